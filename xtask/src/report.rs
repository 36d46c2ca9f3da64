//! `cargo xtask bench report` (and the end of `bench all`): bench/REPORT.md
//! and its charts (bench/*.svg, hand-written SVG) from the newest
//! `bench/results/*-dataplane.json` and `*-microbench.json`, with the
//! project's targets checked one by one. Also the console summaries the
//! suites print after a run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

/// Paths in the order the report shows them.
const PATHS: &[&str] = &[
    "direct",
    "meshlb-native",
    "meshlb-generic",
    "iptables",
    "haproxy",
    "bare-forwarder",
    CEILING,
];
const MESHLB: &str = "meshlb-native";
/// The UDP scenario's sender into a namespace that drops everything.
const CEILING: &str = "sender-ceiling";
const BARE: &str = "bare-forwarder";
const COLORS: &[&str] = &[
    "#555555", "#1f77b4", "#17becf", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd",
];

/// Median, min, max of a scenario/path's values of `key`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub fn stat(mut v: Vec<f64>) -> Option<Stat> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    };
    Some(Stat {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

fn samples<'a>(doc: &'a Value, scenario: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    doc["samples"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(move |s| s["scenario"] == scenario)
}

fn values(doc: &Value, scenario: &str, path: &str, key: &str) -> Vec<f64> {
    samples(doc, scenario)
        .filter(|s| s["path"] == path)
        .filter_map(|s| s[key].as_f64())
        .collect()
}

fn get(doc: &Value, scenario: &str, path: &str, key: &str) -> Option<Stat> {
    stat(values(doc, scenario, path, key))
}

/// The key of a scenario's headline number.
fn key_of(scenario: &str) -> &'static str {
    match scenario {
        "udp" => "pps",
        "latency" => "p99_us",
        _ => "rps",
    }
}

fn ratio(doc: &Value, scenario: &str, a: &str, b: &str) -> Option<f64> {
    let k = key_of(scenario);
    Some(get(doc, scenario, a, k)?.median / get(doc, scenario, b, k)?.median)
}

/// Paths of a scenario in report order (then any others, as found).
fn paths_of(doc: &Value, scenario: &str) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for s in samples(doc, scenario) {
        if let Some(p) = s["path"].as_str() {
            if !seen.iter().any(|x| x == p) {
                seen.push(p.to_string());
            }
        }
    }
    seen.sort_by_key(|p| PATHS.iter().position(|x| x == p).unwrap_or(PATHS.len()));
    seen
}

/// Console summary of a dataplane results document.
pub fn print_dataplane(doc: &Value) {
    for sc in ["keepalive", "conn-per-request"] {
        let k = key_of(sc);
        println!(
            "\n{sc} ({k}):  {:<16} {:>10} {:>10} {:>10} {:>8}",
            "path", "median", "min", "max", "/direct"
        );
        for p in paths_of(doc, sc) {
            if let Some(s) = get(doc, sc, &p, k) {
                let r = ratio(doc, sc, &p, "direct").map_or(String::new(), |r| format!("{r:.2}"));
                println!(
                    "  {:<16} {:>10.0} {:>10.0} {:>10.0} {:>8}",
                    p, s.median, s.min, s.max, r
                );
            }
        }
    }
    println!(
        "\nudp (packets/s delivered):  {:<16} {:>10} {:>10} {:>10} {:>7} {:>8} {:>10} {:>7}",
        "path", "median", "min", "max", "spread", "/direct", "sent", "loss"
    );
    for row in udp_rows(doc) {
        println!(
            "  {:<16} {:>10.0} {:>10.0} {:>10.0} {:>6.1}% {:>8} {:>10.0} {:>6.1}%",
            row.path,
            row.pps.median,
            row.pps.min,
            row.pps.max,
            100.0 * row.spread(),
            row.direct.map_or(String::new(), |r| format!("{r:.2}")),
            row.sent,
            100.0 * row.loss,
        );
    }
    for (what, r) in udp_ratios(doc) {
        println!("  {what}: {}", r.map_or("–".into(), |x| format!("{x:.2}")));
    }
    println!("\nlatency (us, median over rounds):");
    for p in paths_of(doc, "latency") {
        let m = |k| get(doc, "latency", &p, k).map_or(f64::NAN, |s| s.median);
        println!(
            "  {:<16} p50 {:>8.0}  p99 {:>8.0}",
            p,
            m("p50_us"),
            m("p99_us")
        );
    }
    for sc in ["mixed-meshlb", "mixed-iptables"] {
        println!("\n{sc} (req/s per round):");
        for p in paths_of(doc, sc) {
            let v = values(doc, sc, &p, "rps");
            let line: Vec<String> = v.iter().map(|x| format!("{x:.0}")).collect();
            println!("  {:<16} {}", p, line.join(" "));
        }
    }
}

/// Per-case median ns of the per-call microbench samples.
/// One path of the UDP scenario: packets/s delivered (median, min, max
/// over rounds), against direct, and what the sender sent.
struct UdpRow {
    path: String,
    pps: Stat,
    direct: Option<f64>,
    /// Median of the sender's packets/s.
    sent: f64,
    /// Median of the rounds' loss (1 - delivered / sent).
    loss: f64,
}

impl UdpRow {
    /// (max - min) / median.
    fn spread(&self) -> f64 {
        (self.pps.max - self.pps.min) / self.pps.median
    }
}

