//! Issue 15, "Timeouts": with `udp_timeout = "3s"`, an idle UDP flow's
//! entry is gone after 4 s; with `tcp_closing_timeout`, a closed flow's
//! entry and SNAT port are released after the quarantine, not before.
//!
//! On the routing mesh of `common::mesh`: `web` (VIP 10.96.0.10, tcp 80,
//! udp 53) has only t3, which runs behind n2, and the client routes the VIP
//! via n1, so every flow entering n1 is source-translated (SNAT) there.
//! Every daemon runs with
//!
//! ```toml
//! [conntrack]
//! udp_timeout = "3s"
//! tcp_closing_timeout = "2s"
//! snat_quarantine = "8s"
//! ```
//!
//! n1's `conntrack_entries` and `snat_ports_in_use` (and counters) are
//! polled on a fixed 100 ms grid, each reading stamped with when it started
//! and ended: a reading showing an entry proves it was there at its start,
//! one showing it gone proves it was gone by its end. The timeline reads
//! them as `meshlb status` does (`meshlb::engine::xdp::inspect::status`: the entries of
//! n1's pinned conntrack and SNAT maps), in-process and nothing else, so a
//! reading takes about a millisecond: the command itself takes 200-450 ms
//! on a busy 2-core machine (the in-process `inspect::status` 100-170 ms),
//! too coarse for bounds 180 ms from what the product may do.
//! `meshlb status --json` itself is checked to show each flow right after
//! it ran, and the empty tables and the counters at the end.
//!
//! The bounds, and the product facts behind them:
//! - A flow's `last_seen` is kept in ticks of 2^29 ns (0.54 s), and a flow
//!   is expired once more than `ticks(timeout)` (rounded down) ticks old:
//!   a 3 s UDP flow expires 2.68 to 3.22 s after its last packet, a 2 s
//!   closing TCP flow 1.61 to 2.15 s after; the daemon sweeps every
//!   shortest-timeout/6 (here 333 ms). So the UDP entry must be seen at
//!   2.5 s or later, and be gone by 4 s; the closed TCP flow's entry seen
//!   at 1 s or later, and gone by 2 s + 1.5 s.
//! - A SNAT entry's `last_seen` is the time its port was taken, refreshed
//!   by replies at most once a second; the sweep frees an established
//!   flow's port once its conntrack entry is gone and it has been quiet
//!   for the quarantine. So the port must still be held when the entry is
//!   gone, be seen held at 7 s or later after the last packet (6 s
//!   included), and be released by 8 s + 1.5 s.
//!
//! "Seen at X or later": no reading that ended before X shows it gone, and
//! some reading that started at X or later shows it there.
//!
//! Needs root; see `common`.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use common::mesh::{config, Mesh, SERVICES, VIP4};
use common::{http_get, http_get_path, in_netns, udp_request, Proc};
use meshlb::kernel::pinned::Maps;

/// n1: where the client's traffic enters, and is source-translated.
const N1: usize = 0;
/// The `[conntrack]` section every daemon runs with.
const CONNTRACK: &str = r#"
[conntrack]
udp_timeout = "3s"
tcp_closing_timeout = "2s"
snat_quarantine = "8s"
"#;
/// The UDP flow's fixed client source port (outside the client's
/// ephemeral range, `common::CLIENT_PORT_RANGE`).
const UDP_SRC_PORT: u16 = 41053;
/// Datagrams the UDP flow sends (the 2nd makes it established).
const DATAGRAMS: usize = 3;
/// The polling grid.
const PERIOD: Duration = Duration::from_millis(100);
/// The UDP flow's entry: seen this long after the last reply or later (it
/// may expire from 2.68 s on)...
const UDP_SEEN_AT: Duration = Duration::from_millis(2500);
/// ... and gone by this long after it.
const UDP_GONE_BY: Duration = Duration::from_secs(4);
/// The closed TCP flow's entry: seen this long after the close or later
/// (it may expire from 1.61 s on)...
const TCP_SEEN_AT: Duration = Duration::from_millis(1000);
/// ... and gone by this long after it (`tcp_closing_timeout` + 1.5 s).
const TCP_GONE_BY: Duration = Duration::from_millis(3500);
/// Both flows' SNAT port: seen held this long after the last packet or
/// later (the quarantine, minus the second a SNAT entry's `last_seen` may
/// be stale)...
const SNAT_SEEN_AT: Duration = Duration::from_secs(7);
/// ... and released by this long after it (quarantine + 1.5 s).
const SNAT_FREED_BY: Duration = Duration::from_millis(9500);
/// A timeline gives up this long after its start.
const TIMELINE_LIMIT: Duration = Duration::from_secs(14);
/// Request timeouts (two SYN retransmits fit).
const REQ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a daemon may take to load (the verifier alone takes 10-30 s
/// per program on a loaded 2-core machine, three daemons at once).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// The whole test, setup included (teardown excluded).
const BUDGET: Duration = Duration::from_secs(240);

/// One reading of n1's status.
#[derive(Clone, Debug)]
struct Reading {
    /// When the reading started / ended, from the timeline's start.
    start: Duration,
    end: Duration,
    ct: u64,
    snat: u64,
    counters: BTreeMap<String, u64>,
}

impl Reading {
    fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }
}

