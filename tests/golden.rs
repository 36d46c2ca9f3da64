//! Golden test of the inspection CLI on the demo topology (issue 17:
//! "`meshlb status --json` and `explain --json` byte-identical before and
//! after"): a refactor must not change a byte of what operators and
//! scripts read.
//!
//! It builds the topology `cargo xtask demo` builds (a client, the LB
//! node, three backend namespaces 10.201.{1,2,3}.2), runs `meshlb run`
//! with the demo's own config (`src/demo.toml`) and the demo's arguments
//! (client-facing interface `--iface`, backend-facing ones `--task-iface`,
//! `--xdp-mode generic`), waits until it has synced, then runs, against
//! the daemon's pin directory and without sending any traffic:
//! - `meshlb status --json`, compared with `tests/golden/status.json`;
//! - `meshlb explain PROTO SRC DST --json` for the flows of [`FLOWS`]
//!   (TCP and UDP to the VIP, both node ports of the LB's address, and
//!   flows no frontend matches), compared with `tests/golden/explain.txt`
//!   (each output line under a `$ meshlb explain ...` header).
//!
//! The outputs are compared byte for byte after the normalisations of
//! [`normalise_status`] (nothing else is touched, and explain's output is
//! not normalised at all); a mismatch prints a line diff and fails. Before
//! comparing (and before blessing) the outputs are also checked for what
//! they must say: the service, its VIP and ports, its three backends, the
//! scheduler, the interface roles, and a backend chosen for each VIP and
//! node-port flow; so a broken output can never be blessed.
//!
//! To regenerate the golden files after an intended change of the output:
//!
//! ```text
//! MESHLB_BLESS=1 cargo test --test golden
//! ```
//!
//! then review and commit the diff of `tests/golden/`.
//!
//! The topology is `common::Topology` (prefix `mlbt-gold-<pid>`, pins under
//! `/sys/fs/bpf/mlbt-gold-<pid>/lb`), so it runs beside every other test.
//! It differs from the demo's only in what the outputs do not show or
//! what [`normalise_status`] maps back to the demo's names: the interface
//! names, the client's routes (the VIP and backend ranges rather than a
//! default route) and TX checksum offload (off on the backends' ends too).
//! No nginx is started: no request is made, and the demo's service has no
//! health check. Needs root; never skips (in CI or elsewhere).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The demo's config, the file `cargo xtask demo` passes with --config.
/// (If `src/demo.toml` moves, this path moves with it.)
const DEMO_CONFIG: &str = include_str!("../src/demo.toml");
const TAG: &str = "gold";
const READY: Duration = Duration::from_secs(30);
/// How long the status may take to settle once the daemon is ready.
const SETTLE: Duration = Duration::from_secs(20);
const CLI_TIMEOUT: Duration = Duration::from_secs(15);
/// Set to 1 to write the golden files instead of comparing with them.
const BLESS_ENV: &str = "MESHLB_BLESS";

const VIP: &str = "10.96.0.10";
const BACKENDS: [&str; 3] = ["10.201.1.2", "10.201.2.2", "10.201.3.2"];

/// What `explain` is asked, and what each answer must say beyond the
/// golden: `Some(frontend suffix)` when a backend must be chosen, `None`
/// when no service may match. The LB's client-facing address 10.200.0.1
/// is a node address, so the published ports answer there (node ports).
const FLOWS: &[(&str, &str, &str, Option<&str>)] = &[
    // The demo's own `explain` (xtask/src/demo.rs), and two more source
    // ports of the same client: the ring spreads them.
    (
        "tcp",
        "10.200.0.2:40000",
        "10.96.0.10:80",
        Some("10.96.0.10:80/tcp"),
    ),
    (
        "tcp",
        "10.200.0.2:40001",
        "10.96.0.10:80",
        Some("10.96.0.10:80/tcp"),
    ),
    (
        "tcp",
        "10.200.0.2:40002",
        "10.96.0.10:80",
        Some("10.96.0.10:80/tcp"),
    ),
    (
        "udp",
        "10.200.0.2:40000",
        "10.96.0.10:9000",
        Some("10.96.0.10:9000/udp"),
    ),
    // Node ports on the node's own address.
    (
        "tcp",
        "10.200.0.2:40000",
        "10.200.0.1:80",
        Some("(node port)"),
    ),
    (
        "udp",
        "10.200.0.2:40000",
        "10.200.0.1:9000",
        Some("(node port)"),
    ),
    // The VIP on a port it does not publish, a protocol it does not
    // publish on that port, and an address no service has.
    ("tcp", "10.200.0.2:40000", "10.96.0.10:443", None),
    ("udp", "10.200.0.2:40000", "10.96.0.10:80", None),
    ("tcp", "10.200.0.2:40000", "10.96.0.99:80", None),
];

