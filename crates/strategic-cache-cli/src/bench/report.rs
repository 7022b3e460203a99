//! What `bench` reports: the fill, every case, ours over the limit rows, the targets,
//! and the rendering of all of it for a person.

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::near_memory::NearMemory;
use super::plot;
use super::soak::SoakReport;
use super::stats::Case;
use crate::scratch::Tables;

/// How the scratch database was filled.
#[derive(Clone, Debug, Serialize)]
pub struct FillReport {
    /// Rows in the six tables.
    pub rows: u64,
    /// Seconds the fill took (upserts only; `VACUUM ANALYZE` is `vacuum_secs`).
    pub secs: f64,
    /// Rows per second of the fill.
    pub rows_per_s: f64,
    /// Seconds of the `VACUUM ANALYZE` after the fill (what autovacuum would do in time).
    pub vacuum_secs: f64,
}

/// A target of the issue and whether this run met it.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    /// What is compared.
    pub name: String,
    /// Whether it was met.
    pub pass: bool,
    /// The figures.
    pub detail: String,
}

/// One of our rows against its limit row.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    /// Our case.
    pub case: String,
    /// The bare-driver case.
    pub limit: String,
    /// Our p95 over the limit's.
    pub p95_ratio: f64,
    /// Our throughput over the limit's.
    pub throughput_ratio: f64,
}

/// What `bench` reports.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Users, bots, stale percent, pool size, whether `--quick`.
    pub setup: serde_json::Value,
    /// Where the scratch tables were: local, or distributed by Citus.
    pub tables: Tables,
    /// The fill.
    pub fill: FillReport,
    /// Every case.
    pub cases: Vec<Case>,
    /// Ours over the limit rows.
    pub ratios: Vec<Ratio>,
    /// The reader's own cost per read (µs) over a store that answers at once.
    pub reader_overhead_us: f64,
    /// The targets.
    pub targets: Vec<Target>,
    /// The near tier's memory against its bound, per bound (empty with `--soak`).
    pub near_memory: Vec<NearMemory>,
    /// The soak test, with `--soak`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soak: Option<SoakReport>,
}

pub(super) fn find<'a>(cases: &'a [Case], name: &str) -> Option<&'a Case> {
    cases.iter().find(|c| c.name == name)
}

/// Each of our rows against its limit row.
pub(super) fn ratios(cases: &[Case]) -> Vec<Ratio> {
    let pairs = [
        ("single_read", "bare_single_read"),
        ("repo_single_read", "bare_single_read"),
        ("single_read_10", "bare_single_read_10"),
        ("snapshot", "bare_snapshot"),
        ("repo_snapshot", "bare_snapshot"),
        ("snapshot_10", "bare_snapshot_10"),
        ("sustained", "bare_snapshot_10"),
    ];
    pairs
        .iter()
        .filter_map(|(ours, limit)| {
            let (o, l) = (find(cases, ours)?, find(cases, limit)?);
            Some(Ratio {
                case: (*ours).to_owned(),
                limit: (*limit).to_owned(),
                p95_ratio: o.p95_us / l.p95_us.max(1e-9),
                throughput_ratio: o.throughput_per_s / l.throughput_per_s.max(1e-9),
            })
        })
        .collect()
}

/// The targets, as measured by this run.
pub(super) fn targets(cases: &[Case], overhead_us: f64) -> Vec<Target> {
    let mut out = Vec::new();
    let p95 = |ours: &str, limit: &str, out: &mut Vec<Target>| {
        if let (Some(o), Some(l)) = (find(cases, ours), find(cases, limit)) {
            let bound = 1.3 * l.p95_us;
            out.push(Target {
                name: format!("{ours} p95 <= 1.3 x {limit} p95"),
                pass: o.p95_us <= bound,
                detail: format!(
                    "{:.0} us vs {:.0} us (ratio {:.2})",
                    o.p95_us,
                    l.p95_us,
                    o.p95_us / l.p95_us.max(1e-9)
                ),
            });
        }
    };
    p95("single_read", "bare_single_read", &mut out);
    p95("snapshot", "bare_snapshot", &mut out);
    for (ours, limit) in [
        ("single_read_10", "bare_single_read_10"),
        ("snapshot_10", "bare_snapshot_10"),
    ] {
        if let (Some(o), Some(l)) = (find(cases, ours), find(cases, limit)) {
            out.push(Target {
                name: format!("{ours} throughput >= 0.8 x {limit}"),
                pass: o.throughput_per_s >= 0.8 * l.throughput_per_s,
                detail: format!(
                    "{:.0}/s vs {:.0}/s (ratio {:.2})",
                    o.throughput_per_s,
                    l.throughput_per_s,
                    o.throughput_per_s / l.throughput_per_s.max(1e-9)
                ),
            });
        }
    }
    if let Some(b) = find(cases, "burst_200") {
        out.push(Target {
            name: "burst_200: zero errors, p95 <= 5 ms".into(),
            pass: b.errors == 0 && b.p95_us <= 5000.0,
            detail: format!("{} errors, p95 {:.0} us", b.errors, b.p95_us),
        });
    }
    if let Some(b) = find(cases, "near_burst_200") {
        out.push(Target {
            name: "near_burst_200: zero errors, p95 <= 2 ms".into(),
            pass: b.errors == 0 && b.p95_us <= 2000.0,
            detail: format!("{} errors, p95 {:.0} us", b.errors, b.p95_us),
        });
    }
    if let Some(n) = find(cases, "near_snapshot_shared") {
        out.push(Target {
            name: "near_snapshot_shared p99 <= 2 us".into(),
            pass: n.p99_us <= 2.0,
            detail: format!("p99 {:.2} us", n.p99_us),
        });
    }
    // The change feed's price on writes (issue 25, item 6): each write case with the notify
    // triggers against the same case with them disabled, in this run.
    for w in ["upsert_1", "upsert_8", "upsert_batch"] {
        let (feed, nofeed) = (format!("{w}_feed"), format!("{w}_nofeed"));
        if let (Some(f), Some(n)) = (find(cases, &feed), find(cases, &nofeed)) {
            out.push(Target {
                name: format!("{feed} throughput >= 0.8 x {nofeed}"),
                pass: f.throughput_per_s >= 0.8 * n.throughput_per_s,
                detail: format!(
                    "{:.0}/s vs {:.0}/s (ratio {:.2})",
                    f.throughput_per_s,
                    n.throughput_per_s,
                    f.throughput_per_s / n.throughput_per_s.max(1e-9)
                ),
            });
        }
    }
    out.push(Target {
        name: "reader overhead <= 2 us per read".into(),
        pass: overhead_us <= 2.0,
        detail: format!("{overhead_us:.2} us"),
    });
    out
}

