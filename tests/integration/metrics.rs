//! Metrics export against a real line-protocol server (VictoriaMetrics, Debian package
//! `victoria-metrics`), and the Grafana dashboard checked against the exporter's names.
//!
//! VictoriaMetrics stores an InfluxDB field `f` of measurement `m` as the series `m_f` with the
//! tags as labels, so `strategic_cache_reads,table=..,bot=.. hit=3i` is read back from
//! `/api/v1/export` as `strategic_cache_reads_hit{table="..",bot=".."} 3`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use strategic_cache::metrics::{
    self, ExporterConfig, ExporterHandle, InfluxConfig, MetricsExporter, MetricsRecorder,
};
use strategic_cache::{Component, ReadObserver, ReadOutcome};
use tokio::time::{Instant, sleep};

use crate::support::free_port;
use crate::support::victoria::{Series, VictoriaMetrics};

/// Sum of the values of `metric` per (table, bot).
fn sums(series: &[Series], metric: &str) -> BTreeMap<(String, String), f64> {
    let mut out = BTreeMap::new();
    for s in series.iter().filter(|s| s.labels["__name__"] == metric) {
        let key = (
            s.labels.get("table").cloned().unwrap_or_default(),
            s.labels.get("bot").cloned().unwrap_or_default(),
        );
        *out.entry(key).or_insert(0.0) += s.values.iter().sum::<f64>();
    }
    out
}

fn fast() -> ExporterConfig {
    ExporterConfig {
        flush_interval: Duration::from_millis(100),
        max_pending_windows: 60,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
    }
}

fn key(table: &str, bot: &str) -> (String, String) {
    (table.to_owned(), bot.to_owned())
}

async fn wait_stats(
    handle: &ExporterHandle,
    what: &str,
    ok: impl Fn(metrics::ExporterStats) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ok(handle.stats()) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {:?}",
            handle.stats()
        );
        sleep(Duration::from_millis(10)).await;
    }
}

/// Hostile bot names as recorded, and the `bot` label VictoriaMetrics must show for each.
const HOSTILE: [(&str, &str); 8] = [
    ("elena", "elena"),
    ("bot with space", "bot with space"),
    ("a,b=c", "a,b=c"),
    ("say \"hi\"", "say \"hi\""),
    ("back\\slash\\", "back\\slash\\"),
    ("new\nline", "new line"),
    ("ünïcødé 🤖", "ünïcødé 🤖"),
    ("", "_unnamed"),
];

