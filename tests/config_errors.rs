//! A malformed config makes `meshlb run` exit with status 2 and one stderr
//! line naming the bad field, before anything is attached or pinned; a
//! malformed `explain` address is a one-line usage error too. A valid
//! config in the same setup is the control. `run` with neither a config
//! nor etcd is a usage error too. Needs root; see `common`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// A port the test itself listens on in the LB namespace (on every
/// address), as sshd would on 22.
const SSHD_PORT: u16 = 2222;

const BASE: &str = r#"node = "lb"

[[service]]
name = "web"
vip = "10.96.0.10"
publish = [{ proto = "tcp", port = 80, target = 8000 }]

[[service.backend]]
addr = "10.201.1.2"
"#;

/// (case, config text, the line must mention one of these, case-insensitive)
fn cases() -> Vec<(&'static str, String, &'static [&'static str])> {
    let long_name = "n".repeat(61);
    let dup = format!(
        "{}\n{}",
        BASE.replace("\"web\"", "\"dupsvc\""),
        BASE.replace("node = \"lb\"\n", "")
            .replace("\"web\"", "\"dupsvc\"")
            .replace("10.96.0.10", "10.96.0.20")
    );
    vec![
        (
            "bad TOML value",
            BASE.replace("\"10.96.0.10\"", "10.96.0.10"),
            &["vip", "line"],
        ),
        (
            "bad TOML header",
            BASE.replace("[[service]]", "[[service]"),
            &["line", "toml"],
        ),
        ("port 0", BASE.replace("port = 80", "port = 0"), &["port"]),
        (
            "port 70000",
            BASE.replace("port = 80", "port = 70000"),
            &["port"],
        ),
        (
            "target 0",
            BASE.replace("target = 8000", "target = 0"),
            &["target"],
        ),
        (
            "bad vip",
            BASE.replace("10.96.0.10", "10.96.0.300"),
            &["vip"],
        ),
        (
            "unknown scheduler",
            BASE.replace("publish =", "scheduler = \"fastest\"\npublish ="),
            &["scheduler"],
        ),
        (
            "61-char name",
            BASE.replace("\"web\"", &format!("\"{long_name}\"")),
            &["name"],
        ),
        (
            "unknown service key",
            BASE.replace("publish =", "colour = \"blue\"\npublish ="),
            &["colour"],
        ),
        (
            "unknown top-level key",
            format!("nodee = \"x\"\n{BASE}"),
            &["nodee"],
        ),
        ("duplicate service name", dup, &["dupsvc"]),
        (
            "empty publish",
            BASE.replace("[{ proto = \"tcp\", port = 80, target = 8000 }]", "[]"),
            &["publish"],
        ),
        (
            "unknown proto",
            BASE.replace("\"tcp\"", "\"sctp\""),
            &["proto"],
        ),
        (
            "bad backend addr",
            BASE.replace("10.201.1.2", "10.201.1.x"),
            &["addr"],
        ),
        (
            "etcd password over plain http",
            format!(
                "node = \"lb\"\n[etcd]\nendpoints = [\"http://127.0.0.1:1\"]\nusername = \"u\"\npassword_file = \"/nonexistent\"\n{}",
                BASE.replacen("node = \"lb\"\n", "", 1)
            ),
            &["etcd-insecure"],
        ),
        (
            "loopback vip",
            BASE.replace("10.96.0.10", "127.0.0.10"),
            &["vip", "loopback"],
        ),
        (
            "cloud metadata backend",
            BASE.replace("10.201.1.2", "169.254.169.254"),
            &["addr", "link-local"],
        ),
        (
            "vip = this node's address",
            BASE.replace("10.96.0.10", &LB_V4.to_string()),
            &["service[0].vip"],
        ),
        (
            "vip = this node's gateway",
            BASE.replace("10.96.0.10", &CLIENT_V4.to_string()),
            &["service[0].vip"],
        ),
        (
            "publish of a port an sshd-like listener holds",
            BASE.replace("port = 80", &format!("port = {SSHD_PORT}")),
            &["service[0].publish[0].port: 2222/tcp is already listened on by pid"],
        ),
        (
            "loopback advertise_addr",
            format!("advertise_addr = \"127.0.0.1\"\n{BASE}"),
            &["advertise_addr"],
        ),
        (
            "advertise_addr not an address of this node",
            format!("advertise_addr = \"192.0.2.77\"\n{BASE}"),
            &["advertise-addr", "192.0.2.77"],
        ),
        (
            "mixed address families",
            BASE.replace("10.96.0.10", "fd00:96::10"),
            &["addr", "vip", "famil"],
        ),
    ]
}

/// Files below `dir`, recursively (none when it does not exist).
fn pins(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(pins(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

fn one_line_naming(out: &CmdOutput, wants: &[&str]) -> Result<(), String> {
    if out.code() != Some(2) {
        return Err(format!("exit status {:?}, want 2", out.status));
    }
    let lines = out.stderr_lines();
    if lines.len() != 1 {
        return Err(format!(
            "{} stderr lines, want 1: {:?}",
            lines.len(),
            out.stderr
        ));
    }
    let line = lines[0].to_lowercase();
    if !wants.iter().any(|w| line.contains(&w.to_lowercase())) {
        return Err(format!("stderr {:?} names none of {wants:?}", lines[0]));
    }
    Ok(())
}

#[test]
fn malformed_config_exits_2_with_one_line_and_attaches_nothing() {
    let topo = Topology::new("cfg", TopoOpts { backends: 0 });
    let iface = topo.lb_client_iface.clone();
    // The client is a gateway of the node ("vip = this node's gateway"),
    // and the test listens as sshd would.
    topo.client_as_gateway("10.250.0.0/16");
    let _sshd = topo.listen_in_lb(SSHD_PORT);
    let mut failures = Vec::new();
    for (i, (case, text, wants)) in cases().into_iter().enumerate() {
        let cfg = topo.write_file(&format!("bad{i}.toml"), &text);
        let dir = topo.bpffs(&format!("bad{i}"));
        let (c, d) = (cfg.display().to_string(), dir.display().to_string());
        let out = topo.meshlb(
            &topo.lb_ns,
            &[
                "run",
                "--config",
                &c,
                "--iface",
                &iface,
                "--xdp-mode",
                "generic",
                "--bpffs",
                &d,
            ],
            Duration::from_secs(15),
        );
        eprintln!("{case}: {:?} {}", out.code(), out.stderr.trim_end());
        let mut problems = Vec::new();
        if let Err(e) = one_line_naming(&out, wants) {
            problems.push(e);
        }
        if let Some(mode) = topo.xdp_mode(&topo.lb_ns, &iface) {
            problems.push(format!("XDP ({mode}) attached to {iface}"));
        }
        let left = pins(&dir);
        if !left.is_empty() {
            problems.push(format!("pinned: {left:?}"));
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{case}: {}\n  config:\n{}\n  {}",
                problems.join("; "),
                text.trim_end(),
                out.describe()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} malformed configs handled wrongly:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );

    // Control: the same command line with a valid config runs and attaches,
    // and `cleanup` undoes it — so the rejections above were about the config.
    let cfg = topo.write_file("good.toml", BASE);
    let mut daemon = topo.start_daemon_on(&cfg, "generic", &[&iface]);
    topo.wait_ready(&mut daemon, &["web"], Duration::from_secs(30));
    assert_eq!(
        topo.xdp_mode(&topo.lb_ns, &iface).as_deref(),
        Some("generic")
    );
    daemon.stop(Duration::from_secs(10));
    let d = topo.lb_bpffs().display().to_string();
    let out = topo.meshlb(
        &topo.lb_ns,
        &["cleanup", "--bpffs", &d],
        Duration::from_secs(20),
    );
    assert!(out.success(), "cleanup failed: {}", out.describe());
    assert_eq!(
        topo.xdp_mode(&topo.lb_ns, &iface),
        None,
        "cleanup left XDP on {iface}"
    );
    assert!(pins(&topo.lb_bpffs()).is_empty(), "cleanup left pins");
}

#[test]
/// `meshlb run` with neither `--config` nor `--etcd`: one line saying so,
/// exit 2, nothing attached or pinned (it never programs a demo service
/// on its own).
fn run_without_config_or_etcd_exits_2_and_attaches_nothing() {
    let topo = Topology::new("cfn", TopoOpts { backends: 0 });
    let iface = topo.lb_client_iface.clone();
    let dir = topo.bpffs("none");
    let d = dir.display().to_string();
    let out = topo.meshlb(
        &topo.lb_ns,
        &[
            "run",
            "--iface",
            &iface,
            "--xdp-mode",
            "generic",
            "--bpffs",
            &d,
        ],
        Duration::from_secs(15),
    );
    if let Err(e) = one_line_naming(&out, &["--config"]) {
        panic!("{e}: {}", out.describe());
    }
    assert!(
        out.stderr.contains("--etcd"),
        "the line names --etcd too: {}",
        out.describe()
    );
    assert_eq!(topo.xdp_mode(&topo.lb_ns, &iface), None, "XDP attached");
    assert!(pins(&dir).is_empty(), "pinned: {:?}", pins(&dir));
}

#[test]
fn explain_with_malformed_address_is_a_one_line_usage_error() {
    let topo = Topology::new("cfx", TopoOpts { backends: 0 });
    let d = topo.lb_bpffs().display().to_string();
    let cases: &[(&str, &str, &str, &[&str])] = &[
        (
            "tcp",
            "10.200.0.2",
            "10.96.0.10:80",
            &["10.200.0.2", "src", "addr"],
        ),
        (
            "tcp",
            "10.200.0.2:70000",
            "10.96.0.10:80",
            &["70000", "src", "port"],
        ),
        (
            "udp",
            "10.200.0.2:4000",
            "10.96.0.300:80",
            &["10.96.0.300", "dst", "addr"],
        ),
        (
            "tcp",
            "10.200.0.2:4000",
            "fd00:96::10:80",
            &["fd00:96::10:80", "dst", "addr"],
        ),
        (
            "sctp",
            "10.200.0.2:4000",
            "10.96.0.10:80",
            &["sctp", "proto"],
        ),
    ];
    let mut failures = Vec::new();
    for (proto, src, dst, wants) in cases {
        let out = topo.meshlb(
            &topo.lb_ns,
            &["explain", proto, src, dst, "--json", "--bpffs", &d],
            Duration::from_secs(15),
        );
        if let Err(e) = one_line_naming(&out, wants) {
            failures.push(format!(
                "explain {proto} {src} {dst}: {e}\n  {}",
                out.describe()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