/// n1's pinned maps, read as `meshlb status` reads them
/// (`meshlb::engine::xdp::inspect::status`: the entries of the conntrack and SNAT maps,
/// the counters by name), without the rest of its work.
struct Probe {
    maps: Maps,
}

impl Probe {
    fn open(m: &Mesh) -> Probe {
        let dir = m.bpffs(&m.nodes[N1]);
        let maps = Maps::from_pins(&dir)
            .unwrap_or_else(|e| panic!("n1's maps in {}: {e}{}", dir.display(), m.ctx()));
        Probe { maps }
    }

    fn read(&self, from: Instant) -> Reading {
        let start = Instant::now();
        let ct = self.maps.conntrack.keys().count() as u64;
        let snat = self.maps.snat.keys().count() as u64;
        let end = Instant::now();
        let counters = meshlb_common::Counter::ALL
            .iter()
            .zip(self.maps.counters())
            .map(|(c, v)| (c.name().to_string(), v))
            .collect();
        Reading {
            start: start.saturating_duration_since(from),
            end: end.saturating_duration_since(from),
            ct,
            snat,
            counters,
        }
    }
}

/// `meshlb status --json` on n1: (conntrack_entries, snat_ports_in_use).
fn cli_tables(m: &Mesh) -> (u64, u64) {
    let st = m
        .try_status(N1)
        .unwrap_or_else(|e| panic!("meshlb status on n1: {e}{}", m.ctx()));
    let num = |k: &str| {
        st[k]
            .as_u64()
            .unwrap_or_else(|| panic!("status --json on n1: no number {k}: {st}"))
    };
    (num("conntrack_entries"), num("snat_ports_in_use"))
}

/// The timeline: runs of readings with the same tables and counters, each
/// as the start of its first reading and the end of its last.
fn render(tl: &[Reading]) -> String {
    let key = |r: &Reading| (r.ct, r.snat, r.counter("swept"), r.counter("expired"));
    let mut s = String::new();
    let mut i = 0;
    while i < tl.len() {
        let mut j = i;
        while j + 1 < tl.len() && key(&tl[j + 1]) == key(&tl[i]) {
            j += 1;
        }
        let r = &tl[i];
        let _ = writeln!(
            s,
            "  +{:>5}..{:>5} ms ({:>3} readings)  conntrack_entries={} snat_ports_in_use={} swept={} expired={}",
            r.start.as_millis(),
            tl[j].end.as_millis(),
            j - i + 1,
            r.ct,
            r.snat,
            r.counter("swept"),
            r.counter("expired")
        );
        i = j + 1;
    }
    s
}

/// Polls n1 on a `PERIOD` grid from `from` (grid points missed while a
/// poll ran are skipped, so a late reading never delays the next ones)
/// until `done` holds for a reading, `TIMELINE_LIMIT` has passed since
/// `from`, or the test's deadline. Returns every reading.
fn timeline(
    probe: &Probe,
    from: Instant,
    deadline: Instant,
    done: impl Fn(&Reading) -> bool,
) -> Vec<Reading> {
    let mut tl = Vec::new();
    let mut k: u32 = 0;
    loop {
        let target = from + PERIOD * k;
        let now = Instant::now();
        if target > now {
            thread::sleep(target - now);
        } else if now - target > PERIOD / 2 {
            // Behind the grid: skip to the next point.
            k = ((now - from).as_millis() / PERIOD.as_millis()) as u32 + 1;
            continue;
        }
        k += 1;
        let r = probe.read(from);
        let stop = done(&r);
        tl.push(r);
        if stop || from.elapsed() >= TIMELINE_LIMIT || Instant::now() >= deadline {
            return tl;
        }
    }
}