/// Through the v2 endpoint, one final window carries exact counts, hit rate, latency and age
/// per (table, bot), and hostile bot names arrive as the same tag values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_v2_export_values_and_hostile_tags_reach_the_server() {
    let vm = VictoriaMetrics::start().await;
    let recorder = Arc::new(MetricsRecorder::default());
    for (raw, _) in HOSTILE {
        for _ in 0..3 {
            recorder.on_read(
                Component::MemoryHealth,
                raw,
                ReadOutcome::Hit,
                Duration::from_micros(1_500),
                Some(Duration::from_secs(120)),
            );
        }
        recorder.on_read(
            Component::MemoryHealth,
            raw,
            ReadOutcome::Miss,
            Duration::from_micros(700),
            None,
        );
    }
    recorder
        .record_strategic_cache_metrics("strategic_memory_behavior", false, 2.0, None, "elena")
        .unwrap();
    recorder.on_read(
        Component::MemoryBehavior,
        "elena",
        ReadOutcome::Error,
        Duration::from_millis(50),
        None,
    );
    recorder.on_read(
        Component::MemoryBehavior,
        "elena",
        ReadOutcome::Stale,
        Duration::from_millis(1),
        Some(Duration::from_secs(400)),
    );

    // A long interval: the only window is the one shutdown takes, so the values are exact.
    let sink = InfluxConfig::v2(vm.url(""), "acme", "cache").with_token("not-checked-by-vm");
    let config = ExporterConfig {
        flush_interval: Duration::from_secs(3600),
        ..fast()
    };
    let handle = MetricsExporter::spawn(recorder.clone(), sink, config).unwrap();
    let stats = handle.shutdown().await;
    assert_eq!(
        (
            stats.exported_windows,
            stats.pending_windows,
            stats.export_failures
        ),
        (1, 0, 0)
    );

    let series = vm
        .export_until("strategic_cache_.*", |s| {
            sums(s, "strategic_cache_reads_hit").len() == HOSTILE.len() + 1
        })
        .await;
    let hits = sums(&series, "strategic_cache_reads_hit");
    let expected: BTreeSet<_> = HOSTILE
        .iter()
        .map(|(_, shown)| key("memory_health", shown))
        .chain([key("memory_behavior", "elena")])
        .collect();
    assert_eq!(hits.keys().cloned().collect::<BTreeSet<_>>(), expected);
    for (_, shown) in HOSTILE {
        let k = key("memory_health", shown);
        assert_eq!(hits[&k], 3.0, "{k:?}");
        assert_eq!(sums(&series, "strategic_cache_reads_miss")[&k], 1.0);
        assert_eq!(sums(&series, "strategic_cache_reads_reads")[&k], 4.0);
        assert_eq!(sums(&series, "strategic_cache_reads_hit_rate")[&k], 0.75);
        assert_eq!(
            sums(&series, "strategic_cache_reads_latency_max_us")[&k],
            1500.0
        );
        // p50 is rank 2 of [700, 1500, 1500, 1500]: the 1500 µs bucket, capped at the max.
        assert_eq!(
            sums(&series, "strategic_cache_reads_latency_p50_us")[&k],
            1500.0
        );
        assert_eq!(sums(&series, "strategic_cache_reads_age_max_s")[&k], 120.0);
    }
    let behavior = key("memory_behavior", "elena");
    assert_eq!(sums(&series, "strategic_cache_reads_error")[&behavior], 1.0);
    assert_eq!(sums(&series, "strategic_cache_reads_stale")[&behavior], 1.0);
    assert_eq!(sums(&series, "strategic_cache_reads_miss")[&behavior], 1.0);
    assert_eq!(
        sums(&series, "strategic_cache_reads_latency_max_us")[&behavior],
        50_000.0
    );
    assert_eq!(
        sums(&series, "strategic_cache_reads_age_max_s")[&behavior],
        400.0
    );
    // No label other than table and bot, so never a user id.
    for s in series
        .iter()
        .filter(|s| s.labels["__name__"].starts_with("strategic_cache_reads_"))
    {
        let labels: BTreeSet<&str> = s.labels.keys().map(String::as_str).collect();
        assert_eq!(
            labels,
            BTreeSet::from(["__name__", "bot", "table"]),
            "{s:?}"
        );
    }
    let dropped = series
        .iter()
        .filter(|s| s.labels["__name__"] == "strategic_cache_exporter_dropped_windows")
        .collect::<Vec<_>>();
    assert!(
        !dropped.is_empty(),
        "the exporter wrote no dropped_windows series"
    );
    assert!(
        dropped.iter().all(|s| s.values.iter().all(|v| *v == 0.0)),
        "windows were dropped: {dropped:?}"
    );
}

/// Through the 1.x `/write` endpoint, periodic windows deliver every read exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_v1_periodic_export_delivers_every_read_once() {
    let vm = VictoriaMetrics::start().await;
    let recorder = Arc::new(MetricsRecorder::default());
    let handle = MetricsExporter::spawn(
        recorder.clone(),
        InfluxConfig::v1(vm.url(""), "cache"),
        fast(),
    )
    .unwrap();
    for round in 0..5u64 {
        for component in Component::ALL {
            recorder.on_read(
                component,
                "marcus",
                ReadOutcome::Hit,
                Duration::from_micros(300),
                None,
            );
        }
        recorder.on_read(
            Component::MemoryHealth,
            "elena",
            ReadOutcome::Miss,
            Duration::from_micros(round),
            None,
        );
        sleep(Duration::from_millis(60)).await;
    }
    wait_stats(&handle, "two exported windows", |s| s.exported_windows >= 2).await;
    let stats = handle.shutdown().await;
    assert_eq!(stats.export_failures, 0);
    let series = vm
        .export_until("strategic_cache_reads_(hit|miss)", |s| {
            sums(s, "strategic_cache_reads_miss").get(&key("memory_health", "elena")) == Some(&5.0)
        })
        .await;
    let hits = sums(&series, "strategic_cache_reads_hit");
    for component in Component::ALL {
        assert_eq!(
            hits[&key(component.short_name(), "marcus")],
            5.0,
            "{component}"
        );
    }
    assert!(
        series
            .iter()
            .all(|s| s.labels.get("db").map(String::as_str) == Some("cache"))
    );
}

