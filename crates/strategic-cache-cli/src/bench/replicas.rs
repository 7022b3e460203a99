//! The replica cases, run when `bench` is given replicas (`--replica URL`): the read cases
//! again through a repository that reads from the replicas, beside the same reads on the
//! primary in the same run, and the replication lag as a reader sees it.
//!
//! - `replica_single_read`, `replica_single_read_10`, `replica_snapshot`, `replica_snapshot_10`:
//!   as `single_read`, ..., through a reader whose repository has the replicas; which server
//!   answered is counted by the repository (`servers()`) and reported beside the rows.
//! - `replica_lag`: a new value committed on the primary through the repository, then read
//!   back on each replica (a bare connection polling the row) until it is there: the time from
//!   the commit's acknowledgement to the row being visible, one sample per replica per commit.
//!   The polling overstates each sample by at most one round trip.
//!
//! The replicas must follow the primary the bench writes to (streaming replication of the
//! same database): the scratch schema is created on the primary and replayed on them, and
//! the cases wait until they have replayed the fill.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::json;
use strategic_cache::prelude::*;
use strategic_cache::{
    Key, MemoryHealth, NewEntry, PgCacheRepository, PgConfig, ServerRole, ServerStats, WriteOutcome,
};
use tokio_postgres::NoTls;

use crate::context::Replicas;

use super::cases::{Bench, CONCURRENCY, drive};
use super::data::Shape;
use super::stats::{Case, Samples};

/// How long the replicas may take to replay the fill before the bench gives up.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(300);

/// The key the lag case writes (outside the data set's users, so no read case sees it).
const LAG_USER: &str = "bench-replica-lag";

fn replica_reads(servers: &[ServerStats]) -> u64 {
    servers
        .iter()
        .filter(|s| matches!(s.role, ServerRole::Replica))
        .map(|s| s.reads)
        .sum()
}

fn primary_reads(servers: &[ServerStats]) -> u64 {
    servers
        .iter()
        .filter(|s| matches!(s.role, ServerRole::Primary))
        .map(|s| s.reads)
        .sum()
}

