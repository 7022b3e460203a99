//! A private primary with streaming replicas: the test's own [`PgCluster`]s on loopback, a
//! migrated `cache` database on the primary that the replicas follow, and the faults a replica
//! set has (a replica or the primary stopped and started, replay paused), plus the replication
//! lag as measured (a commit on the primary → the row visible on a replica).
//!
//! Each server is small (16 MB of shared buffers, fsync off) and everything is removed on drop.
//! The database is created and migrated before the replicas are copied, so they start with it.

use std::time::{Duration, Instant};

use sea_orm::ConnectionTrait;
use tokio_postgres::{Client, NoTls};

use super::cluster::PgCluster;
use super::db::connect;
use super::timing::poll_until;

/// The database the cache lives in, on the primary and (by replication) on every replica.
pub const DATABASE: &str = "cache";

/// Options of every server of a set: small, and quick to reconnect. `wal_retrieve_retry_interval`
/// is how long a replica waits before trying the primary again (5 s by default).
const OPTIONS: &str = "-c shared_buffers=16MB -c wal_retrieve_retry_interval=100ms";

/// How long a replica may take to (re)connect and stream.
const STREAMING_LIMIT: Duration = Duration::from_secs(30);

/// A primary and its streaming replicas.
pub struct ReplicaSet {
    // Replicas first: dropped (stopped) before the primary they stream from.
    replicas: Vec<PgCluster>,
    primary: PgCluster,
}

/// A one-off connection with the test's short bounds (plain tokio-postgres: the harness asks
/// servers about replication, not the cache).
pub async fn client(url: &str) -> Result<Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    config.connect_timeout(Duration::from_secs(5));
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// The name a replica reports to its primary (`application_name` in `pg_stat_replication`).
fn replica_name(i: usize) -> String {
    format!("sc_replica_{i}")
}

impl ReplicaSet {
    /// A primary with the `cache` database migrated, and `n` replicas streaming from it.
    pub async fn start(n: usize) -> ReplicaSet {
        super::db::init_tracing();
        let primary = PgCluster::start_with(OPTIONS).await;
        {
            let admin = connect(&primary.url("postgres")).await;
            admin
                .execute_unprepared(
                    "CREATE TABLE sc_lag_probe (n bigint PRIMARY KEY, at timestamptz NOT NULL)",
                )
                .await
                .unwrap();
            let _ = admin.close().await;
        }
        primary.migrated(DATABASE).await;
        let mut replicas = Vec::new();
        for i in 0..n {
            let options = format!("{OPTIONS} -c cluster_name={}", replica_name(i));
            replicas.push(PgCluster::replica_of(&primary, &options).await);
        }
        let set = ReplicaSet { replicas, primary };
        for i in 0..n {
            set.wait_streaming(i).await;
        }
        set
    }

    /// The primary.
    pub fn primary(&self) -> &PgCluster {
        &self.primary
    }

    /// Replica `i`.
    pub fn replica(&self, i: usize) -> &PgCluster {
        &self.replicas[i]
    }

    /// The URL of the cache database on the primary.
    pub fn primary_url(&self) -> String {
        self.primary.url(DATABASE)
    }

    /// The URLs of the cache database on every replica, in order.
    pub fn replica_urls(&self) -> Vec<String> {
        self.replicas.iter().map(|r| r.url(DATABASE)).collect()
    }

    /// Waits until replica `i` is in recovery and its primary shows it streaming.
    pub async fn wait_streaming(&self, i: usize) {
        let name = replica_name(i);
        let replica_url = self.replicas[i].url("postgres");
        let primary_url = self.primary.url("postgres");
        let streaming = poll_until(STREAMING_LIMIT, || async {
            let Ok(replica) = client(&replica_url).await else {
                return false;
            };
            let in_recovery = replica
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .is_ok_and(|row| row.get::<_, bool>(0));
            let Ok(primary) = client(&primary_url).await else {
                return false;
            };
            in_recovery
                && primary
                    .query_one(
                        "SELECT count(*) FROM pg_stat_replication \
                         WHERE application_name = $1 AND state = 'streaming'",
                        &[&name],
                    )
                    .await
                    .is_ok_and(|row| row.get::<_, i64>(0) == 1)
        })
        .await;
        assert!(
            streaming.is_some(),
            "replica {i} not streaming after {STREAMING_LIMIT:?}"
        );
    }

