//! The reads under `Pooler::PgBouncerTransaction` against PostgreSQL at `DATABASE_URL` (a base
//! URL; a scratch database is created and dropped): a repository lookup and a snapshot, each
//! timed three ways in one run, interleaved read by read so that they share the machine's
//! state: the default prepared read direct to PostgreSQL (`prepared_direct`), the setting's
//! simple-query read with its values inlined, direct too (`inline_direct`: the setting's own
//! cost), and the same through a PgBouncer in transaction pooling that the bench starts on
//! loopback (`inline_pgbouncer`: the pooler's cost on top). Five rounds; prints each round's
//! percentiles, then the median over the rounds of each p50 and p95 and their ratios to
//! `prepared_direct`. Skipped without `DATABASE_URL`; the PgBouncer rows without `pgbouncer`
//! on the PATH (Debian package `pgbouncer`).
//!
//! `DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable cargo bench -p strategic-cache --bench pooler`

#![allow(missing_docs, clippy::unwrap_used)]

use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use migration::runner::{self, MigrateOptions};
use sea_orm::sqlx::postgres::PgConnectOptions;
use sea_orm::{ConnectionTrait, Database};
use strategic_cache::prelude::*;
use strategic_cache::{
    Component, Key, MemoryHealth, NewEntry, PersonalityProfile, PgCacheRepository, PgConfig, Pooler,
};

const BOT: &str = "elena";
const USERS: usize = 200;
const READS: usize = 2000;
const ROUNDS: usize = 5;

fn with_database(base: &str, name: &str) -> String {
    let (url, query) = base.split_once('?').unwrap_or((base, ""));
    let root = url.rsplit_once('/').map_or(url, |(root, _)| root);
    if query.is_empty() {
        format!("{root}/{name}")
    } else {
        format!("{root}/{name}?{query}")
    }
}

/// `url` with its host and port replaced by `127.0.0.1:port`.
fn at_port(url: &str, port: u16) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (userinfo, rest) = rest.rsplit_once('@').map_or(("", rest), |(u, r)| (u, r));
    let path = &rest[rest.find('/').unwrap_or(rest.len())..];
    let at = if userinfo.is_empty() { "" } else { "@" };
    format!("{scheme}://{userinfo}{at}127.0.0.1:{port}{path}")
}

