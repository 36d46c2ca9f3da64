//! The "Under QEMU" section of bench/REPORT.md: per arch, the newest
//! `bench/results/*-vm-<arch>.json` of `cargo xtask bench vm` — the ratios
//! of meshlb against kube-proxy-style IPVS, iptables and HAProxy, every
//! path's figures (failed runs counted, never dropped), the routing mesh and
//! the control plane, with a bar chart per workload.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde_json::Value;

use crate::bench_vm::{key_of, MESH_PATHS, MESH_WORKLOADS, PATHS, WORKLOADS};
use crate::report::{bar_chart, latest, load, rel, stat, Stat};

const ARCHES: &[&str] = &["x86_64", "aarch64"];

fn title(workload: &str) -> &'static str {
    match workload {
        "keepalive" => "Keep-alive HTTP (wrk), req/s",
        "cpr" => "Connection per request (wrk, Connection: close), req/s",
        "udp" => "UDP datagrams/s delivered to the backend",
        _ => "Latency at a fixed rate, p50 µs (lower is better)",
    }
}

fn values(samples: &[Value], workload: &str, path: &str, key: &str) -> Vec<f64> {
    samples
        .iter()
        .filter(|s| s["workload"] == workload && s["path"] == path && s["ok"] == true)
        .filter_map(|s| s[key].as_f64())
        .collect()
}

/// `(ok, total, first error)` of one path's runs.
fn runs(samples: &[Value], workload: &str, path: &str) -> (usize, usize, Option<String>) {
    let all: Vec<&Value> = samples
        .iter()
        .filter(|s| s["workload"] == workload && s["path"] == path)
        .collect();
    let ok = all.iter().filter(|s| s["ok"] == true).count();
    let err = all
        .iter()
        .find(|s| s["ok"] != true)
        .and_then(|s| s["error"].as_str())
        .map(str::to_string);
    (ok, all.len(), err)
}

fn med(samples: &[Value], workload: &str, path: &str) -> Option<f64> {
    stat(values(samples, workload, path, key_of(workload))).map(|s| s.median)
}

/// `a ÷ b` of the medians (for latency: `b ÷ a`, so above 1 is better for
/// `a` everywhere).
fn ratio(samples: &[Value], workload: &str, a: &str, b: &str) -> String {
    match (med(samples, workload, a), med(samples, workload, b)) {
        (Some(x), Some(y)) if x > 0.0 && y > 0.0 => {
            let r = if workload == "latency" { y / x } else { x / y };
            format!("{r:.2}")
        }
        _ => "failed".into(),
    }
}

/// Appends the section; writes the charts next to REPORT.md.
pub fn section(md: &mut String, bench: &Path) -> Result<()> {
    let files: Vec<(&str, std::path::PathBuf)> = ARCHES
        .iter()
        .filter_map(|a| latest(&format!("vm-{a}")).map(|f| (*a, f)))
        .collect();
    let _ = writeln!(md, "## Under QEMU\n");
    if files.is_empty() {
        let _ = writeln!(
            md,
            "No results yet: run `cargo xtask bench vm` (x86_64 and aarch64 guests).\n"
        );
        return Ok(());
    }
    let _ = writeln!(
        md,
        "`cargo xtask bench vm`: the same paths inside QEMU guests running Debian's kernel, where IPVS exists — meshlb's IPVS data plane and a kube-proxy-style IPVS table made with `ipvsadm` (rr, masquerade) join the peers — and on aarch64. **The accelerator is TCG** (this machine has no KVM): every guest instruction is emulated, so absolute figures are emulation-bound and say nothing about real hardware; only the ratios between paths measured in the same run mean anything. Ratios are of medians; above 1 means meshlb did better (for latency: the peer's p50 ÷ meshlb's).\n"
    );
    for (arch, f) in &files {
        let doc = load(f)?;
        arch_section(md, bench, arch, f, &doc)?;
    }
    Ok(())
}

