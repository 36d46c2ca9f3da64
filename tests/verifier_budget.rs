//! Every load-balancer program verifies on this machine's kernel with
//! headroom under the verifier's limit of 10^6 processed instructions
//! (reported per program). A program over the limit fails to load (E2BIG)
//! after the verifier spent seconds on it: on a node, an interface that
//! forwards nothing and a daemon that starts late. Each added branch of
//! the data path multiplies the states the verifier walks, so the margin
//! is checked here, in seconds, not minutes into the VM scenarios. Needs
//! root.

mod common;

use aya::programs::{SchedClassifier, Xdp};

/// The kernel's limit on instructions processed while verifying one
/// program.
const LIMIT: u32 = 1_000_000;
/// A program may use at most this share of the limit.
const MAX_SHARE: f64 = 0.7;

#[test]
fn every_program_verifies_with_headroom() {
    common::require_root();
    common::ensure_bpffs();
    let dir = std::path::Path::new("/sys/fs/bpf").join(format!("mlbt-vb-{}", std::process::id()));
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = meshlb::engine::xdp::cleanup(&self.0);
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    std::fs::create_dir_all(&dir).expect("pin dir");
    let _cleanup = Cleanup(dir.clone());
    let mut ebpf = meshlb::engine::xdp::loader()
        .default_map_pin_directory(&dir)
        .load(meshlb::EBPF_OBJECT)
        .expect("load eBPF object");
    let mut report = Vec::new();
    let mut over = Vec::new();
    for name in [meshlb_common::PROG_XDP_LB, meshlb_common::PROG_TC_LB] {
        let t = std::time::Instant::now();
        let loaded = if name == meshlb_common::PROG_XDP_LB {
            let p: &mut Xdp = ebpf.program_mut(name).unwrap().try_into().unwrap();
            p.load().map(|()| p.info())
        } else {
            let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            p.load().map(|()| p.info())
        };
        let info = match loaded {
            Ok(info) => info,
            Err(e) => {
                // The verifier's last lines say how far it got.
                let e = e.to_string();
                let tail: Vec<&str> = e.lines().rev().take(3).collect();
                let line = format!("{name}: does not verify: {}", tail.join(" / "));
                over.push(line.clone());
                report.push(line);
                continue;
            }
        };
        let n = info
            .ok()
            .and_then(|i| i.verified_instruction_count())
            .expect("the kernel reports verified instructions (5.16+)");
        let share = f64::from(n) / f64::from(LIMIT);
        let line = format!(
            "{name}: {n} instructions processed ({:.0}% of the limit), verified in {} ms",
            share * 100.0,
            t.elapsed().as_millis()
        );
        if share > MAX_SHARE {
            over.push(line.clone());
        }
        report.push(line);
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        over.is_empty(),
        "programs over {:.0}% of the verifier's budget (simplify a path, or split it into a subprogram the verifier checks once):\n{}",
        MAX_SHARE * 100.0,
        over.join("\n")
    );
}