/// With the sink down, recording carries on, pending windows stay bounded with drops counted,
/// and export resumes when a server comes back on the same port (also after it is killed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_sink_down_bounds_memory_and_resumes() {
    let port = free_port();
    let recorder = Arc::new(MetricsRecorder::default());
    let config = ExporterConfig {
        flush_interval: Duration::from_millis(50),
        max_pending_windows: 3,
        ..fast()
    };
    let sink = InfluxConfig::v2(format!("http://127.0.0.1:{port}"), "acme", "cache");
    let handle = MetricsExporter::spawn(recorder.clone(), sink, config).unwrap();

    // Nothing listens: every POST fails. Recording never sees it.
    let deadline = Instant::now() + Duration::from_secs(15);
    while handle.stats().dropped_windows < 3 {
        recorder.on_read(
            Component::MemoryHealth,
            "elena",
            ReadOutcome::Hit,
            Duration::from_micros(5),
            None,
        );
        recorder
            .record_strategic_cache_metrics("memory_health", true, 0.005, None, "elena")
            .unwrap();
        assert!(handle.stats().pending_windows <= 3, "{:?}", handle.stats());
        assert!(Instant::now() < deadline, "no drops: {:?}", handle.stats());
        sleep(Duration::from_millis(5)).await;
    }
    let down = handle.stats();
    assert!(
        down.export_failures >= 1 && down.exported_windows == 0,
        "{down:?}"
    );

    // A server appears on that port: the pending windows and new reads go through.
    let vm = VictoriaMetrics::start_on(port).await;
    recorder.on_read(
        Component::MemoryHealth,
        "after-start",
        ReadOutcome::Hit,
        Duration::from_micros(5),
        None,
    );
    wait_stats(&handle, "delivery after start", |s| {
        s.exported_windows >= 2 && s.pending_windows == 0
    })
    .await;
    let series = vm
        .export_until("strategic_cache_.*", |s| {
            sums(s, "strategic_cache_reads_hit").contains_key(&key("memory_health", "after-start"))
        })
        .await;
    let dropped = series
        .iter()
        .filter(|s| s.labels["__name__"] == "strategic_cache_exporter_dropped_windows")
        .flat_map(|s| s.values.iter().copied())
        .fold(0.0, f64::max);
    assert!(
        dropped >= 3.0,
        "dropped windows exported as a field: {dropped}"
    );

    // The server is killed, then comes back: failures are counted, then export resumes.
    drop(vm);
    let before = handle.stats();
    wait_stats(&handle, "failures after kill", |s| {
        s.export_failures > before.export_failures
    })
    .await;
    let vm = VictoriaMetrics::start_on(port).await;
    // Recorded once the server is up: a window recorded while it was down may be one of the
    // dropped ones, which is the bound working as intended.
    recorder.on_read(
        Component::MemoryHealth,
        "after-restart",
        ReadOutcome::Miss,
        Duration::from_micros(5),
        None,
    );
    let exported = handle.stats().exported_windows;
    wait_stats(&handle, "delivery after restart", |s| {
        s.exported_windows > exported && s.pending_windows == 0
    })
    .await;
    vm.export_until("strategic_cache_reads_miss", |s| {
        sums(s, "strategic_cache_reads_miss").get(&key("memory_health", "after-restart"))
            == Some(&1.0)
    })
    .await;
    handle.shutdown().await;
}

