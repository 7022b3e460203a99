//! Streaming replicas against real PostgreSQL servers: a private primary with two replicas
//! (`support::replicas`), reads routed to them within `max_replica_lag`, and the faults
//! (a replica stopped, replay paused, the primary stopped) that must not cost a read.

use std::time::{Duration, Instant};

use crate::support::replicas::{ReplicaSet, client, lag_sample};

/// The harness itself: two replicas stream from the primary, a commit becomes visible on
/// them, and a replica whose replay is paused does not see it until resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_replicas_follow_the_primary_and_pause() {
    let started = Instant::now();
    let set = ReplicaSet::start(2).await;
    println!("primary + 2 replicas ready in {:?}", started.elapsed());
    for i in 0..2 {
        let lag = set.lag(i, Duration::from_secs(5)).await;
        println!("replica {i}: lag {lag:?}");
        assert!(lag.is_some(), "replica {i} never saw the commit");
    }
    set.pause_replay(0).await;
    let primary = client(&set.primary().url("postgres")).await.unwrap();
    let paused = client(&set.replica(0).url("postgres")).await.unwrap();
    assert_eq!(
        lag_sample(&primary, &paused, Duration::from_millis(500)).await,
        None,
        "a paused replica saw a new commit"
    );
    set.resume_replay(0).await;
    set.wait_caught_up(0).await;
    set.stop_replica(1).await;
    assert!(client(&set.replica(1).url("postgres")).await.is_err());
    set.start_replica(1).await;
    set.wait_caught_up(1).await;
    println!("whole harness run {:?}", started.elapsed());
}