/// Stops the daemon (SIGTERM, then SIGKILL) before the topology's own drop
/// runs `meshlb cleanup` and deletes the namespaces, also when a check
/// panics. Declared after the topology, so dropped before it.
struct DaemonGuard(Proc);

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        self.0.stop(Duration::from_secs(5));
    }
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn blessing() -> bool {
    std::env::var(BLESS_ENV).is_ok_and(|v| v == "1")
}

/// The per-run names in the outputs and what they become: the test's
/// interface names (`gold<pid>lc`, `gold<pid>l<i>`) are mapped to the
/// ones `cargo xtask demo` gives the same interfaces (`lb-cl`, `lb-b<i>`).
/// Each name is replaced only as a whole JSON string or as a word inside
/// one (the `why` text may name an interface).
fn iface_names(topo: &Topology) -> Vec<(String, String)> {
    let mut v = vec![(topo.lb_client_iface.clone(), "lb-cl".to_string())];
    for (i, b) in topo.backends.iter().enumerate() {
        v.push((b.lb_iface.clone(), format!("lb-b{}", i + 1)));
    }
    v
}

/// The only changes made to `status --json` before it is compared; each
/// is something that legitimately differs between runs or machines:
/// 1. interface names carry the test's PID ([`iface_names`]): mapped to
///    the demo's names;
/// 2. `node` is the hostname of the machine (the demo passes no --node):
///    its value becomes `<hostname>`;
/// 3. every other occurrence of the test's prefix (`mlbt-gold-<pid>`) or
///    short name (`gold<pid>`), should a path or name carry one, becomes
///    `<prefix>` / `<short>` (none does today; the golden would show it);
/// 4. the values of the data path's `counters` become 0 (their names are
///    compared): the kernel's own packets move them (below);
/// 5. `socket_lb.cgroup`, where the machine mounts the cgroup v2
///    hierarchy (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`), becomes
///    `<cgroup2>`.
///
/// Per-service and per-backend numbers, flow counts and rates are not
/// normalised: the test sends no traffic, so they must be what the golden
/// says (0).
fn normalise_status(topo: &Topology, text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_counters = false;
    for line in text.split_inclusive('\n') {
        // The data path's own counters (`"counters"`, the last top-level
        // object): the names are compared, the values zeroed. Packets the
        // kernel sends on its own (IPv6 router solicitations, MLD reports
        // on the new veths) reach the programs at any moment and move
        // `not_service`, `other_proto` and the like without any test
        // traffic.
        if line.starts_with("  \"counters\": {") {
            in_counters = true;
        } else if in_counters && line.starts_with("  }") {
            in_counters = false;
        } else if in_counters {
            if let Some((name, value)) = line.split_once(": ") {
                let comma = if value.trim_end().ends_with(',') {
                    ","
                } else {
                    ""
                };
                out.push_str(&format!("{name}: 0{comma}\n"));
                continue;
            }
        }
        // `socket_lb.cgroup`: one level down, four spaces of indent.
        if let Some(rest) = line.strip_prefix("    \"cgroup\": ") {
            let comma = if rest.trim_end().ends_with(',') {
                ","
            } else {
                ""
            };
            out.push_str(&format!("    \"cgroup\": \"<cgroup2>\"{comma}\n"));
            continue;
        }
        // Top-level key of the pretty-printed object: two spaces of indent.
        if let Some(rest) = line.strip_prefix("  \"node\": ") {
            let comma = if rest.trim_end().ends_with(',') {
                ","
            } else {
                ""
            };
            let nl = if line.ends_with('\n') { "\n" } else { "" };
            out.push_str(&format!("  \"node\": \"<hostname>\"{comma}{nl}"));
        } else {
            out.push_str(line);
        }
    }
    normalise_names(topo, &out)
}