fn udp_rows(doc: &Value) -> Vec<UdpRow> {
    paths_of(doc, "udp")
        .into_iter()
        .filter_map(|p| {
            let pps = get(doc, "udp", &p, "pps")?;
            let med = |k| get(doc, "udp", &p, k).map_or(f64::NAN, |s| s.median);
            Some(UdpRow {
                direct: if p == CEILING {
                    None
                } else {
                    ratio(doc, "udp", &p, "direct")
                },
                sent: med("sent_pps"),
                loss: med("loss"),
                path: p,
                pps,
            })
        })
        .collect()
}

/// The UDP ratios the report states (medians).
fn udp_ratios(doc: &Value) -> [(String, Option<f64>); 3] {
    [
        (
            format!("{MESHLB} ÷ iptables"),
            ratio(doc, "udp", MESHLB, "iptables"),
        ),
        (
            format!("{MESHLB} ÷ {BARE}"),
            ratio(doc, "udp", MESHLB, BARE),
        ),
        (
            format!("direct ÷ {CEILING}"),
            ratio(doc, "udp", "direct", CEILING),
        ),
    ]
}

/// Whether every forwarding path delivered at least 90 % of what the
/// sender sent (median loss under 10 %): then the forwarders kept up with
/// the sender, the sender is the limit, and the ratios between paths say
/// little about the forwarders.
fn udp_sender_bound(doc: &Value) -> Option<bool> {
    let rows = udp_rows(doc);
    let paths: Vec<&UdpRow> = rows.iter().filter(|r| r.path != CEILING).collect();
    if paths.is_empty() || paths.iter().any(|r| r.loss.is_nan()) {
        return None;
    }
    Some(paths.iter().all(|r| r.loss < 0.1))
}

/// The share of the forwarding paths' lost frames that the AF_XDP sender
/// saw dropped at the first hop (`kicks_dropped`), over all rounds; None
/// for other senders or without loss.
fn udp_first_hop_drops(doc: &Value) -> Option<f64> {
    let (mut dropped, mut lost) = (0u64, 0u64);
    for s in doc["samples"].as_array().into_iter().flatten() {
        if s["scenario"] != "udp" || s["path"] == CEILING {
            continue;
        }
        dropped += s["sender"]["kicks_dropped"].as_u64()?;
        lost += s["sent"].as_u64()?.saturating_sub(s["delivered"].as_u64()?);
    }
    (lost > 0).then(|| dropped as f64 / lost as f64)
}

fn micro(doc: &Value, case: &str, method: &str) -> Option<Stat> {
    stat(
        doc["samples"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["case"] == case && s["method"] == method)
            .filter_map(|s| s["ns_per_run"].as_f64())
            .collect(),
    )
}

const MICRO_CASES: &[&str] = &[
    "pass-v4",
    "bare-v4",
    "lb-hit-v4",
    "lb-miss-v4",
    "bare-v6",
    "lb-hit-v6",
    "lb-miss-v6",
];

/// Net ns of a case: its per-call time minus the `pass` floor.
fn micro_net(doc: &Value, case: &str) -> Option<f64> {
    Some(micro(doc, case, "per-call")?.median - micro(doc, "pass-v4", "per-call")?.median)
}

pub fn print_microbench(doc: &Value) {
    println!("\nmicrobench (ns per packet, per-call method; net = minus the pass floor):");
    for c in MICRO_CASES {
        if let Some(s) = micro(doc, c, "per-call") {
            println!(
                "  {c:<11} median {:>7.1}  min {:>7.1}  max {:>7.1}  net {:>7.1}",
                s.median,
                s.min,
                s.max,
                micro_net(doc, c).unwrap_or(f64::NAN)
            );
        }
    }
    for fam in ["v4", "v6"] {
        if let (Some(lb), Some(bare)) = (
            micro_net(doc, &format!("lb-hit-{fam}")),
            micro_net(doc, &format!("bare-{fam}")),
        ) {
            println!("  LB hit / bare ({fam}, net): {:.2}x", lb / bare.max(1.0));
        }
        if let (Some(lb), Some(bare)) = (
            micro_net(doc, &format!("lb-miss-{fam}")),
            micro_net(doc, &format!("bare-{fam}")),
        ) {
            println!(
                "  LB new flow / bare ({fam}, net): {:.2}x",
                lb / bare.max(1.0)
            );
        }
    }
}

// ---------------------------------------------------------------------
// SVG
// ---------------------------------------------------------------------

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A round number ≥ `x` for an axis top (1, 2, 2.5, 5 × 10^k).
fn nice_ceil(x: f64) -> f64 {
    if x.is_nan() || x <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(x.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= x {
            return m * p;
        }
    }
    10.0 * p
}