    /// Stops replica `i` at once (`pg_ctl stop -m immediate`).
    pub async fn stop_replica(&self, i: usize) {
        self.replicas[i].stop_immediate().await;
    }

    /// Starts replica `i` again and waits until it streams.
    pub async fn start_replica(&self, i: usize) {
        self.replicas[i].start_server().await;
        self.wait_streaming(i).await;
    }

    /// Stops the primary at once (`pg_ctl stop -m immediate`); the replicas stay up, in
    /// recovery, serving reads of what they have replayed.
    pub async fn stop_primary(&self) {
        self.primary.stop_immediate().await;
    }

    /// Starts the primary again and waits until every running replica streams from it.
    pub async fn start_primary(&self) {
        self.primary.start_server().await;
        for i in 0..self.replicas.len() {
            self.wait_streaming(i).await;
        }
    }

    /// Pauses WAL replay on replica `i` and waits until it is paused: from then on it serves
    /// what it had replayed, however much the primary commits.
    pub async fn pause_replay(&self, i: usize) {
        let replica = client(&self.replicas[i].url("postgres")).await.unwrap();
        replica
            .execute("SELECT pg_wal_replay_pause()", &[])
            .await
            .unwrap();
        let paused = poll_until(Duration::from_secs(10), || async {
            replica
                .query_one("SELECT pg_get_wal_replay_pause_state()", &[])
                .await
                .is_ok_and(|row| row.get::<_, String>(0) == "paused")
        })
        .await;
        assert!(paused.is_some(), "replay on replica {i} never paused");
    }

    /// Resumes WAL replay on replica `i`.
    pub async fn resume_replay(&self, i: usize) {
        let replica = client(&self.replicas[i].url("postgres")).await.unwrap();
        replica
            .execute("SELECT pg_wal_replay_resume()", &[])
            .await
            .unwrap();
    }

    /// Replication lag as measured: from the acknowledgement of a commit on the primary to
    /// the committed row being visible on replica `i` (polled every 0.5 ms, so the figure
    /// overstates it by at most that and one round trip). `None` if not visible within
    /// `limit`.
    pub async fn lag(&self, i: usize, limit: Duration) -> Option<Duration> {
        let primary = client(&self.primary.url("postgres")).await.unwrap();
        let replica = client(&self.replicas[i].url("postgres")).await.unwrap();
        lag_sample(&primary, &replica, limit).await
    }

    /// Waits until replica `i` has replayed everything the primary had committed when called.
    pub async fn wait_caught_up(&self, i: usize) {
        let lag = self.lag(i, STREAMING_LIMIT).await;
        assert!(lag.is_some(), "replica {i} never caught up");
    }
}

/// One lag sample over open connections: a row committed on `primary`, polled for on
/// `replica` until visible (or `limit`). The row's key is unique per sample.
pub async fn lag_sample(primary: &Client, replica: &Client, limit: Duration) -> Option<Duration> {
    static SAMPLE: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    let n = SAMPLE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        + i64::from(std::process::id()) * 1_000_000_000;
    primary
        .execute("INSERT INTO sc_lag_probe (n, at) VALUES ($1, now())", &[&n])
        .await
        .unwrap();
    let acked = Instant::now();
    loop {
        let seen = replica
            .query_opt("SELECT 1 FROM sc_lag_probe WHERE n = $1", &[&n])
            .await
            .is_ok_and(|row| row.is_some());
        if seen {
            return Some(acked.elapsed());
        }
        if acked.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}
