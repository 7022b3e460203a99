#!/bin/bash
# The log feed's price on the single-row upsert (docs/SCALING.md, "What the change feed costs a
# write"): the library's upsert of memory health with migration 6's triggers, and after
# `migrate feed log` with READERS bot processes decoding the log, each against a copy of the
# table without triggers and with no reader running, in the same round.
# Usage: docs/feed-cost/log.sh URL CLI [ROUNDS] [READERS], URL a database migrated to the last
# migration that nothing else uses, on a server with wal_level = logical (the script creates
# tables fc_* in it and switches its feed; it leaves the feed on the triggers), CLI the
# strategic-cache binary. Prints one line per pgbench run: variant, writers, transactions a
# second. SECONDS_PER_RUN changes the 8 s of each run.
set -euo pipefail
url=$1
cli=$2
rounds=${3:-3}
readers=${4:-2}
here=$(dirname "$0")
psql -q -v ON_ERROR_STOP=1 "$url" -f "$here/setup.sql" >/dev/null
script() { # table: the library's upsert statement of memory health, on `table`
  cat <<SQL
\set u random(1, 10000)
INSERT INTO $1 (user_id, bot_name, memory_snapshot, avg_memory_age_hours, retrieval_frequency_trend, forgetting_risk_memories, computed_at, expires_at) VALUES ('user-' || :u, 'bench-bot', '{"memories": 12, "recent": ["a", "b", "c"]}'::jsonb, 3.5, 'stable', '[]'::jsonb, now(), now() + interval '1 hour') ON CONFLICT (user_id, bot_name) DO UPDATE SET memory_snapshot = EXCLUDED.memory_snapshot, avg_memory_age_hours = EXCLUDED.avg_memory_age_hours, retrieval_frequency_trend = EXCLUDED.retrieval_frequency_trend, forgetting_risk_memories = EXCLUDED.forgetting_risk_memories, computed_at = EXCLUDED.computed_at, expires_at = EXCLUDED.expires_at WHERE $1.computed_at <= EXCLUDED.computed_at RETURNING *;
SQL
}
tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  "$cli" --database-url "$url" migrate feed triggers >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT
script fc_plain >"$tmp/none.sql"
script strategic_memory_health >"$tmp/feed.sql"
for t in fc_plain strategic_memory_health; do
  psql -q -v ON_ERROR_STOP=1 "$url" -c "INSERT INTO $t (user_id, bot_name, memory_snapshot, expires_at)
    SELECT 'user-' || i, 'bench-bot', '{}', now() + interval '1 hour' FROM generate_series(1, 10000) i
    ON CONFLICT (user_id, bot_name) DO NOTHING" >/dev/null
done
bench() { # variant script writers
  pgbench -n -T "${SECONDS_PER_RUN:-8}" -c "$3" -j "$3" -M prepared -f "$tmp/$2.sql" "$url" 2>&1 |
    awk -v v="$1" -v c="$3" '/^tps/ {print v, "writers=" c, $3}'
}
for r in $(seq "$rounds"); do
  for c in 1 8; do
    # The trigger feed (readers make no difference to it: the cost is in the writer's commit).
    "$cli" --database-url "$url" migrate feed triggers >/dev/null
    bench none none "$c"
    bench triggers feed "$c"
    # The log feed, READERS bot processes decoding it (each a near tier, as a bot's is).
    "$cli" --database-url "$url" migrate feed log >/dev/null
    pids=()
    for i in $(seq "$readers"); do
      "$cli" --database-url "$url" watch --user user-1 --bot bench-bot --interval-ms 1000 >/dev/null 2>&1 &
      pids+=($!)
    done
    sleep 2
    slots=$(psql -At "$url" -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'strategic_cache_%'")
    bench "log(slots=$slots)" feed "$c"
    bench "none-while-decoding" none "$c"
    for p in "${pids[@]}"; do kill "$p"; wait "$p" 2>/dev/null || true; done
    pids=()
  done
done
