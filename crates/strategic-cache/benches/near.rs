//! The near tier against PostgreSQL at `DATABASE_URL` (a base URL; a scratch
//! database is created and dropped): a near snapshot hit and a near single-entry hit against
//! the database snapshot of the same run, a warm burst of 200 concurrent snapshots, and a
//! 1,000-row `upsert_many` of 1.2 KB rows with the notify triggers against the same without
//! them (one listener draining). Prints percentiles; skipped without `DATABASE_URL`.
//!
//! `DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable cargo bench -p strategic-cache --bench near`

#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use migration::runner::{self, Command, MigrateOptions};
use sea_orm::{ConnectionTrait, Database};
use strategic_cache::prelude::*;
use strategic_cache::{
    CacheReader, CacheRepository, Component, ConversationPatterns, EngagementOpportunities, Key,
    MemoryBehavior, MemoryHealth, NearConfig, NewEntry, Payload, PersonalityProfile,
    PgCacheRepository, PgConfig,
};

const BOT: &str = "elena";
const USERS: usize = 200;

fn pad() -> serde_json::Value {
    serde_json::json!({ "text": "x".repeat(1100) })
}

fn entries(user: &str) -> Vec<NewEntry> {
    let payloads: [Payload; 5] = [
        MemoryHealth {
            memory_snapshot: pad(),
            ..MemoryHealth::default()
        }
        .into(),
        PersonalityProfile {
            dominant_traits: Some(pad()),
            ..PersonalityProfile::default()
        }
        .into(),
        ConversationPatterns {
            recent_topics: Some(pad()),
            ..ConversationPatterns::default()
        }
        .into(),
        MemoryBehavior {
            forgetting_curve_params: Some(pad()),
            ..MemoryBehavior::default()
        }
        .into(),
        EngagementOpportunities {
            suggested_topics: Some(pad()),
            ..EngagementOpportunities::default()
        }
        .into(),
    ];
    payloads
        .into_iter()
        .map(|p| NewEntry::new(Key::user_bot(user, BOT), p))
        .collect()
}

fn percentiles(name: &str, mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "{name:<34} n={:<7} p50={:>10.2?} p95={:>10.2?} p99={:>10.2?}",
        samples.len(),
        at(0.50),
        at(0.95),
        at(0.99)
    );
    (at(0.50), at(0.99))
}

fn with_database(base: &str, name: &str) -> String {
    let (url, query) = base.split_once('?').unwrap_or((base, ""));
    let root = url.rsplit_once('/').map_or(url, |(root, _)| root);
    if query.is_empty() {
        format!("{root}/{name}")
    } else {
        format!("{root}/{name}?{query}")
    }
}

