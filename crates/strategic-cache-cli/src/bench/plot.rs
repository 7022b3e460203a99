//! `--plot FILE.svg`: the latency distribution (CDF, log-scale latency) of the read cases,
//! written as SVG text by hand: a few dozen lines instead of a plotting library's
//! dependency tree.

use std::fmt::Write as _;

use super::stats::Case;

/// Cases drawn, in legend order: ours next to their limit rows, then the bursts.
const DRAWN: &[(&str, &str, bool)] = &[
    ("single_read", "#1f77b4", false),
    ("bare_single_read", "#1f77b4", true),
    ("single_read_10", "#ff7f0e", false),
    ("bare_single_read_10", "#ff7f0e", true),
    ("snapshot", "#2ca02c", false),
    ("bare_snapshot", "#2ca02c", true),
    ("snapshot_10", "#d62728", false),
    ("bare_snapshot_10", "#d62728", true),
    ("burst_200", "#9467bd", false),
    ("read_during_sweep", "#8c564b", false),
    ("soak_read", "#e377c2", false),
];

const W: f64 = 900.0;
const H: f64 = 520.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 230.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;

/// The SVG document.
pub fn render(cases: &[Case], setup: &serde_json::Value) -> String {
    let drawn: Vec<(&Case, &str, bool)> = DRAWN
        .iter()
        .filter_map(|(name, color, dashed)| {
            cases
                .iter()
                .find(|c| c.name == *name && c.n > 0)
                .map(|c| (c, *color, *dashed))
        })
        .collect();
    // Decades of microseconds covering every point drawn.
    let lo = drawn
        .iter()
        .flat_map(|(c, _, _)| c.cdf_us.iter().map(|p| p.0))
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    let hi = drawn
        .iter()
        .flat_map(|(c, _, _)| c.cdf_us.iter().map(|p| p.0))
        .fold(0.0, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > 0.0 {
        (
            lo.log10().floor(),
            hi.log10().ceil().max(lo.log10().floor() + 1.0),
        )
    } else {
        (1.0, 4.0)
    };
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let x = |us: f64| LEFT + pw * ((us.max(1e-3).log10() - lo) / (hi - lo)).clamp(0.0, 1.0);
    let y = |q: f64| TOP + ph * (1.0 - q);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="22" font-size="15">strategic-cache bench: read latency CDF ({} users x {} bots, {} cores)</text>"#,
        setup["users"], setup["bots"], setup["cores"]
    );
    // Grid: decades and their 2x, 5x on x; tenths on y.
    let mut decade = lo;
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powf(decade);
            if v.log10() > hi + 1e-9 {
                break;
            }
            let px = x(v);
            let stroke = if m == 1.0 { "#bbb" } else { "#eee" };
            let _ = writeln!(
                s,
                r#"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="{stroke}"/>"#,
                TOP + ph
            );
            let label = if v >= 1000.0 {
                format!("{} ms", v / 1000.0)
            } else {
                format!("{v} us")
            };
            let _ = writeln!(
                s,
                r##"<text x="{px:.1}" y="{:.1}" text-anchor="middle" fill="#444">{label}</text>"##,
                TOP + ph + 16.0
            );
        }
        decade += 1.0;
    }
    for tenth in 0..=10 {
        let q = f64::from(tenth) / 10.0;
        let py = y(q);
        let _ = writeln!(
            s,
            r#"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="{}"/>"#,
            LEFT + pw,
            if tenth % 5 == 0 { "#bbb" } else { "#eee" }
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#444">{:.0}%</text>"##,
            LEFT - 6.0,
            py + 4.0,
            q * 100.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">latency per operation (log scale); dashed: bare driver (the limit)</text>"#,
        LEFT + pw / 2.0,
        H - 18.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">fraction of operations at or below</text>"#,
        TOP + ph / 2.0
    );
    for (i, (case, color, dashed)) in drawn.iter().enumerate() {
        let points: Vec<String> = case
            .cdf_us
            .iter()
            .map(|(us, q)| format!("{:.1},{:.1}", x(*us), y(*q)))
            .collect();
        let dash = if *dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"/>"#,
            points.join(" ")
        );
        let ly = TOP + 14.0 + 20.0 * i as f64;
        let lx = W - RIGHT + 16.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{:.1}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>"#,
            lx + 28.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{} (p95 {:.0} us)</text>"#,
            lx + 34.0,
            ly + 4.0,
            case.name,
            case.p95_us
        );
    }
    s.push_str("</svg>\n");
    s
}