impl BenchReport {
    /// The human table and the pass/fail lines.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        if self.setup["near_memory"] == true {
            let _ = writeln!(
                out,
                "near tier memory only (--near-memory): each bound in a process of its own"
            );
        } else {
            self.render_setup(&mut out);
        }
        self.render_cases(&mut out);
        out
    }

    /// The data set, the fill and the replicas.
    fn render_setup(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "data set: {} users x {} bots, {}% stale, {} rows; pool {}; TLS {}; {} cores",
            self.setup["users"],
            self.setup["bots"],
            self.setup["stale_percent"],
            self.fill.rows,
            self.setup["pool"],
            if self.setup["tls"] == true {
                "on"
            } else {
                "off"
            },
            self.setup["cores"],
        );
        let _ = writeln!(out, "tables: {}", self.tables);
        let _ = writeln!(
            out,
            "fill: {} rows in {:.1} s ({:.0} rows/s), then VACUUM ANALYZE {:.1} s",
            self.fill.rows, self.fill.secs, self.fill.rows_per_s, self.fill.vacuum_secs
        );
        let replicas = &self.setup["replicas"];
        if !replicas.is_null() {
            let _ = writeln!(
                out,
                "replicas: {} (max lag {} ms), fill replayed after {:.1} s; the replica_* reads \
                 were answered {} by replicas, {} by the primary",
                replicas["replicas"],
                replicas["max_replica_lag_ms"],
                replicas["fill_replayed_after_s"].as_f64().unwrap_or(0.0),
                replicas["replica_case_reads_on_replicas"],
                replicas["replica_case_reads_on_primary"],
            );
        }
    }

    /// The cases, the ratios, the soak and the targets.
    fn render_cases(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "\n{:<22} {:>7} {:>9} {:>9} {:>9} {:>10} {:>11} {:>6} {:>6}",
            "case", "n", "p50 us", "p95 us", "p99 us", "max us", "per s", "errors", "hits"
        );
        for c in &self.cases {
            let _ = writeln!(
                out,
                "{:<22} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>10.1} {:>11.0} {:>6} {:>5.0}%",
                c.name,
                c.n,
                c.p50_us,
                c.p95_us,
                c.p99_us,
                c.max_us,
                c.throughput_per_s,
                c.errors,
                100.0 * c.hit_rate
            );
        }
        if !self.ratios.is_empty() {
            let _ = writeln!(out, "\nours / limit        p95 ratio  throughput ratio");
            for r in &self.ratios {
                let _ = writeln!(
                    out,
                    "{:<20} {:>9.2} {:>17.2}   (vs {})",
                    r.case, r.p95_ratio, r.throughput_ratio, r.limit
                );
            }
        }
        if let Some(soak) = &self.soak {
            out.push_str(&soak.render());
        }
        if !self.targets.is_empty() {
            out.push('\n');
        }
        for t in &self.targets {
            let verdict = if t.pass { "PASS" } else { "FAIL" };
            let _ = writeln!(out, "{verdict} {}: {}", t.name, t.detail);
        }
    }
}

/// Writes the plot of `report` to `path`.
pub fn write_plot(report: &BenchReport, path: &std::path::Path) -> Result<()> {
    let svg = plot::render(&report.cases, &report.setup);
    std::fs::write(path, svg).with_context(|| format!("cannot write {}", path.display()))
}