fn fmt_num(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// Vertical bars (median) with min–max whiskers.
pub fn bar_chart(title: &str, unit: &str, bars: &[(String, Stat)]) -> String {
    let (w, h, left, top, bottom) = (640.0, 320.0, 70.0, 40.0, 60.0);
    let ymax = nice_ceil(bars.iter().map(|(_, s)| s.max).fold(0.0, f64::max) * 1.05);
    let plot_h = h - top - bottom;
    let slot = (w - left - 20.0) / bars.len().max(1) as f64;
    let y = |v: f64| top + plot_h * (1.0 - v / ymax);
    let mut s = svg_open(w, h, title);
    axis_y(&mut s, left, w - 20.0, top, plot_h, ymax, unit);
    for (i, (label, st)) in bars.iter().enumerate() {
        let x = left + slot * i as f64 + slot * 0.2;
        let bw = slot * 0.6;
        let c = COLORS[i % COLORS.len()];
        let _ = write!(
            s,
            r#"<rect x="{x:.1}" y="{:.1}" width="{bw:.1}" height="{:.1}" fill="{c}"/>"#,
            y(st.median),
            (y(0.0) - y(st.median)).max(0.0)
        );
        let cx = x + bw / 2.0;
        let _ = write!(
            s,
            r#"<line x1="{cx:.1}" x2="{cx:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/><line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/><line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/>"#,
            y(st.min),
            y(st.max),
            cx - 6.0,
            cx + 6.0,
            y(st.min),
            y(st.min),
            cx - 6.0,
            cx + 6.0,
            y(st.max),
            y(st.max)
        );
        let _ = write!(
            s,
            r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}</text><text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-size="12">{}</text>"#,
            y(st.max) - 5.0,
            fmt_num(st.median),
            h - bottom + 18.0,
            esc(label)
        );
    }
    let _ = write!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10" fill="dimgray">bar: median; whisker: min–max over rounds</text>"#,
        w - 20.0,
        h - 8.0
    );
    s.push_str("</svg>\n");
    s
}

/// Lines over x = 1..n (or a log x axis when `log_x`), one per series.
pub fn line_chart(
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[(String, Vec<(f64, f64)>)],
    log_x: bool,
) -> String {
    let (w, h, left, top, bottom, right) = (640.0, 340.0, 70.0, 40.0, 70.0, 170.0);
    let pts = series.iter().flat_map(|(_, v)| v.iter());
    let (mut xmin, mut xmax, mut ymax) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
    for &(x, y) in pts {
        if x.is_finite() && y.is_finite() && (!log_x || x > 0.0) {
            xmin = xmin.min(x);
            xmax = xmax.max(x);
            ymax = ymax.max(y);
        }
    }
    if !xmin.is_finite() {
        (xmin, xmax) = (0.0, 1.0);
    }
    let tx = |x: f64| if log_x { x.max(1e-9).log10() } else { x };
    let (mut x0, mut x1) = (tx(xmin), tx(xmax));
    if log_x {
        x0 = x0.floor();
        x1 = x1.ceil().max(x0 + 1.0);
    } else if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let ymax = nice_ceil(ymax * 1.05);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let px = |x: f64| left + pw * (tx(x) - x0) / (x1 - x0);
    let py = |y: f64| top + ph * (1.0 - y / ymax);
    let mut s = svg_open(w, h, title);
    axis_y(&mut s, left, left + pw, top, ph, ymax, ylabel);
    // x ticks
    let ticks: Vec<f64> = if log_x {
        (x0 as i32..=x1 as i32).map(|e| 10f64.powi(e)).collect()
    } else {
        let step = ((x1 - x0) / 10.0).ceil().max(1.0);
        let mut v = Vec::new();
        let mut t = x0.ceil();
        while t <= x1 {
            v.push(t);
            t += step;
        }
        v
    };
    for t in ticks {
        let x = px(t);
        let _ = write!(
            s,
            r#"<line x1="{x:.1}" x2="{x:.1}" y1="{:.1}" y2="{:.1}" stroke="gainsboro"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}</text>"#,
            top,
            top + ph,
            top + ph + 15.0,
            fmt_num(t)
        );
    }
    let _ = write!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12">{}</text>"#,
        left + pw / 2.0,
        h - bottom + 35.0,
        esc(xlabel)
    );
    for (i, (name, v)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let d: Vec<String> = v
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_x || *x > 0.0))
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
            d.join(" ")
        );
        if !log_x {
            for p in &d {
                let (a, b) = p.split_once(',').unwrap_or(("0", "0"));
                let _ = write!(s, r#"<circle cx="{a}" cy="{b}" r="3" fill="{c}"/>"#);
            }
        }
        let ly = top + 10.0 + 18.0 * i as f64;
        let _ = write!(
            s,
            r#"<line x1="{:.1}" x2="{:.1}" y1="{ly:.1}" y2="{ly:.1}" stroke="{c}" stroke-width="3"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
            w - right + 10.0,
            w - right + 30.0,
            w - right + 35.0,
            ly + 4.0,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn svg_open(w: f64, h: f64, title: &str) -> String {
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/><text x="{:.1}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        w / 2.0,
        esc(title)
    )
}

fn axis_y(s: &mut String, x0: f64, x1: f64, top: f64, ph: f64, ymax: f64, unit: &str) {
    for i in 0..=5 {
        let v = ymax * f64::from(i) / 5.0;
        let y = top + ph * (1.0 - f64::from(i) / 5.0);
        let _ = write!(
            s,
            r#"<line x1="{x0:.1}" x2="{x1:.1}" y1="{y:.1}" y2="{y:.1}" stroke="{}"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{}</text>"#,
            if i == 0 { "black" } else { "#ddd" },
            x0 - 5.0,
            y + 4.0,
            fmt_num(v)
        );
    }
    let _ = write!(
        s,
        r#"<text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle" font-size="12">{}</text>"#,
        top + ph / 2.0,
        top + ph / 2.0,
        esc(unit)
    );
}

// ---------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------

/// The newest `bench/results/*-<suite>.json`.
pub fn latest(suite: &str) -> Option<PathBuf> {
    let dir = crate::root().join("bench/results");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(&format!("-{suite}.json")))
        })
        .collect();
    v.sort();
    v.pop()
}