/// Normalisations 1 and 3 of [`normalise_status`].
fn normalise_names(topo: &Topology, text: &str) -> String {
    let mut out = text.to_string();
    for (from, to) in iface_names(topo) {
        out = replace_word(&out, &from, &to);
    }
    out = out.replace(&topo.prefix, "<prefix>");
    out.replace(&topo.short, "<short>")
}

/// Replaces `from` where it is not part of a longer name (neither side
/// touches an alphanumeric, `-` or `_`).
fn replace_word(text: &str, from: &str, to: &str) -> String {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(from) {
        let before = rest[..i].chars().next_back();
        let after = rest[i + from.len()..].chars().next();
        out.push_str(&rest[..i]);
        if before.is_some_and(is_name) || after.is_some_and(is_name) {
            out.push_str(from);
        } else {
            out.push_str(to);
        }
        rest = &rest[i + from.len()..];
    }
    out.push_str(rest);
    out
}

/// `meshlb ARGS` in the LB namespace; its stdout, or a panic with its
/// output and the daemon's log.
fn cli(topo: &Topology, args: &[&str]) -> String {
    let out = topo.meshlb(&topo.lb_ns, args, CLI_TIMEOUT);
    assert!(out.success(), "{}{}", out.describe(), topo.ctx());
    out.stdout
}

fn status_text(topo: &Topology) -> String {
    let dir = topo.lb_bpffs().display().to_string();
    cli(topo, &["status", "--json", "--bpffs", &dir])
}