/// A sink that accepts connections and never answers blocks neither recording (100,000 reads
/// finish within 10 s, or the test fails rather than hangs) nor counting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_slow_sink_does_not_block_recording() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (accepted_tx, mut accepted_rx) = tokio::sync::mpsc::channel(8);
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
            let _ = accepted_tx.try_send(());
        }
    });
    let recorder = Arc::new(MetricsRecorder::default());
    let sink = InfluxConfig::v1(format!("http://127.0.0.1:{port}"), "cache")
        .with_timeout(Duration::from_secs(60));
    let handle = MetricsExporter::spawn(recorder.clone(), sink, fast()).unwrap();
    accepted_rx.recv().await.unwrap();

    // The exporter is now stuck in a POST; recording from another thread still completes.
    let r = recorder.clone();
    let reads = std::thread::spawn(move || {
        for i in 0..100_000u32 {
            let outcome = if i % 4 == 0 {
                ReadOutcome::Miss
            } else {
                ReadOutcome::Hit
            };
            r.on_read(
                Component::ALL[i as usize % 6],
                "elena",
                outcome,
                Duration::from_micros(50),
                None,
            );
        }
    });
    // A recorder that blocked would hang the test without this bound; 100,000 reads take
    // milliseconds.
    let finished = crate::support::timing::poll_until(Duration::from_secs(10), || async {
        reads.is_finished()
    })
    .await;
    assert!(
        finished.is_some(),
        "recording 100,000 reads did not finish within 10 s while the exporter was stuck"
    );
    reads.join().unwrap();
    assert_eq!(handle.stats().exported_windows, 0);
    drop(handle);
    // Nothing was lost or swapped out while the exporter was stuck.
    let window = recorder.take_window();
    let total: u64 = window.rows.iter().map(|r| r.stats.reads()).sum();
    assert_eq!(total, 100_000);
    server.abort();
}

/// Each InfluxQL query of the Grafana dashboard, as (panel or variable, query, the
/// double-quoted identifiers it names except aliases such as `AS "p50"`).
fn dashboard_queries() -> Vec<(String, String, Vec<String>)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../dashboards/grafana/strategic-cache.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            assert_eq!(target["rawQuery"], true, "{}", panel["title"]);
            queries.push((
                panel["title"].as_str().unwrap().to_owned(),
                target["query"].as_str().unwrap().to_owned(),
            ));
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if var["type"] == "query" {
            let q = var["query"]
                .as_str()
                .or(var["query"]["query"].as_str())
                .unwrap();
            queries.push((var["name"].as_str().unwrap().to_owned(), q.to_owned()));
        }
    }
    queries
        .into_iter()
        .map(|(title, query)| {
            let parts: Vec<&str> = query.split('"').collect();
            let idents = parts
                .iter()
                .enumerate()
                .skip(1)
                .step_by(2)
                .filter(|(i, _)| {
                    !parts[i - 1]
                        .trim_end()
                        .to_ascii_uppercase()
                        .ends_with(" AS")
                })
                .map(|(_, ident)| (*ident).to_owned())
                .collect();
            (title, query, idents)
        })
        .collect()
}

/// The dashboard is well formed: raw InfluxQL in every panel, each naming a measurement and a
/// field or tag, and an InfluxDB datasource variable first. (That the names are ones the
/// exporter writes is checked against VictoriaMetrics in
/// `metrics_simulate_lands_its_figures_in_the_server`.)
#[test]
fn metrics_dashboard_queries_are_well_formed() {
    let queries = dashboard_queries();
    assert!(queries.len() >= 6, "{queries:?}");
    for (title, query, idents) in &queries {
        assert!(idents.len() >= 2, "{title}: names no field or tag: {query}");
    }
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../dashboards/grafana/strategic-cache.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(
        dashboard["templating"]["list"][0]["type"], "datasource",
        "first variable selects the InfluxDB datasource"
    );
}