/// The control-plane suite's summary tables.
fn control_plane_tables(md: &mut String, cp: &Value) {
    let num = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    md.push_str("| services | sync from | services present after (s) | of which start-up (s) | list + full sync (s) | daemon RSS (MiB) |\n|---|---|---|---|---|---|\n");
    let opt = |v: &Value| v.as_f64().map_or("–".to_string(), |x| format!("{x:.2}"));
    for r in cp["full_sync"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} | {} | {} | {:.1} |",
            r["services"],
            r["mode"].as_str().unwrap_or("?"),
            num(&r["services_present_s"]),
            opt(&r["startup_s"]),
            opt(&r["list_sync_s"]),
            num(&r["rss_kib"]) / 1024.0
        );
    }
    md.push_str("\n| services | etcd put → BACKENDS map p50 (ms) | p99 (ms) | put alone p50 (ms) | put alone p99 (ms) | changes |\n|---|---|---|---|---|---|\n");
    for r in cp["change_summary"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            r["services"],
            num(&r["visible_us"]["p50"]) / 1000.0,
            num(&r["visible_us"]["p99"]) / 1000.0,
            num(&r["put_us"]["p50"]) / 1000.0,
            num(&r["put_us"]["p99"]) / 1000.0,
            r["visible_us"]["count"]
        );
    }
    // How the cost of one change grows with the services: the largest
    // size's p50 over the smallest's.
    let p50s: Vec<(u64, f64)> = cp["change_summary"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| Some((r["services"].as_u64()?, r["visible_us"]["p50"].as_f64()?)))
        .collect();
    if let (Some(lo), Some(hi)) = (
        p50s.iter().min_by_key(|(n, _)| *n),
        p50s.iter().max_by_key(|(n, _)| *n),
    ) {
        if hi.0 > lo.0 && lo.1 > 0.0 {
            let _ = writeln!(
                md,
                "\np50 of one change at {} services ÷ at {} services: {:.2}×",
                hi.0,
                lo.0,
                hi.1 / lo.1
            );
        }
    }
    md.push_str("\nkube-proxy iptables mode, the same services (KUBE-SERVICES/NODEPORTS/SVC/SEP chains, DNAT), loaded into a fresh namespace:\n\n| services | tool | rules | full restore (s) | one change = full `--noflush` re-restore (s) | meshlb full sync ÷ restore | re-restore ÷ meshlb change p50 |\n|---|---|---|---|---|---|---|\n");
    for r in cp["iptables"].as_array().into_iter().flatten() {
        let rr = r["rerestore_median_s"]
            .as_f64()
            .map_or(format!(">{}", r["timeout_s"]), |v| format!("{v:.2}"));
        let ratio = r["rerestore_over_meshlb_change_p50"]
            .as_f64()
            .map_or("–".to_string(), |v| format!("{v:.0}×"));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.2} | {} | {:.2} | {} |",
            r["services"],
            r["tool"].as_str().unwrap_or("?"),
            r["rules"],
            num(&r["full_restore_s"]),
            rr,
            num(&r["meshlb_sync_over_iptables_full"]),
            ratio
        );
    }
    md.push('\n');
}

pub fn load(p: &Path) -> Result<Value> {
    let t = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&t).with_context(|| format!("parsing {}", p.display()))
}

pub fn rel(p: &Path) -> String {
    p.strip_prefix(crate::root().join("bench"))
        .unwrap_or(p)
        .display()
        .to_string()
}

/// One target: what, the measured value, met or not, why.
struct Target {
    what: String,
    value: String,
    met: Option<bool>,
    note: String,
}

fn mark(t: &Target) -> &'static str {
    match t.met {
        Some(true) => "**met**",
        Some(false) => "**not met**",
        None => "not measured",
    }
}

/// Did a mixed scenario collapse? (Any round of either path below half of
/// that path's best round.)
fn collapsed(doc: &Value, scenario: &str) -> Option<bool> {
    let paths = paths_of(doc, scenario);
    if paths.is_empty() {
        return None;
    }
    Some(paths.iter().any(|p| {
        let v = values(doc, scenario, p, "rps");
        let best = v.iter().copied().fold(0.0, f64::max);
        v.iter().any(|x| *x < 0.5 * best)
    }))
}