fn arch_section(md: &mut String, bench: &Path, arch: &str, f: &Path, doc: &Value) -> Result<()> {
    let empty = Vec::new();
    let samples = doc["samples"].as_array().unwrap_or(&empty);
    let mesh = doc["mesh_samples"].as_array().unwrap_or(&empty);
    let g = &doc["guest"];
    let st = &doc["setup"];
    let _ = writeln!(
        md,
        "### {arch} guests ({})\n\nResults: [`{}`]({}) — command `{}`, {:.0} s. Guest kernel {} ({} vCPUs in the data-plane guest, {} MiB); {}; {}; {}; {}; {}.\n\nSetup: {}. {} round(s), paths interleaved in each round, {} s per run; wrk `{}`. Latency: {}. UDP: {}.\n",
        doc["accelerator"].as_str().unwrap_or("?").to_uppercase(),
        rel(f), rel(f),
        doc["command"].as_str().unwrap_or_default(),
        doc["took_s"].as_f64().unwrap_or(0.0),
        g["kernel"].as_str().unwrap_or("?"),
        g["cpus"].as_str().unwrap_or("?"),
        g["mem_kib"].as_str().and_then(|k| k.parse::<f64>().ok()).map_or("?".into(), |k| format!("{:.0}", k / 1024.0)),
        g["wrk"].as_str().unwrap_or("wrk ?"),
        g["nginx"].as_str().unwrap_or("nginx ?"),
        g["haproxy"].as_str().unwrap_or("haproxy ?"),
        g["ipvsadm"].as_str().unwrap_or("ipvsadm ?"),
        g["iptables"].as_str().unwrap_or("iptables ?"),
        st["dataplane_guest"].as_str().unwrap_or_default(),
        st["rounds"],
        st["duration_s"],
        st["wrk"].as_str().unwrap_or_default(),
        st["latency"].as_str().unwrap_or_default(),
        st["udp"].as_str().unwrap_or_default(),
    );
    if let Some(m) = doc["merged"].as_object().filter(|m| !m.is_empty()) {
        let _ = writeln!(
            md,
            "This file re-ran only some parts; taken from the earlier run of this arch: {}.\n",
            m.iter()
                .map(|(part, ts)| format!("{part} ({})", ts.as_str().unwrap_or("?")))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for (part, o) in doc["outcomes"].as_object().into_iter().flatten() {
        if o["pass"] != true {
            let _ = writeln!(
                md,
                "**The {part} guest failed**: {}\n",
                o["detail"].as_str().unwrap_or_default()
            );
        }
    }
    let _ = writeln!(
        md,
        "XDP modes: lane 2 {} (native XDP on veth), lane 3 {}; native XDP on virtio-net is the mesh case's (n1's NIC: {}).\n",
        g["xdp_l2"].as_str().unwrap_or("?"),
        g["xdp_l3"].as_str().unwrap_or("?"),
        doc["mesh_guest"]["xdp_mode_r1"].as_str().unwrap_or("not recorded"),
    );
    let _ = writeln!(
        md,
        "| workload | meshlb-native ÷ ipvsadm (kube-proxy IPVS) | ÷ iptables | ÷ meshlb-ipvs | ÷ haproxy | ÷ direct | meshlb-generic ÷ ipvsadm |\n|---|---|---|---|---|---|---|"
    );
    for w in WORKLOADS {
        let hap = if *w == "udp" {
            "–".to_string()
        } else {
            ratio(samples, w, "meshlb-native", "haproxy")
        };
        let _ = writeln!(
            md,
            "| {w} | **{}** | **{}** | {} | {hap} | {} | {} |",
            ratio(samples, w, "meshlb-native", "ipvsadm"),
            ratio(samples, w, "meshlb-native", "iptables"),
            ratio(samples, w, "meshlb-native", "meshlb-ipvs"),
            ratio(samples, w, "meshlb-native", "direct"),
            ratio(samples, w, "meshlb-generic", "ipvsadm"),
        );
    }
    let _ = writeln!(md);
    for w in WORKLOADS {
        let key = key_of(w);
        let _ = writeln!(
            md,
            "#### {}\n\n![{arch} {w}](vm-{arch}-{w}.svg)\n\n| path | median | min | max | runs ok | ×direct | note |\n|---|---|---|---|---|---|---|",
            title(w)
        );
        let mut bars: Vec<(String, Stat)> = Vec::new();
        for p in PATHS {
            if *w == "udp" && *p == "haproxy" {
                continue;
            }
            let (ok, total, err) = runs(samples, w, p);
            let s = stat(values(samples, w, p, key));
            let x = |v: Option<&Stat>, f: fn(&Stat) -> f64| {
                v.map_or("–".into(), |s| format!("{:.0}", f(s)))
            };
            let _ = writeln!(
                md,
                "| {p} | {} | {} | {} | {ok}/{total} | {} | {} |",
                x(s.as_ref(), |s| s.median),
                x(s.as_ref(), |s| s.min),
                x(s.as_ref(), |s| s.max),
                if *w == "latency" {
                    match (med(samples, w, "direct"), s.as_ref()) {
                        (Some(d), Some(s)) => format!("{:.2}", s.median / d),
                        _ => "–".into(),
                    }
                } else {
                    ratio(samples, w, p, "direct")
                },
                err.map_or(String::new(), |e| format!(
                    "failed: {}",
                    e.replace('|', "/")
                )),
            );
            if let Some(s) = s {
                bars.push(((*p).to_string(), s));
            }
        }
        let _ = writeln!(md);
        let unit = match *w {
            "udp" => "packets/s",
            "latency" => "µs",
            _ => "req/s",
        };
        std::fs::write(
            bench.join(format!("vm-{arch}-{w}.svg")),
            bar_chart(
                &format!("{arch} under QEMU (TCG): {}", title(w)),
                unit,
                &bars,
            ),
        )?;
    }
    if samples.iter().any(|s| s["workload"] == "latency") {
        let _ = writeln!(
            md,
            "Latency p99 µs (median over rounds): {}.\n",
            PATHS
                .iter()
                .map(|p| stat(values(samples, "latency", p, "p99_us"))
                    .map_or(format!("{p} –"), |s| format!("{p} {:.0}", s.median)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    // The mesh.
    let _ = writeln!(
        md,
        "#### Routing mesh: through node 1 to a task on node 2\n\n{}. Paths: `direct` (client to the task, routed via n2), `meshlb-xdp` and `meshlb-ipvs` (n1's published port :80; one data plane at a time, so each round has an XDP phase and an IPVS phase), `iptables` (n1 :8082 to the task's :8001, measured in the XDP phase) and `iptables-ipvs` (the same rules, measured in the IPVS phase). A connection-per-request round far below the others is a collapse of that path (as the host suite's mixed case shows for conntrack-based NAT), not noise: see the per-round column.\n\n![{arch} mesh](vm-{arch}-mesh.svg)\n\n| workload | meshlb-xdp ÷ iptables | meshlb-ipvs ÷ iptables-ipvs | meshlb-xdp ÷ meshlb-ipvs | meshlb-xdp ÷ direct |\n|---|---|---|---|---|",
        st["mesh"].as_str().unwrap_or_default()
    );
    for w in MESH_WORKLOADS {
        let _ = writeln!(
            md,
            "| {w} | **{}** | **{}** | {} | {} |",
            ratio(mesh, w, "meshlb-xdp", "iptables"),
            ratio(mesh, w, "meshlb-ipvs", "iptables-ipvs"),
            ratio(mesh, w, "meshlb-xdp", "meshlb-ipvs"),
            ratio(mesh, w, "meshlb-xdp", "direct"),
        );
    }
    let _ = writeln!(
        md,
        "\n| path | keep-alive req/s (median) | runs ok | conn-per-request req/s (median) | per round | runs ok | note |\n|---|---|---|---|---|---|---|"
    );
    let mut bars: Vec<(String, Stat)> = Vec::new();
    for p in MESH_PATHS {
        let (ka_ok, ka_n, ka_err) = runs(mesh, "keepalive", p);
        let (c_ok, c_n, c_err) = runs(mesh, "cpr", p);
        let fmt = |w: &str| med(mesh, w, p).map_or("–".into(), |v| format!("{v:.0}"));
        let rounds: Vec<String> = mesh
            .iter()
            .filter(|s| s["workload"] == "cpr" && s["path"] == *p)
            .map(|s| {
                s["rps"]
                    .as_f64()
                    .map_or("failed".into(), |v| format!("{v:.0}"))
            })
            .collect();
        let _ = writeln!(
            md,
            "| {p} | {} | {ka_ok}/{ka_n} | {} | {} | {c_ok}/{c_n} | {} |",
            fmt("keepalive"),
            fmt("cpr"),
            rounds.join(", "),
            ka_err.or(c_err).map_or(String::new(), |e| format!(
                "failed: {}",
                e.replace('|', "/")
            )),
        );
        if let Some(s) = stat(values(mesh, "cpr", p, "rps")) {
            bars.push(((*p).to_string(), s));
        }
    }
    std::fs::write(
        bench.join(format!("vm-{arch}-mesh.svg")),
        bar_chart(
            &format!("{arch} under QEMU (TCG): mesh, connection per request"),
            "req/s",
            &bars,
        ),
    )?;

    // The control plane.
    let _ = writeln!(
        md,
        "\n#### Control plane on a Pi-sized guest\n\n{}.\n\n| round | services × tasks | SIGHUP → applied (s) | SIGHUP → status lists all (s) | RSS before (MiB) | RSS after (MiB) | peak RSS (MiB) |\n|---|---|---|---|---|---|---|",
        st["control_plane"].as_str().unwrap_or_default()
    );
    for c in doc["control_plane"].as_array().into_iter().flatten() {
        if c["ok"] == true {
            let mib = |k: &str| {
                c[k].as_f64()
                    .map_or("–".into(), |v| format!("{:.1}", v / 1024.0))
            };
            let _ = writeln!(
                md,
                "| {} | {} × {} | {} | {} | {} | {} | {} |",
                c["round"],
                c["services"],
                c["tasks"],
                c["apply_logged_s"],
                c["status_lists_all_s"],
                mib("rss_empty_kib"),
                mib("rss_kib"),
                mib("hwm_kib"),
            );
        } else {
            let _ = writeln!(
                md,
                "| {} | failed: {} | | | | | |",
                c["round"],
                c["error"].as_str().unwrap_or_default().replace('|', "/")
            );
        }
    }
    let _ = writeln!(md);
    Ok(())
}