/// What the demo's status must say, whatever the golden holds: the
/// service, its VIP, ports, scheduler and three backends (up, weight 100 (the default),
/// per published port), the XDP engine in generic mode, the client-facing
/// interface as the uplink and the three backend-facing ones as task
/// interfaces, and no traffic. `Err` names the first thing missing.
fn check_status(st: &Value) -> Result<(), String> {
    let want = |cond: bool, what: &str| {
        if cond {
            Ok(())
        } else {
            Err(format!("status: {what}"))
        }
    };
    want(st["dataplane"] == "xdp-generic", "dataplane xdp-generic")?;
    let svcs = st["services"].as_array().ok_or("no services array")?;
    want(svcs.len() == 1, "exactly one service")?;
    let s = &svcs[0];
    want(s["name"] == "whoami", "service whoami")?;
    want(s["vip"] == VIP, "vip 10.96.0.10")?;
    want(s["scheduler"] == "maglev", "scheduler maglev")?;
    let mut ports: Vec<&str> = s["ports"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    ports.sort_unstable();
    want(ports == ["80/tcp", "9000/udp"], "ports 80/tcp and 9000/udp")?;
    let backends = s["backends"].as_array().ok_or("no backends array")?;
    let mut seen: Vec<(String, u64)> = backends
        .iter()
        .map(|b| {
            (
                b["addr"].as_str().unwrap_or("?").to_string(),
                b["port"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    seen.sort();
    seen.dedup();
    let mut expect: Vec<(String, u64)> = Vec::new();
    for b in BACKENDS {
        // tcp 80 -> 8000, udp 9000 -> 9000
        expect.push((b.to_string(), 8000));
        expect.push((b.to_string(), 9000));
    }
    expect.sort();
    want(
        seen == expect,
        &format!("backends {expect:?} (per published port), got {seen:?}"),
    )?;
    for b in backends {
        want(
            b["state"] == "up" && b["weight"] == 100,
            &format!("backend up, weight 100: {b}"),
        )?;
    }
    let mut roles: Vec<(String, String, String)> = st["interfaces"]
        .as_array()
        .ok_or("no interfaces array")?
        .iter()
        .map(|i| {
            let f = |k: &str| i[k].as_str().unwrap_or("?").to_string();
            (f("name"), f("role"), f("mode"))
        })
        .collect();
    roles.sort();
    let mut expect: Vec<(String, String, String)> = vec![(
        "lb-cl".to_string(),
        "uplink".to_string(),
        "xdp-generic".to_string(),
    )];
    for i in 1..=BACKENDS.len() {
        expect.push((format!("lb-b{i}"), "task".to_string(), "tc".to_string()));
    }
    expect.sort();
    want(
        roles == expect,
        &format!("interfaces (name, role, mode) {expect:?}, got {roles:?}"),
    )?;
    want(st["conntrack_entries"] == 0, "no conntrack entries")?;
    want(st["new_flows_per_second"] == 0, "no new flows")?;
    Ok(())
}

/// Waits until the normalised status passes [`check_status`] and reads
/// the same twice in a row, half a second apart; returns it.
fn settled_status(topo: &Topology) -> String {
    let deadline = Instant::now() + SETTLE;
    let mut last = String::new();
    loop {
        let text = normalise_status(topo, &status_text(topo));
        let verdict = serde_json::from_str::<Value>(&text)
            .map_err(|e| format!("status --json is not JSON ({e})"))
            .and_then(|v| check_status(&v));
        match verdict {
            Ok(()) if text == last => return text,
            Err(e) if Instant::now() >= deadline => {
                panic!(
                    "status not settled after {SETTLE:?}: {e}\n{text}{}",
                    topo.ctx()
                )
            }
            Ok(()) | Err(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "status kept changing for {SETTLE:?}; last two reads:\n{}{}",
            diff(&last, &text),
            topo.ctx()
        );
        last = text;
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `explain --json` for every flow of [`FLOWS`], each output under its
/// command line, with what each answer must say checked first.
fn explain_text(topo: &Topology) -> String {
    let dir = topo.lb_bpffs().display().to_string();
    let mut text = String::new();
    for &(proto, src, dst, want) in FLOWS {
        let args = ["explain", proto, src, dst, "--json", "--bpffs", &dir];
        let out = cli(topo, &args);
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("explain {proto} {src} {dst}: not JSON ({e}): {out}"));
        let backend = v["backend"].as_str().unwrap_or("");
        match want {
            Some(frontend) => {
                assert!(
                v["service"] == "whoami"
                    && v["reason"] == "maglev"
                    && v["frontend"].as_str().is_some_and(|f| f.ends_with(frontend))
                    && BACKENDS.iter().any(|b| backend.starts_with(&format!("{b}:"))),
                "explain {proto} {src} {dst}: expected service whoami, frontend ...{frontend}, \
                 a maglev pick of one of {BACKENDS:?}; got {out}{}",
                topo.ctx()
            );
            }
            None => assert!(
                v["reason"] == "no-service" && v["service"].is_null() && v["backend"].is_null(),
                "explain {proto} {src} {dst}: expected no service; got {out}{}",
                topo.ctx()
            ),
        }
        text.push_str(&format!("$ meshlb explain {proto} {src} {dst} --json\n"));
        text.push_str(&out);
    }
    text
}

/// A line diff of `golden` against `actual` (`-` golden only, `+` actual
/// only, two lines of context around each change), from a longest common
/// subsequence: the files are a few hundred lines at most.
fn diff(golden: &str, actual: &str) -> String {
    let a: Vec<&str> = golden.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    let (n, m) = (a.len(), b.len());
    // lcs[i][j]: length of the LCS of a[i..] and b[j..].
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    // (tag, golden line number, text), tag ' ', '-' or '+'.
    let mut ops: Vec<(char, usize, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            ops.push((' ', i + 1, a[i]));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            ops.push(('-', i + 1, a[i]));
            i += 1;
        } else {
            ops.push(('+', i + 1, b[j]));
            j += 1;
        }
    }
    const CONTEXT: usize = 2;
    let changed: Vec<usize> = (0..ops.len()).filter(|&k| ops[k].0 != ' ').collect();
    let mut out = String::new();
    let mut shown_to = 0;
    for &k in &changed {
        let from = k.saturating_sub(CONTEXT).max(shown_to);
        let to = (k + CONTEXT + 1).min(ops.len());
        if from > shown_to || shown_to == 0 {
            out.push_str(&format!("@@ golden line {} @@\n", ops[from].1));
        }
        for op in &ops[from..to.max(from)] {
            out.push_str(&format!("{}{}\n", op.0, op.2));
        }
        shown_to = to.max(shown_to);
    }
    if golden.ends_with('\n') != actual.ends_with('\n') {
        out.push_str("(the files differ in their final newline)\n");
    }
    out
}

/// Compares `actual` with golden file `name` byte for byte, or writes it
/// when blessing; returns a failure description.
fn compare_or_bless(name: &str, actual: &str) -> Option<String> {
    let path = golden_dir().join(name);
    if blessing() {
        fs::create_dir_all(golden_dir()).expect("create tests/golden");
        fs::write(&path, actual).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        eprintln!("blessed {}", path.display());
        return None;
    }
    let golden = match fs::read_to_string(&path) {
        Ok(g) => g,
        Err(e) => {
            return Some(format!(
                "{}: {e} (run with {BLESS_ENV}=1 to create it); actual output:\n{actual}",
                path.display()
            ))
        }
    };
    (golden != actual).then(|| {
        format!(
            "{} differs from the actual output ({BLESS_ENV}=1 regenerates it if the change is \
             intended):\n{}",
            path.display(),
            diff(&golden, actual)
        )
    })
}

#[test]
fn status_and_explain_json_match_the_golden_files_on_the_demo_topology() {
    let started = Instant::now();
    let topo = Topology::new(TAG, TopoOpts { backends: 3 });
    let cfg = topo.write_file("meshlb.toml", DEMO_CONFIG);
    let cfg = cfg.display().to_string();
    // The demo's arguments: the client side is the uplink (XDP), the
    // backends are local tasks (TC); generic XDP. `start_daemon_args` adds
    // --bpffs and the --iface list.
    let mut args = vec!["--config", cfg.as_str()];
    for b in &topo.backends {
        args.extend(["--task-iface", b.lb_iface.as_str()]);
    }
    args.extend(["--xdp-mode", "generic"]);
    let uplink = topo.lb_client_iface.clone();
    let mut daemon = DaemonGuard(topo.start_daemon_args(&args, &[uplink.as_str()]));
    // Up: metrics answer, `whoami` in status, XDP on the uplink.
    topo.wait_ready_on(&mut daemon.0, &["whoami"], READY, &[uplink.as_str()]);
    // Synced: every backend and interface in place, and stable.
    let status = settled_status(&topo);
    let explain = explain_text(&topo);
    // Nothing moved while explain ran (it only reads the maps).
    let again = normalise_status(&topo, &status_text(&topo));
    assert!(
        again == status,
        "status changed while the test ran:\n{}{}",
        diff(&status, &again),
        topo.ctx()
    );
    assert!(
        daemon.0.is_running(),
        "the daemon exited during the test{}",
        topo.ctx()
    );

    let failures: Vec<String> = [("status.json", &status), ("explain.txt", &explain)]
        .into_iter()
        .filter_map(|(name, text)| compare_or_bless(name, text))
        .collect();
    eprintln!("golden: checked in {:.1?}", started.elapsed());
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The comparison's own helpers (no root needed): a diff that shows what
/// changed and where, and interface names replaced only as whole names.
#[test]
fn diff_and_name_replacement_helpers() {
    let golden = "{\n  \"a\": 1,\n  \"b\": 2,\n  \"c\": 3\n}\n";
    let actual = "{\n  \"a\": 1,\n  \"b\": 20,\n  \"c\": 3\n}";
    let d = diff(golden, actual);
    assert!(d.contains("-  \"b\": 2,\n+  \"b\": 20,\n"), "{d}");
    assert!(d.starts_with("@@ golden line 1 @@\n {\n"), "{d}");
    assert!(d.contains("final newline"), "{d}");
    assert_eq!(diff(golden, golden), "");
    assert_eq!(
        replace_word("\"g1l1\" g1l1 g1l10 xg1l1 g1l1-x", "g1l1", "lb-b1"),
        "\"lb-b1\" lb-b1 g1l10 xg1l1 g1l1-x"
    );
}