/// The UDP scenario: per path packets/s delivered (median, min, max, spread,
/// ×direct), what the sender sent and lost, the sender's own ceiling, the
/// ratios against iptables and the bare forwarder, and what was attached
/// where.
fn udp_section(md: &mut String, doc: &Value, bench: &Path) -> Result<()> {
    let rows = udp_rows(doc);
    if rows.is_empty() {
        return Ok(());
    }
    let title = "UDP packets/s delivered to the backend";
    let bars: Vec<(String, Stat)> = rows
        .iter()
        .filter(|r| r.path != CEILING)
        .map(|r| (r.path.clone(), r.pps))
        .collect();
    std::fs::write(bench.join("udp.svg"), bar_chart(title, "packets/s", &bars))?;
    let st = &doc["setup"];
    let _ = writeln!(
        md,
        "### {title}\n\n![{title}](udp.svg)\n\nSender: {}.\n",
        st["udp"]
            .as_str()
            .unwrap_or("the socket blaster (results file from before the sender was recorded)")
    );
    let _ = writeln!(md, "| path | median packets/s | min | max | spread | n | ×direct | sent/s (median) | loss (median) |\n|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let name = if r.path == CEILING {
            format!("*{CEILING}* (sender into a namespace that drops everything)")
        } else {
            r.path.clone()
        };
        let _ = writeln!(
            md,
            "| {name} | {:.0} | {:.0} | {:.0} | {:.1} % | {} | {} | {:.0} | {:.1} % |",
            r.pps.median,
            r.pps.min,
            r.pps.max,
            100.0 * r.spread(),
            r.pps.n,
            r.direct.map_or("–".into(), |x| format!("{x:.2}")),
            r.sent,
            100.0 * r.loss,
        );
    }
    md.push('\n');
    for (what, r) in udp_ratios(doc) {
        let _ = writeln!(
            md,
            "* {what}: {}",
            r.map_or("–".into(), |x| format!("**{x:.2}**"))
        );
    }
    md.push('\n');
    if let Some(share) = udp_first_hop_drops(doc) {
        let _ = writeln!(
            md,
            "Of the frames the paths lost, {:.0} % were dropped by the first hop (the client veth's peer, whose receive ring was full: the kernel answers the AF_XDP sender's kick EBUSY), so the paths (the first hop's NAPI thread carries each packet through the load balancer and on), not the sender, set the pace.\n",
            100.0 * share
        );
    }
    if let Some(c) = rows.iter().find(|r| r.path == CEILING && r.loss >= 0.01) {
        let _ = writeln!(
            md,
            "The sender's ceiling lost {:.1} % (median) in its sink, which takes every frame with one NAPI thread: that receiver, not only the sender, bounds the ceiling, so {:.0} packets/s is a lower bound of what the sender can send.\n",
            100.0 * c.loss,
            c.sent
        );
    }
    if udp_sender_bound(doc) == Some(true) {
        md.push_str("Every path delivered at least 90 % of what the sender sent: the forwarders kept up, the sender is the limit of this run, so the ratios between paths are capped by it and say little about the forwarders.\n\n");
    }
    let receivers: Vec<&str> = st["udp_receivers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if !receivers.is_empty() {
        md.push_str("What takes the frames at each hop (a veth takes frames sent by XDP only when it has NAPI: a native XDP program or GRO; the first hop's NAPI runs threaded, in a kernel thread rather than in the sender's softirq, on every path alike):\n\n");
        for r in receivers {
            let _ = writeln!(md, "* {r}");
        }
        md.push('\n');
    }
    md.push_str("HAProxy has no UDP mode, so it has no UDP row.\n\n");
    Ok(())
}