/// Sends `DATAGRAMS` datagrams to `dst` from `src`, one at a time, each
/// answered by t3 (up to 3 tries each); returns when the first was sent
/// and when the last reply came. In the calling thread's namespace.
fn udp_flow(src: SocketAddr, dst: SocketAddr) -> Result<(Instant, Instant, usize), String> {
    let sock = UdpSocket::bind(src).map_err(|e| format!("bind {src}: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let mut first = None;
    let mut sends = 0;
    let mut buf = [0u8; 2048];
    for i in 0..DATAGRAMS {
        let payload = format!("ping {i}");
        let mut answered = false;
        for _try in 0..3 {
            sock.send_to(payload.as_bytes(), dst)
                .map_err(|e| format!("send to {dst}: {e}"))?;
            first.get_or_insert_with(Instant::now);
            sends += 1;
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let body = String::from_utf8_lossy(&buf[..n]).trim().to_string();
                    if from != dst || body != "t3" {
                        return Err(format!(
                            "datagram {i}: reply {body:?} from {from}, want \"t3\" from {dst}"
                        ));
                    }
                    answered = true;
                    break;
                }
                Err(e) => eprintln!("udp: datagram {i} not answered ({e}); sending again"),
            }
        }
        if !answered {
            return Err(format!("datagram {i}: no reply in 3 tries"));
        }
    }
    Ok((first.expect("sent"), Instant::now(), sends))
}

/// How long a thing (an entry, a port) lasted in a timeline.
struct Span {
    /// The start of the last reading that showed it before it was gone.
    seen_last: Option<Duration>,
    /// The end of the first reading that showed it gone.
    gone_by: Option<Duration>,
}

/// Checks that `there` held until `seen_at` or later and stopped by
/// `gone_by`; failures go to `failed` as "`what` ...".
fn check_span(
    failed: &mut Vec<String>,
    what: &str,
    tl: &[Reading],
    there: impl Fn(&Reading) -> bool,
    seen_at: Duration,
    gone_by: Duration,
) -> Span {
    let gone = tl.iter().position(|r| !there(r));
    let seen = tl[..gone.unwrap_or(tl.len())].last();
    let span = Span {
        seen_last: seen.map(|r| r.start),
        gone_by: gone.map(|i| tl[i].end),
    };
    match span.gone_by {
        Some(t) if t < seen_at => failed.push(format!(
            "{what} was gone by +{} ms, before +{} ms",
            t.as_millis(),
            seen_at.as_millis()
        )),
        Some(_) if span.seen_last.is_none_or(|t| t < seen_at) => failed.push(format!(
            "{what} was not seen at +{} ms or later: seen last at {:?}, gone by +{} ms",
            seen_at.as_millis(),
            span.seen_last,
            span.gone_by.unwrap_or_default().as_millis()
        )),
        Some(t) if t > gone_by => failed.push(format!(
            "{what} was gone only by +{} ms, not by +{} ms",
            t.as_millis(),
            gone_by.as_millis()
        )),
        Some(_) => {}
        None => failed.push(format!(
            "{what} never went (polled until +{} ms)",
            tl.last().map_or(0, |r| r.end.as_millis())
        )),
    }
    span
}

fn fmt_span(s: &Span) -> String {
    let ms = |t: Option<Duration>| t.map_or("-".to_string(), |t| format!("+{} ms", t.as_millis()));
    format!(
        "seen last at {}, gone by {}",
        ms(s.seen_last),
        ms(s.gone_by)
    )
}

fn metrics_n1(m: &Mesh) -> Result<String, String> {
    in_netns(&m.nodes[N1].ns, || {
        http_get_path(
            "127.0.0.1:9742".parse().unwrap(),
            "/metrics",
            Duration::from_secs(3),
        )
    })
}