async fn burst(reader: &CacheReader) -> Duration {
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(USERS);
    for u in 0..USERS {
        let reader = reader.clone();
        tasks.push(tokio::spawn(async move {
            reader
                .snapshot_shared(&format!("user-{u}"), BOT)
                .await
                .len()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    started.elapsed()
}

async fn batches(repo: &PgCacheRepository, rounds: usize, seed: usize) -> f64 {
    let started = Instant::now();
    for r in 0..rounds {
        let batch: Vec<NewEntry> = (0..1000)
            .map(|i| {
                NewEntry::new(
                    Key::user_bot(format!("bulk-{i}"), "bulkbot"),
                    MemoryHealth {
                        memory_snapshot: serde_json::json!({ "r": seed + r, "text": "y".repeat(1150) }),
                        ..MemoryHealth::default()
                    },
                )
            })
            .collect();
        repo.upsert_many(&batch).await.unwrap();
    }
    rounds as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let Ok(base) = std::env::var("DATABASE_URL") else {
        println!("near bench skipped: set DATABASE_URL to a base URL");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let name = format!("sc_near_bench_{}", std::process::id());
        let admin = Database::connect(&base).await.unwrap();
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let url = with_database(&base, &name);
        let options = MigrateOptions::default();
        let db = runner::connect(&url, &options).await.unwrap();
        runner::run(&db, Command::Up, &options).await.unwrap();

        let repo = Arc::new(
            PgCacheRepository::connect(&url, PgConfig::default())
                .await
                .unwrap(),
        );
        for u in 0..USERS {
            repo.upsert_many(&entries(&format!("user-{u}")))
                .await
                .unwrap();
        }
        let db_reader = CacheReader::new(repo.clone() as Arc<dyn CacheRepository>);
        let near = repo.near_tier(&NearConfig::default()).unwrap();
        let near_reader = CacheReader::new(repo.clone()).with_near(near);
        // Warm: until the lease is held and every snapshot and one entry is in memory.
        for _ in 0..100 {
            for u in 0..USERS {
                near_reader.snapshot(&format!("user-{u}"), BOT).await;
                near_reader
                    .get(Component::MemoryHealth, &format!("user-{u}"), BOT)
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let before = near_reader.stats().near_hits;
            near_reader.snapshot("user-0", BOT).await;
            if near_reader.stats().near_hits > before {
                break;
            }
        }
        for u in 0..USERS {
            near_reader.snapshot(&format!("user-{u}"), BOT).await;
            near_reader
                .get(Component::MemoryHealth, &format!("user-{u}"), BOT)
                .await;
        }

        let mut db_samples = Vec::new();
        for i in 0..3000 {
            let user = format!("user-{}", i % USERS);
            let t = Instant::now();
            std::hint::black_box(db_reader.snapshot(&user, BOT).await);
            db_samples.push(t.elapsed());
        }
        let users: Vec<String> = (0..USERS).map(|u| format!("user-{u}")).collect();
        let hits_before = near_reader.stats().near_hits;
        let mut near_samples = Vec::new();
        let mut get_samples = Vec::new();
        let mut shared_samples = Vec::new();
        for i in 0..200_000 {
            let user = &users[i % USERS];
            let t = Instant::now();
            std::hint::black_box(near_reader.snapshot(user, BOT).await);
            near_samples.push(t.elapsed());
            let t = Instant::now();
            std::hint::black_box(near_reader.get(Component::MemoryHealth, user, BOT).await);
            get_samples.push(t.elapsed());
            let t = Instant::now();
            std::hint::black_box(near_reader.snapshot_shared(user, BOT).await);
            shared_samples.push(t.elapsed());
        }
        let near_hits = near_reader.stats().near_hits - hits_before;
        let (db_p50, _) = percentiles("db snapshot", db_samples);
        let (_, near_p99) = percentiles("near snapshot hit", near_samples);
        percentiles("near single-entry hit", get_samples);
        let (_, shared_p99) = percentiles("near snapshot hit (shared Arc)", shared_samples);
        println!(
            "near hits {near_hits} of {} component reads; db snapshot p50 / near p99: {:.0}x \
             (owned snapshot), {:.0}x (shared)",
            200_000 * 12 + 200_000,
            db_p50.as_secs_f64() / near_p99.as_secs_f64(),
            db_p50.as_secs_f64() / shared_p99.as_secs_f64()
        );

        let mut warm = Vec::new();
        let mut cold = Vec::new();
        for _ in 0..50 {
            warm.push(burst(&near_reader).await);
            cold.push(burst(&db_reader).await);
        }
        percentiles("warm burst of 200 (near)", warm);
        percentiles("burst of 200 (db, no near tier)", cold);

        // One listener draining the bulk bot's channel, as a bot process serving it would.
        let _listening = near_reader
            .get(Component::MemoryHealth, "bulk-0", "bulkbot")
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let tables = migration::CACHE_TABLES;
        let (mut with, mut without) = (Vec::new(), Vec::new());
        batches(&repo, 2, 0).await; // warm-up
        for round in 0..3 {
            with.push(batches(&repo, 8, round * 100).await);
            for t in tables {
                db.execute_unprepared(&format!("ALTER TABLE {t} DISABLE TRIGGER USER"))
                    .await
                    .unwrap();
            }
            without.push(batches(&repo, 8, round * 100 + 50).await);
            for t in tables {
                db.execute_unprepared(&format!("ALTER TABLE {t} ENABLE TRIGGER USER"))
                    .await
                    .unwrap();
            }
        }
        with.sort_by(f64::total_cmp);
        without.sort_by(f64::total_cmp);
        println!(
            "upsert_many 1000 x 1.2 KB: with triggers {:.1} batches/s, without {:.1}/s: {:.2}x \
             (medians of 3 rounds {with:.1?} / {without:.1?})",
            with[1],
            without[1],
            with[1] / without[1]
        );
        println!("near tier: {:?}", near_reader.near_stats());

        drop(near_reader);
        let _ = db.close().await;
        repo.connection().clone().close().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    });
}