pub fn write() -> Result<PathBuf> {
    let bench = crate::root().join("bench");
    let dp_file = latest("dataplane");
    let mb_file = latest("microbench");
    let cp_file = latest("control-plane");
    let dp = dp_file.as_deref().map(load).transpose()?;
    let mb = mb_file.as_deref().map(load).transpose()?;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# meshlb benchmark report\n\nGenerated by `cargo xtask bench report` (run at the end of `cargo xtask bench all`) from the newest results files; every sample, the machine, the versions and the exact command are in those files. Re-run on your machine before quoting any number.\n"
    );
    let mut targets: Vec<Target> = Vec::new();

    if let (Some(doc), Some(f)) = (&dp, &dp_file) {
        let m = &doc["machine"];
        let st = &doc["setup"];
        let _ = writeln!(
            md,
            "## Data plane\n\nResults: [`{}`]({}) — command `{}`.\n\nMachine: {} ({} CPUs), `{}`. {}; {}; {}; {}.\n\nSetup: {}. {} rounds per scenario, paths interleaved in each round ({}), {} s per run; wrk `{}`. Backend: {}. HAProxy: {}. iptables: {}.\n",
            rel(f), rel(f),
            doc["command"].as_str().unwrap_or_default(),
            m["cpu"].as_str().unwrap_or_default(),
            m["nproc"],
            m["uname"].as_str().unwrap_or_default(),
            m["wrk"].as_str().unwrap_or_default(),
            m["nginx"].as_str().unwrap_or_default(),
            m["haproxy"].as_str().unwrap_or_default(),
            m["iptables"].as_str().unwrap_or_default(),
            st["topology"].as_str().unwrap_or_default(),
            st["rounds"],
            st["order"].as_str().unwrap_or_default(),
            st["duration_s"],
            st["wrk"].as_str().unwrap_or_default(),
            st["backend"].as_str().unwrap_or_default(),
            st["haproxy"].as_str().unwrap_or_default(),
            st["iptables"].as_str().unwrap_or_default(),
        );
        let _ = writeln!(
            md,
            "| path | namespace | client source | target |\n|---|---|---|---|"
        );
        for p in st["paths"].as_array().into_iter().flatten() {
            let _ = writeln!(
                md,
                "| {} | `{}` | {} | {} |",
                p["name"].as_str().unwrap_or_default(),
                p["namespace"].as_str().unwrap_or_default(),
                p["client_source"].as_str().unwrap_or_default(),
                p["target"].as_str().unwrap_or_default()
            );
        }
        md.push('\n');

        for (sc, title, unit, svg) in [
            (
                "keepalive",
                "Keep-alive HTTP (wrk)",
                "req/s",
                "keepalive.svg",
            ),
            (
                "conn-per-request",
                "Connection per request (wrk, Connection: close)",
                "req/s",
                "conn-per-request.svg",
            ),
        ] {
            let k = key_of(sc);
            let bars: Vec<(String, Stat)> = paths_of(doc, sc)
                .into_iter()
                .filter_map(|p| get(doc, sc, &p, k).map(|s| (p, s)))
                .collect();
            if bars.is_empty() {
                continue;
            }
            std::fs::write(bench.join(svg), bar_chart(title, unit, &bars))?;
            let _ = writeln!(md, "### {title}\n\n![{title}]({svg})\n");
            let peers: Vec<&String> = bars.iter().map(|(p, _)| p).collect();
            let _ = write!(md, "| path | median {unit} | min | max | n | ×direct | meshlb-native ÷ this |\n|---|---|---|---|---|---|---|\n");
            for (p, s) in &bars {
                let _ = writeln!(
                    md,
                    "| {p} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
                    s.median,
                    s.min,
                    s.max,
                    s.n,
                    ratio(doc, sc, p, "direct").map_or("–".into(), |r| format!("{r:.2}")),
                    ratio(doc, sc, MESHLB, p).map_or("–".into(), |r| format!("{r:.2}")),
                );
            }
            let _ = peers;
            md.push('\n');
        }
        udp_section(&mut md, doc, &bench)?;

        // Rounds: conn-per-request and the mixed collapse test.
        let mut series = Vec::new();
        for p in paths_of(doc, "conn-per-request") {
            let v = values(doc, "conn-per-request", &p, "rps");
            series.push((
                p,
                v.iter()
                    .enumerate()
                    .map(|(i, y)| (i as f64 + 1.0, *y))
                    .collect(),
            ));
        }
        if !series.is_empty() {
            std::fs::write(
                bench.join("conn-per-request-rounds.svg"),
                line_chart(
                    "Connection per request, per round",
                    "round",
                    "req/s",
                    &series,
                    false,
                ),
            )?;
            let _ = writeln!(md, "### Connection per request, round by round\n\n![per round](conn-per-request-rounds.svg)\n");
        }
        let mut mixed = Vec::new();
        for sc in ["mixed-meshlb", "mixed-iptables"] {
            for p in paths_of(doc, sc) {
                let v = values(doc, sc, &p, "rps");
                mixed.push((
                    format!("{}: {p}", sc.trim_start_matches("mixed-")),
                    v.iter()
                        .enumerate()
                        .map(|(i, y)| (i as f64 + 1.0, *y))
                        .collect(),
                ));
            }
        }
        if !mixed.is_empty() {
            std::fs::write(
                bench.join("mixed-rounds.svg"),
                line_chart(
                    "Mixed: same client, direct and via the VIP",
                    "round",
                    "req/s",
                    &mixed,
                    false,
                ),
            )?;
            let _ = writeln!(
                md,
                "### Mixed: one client address, direct and through the load balancer\n\nConnection per request; in each round the client first reaches the backend directly (through the load balancer's namespace, not translated: `direct-same-src`), then through the VIP, from the same source address — so the backend sees the same 4-tuples from both. A conntrack-based DNAT keeps separate state for the two and its tuples clash (ENV.md measured iptables falling 3.7k → 0.9k); meshlb translates before the stack and tracks only its own flows. *Collapse* here means a round below half of that path's best round.\n\n![mixed](mixed-rounds.svg)\n"
            );
            let _ = writeln!(md, "| scenario | path | req/s per round |\n|---|---|---|");
            for sc in ["mixed-meshlb", "mixed-iptables"] {
                for p in paths_of(doc, sc) {
                    let v: Vec<String> = values(doc, sc, &p, "rps")
                        .iter()
                        .map(|x| format!("{x:.0}"))
                        .collect();
                    let _ = writeln!(md, "| {sc} | {p} | {} |", v.join(", "));
                }
            }
            md.push('\n');
        }

        // Latency CDF: the median over rounds of each percentile point.
        let mut cdf = Vec::new();
        for p in paths_of(doc, "latency") {
            let mut by_pct: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            for s in samples(doc, "latency").filter(|s| s["path"] == p.as_str()) {
                for pt in s["cdf_us"].as_array().into_iter().flatten() {
                    if let (Some(pc), Some(us)) = (pt[0].as_f64(), pt[1].as_f64()) {
                        by_pct.entry(format!("{pc:08.3}")).or_default().push(us);
                    }
                }
            }
            let mut line: Vec<(f64, f64)> = by_pct
                .into_iter()
                .filter_map(|(k, v)| Some((stat(v)?.median, k.parse::<f64>().ok()?)))
                .collect();
            line.sort_by(|a, b| a.1.total_cmp(&b.1));
            cdf.push((p, line));
        }
        if !cdf.is_empty() {
            std::fs::write(
                bench.join("latency-cdf.svg"),
                line_chart(
                    "Latency CDF at a fixed request rate",
                    "latency (µs, log scale)",
                    "percentile",
                    &cdf,
                    true,
                ),
            )?;
            let _ = writeln!(
                md,
                "### Latency at a fixed rate\n\n{}. The CDF shows, per percentile, the median over rounds.\n\n![latency CDF](latency-cdf.svg)\n\n| path | p50 µs | p90 µs | p99 µs | p99.9 µs | errors |\n|---|---|---|---|---|---|",
                st["latency"].as_str().unwrap_or_default()
            );
            for p in paths_of(doc, "latency") {
                let m = |k| get(doc, "latency", &p, k).map_or(f64::NAN, |s| s.median);
                let errors: f64 = values(doc, "latency", &p, "errors").iter().sum();
                let _ = writeln!(
                    md,
                    "| {p} | {:.0} | {:.0} | {:.0} | {:.0} | {errors:.0} |",
                    m("p50_us"),
                    m("p90_us"),
                    m("p99_us"),
                    m("p999_us")
                );
            }
            md.push('\n');
        }

        let r = |sc, a, b| ratio(doc, sc, a, b);
        let ka = r("keepalive", MESHLB, "direct");
        targets.push(Target {
            what: "keep-alive through meshlb ÷ direct ≥ 0.97".into(),
            value: ka.map_or("–".into(), |x| format!("{x:.2}")),
            met: ka.map(|x| x >= 0.97),
            note: "wrk keep-alive, medians".into(),
        });
        let cpr = r("conn-per-request", MESHLB, "direct");
        let coll = collapsed(doc, "mixed-meshlb");
        targets.push(Target {
            what: "connection per request through meshlb ÷ direct ≥ 0.95, no collapse".into(),
            value: format!(
                "{}; mixed collapse: {}",
                cpr.map_or("–".into(), |x| format!("{x:.2}")),
                coll.map_or("–", |c| if c { "yes" } else { "no" })
            ),
            met: cpr.map(|x| x >= 0.95 && coll != Some(true)),
            note: format!(
                "iptables in the same mixed test: collapse {}",
                collapsed(doc, "mixed-iptables").map_or("–", |c| if c { "yes" } else { "no" })
            ),
        });
        for sc in ["keepalive", "conn-per-request"] {
            let h = r(sc, MESHLB, "haproxy");
            targets.push(Target {
                what: format!("meshlb XDP ≥ 1.5× HAProxy req/s ({sc})"),
                value: h.map_or("–".into(), |x| format!("{x:.2}×")),
                met: h.map(|x| x >= 1.5),
                note: "HAProxy: one thread, TCP mode".into(),
            });
        }
        let u = r("udp", MESHLB, "iptables");
        targets.push(Target {
            what: "meshlb XDP ≥ 3× iptables DNAT packets/s".into(),
            value: u.map_or("–".into(), |x| format!("{x:.2}×")),
            met: u.map(|x| x >= 3.0),
            note: format!(
                "sender: {}; its ceiling {} pkt/s{}",
                doc["setup"]["udp_sender"].as_str().unwrap_or("socket-blaster"),
                get(doc, "udp", CEILING, "pps").map_or("–".into(), |s| fmt_num(s.median)),
                if udp_sender_bound(doc) == Some(true) {
                    "; every path delivered what the sender sent, so the ratio is capped by the sender, not by the load balancers"
                } else {
                    ""
                }
            ),
        });
        let b = r("udp", MESHLB, BARE);
        targets.push(Target {
            what: "meshlb XDP ≥ 0.8× the bare forwarder packets/s".into(),
            value: b.map_or("–".into(), |x| format!("{x:.2}×")),
            met: b.map(|x| x >= 0.8),
            note: "the bare forwarder: parse, FIB lookup, redirect (`meshlb_bare`), same sender"
                .into(),
        });
    } else {
        md.push_str("## Data plane\n\nNo `*-dataplane.json` results yet: run `cargo xtask bench dataplane`.\n\n");
    }

    if let (Some(doc), Some(f)) = (&mb, &mb_file) {
        let _ = writeln!(
            md,
            "## Micro-benchmark: cost per packet (BPF_PROG_TEST_RUN)\n\nResults: [`{}`]({}) — `{}`.\n\nMethod: {}. The kernel does not restore the frame between the repetitions of a `repeat` run, so after the first DNAT the LB program would be timed on a frame addressed to the backend (the run recorded this: {}); hence every program is timed per call on a fresh frame, and the `pass` program (returns XDP_PASS at once) gives the floor of that method (one `ktime_get_ns` and bh disable/enable), subtracted for the *net* column. The `repeat` runs of the `pass` program (the one program whose frame no run changes) are a cross-check of that floor.\n\n* **hit**: an ACK of an established flow: frontend lookup, conntrack hit, DNAT, the backend's cached next hop (no FIB lookup), redirect;\n* **miss**: a SYN from a new (address, port) every call: frontend lookup, conntrack miss, Maglev, two LRU inserts (which evict once the embryonic table is full, as under a flood: later rounds), the cached next hop, redirect;\n* **bare**: the reference, what any routing XDP program must do: parse, `bpf_fib_lookup`, TTL, MACs, redirect (frames addressed to the backend itself).\n",
            rel(f), rel(f),
            doc["bench_command"].as_str().unwrap_or_default(),
            doc["method"].as_str().unwrap_or_default(),
            doc["repeat_check"],
        );
        let bars: Vec<(String, Stat)> = MICRO_CASES
            .iter()
            .filter_map(|c| micro(doc, c, "per-call").map(|s| (c.to_string(), s)))
            .collect();
        std::fs::write(
            bench.join("microbench.svg"),
            bar_chart("ns per packet (per call)", "ns", &bars),
        )?;
        let _ = writeln!(md, "![ns per packet](microbench.svg)\n\n| case | median ns | min | max | net ns | ÷ bare (net) |\n|---|---|---|---|---|---|");
        for (c, s) in &bars {
            let fam = if c.ends_with("v6") { "v6" } else { "v4" };
            let bare = micro_net(doc, &format!("bare-{fam}"));
            let net = micro_net(doc, c);
            let _ = writeln!(
                md,
                "| {c} | {:.1} | {:.1} | {:.1} | {} | {} |",
                s.median,
                s.min,
                s.max,
                net.map_or("–".into(), |x| format!("{x:.1}")),
                match (net, bare) {
                    (Some(n), Some(b)) if c.starts_with("lb") => format!("{:.1}×", n / b.max(1.0)),
                    _ => "–".into(),
                }
            );
        }
        for c in ["pass-v4"] {
            if let Some(s) = micro(doc, c, "repeat") {
                let _ = writeln!(
                    md,
                    "\n`repeat` cross-check, {c}: {:.1} ns per repetition (median).",
                    s.median
                );
            }
        }
        md.push('\n');
        for fam in ["v4", "v6"] {
            for (case, what, limit) in [("hit", "conntrack hit", 1.5), ("miss", "new flow", 3.0)] {
                let lb = micro_net(doc, &format!("lb-{case}-{fam}"));
                let bare = micro_net(doc, &format!("bare-{fam}"));
                let x = lb.zip(bare).map(|(l, b)| l / b.max(1.0));
                targets.push(Target {
                    what: format!(
                        "LB program ≤ {limit}× the bare forwarder per packet (IP{fam}, {what})"
                    ),
                    value: x.map_or("–".into(), |x| {
                        let gross = micro(doc, &format!("lb-{case}-{fam}"), "per-call")
                            .zip(micro(doc, &format!("bare-{fam}"), "per-call"))
                            .map_or(f64::NAN, |(l, b)| l.median / b.median);
                        format!(
                            "{x:.2}× net ({:.0} vs {:.0} ns); {gross:.2}× gross",
                            lb.unwrap_or(0.0),
                            bare.unwrap_or(0.0)
                        )
                    }),
                    met: x.map(|x| x <= limit),
                    note: "net: minus the `pass` floor of the per-call method; the bare forwarder parses, asks the FIB and redirects".into(),
                });
            }
        }
    } else {
        md.push_str("## Micro-benchmark\n\nNo `*-microbench.json` results yet: run `cargo xtask bench microbench`.\n\n");
    }

    if let Some(f) = &cp_file {
        let _ = writeln!(
            md,
            "## Control plane\n\nResults: [`{}`]({}) (`cargo xtask bench control-plane`): services × 10 tasks in etcd, meshlb XDP generic.\n",
            rel(f),
            rel(f)
        );
        if let Ok(cp) = load(f) {
            control_plane_tables(&mut md, &cp);
        }
    }

    crate::report_vm::section(&mut md, &bench)?;

    let mut head =
        String::from("## Targets\n\n| target | measured | verdict | note |\n|---|---|---|---|\n");
    for t in &targets {
        let _ = writeln!(
            head,
            "| {} | {} | {} | {} |",
            t.what,
            t.value,
            mark(t),
            t.note
        );
    }
    head.push_str("\nThe same paths inside QEMU guests (IPVS and kube-proxy-style IPVS as peers, aarch64, the routing mesh across three guests) are in [Under QEMU](#under-qemu): TCG, ratios only.\n\n");
    let split = md.find("## ").unwrap_or(md.len());
    md.insert_str(split, &head);
    let out = bench.join("REPORT.md");
    std::fs::write(&out, md).with_context(|| format!("writing {}", out.display()))?;
    println!("report: {}", out.display());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_axes() {
        let s = stat(vec![3.0, 1.0, f64::NAN, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert!(stat(vec![]).is_none());
        assert_eq!(nice_ceil(7300.0), 10000.0);
        assert_eq!(nice_ceil(2100.0), 2500.0);
        assert_eq!(fmt_num(66_102.0), "66k");
    }

    #[test]
    fn collapse_detection() {
        let doc = serde_json::json!({"samples": [
            {"scenario": "mixed-x", "path": "a", "rps": 4000.0},
            {"scenario": "mixed-x", "path": "a", "rps": 900.0},
            {"scenario": "mixed-y", "path": "a", "rps": 4000.0},
            {"scenario": "mixed-y", "path": "a", "rps": 3500.0},
        ]});
        assert_eq!(collapsed(&doc, "mixed-x"), Some(true));
        assert_eq!(collapsed(&doc, "mixed-y"), Some(false));
        assert_eq!(collapsed(&doc, "mixed-z"), None);
    }

    #[test]
    fn charts_are_svg() {
        let s = Stat {
            median: 2.0,
            min: 1.0,
            max: 3.0,
            n: 3,
        };
        let b = bar_chart("t<", "u", &[("a".into(), s)]);
        assert!(b.starts_with("<svg") && b.ends_with("</svg>\n") && b.contains("t&lt;"));
        let l = line_chart(
            "t",
            "x",
            "y",
            &[("a".into(), vec![(10.0, 50.0), (100.0, 99.0)])],
            true,
        );
        assert!(l.contains("<polyline"));
    }
}