/// A PgBouncer in transaction pooling in front of the server of `url`, on a free loopback
/// port, trusting the URL's user; run as the `postgres` OS user when the bench runs as root
/// (PgBouncer refuses root). `None` without `pgbouncer` on the PATH.
fn start_pgbouncer(url: &str, dir: &std::path::Path) -> Option<(Child, u16)> {
    let server = PgConnectOptions::from_str(url).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("userlist.txt"),
        format!("\"{}\" \"\"\n", server.get_username()),
    )
    .unwrap();
    std::fs::write(
        dir.join("pgbouncer.ini"),
        format!(
            "[databases]\n* = host={} port={}\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
             listen_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {}\n\
             pool_mode = transaction\nmax_client_conn = 100\ndefault_pool_size = 4\n",
            server.get_host(),
            server.get_port(),
            dir.join("userlist.txt").display()
        ),
    )
    .unwrap();
    let mut command = Command::new("pgbouncer");
    command
        .arg(dir.join("pgbouncer.ini"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if root {
        let id = |flag: &str| -> u32 {
            let out = Command::new("id")
                .args([flag, "postgres"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        };
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir)
            .status();
        command.uid(id("-u")).gid(id("-g"));
    }
    let child = command.spawn().ok()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "pgbouncer is not listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((child, port))
}

fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    (us(at(0.50)), us(at(0.95)))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let Ok(base) = std::env::var("DATABASE_URL") else {
        println!("pooler bench skipped: set DATABASE_URL to a base URL");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let name = format!("sc_pooler_bench_{}", std::process::id());
        let admin = Database::connect(&base).await.unwrap();
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let url = with_database(&base, &name);
        let options = MigrateOptions::default();
        let db = runner::connect(&url, &options).await.unwrap();
        runner::run(&db, runner::Command::Up, &options)
            .await
            .unwrap();
        db.close().await.unwrap();

        let config = |pooler| PgConfig {
            max_connections: 2,
            min_connections: 2,
            pooler,
            ..PgConfig::default()
        };
        let prepared = Arc::new(
            PgCacheRepository::connect(&url, config(Pooler::None))
                .await
                .unwrap(),
        );
        for u in 0..USERS {
            let user = format!("user-{u}");
            prepared
                .upsert_many(&[
                    NewEntry::new(
                        Key::user_bot(&user, BOT),
                        MemoryHealth {
                            memory_snapshot: serde_json::json!({ "text": "x".repeat(1100) }),
                            ..MemoryHealth::default()
                        },
                    ),
                    NewEntry::new(
                        Key::user_bot(&user, BOT),
                        PersonalityProfile {
                            dominant_traits: Some(serde_json::json!({ "t": "y".repeat(1100) })),
                            ..PersonalityProfile::default()
                        },
                    ),
                ])
                .await
                .unwrap();
        }
        let inline = Arc::new(
            PgCacheRepository::connect(&url, config(Pooler::PgBouncerTransaction))
                .await
                .unwrap(),
        );
        let dir = std::env::temp_dir().join(format!("sc-pooler-bench-{}", std::process::id()));
        let bouncer = start_pgbouncer(&url, &dir);
        let mut variants: Vec<(&str, Arc<PgCacheRepository>)> = vec![
            ("prepared_direct", prepared.clone()),
            ("inline_direct", inline),
        ];
        match &bouncer {
            Some((_, port)) => {
                let through = PgCacheRepository::connect(
                    &at_port(&url, *port),
                    config(Pooler::PgBouncerTransaction),
                )
                .await
                .unwrap();
                variants.push(("inline_pgbouncer", Arc::new(through)));
            }
            None => println!("pgbouncer not on the PATH: its rows are skipped"),
        }

        for read in ["lookup", "snapshot"] {
            let mut p50s = vec![Vec::new(); variants.len()];
            let mut p95s = vec![Vec::new(); variants.len()];
            for round in 0..=ROUNDS {
                let mut samples = vec![Vec::with_capacity(READS); variants.len()];
                for i in 0..READS {
                    let user = format!("user-{}", (i * 7 + round) % USERS);
                    let key = Key::user_bot(&user, BOT);
                    for (v, (_, repo)) in variants.iter().enumerate() {
                        let t = Instant::now();
                        let found = if read == "lookup" {
                            repo.lookup(Component::MemoryHealth, &key)
                                .await
                                .unwrap()
                                .into_fresh()
                                .is_some()
                        } else {
                            repo.snapshot(&user, BOT, 168).await.unwrap().len() == 2
                        };
                        samples[v].push(t.elapsed());
                        assert!(found, "{read} of {user} found nothing");
                    }
                }
                // Round 0 warms the pools and the server's caches and is not counted.
                if round == 0 {
                    continue;
                }
                for (v, s) in samples.into_iter().enumerate() {
                    let (p50, p95) = percentiles(s);
                    println!(
                        "round {round} {read:<8} {:<17} p50={p50:>7.1} us p95={p95:>7.1} us",
                        variants[v].0
                    );
                    p50s[v].push(p50);
                    p95s[v].push(p95);
                }
            }
            let base50 = median(p50s[0].clone());
            let base95 = median(p95s[0].clone());
            for (v, (name, _)) in variants.iter().enumerate() {
                let (p50, p95) = (median(p50s[v].clone()), median(p95s[v].clone()));
                println!(
                    "median of {ROUNDS} {read:<8} {name:<17} p50={p50:>7.1} us ({:.2}x) \
                     p95={p95:>7.1} us ({:.2}x)",
                    p50 / base50,
                    p95 / base95
                );
            }
        }

        drop(variants);
        drop(prepared);
        if let Some((mut child, _)) = bouncer {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&dir);
        admin
            .execute_unprepared(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .await
            .unwrap();
    });
}