/// Asserts that every measurement, field and tag the dashboard queries is one the exporter
/// wrote into VictoriaMetrics (`series`: everything it holds): a field `f` of measurement `m`
/// as the series `m_f`, a tag as a label of such a series.
fn assert_dashboard_names_written(series: &[Series]) {
    let names: BTreeSet<&str> = series
        .iter()
        .map(|s| s.labels["__name__"].as_str())
        .collect();
    let mut used = BTreeSet::new();
    for (title, query, idents) in dashboard_queries() {
        // Written only by a store that reads from database servers, which this in-memory
        // run is not: checked against the library's names instead (whose rendering its unit
        // tests pin).
        if idents
            .iter()
            .any(|i| i == strategic_cache::metrics::MEASUREMENT_SERVER)
        {
            for ident in &idents {
                assert!(
                    ident == strategic_cache::metrics::MEASUREMENT_SERVER
                        || strategic_cache::metrics::SERVER_FIELDS.contains(&ident.as_str())
                        || strategic_cache::metrics::SERVER_TAGS.contains(&ident.as_str()),
                    "{title}: `{ident}` is neither a field nor a tag of the server lines: {query}"
                );
            }
            continue;
        }
        let measurement = idents
            .iter()
            .find(|m| names.iter().any(|n| n.starts_with(&format!("{m}_"))))
            .unwrap_or_else(|| {
                panic!("{title}: no measurement the exporter wrote in {query}; it wrote {names:?}")
            });
        let prefix = format!("{measurement}_");
        for ident in &idents {
            if ident == measurement {
                continue;
            }
            let field = names.contains(format!("{prefix}{ident}").as_str());
            let tag = series.iter().any(|s| {
                s.labels["__name__"].starts_with(&prefix) && s.labels.contains_key(ident.as_str())
            });
            assert!(
                field || tag,
                "{title}: `{ident}` is neither a field nor a tag the exporter wrote to \
                 {measurement}: {query}"
            );
            used.insert(format!("{prefix}{ident}"));
        }
    }
    for needed in [
        "strategic_cache_reads_hit",
        "strategic_cache_reads_reads",
        "strategic_cache_reads_miss",
        "strategic_cache_reads_latency_p95_us",
        "strategic_cache_read_latency_count",
        "strategic_cache_read_latency_le_us",
        "strategic_cache_reads_age_p95_s",
        "strategic_cache_reads_bot",
        "strategic_cache_reads_table",
        "strategic_cache_worker_recomputes",
        "strategic_cache_exporter_dropped_windows",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
}

/// A `simulate` run with `INFLUXDB_URL` set lands its figures in the real server: per table
/// and bot, the exported reads add up to the run's reads, the worker's and requester's
/// counters arrive too, and every name the Grafana dashboard queries is among what arrived.
#[tokio::test]
async fn metrics_simulate_lands_its_figures_in_the_server() {
    let vm = VictoriaMetrics::start().await;
    let exe = std::env::current_exe().unwrap();
    let binary = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join(format!("strategic-cache{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.exists(),
        "run `cargo build --bins` first: {}",
        binary.display()
    );
    let output = tokio::process::Command::new(&binary)
        .args([
            "--json",
            "simulate",
            "--hours",
            "0.25",
            "--warmup-hours",
            "0",
            "--speedup",
            "900",
        ])
        .args(["--users", "200", "--metrics-interval-secs", "0.2"])
        .env_remove("DATABASE_URL")
        .env("INFLUXDB_URL", vm.url(""))
        .env("INFLUXDB_DB", "strategic")
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["metrics_export_failures"], 0);
    assert!(
        report["metrics_windows_exported"].as_u64().unwrap() >= 2,
        "{report}"
    );

    let reads = report["reads"].as_f64().unwrap();
    let expected_recomputes = report["recomputes"].as_f64().unwrap();
    // Points of one export can become queryable at different moments: wait for both totals.
    let series = vm
        .export_until(
            "strategic_cache_(reads_reads|worker_recomputes|refresh_requests_enqueued)",
            |s| {
                let total: f64 = sums(s, "strategic_cache_reads_reads").values().sum();
                total >= reads && worker_recomputes(s) >= expected_recomputes
            },
        )
        .await;
    let per_table = sums(&series, "strategic_cache_reads_reads");
    assert_eq!(
        per_table.values().sum::<f64>(),
        reads,
        "every read exported exactly once"
    );
    let tables: BTreeSet<&str> = per_table.keys().map(|(t, _)| t.as_str()).collect();
    assert_eq!(tables.len(), 6, "{tables:?}");
    assert!(per_table.keys().all(|(_, bot)| bot.starts_with("sim-bot-")));
    assert!(
        series
            .iter()
            .all(|s| !s.labels.contains_key("user") && !s.labels.contains_key("user_id"))
    );
    assert_eq!(
        worker_recomputes(&series),
        expected_recomputes,
        "the final window carries the totals"
    );
    let everything = vm
        .export_until("strategic_cache_.*", |s| !s.is_empty())
        .await;
    assert_dashboard_names_written(&everything);
}

/// The worker's recompute total: the largest value of each `worker_recomputes` series, summed.
fn worker_recomputes(series: &[Series]) -> f64 {
    series
        .iter()
        .filter(|s| s.labels["__name__"] == "strategic_cache_worker_recomputes")
        .filter_map(|s| s.values.iter().copied().reduce(f64::max))
        .sum()
}