#[test]
fn idle_and_closed_flows_expire_and_snat_ports_wait_out_the_quarantine() {
    let t0 = Instant::now();
    let deadline = t0 + BUDGET;
    let m = Mesh::new("ft");
    let text = format!("{}{CONNTRACK}", config(&m, &["t3"]));
    let _daemons = start_cluster(&m, &text);
    let ready = t0.elapsed();
    let probe = Probe::open(&m);
    let vip_udp: SocketAddr = format!("{VIP4}:53").parse().unwrap();
    let vip_tcp: SocketAddr = format!("{VIP4}:80").parse().unwrap();
    let mut failed: Vec<String> = Vec::new();

    // Warm up the path (neighbours on n1, n2, t3) with one datagram from
    // an ephemeral port: a flow that never becomes established.
    let warm = m.client(|| udp_request(vip_udp, b"warm", REQ_TIMEOUT));
    assert_eq!(
        warm.as_deref(),
        Ok("t3"),
        "warm-up datagram to {vip_udp}{}",
        m.ctx()
    );
    let warm_at = Instant::now();

    // Nothing else flows through n1: its tables empty out.
    let base = timeline(&probe, warm_at, deadline, |r| r.ct == 0 && r.snat == 0);
    let b = base.last().expect("a reading");
    assert!(
        b.ct == 0 && b.snat == 0,
        "n1's flow tables did not empty out (one warm-up datagram, then nothing):\n{}{}",
        render(&base),
        m.ctx()
    );
    eprintln!(
        "setup: cluster ready after {:.1} s; the warm-up (never established) UDP flow's \
         entry and SNAT port were gone by +{} ms after its reply",
        ready.as_secs_f64(),
        b.end.as_millis()
    );
    let c0 = m.counters(N1);

    // --- UDP: an idle flow expires after udp_timeout; its port waits out the quarantine.
    let src = SocketAddr::from((m.client_v4, UDP_SRC_PORT));
    let (udp_first, udp_last, sends) = m
        .client(|| udp_flow(src, vip_udp))
        .unwrap_or_else(|e| panic!("UDP flow {src} -> {vip_udp}: {e}{}", m.ctx()));
    // `meshlb status --json` shows the flow (this takes a few hundred ms;
    // the timeline then picks up at its next grid point).
    let udp_cli = cli_tables(&m);
    let udp = timeline(&probe, udp_last, deadline, |r| r.snat == 0);
    let udp_text = format!(
        "UDP flow {src} -> {vip_udp} ({sends} datagrams over {} ms; times from the last reply):\n{}",
        (udp_last - udp_first).as_millis(),
        render(&udp)
    );
    eprintln!("{udp_text}");
    if udp_cli.0 < 1 || udp_cli.1 < 1 {
        failed.push(format!(
            "UDP: `meshlb status --json` on n1 does not show the flow right after the last reply \
             (conntrack_entries {}, snat_ports_in_use {})",
            udp_cli.0, udp_cli.1
        ));
    }
    let ct = check_span(
        &mut failed,
        "UDP: the idle flow's conntrack entry",
        &udp,
        |r| r.ct > 0,
        UDP_SEEN_AT,
        UDP_GONE_BY,
    );
    if let Some(r) = udp.iter().find(|r| r.ct == 0).filter(|r| r.snat == 0) {
        failed.push(format!(
            "UDP: the SNAT port went with the conntrack entry (by +{} ms), before the quarantine",
            r.end.as_millis()
        ));
    }
    let port = check_span(
        &mut failed,
        "UDP: the flow's SNAT port",
        &udp,
        |r| r.snat > 0,
        SNAT_SEEN_AT,
        SNAT_FREED_BY,
    );
    eprintln!(
        "UDP (udp_timeout 3 s, quarantine 8 s): entry {}; SNAT port {}",
        fmt_span(&ct),
        fmt_span(&port)
    );
    let c1 = m.counters(N1);
    // The TCP half measures n1's only SNAT port.
    assert!(
        udp.last().expect("a reading").snat == 0,
        "the UDP flow's SNAT port was never released:\n  {}\n{udp_text}{}",
        failed.join("\n  "),
        m.ctx()
    );

    // --- TCP: a closed flow's entry goes after tcp_closing_timeout, its port after the quarantine.
    let body = m
        .client(|| http_get(vip_tcp, REQ_TIMEOUT))
        .unwrap_or_else(|e| panic!("GET {vip_tcp}: {e}{}", m.ctx()));
    let closed = Instant::now();
    assert_eq!(body, "t3", "GET {vip_tcp} answered by another task");
    let tcp_cli = cli_tables(&m);
    let tcp = timeline(&probe, closed, deadline, |r| r.snat == 0);
    let tcp_text = format!(
        "TCP flow (GET {vip_tcp} on its own connection; times from the client's close):\n{}",
        render(&tcp)
    );
    eprintln!("{tcp_text}");
    if tcp_cli.0 < 1 || tcp_cli.1 < 1 {
        failed.push(format!(
            "TCP: `meshlb status --json` on n1 does not show the closed flow right after the close \
             (conntrack_entries {}, snat_ports_in_use {})",
            tcp_cli.0, tcp_cli.1
        ));
    }
    let ct = check_span(
        &mut failed,
        "TCP: the closed flow's conntrack entry",
        &tcp,
        |r| r.ct > 0,
        TCP_SEEN_AT,
        TCP_GONE_BY,
    );
    let port = check_span(
        &mut failed,
        "TCP: the closed flow's SNAT port",
        &tcp,
        |r| r.snat > 0,
        SNAT_SEEN_AT,
        SNAT_FREED_BY,
    );
    eprintln!(
        "TCP (tcp_closing_timeout 2 s, quarantine 8 s): entry {}; SNAT port {}",
        fmt_span(&ct),
        fmt_span(&port)
    );

    // --- `meshlb status --json` shows the tables empty and the expiries
    // counted; so does /metrics.
    let end_cli = cli_tables(&m);
    if end_cli != (0, 0) {
        failed.push(format!(
            "`meshlb status --json` on n1 at the end: conntrack_entries {}, snat_ports_in_use {}; want 0, 0",
            end_cli.0, end_cli.1
        ));
    }
    let c2 = m.counters(N1);
    let get = |c: &BTreeMap<String, u64>, k: &str| c.get(k).copied().unwrap_or(0);
    let expiries = |c: &BTreeMap<String, u64>| get(c, "swept") + get(c, "expired");
    let delta = |a: &BTreeMap<String, u64>, c: &BTreeMap<String, u64>| {
        ["swept", "expired", "new_flow", "snat_reclaimed"]
            .iter()
            .map(|k| format!("{k} +{}", get(c, k).saturating_sub(get(a, k))))
            .collect::<Vec<_>>()
            .join(", ")
    };
    eprintln!(
        "n1 counters: before the UDP flow swept={} expired={} new_flow={} snat_reclaimed={}; \
         with the UDP flow: {}; with the TCP flow: {}",
        get(&c0, "swept"),
        get(&c0, "expired"),
        get(&c0, "new_flow"),
        get(&c0, "snat_reclaimed"),
        delta(&c0, &c1),
        delta(&c1, &c2),
    );
    if expiries(&c1) <= expiries(&c0) {
        failed.push(format!(
            "n1's swept+expired counters did not grow with the UDP flow's expiry ({} -> {})",
            expiries(&c0),
            expiries(&c1)
        ));
    }
    if expiries(&c2) <= expiries(&c1) {
        failed.push(format!(
            "n1's swept+expired counters did not grow with the TCP flow's expiry ({} -> {})",
            expiries(&c1),
            expiries(&c2)
        ));
    }
    match metrics_n1(&m) {
        Ok(text) => {
            let expired = text.lines().find_map(|l| {
                l.strip_prefix("meshlb_flow_events_total{event=\"expired\"} ")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            });
            eprintln!("n1 /metrics: meshlb_flow_events_total{{event=\"expired\"}} {expired:?}");
            if expired.is_none_or(|n| n < 2) {
                failed.push(format!(
                    "n1 /metrics: meshlb_flow_events_total{{event=\"expired\"}} is {expired:?}, want >= 2"
                ));
            }
        }
        Err(e) => failed.push(format!("n1 /metrics: {e}")),
    }

    assert!(
        failed.is_empty(),
        "flow timeouts on n1:\n  {}\n{udp_text}{tcp_text}{}",
        failed.join("\n  "),
        m.ctx()
    );
    assert!(
        t0.elapsed() < BUDGET,
        "the test took {:?}, over its budget of {BUDGET:?}",
        t0.elapsed()
    );
    eprintln!(
        "test time (teardown excluded): {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// `common::mesh::start_cluster_with`, patient: each daemon first gets
/// `START_TIMEOUT` to serve its metrics (`Mesh::wait_ready` allows 30 s,
/// which three verifier runs at once on a busy 2-core machine can
/// exceed), then `Mesh::wait_ready` checks the rest.
fn start_cluster(m: &Mesh, text: &str) -> Vec<Proc> {
    let cfg = m.write_file("meshlb.toml", text);
    let mut daemons: Vec<Proc> = (0..3).map(|i| m.start_daemon(i, &cfg)).collect();
    for (i, d) in daemons.iter_mut().enumerate() {
        let n = &m.nodes[i];
        let up = common::wait_for(START_TIMEOUT, "the daemon's metrics endpoint", || {
            if let Some(st) = d.exit_status() {
                return Ok(Some(st));
            }
            in_netns(&n.ns, || {
                http_get_path(
                    "127.0.0.1:9742".parse().unwrap(),
                    "/metrics",
                    Duration::from_secs(2),
                )
            })
            .map(|_| None)
        });
        // An exited daemon (`Ok(Some(status))`): wait_ready reports it.
        if let Err(e) = up {
            panic!("daemon {}: {e}{}", n.name, m.ctx());
        }
        m.wait_ready(i, d, &SERVICES);
    }
    daemons
}