impl Bench {
    /// The replica cases; returns what the report shows beside them (how long the replicas
    /// took to replay the fill, and which servers answered the replica cases).
    pub(super) async fn replica_cases(
        &mut self,
        primary_url: &str,
        admin: &sea_orm::DatabaseConnection,
        replicas: &Replicas,
    ) -> Result<serde_json::Value> {
        self.step("replicas: catching up");
        let caught_up = catch_up(admin, &replicas.urls).await?;
        let repo = Arc::new(
            PgCacheRepository::connect(
                primary_url,
                replicas.config(PgConfig {
                    max_connections: self.args.pool.max(1),
                    min_connections: self.args.pool.max(1),
                    ..PgConfig::default()
                }),
            )
            .await?,
        );
        let started = Instant::now();
        while !repo
            .servers()
            .iter()
            .filter(|s| matches!(s.role, ServerRole::Replica))
            .all(|s| s.eligible)
        {
            if started.elapsed() > Duration::from_secs(30) {
                bail!(
                    "the replicas are not within --max-replica-lag-ms of the primary after 30 s: {:?}",
                    repo.servers()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let reader = self.reader_on(repo.clone());
        // Opens the replicas' pool connections before anything is timed, as `warm_up` does
        // for the primary's.
        let shape = self.shape;
        let warm = reader.clone();
        drive(
            self.args.pool,
            (self.args.reads / 2).max(100),
            None,
            move |_, k| {
                let reader = warm.clone();
                async move {
                    let (u, b) = shape.fresh_key(7, k);
                    reader.snapshot(&Shape::user(u), &Shape::bot(b)).await;
                    Ok(0.0)
                }
            },
        )
        .await;

        let before = repo.servers();
        let reads = self.args.reads;
        for (name, tasks, seed) in [
            ("replica_single_read", 1, 100),
            ("replica_single_read_10", CONCURRENCY, 200),
        ] {
            self.reader_reads(
                self.reader_on(repo.clone()),
                name,
                tasks,
                reads,
                move |t, k| shape.fresh_key(seed + u64::from(t), k),
            )
            .await;
        }
        for (name, tasks, seed) in [
            ("replica_snapshot", 1, 500),
            ("replica_snapshot_10", CONCURRENCY, 600),
        ] {
            self.reader_snapshots(self.reader_on(repo.clone()), name, tasks, reads, None, seed)
                .await;
        }
        let after = repo.servers();

        self.step("replica_lag");
        let lag = lag_case(&self.repo, &replicas.urls, self.args.lag_samples).await?;
        self.cases.push(lag);
        Ok(json!({
            "replicas": replicas.urls.len(),
            "max_replica_lag_ms": replicas.max_lag.as_millis() as u64,
            "fill_replayed_after_s": caught_up.as_secs_f64(),
            "replica_case_reads_on_replicas": replica_reads(&after) - replica_reads(&before),
            "replica_case_reads_on_primary": primary_reads(&after) - primary_reads(&before),
        }))
    }
}

/// Waits until every replica has replayed what the primary had written when called (the
/// fill); returns how long that took.
async fn catch_up(admin: &sea_orm::DatabaseConnection, urls: &[String]) -> Result<Duration> {
    use sea_orm::{ConnectionTrait, DbBackend, Statement};
    let started = Instant::now();
    let row = admin
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT pg_current_wal_insert_lsn()::text AS lsn",
        ))
        .await?
        .context("no LSN from the primary")?;
    let lsn: String = row.try_get("", "lsn")?;
    for url in urls {
        let (client, connection) = tokio_postgres::connect(url, NoTls)
            .await
            .with_context(|| format!("cannot connect to replica {}", redact(url)))?;
        tokio::spawn(connection);
        loop {
            let row = client
                .query_one(
                    "SELECT pg_is_in_recovery(), \
                            coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                    &[&lsn],
                )
                .await?;
            if !row.get::<_, bool>(0) {
                bail!(
                    "{} is not a replica (not in recovery): give --replica only servers that \
                     stream from the primary",
                    redact(url)
                );
            }
            if row.get::<_, bool>(1) {
                break;
            }
            if started.elapsed() > CATCH_UP_LIMIT {
                bail!(
                    "replica {} has not replayed the fill after {CATCH_UP_LIMIT:?}: does it \
                     stream from the primary given with --database-url?",
                    redact(url)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(started.elapsed())
}

/// `url` with its password, if any, hidden.
fn redact(url: &str) -> String {
    migration::runner::redact_url(url)
}

/// `samples` commits on the primary through `repo`, each read back on every replica until
/// visible: one latency per (commit, replica), from the commit's acknowledgement.
async fn lag_case(repo: &PgCacheRepository, urls: &[String], samples: u64) -> Result<Case> {
    let mut clients = Vec::new();
    for url in urls {
        let (client, connection) = tokio_postgres::connect(url, NoTls)
            .await
            .with_context(|| format!("cannot connect to replica {}", redact(url)))?;
        tokio::spawn(connection);
        let statement = client
            .prepare(
                "SELECT avg_memory_age_hours FROM strategic_memory_health \
                 WHERE user_id = $1 AND bot_name = $2",
            )
            .await?;
        clients.push(Arc::new((client, statement)));
    }
    let bot = Shape::bot(0);
    let key = Key::user_bot(LAG_USER, &bot);
    let mut out = Samples::default();
    let started = Instant::now();
    for version in 1..=samples.max(1) {
        let entry = NewEntry::new(
            key.clone(),
            MemoryHealth {
                memory_snapshot: json!({ "lag_probe": version }),
                avg_memory_age_hours: Some(version as f64),
                ..MemoryHealth::default()
            },
        );
        if repo.upsert(&entry).await? != WriteOutcome::Written {
            bail!("the lag probe's write was not written");
        }
        let acked = Instant::now();
        // Every replica polled at once, each in a task of its own: a sample is not delayed by
        // another replica's.
        let mut polls = tokio::task::JoinSet::new();
        for replica in &clients {
            let (replica, bot) = (replica.clone(), bot.clone());
            polls.spawn(async move {
                let (client, statement) = &*replica;
                loop {
                    let row = client.query_opt(statement, &[&LAG_USER, &bot]).await?;
                    let seen: Option<f64> = row.and_then(|r| r.get(0));
                    if seen.is_some_and(|v| v >= version as f64) {
                        return Ok::<_, anyhow::Error>(acked.elapsed());
                    }
                    if acked.elapsed() > Duration::from_secs(30) {
                        bail!("a commit was not visible on a replica after 30 s");
                    }
                }
            });
        }
        while let Some(lag) = polls.join_next().await {
            let lag = lag.context("a lag poll panicked")??;
            out.latencies_ns
                .push(u64::try_from(lag.as_nanos()).unwrap_or(u64::MAX));
            out.hits += 1.0;
        }
        // Apart, as commits of a refresh worker are: a lag sample, not a write benchmark.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    out.wall = started.elapsed();
    let mut case = Case::from_samples("replica_lag", "commit", out, 1.0);
    case.unit = "commit on the primary -> visible on a replica (throughput: samples/s)".into();
    Ok(case)
}
