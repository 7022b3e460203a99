#!/bin/bash
# The change feed's price on the single-row upsert (docs/SCALING.md, "What the change feed
# costs a write"). Usage: docs/feed-cost/run.sh URL [ROUNDS], URL a database migrated to the
# last migration that nothing else uses (the script creates tables fc_* in it). Prints one line
# per pgbench run: variant, writers, transactions a second. Set PGOPTIONS="-c
# synchronous_commit=off" to see the same without the commit's wait for its WAL flush, and
# SECONDS_PER_RUN to change the 8 s of each run.
set -euo pipefail
url=$1
rounds=${2:-3}
here=$(dirname "$0")
psql -q -v ON_ERROR_STOP=1 "$url" -f "$here/setup.sql" >/dev/null
script() { # table: the library's upsert statement of memory health, on `table`
  cat <<SQL
\set u random(1, 10000)
INSERT INTO $1 (user_id, bot_name, memory_snapshot, avg_memory_age_hours, retrieval_frequency_trend, forgetting_risk_memories, computed_at, expires_at) VALUES ('user-' || :u, 'bench-bot', '{"memories": 12, "recent": ["a", "b", "c"]}'::jsonb, 3.5, 'stable', '[]'::jsonb, now(), now() + interval '1 hour') ON CONFLICT (user_id, bot_name) DO UPDATE SET memory_snapshot = EXCLUDED.memory_snapshot, avg_memory_age_hours = EXCLUDED.avg_memory_age_hours, retrieval_frequency_trend = EXCLUDED.retrieval_frequency_trend, forgetting_risk_memories = EXCLUDED.forgetting_risk_memories, computed_at = EXCLUDED.computed_at, expires_at = EXCLUDED.expires_at WHERE $1.computed_at <= EXCLUDED.computed_at RETURNING *;
SQL
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
script fc_plain >"$tmp/none.sql"
script strategic_memory_health >"$tmp/m6.sql"
script fc_m4 >"$tmp/m4.sql"
script fc_rowtrig >"$tmp/row.sql"
script fc_stmtmin >"$tmp/stmtmin.sql"
# No trigger: the same statement with one pg_notify of the key in it.
script fc_notify | sed 's/^INSERT/WITH w AS (INSERT/; s/RETURNING \*;$/RETURNING *) SELECT pg_notify(strategic_cache_channel(w.bot_name), w.user_id) FROM w;/' >"$tmp/notify.sql"
# Every table starts with its 10,000 rows, so that every run measures updates.
for t in fc_plain strategic_memory_health fc_m4 fc_rowtrig fc_stmtmin fc_notify; do
  psql -q -v ON_ERROR_STOP=1 "$url" -c "INSERT INTO $t (user_id, bot_name, memory_snapshot, expires_at)
    SELECT 'user-' || i, 'bench-bot', '{}', now() + interval '1 hour' FROM generate_series(1, 10000) i
    ON CONFLICT (user_id, bot_name) DO NOTHING" >/dev/null
done
for r in $(seq "$rounds"); do
  for c in 1 8; do
    for v in none m6 m4 notify stmtmin row; do
      pgbench -n -T "${SECONDS_PER_RUN:-8}" -c "$c" -j "$c" -M prepared -f "$tmp/$v.sql" "$url" 2>&1 |
        awk -v v="$v" -v c="$c" '/^tps/ {print v, "writers=" c, $3}'
    done
  done
done
