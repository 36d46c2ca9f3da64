//! Every call chain of every eBPF program fits the 512-byte stack budget
//! as older verifiers count it. Debian 6.1's verifier (the QEMU guests')
//! adds up the frames along each chain of BPF-to-BPF calls, each rounded
//! up to 32 bytes and an empty one counted as 32 — so the compiler's own
//! `memset`/`memcpy` calls cost a frame too — and refuses the program past
//! 512 ("combined stack size of N calls is M"). The host's newer verifier
//! is laxer, so a frame that grows would otherwise first show in the
//! guests, minutes into CI, as "meshlb not ready".
//!
//! Static and conservative: the programs as aya links them (callees
//! appended, calls made pc-relative), frames from their stack accesses,
//! every call taken. Needs no root.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use aya_obj::{generated::bpf_insn, Object};

/// The verifier's stack budget along one call chain.
const LIMIT: u64 = 512;

const BPF_CALL: u8 = 0x85;
const BPF_PSEUDO_CALL: u8 = 1;
const FP: u8 = 10;

/// Where a program's subprograms start: its entry and every call target.
fn subprog_starts(insns: &[bpf_insn]) -> BTreeSet<usize> {
    let mut starts = BTreeSet::from([0]);
    for (i, ins) in insns.iter().enumerate() {
        if ins.code == BPF_CALL && ins.src_reg() == BPF_PSEUDO_CALL {
            starts.insert((i as i64 + i64::from(ins.imm) + 1) as usize);
        }
    }
    starts
}

/// The deepest stack offset a run of instructions uses: loads and stores
/// relative to the frame pointer, and frame pointer copies moved down to
/// hand a buffer to a helper (`rX = r10; rX += -N`).
fn frame_size(insns: &[bpf_insn]) -> u64 {
    let mut deepest = 0i64;
    let mut fp_copies = [false; 11];
    for ins in insns {
        let class = ins.code & 0x07;
        let (dst, src) = (ins.dst_reg() as usize, ins.src_reg());
        let off = i64::from(ins.off);
        match class {
            // LDX: dst = *(src + off)
            0x01 if src == FP => deepest = deepest.max(-off),
            // ST / STX: *(dst + off) = ...
            0x02 | 0x03 if dst == FP as usize => deepest = deepest.max(-off),
            // ALU64
            0x07 => {
                let op = ins.code & 0xf0;
                let from_reg = ins.code & 0x08 != 0;
                if dst < fp_copies.len() {
                    if op == 0xb0 && from_reg {
                        // mov dst, src
                        fp_copies[dst] = src == FP;
                    } else if op == 0x00 && !from_reg && fp_copies[dst] {
                        // add dst, imm on a frame pointer copy
                        deepest = deepest.max(-i64::from(ins.imm));
                        fp_copies[dst] = false;
                    } else {
                        fp_copies[dst] = false;
                    }
                }
            }
            _ => {
                if dst < fp_copies.len() && class != 0x05 && class != 0x06 {
                    fp_copies[dst] = false;
                }
            }
        }
    }
    deepest.max(0) as u64
}

/// A subprogram's charge: its frame rounded up to 32 bytes, at least 32.
fn charge(frame: u64) -> u64 {
    frame.max(1).div_ceil(32) * 32
}

/// The worst chain from `at`: (total, chain of subprogram starts).
fn worst(
    at: usize,
    subs: &BTreeMap<usize, (u64, BTreeSet<usize>)>,
    path: &mut Vec<usize>,
) -> (u64, Vec<usize>) {
    let (frame, calls) = &subs[&at];
    path.push(at);
    let mut best = (0, Vec::new());
    for c in calls {
        if path.contains(c) {
            continue;
        }
        let w = worst(*c, subs, path);
        if w.0 > best.0 {
            best = w;
        }
    }
    path.pop();
    let mut chain = vec![at];
    chain.extend(best.1);
    (charge(*frame) + best.0, chain)
}

/// The name of the function whose instructions start at `at` in a linked
/// program (" name", demangled roughly), or "".
fn name_at(named: &[(String, Vec<bpf_insn>)], insns: &[bpf_insn], at: usize) -> String {
    let same = |a: &bpf_insn, b: &bpf_insn| {
        a.code == b.code
            && a.dst_reg() == b.dst_reg()
            && a.src_reg() == b.src_reg()
            && a.off == b.off
            && (a.imm == b.imm || a.code == BPF_CALL)
    };
    named
        .iter()
        .find(|(_, f)| {
            !f.is_empty()
                && insns.len() >= at + f.len()
                && f.iter().zip(&insns[at..]).all(|(a, b)| same(a, b))
        })
        .map(|(n, _)| format!(" {}", short_name(n)))
        .unwrap_or_default()
}

/// `_RNvNtCs.._11meshlb_ebpf2lb8try_port` -> `lb::try_port` (the last two
/// path segments of a v0-mangled name; anything else as it is).
fn short_name(mangled: &str) -> String {
    let mut parts = Vec::new();
    let b = mangled.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let mut j = i;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            let n: usize = mangled[i..j].parse().unwrap_or(0);
            if n > 0 && j + n <= b.len() {
                parts.push(&mangled[j..j + n]);
                i = j + n;
                continue;
            }
            i = j;
        } else {
            i += 1;
        }
    }
    let ours: Vec<&str> = parts
        .iter()
        .copied()
        .filter(|p| p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .collect();
    match ours.iter().position(|p| *p == "meshlb_ebpf") {
        Some(k) if k + 1 < ours.len() => ours[k + 1..]
            .iter()
            .take(2)
            .copied()
            .collect::<Vec<_>>()
            .join("::"),
        _ => mangled.to_string(),
    }
}

#[test]
fn every_call_chain_fits_older_verifiers_stack_budget() {
    let mut obj = Object::parse(meshlb::EBPF_OBJECT).expect("the embedded eBPF object parses");
    // The functions as compiled, to name the subprograms of the linked
    // programs (found by their instructions; call offsets change in
    // linking, so calls compare by opcode alone).
    let named: Vec<(String, Vec<bpf_insn>)> = obj
        .functions
        .values()
        .map(|f| (f.name.clone(), f.instructions.clone()))
        .collect();
    let text: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
    obj.relocate_calls(&text).expect("calls link");
    let mut report = Vec::new();
    let mut over = Vec::new();
    let mut programs: Vec<_> = obj.programs.iter().collect();
    programs.sort_by_key(|(name, _)| name.as_str());
    for (name, prog) in programs {
        let insns = &obj.functions[&prog.function_key()].instructions;
        let starts: Vec<usize> = subprog_starts(insns).into_iter().collect();
        let mut subs = BTreeMap::new();
        for (k, &s) in starts.iter().enumerate() {
            let end = starts.get(k + 1).copied().unwrap_or(insns.len());
            let body = &insns[s..end];
            let calls = body
                .iter()
                .enumerate()
                .filter(|(_, ins)| ins.code == BPF_CALL && ins.src_reg() == BPF_PSEUDO_CALL)
                .map(|(i, ins)| ((s + i) as i64 + i64::from(ins.imm) + 1) as usize)
                .collect();
            subs.insert(s, (frame_size(body), calls));
        }
        let (total, chain) = worst(0, &subs, &mut Vec::new());
        let frames: Vec<String> = chain
            .iter()
            .map(|s| format!("@{s}:{}{}", subs[s].0, name_at(&named, insns, *s)))
            .collect();
        let line = format!(
            "{name}: {} subprograms, worst chain {total} bytes ({})",
            subs.len(),
            frames.join(" -> ")
        );
        if total > LIMIT {
            over.push(line.clone());
        }
        report.push(line);
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        !report.is_empty(),
        "the object holds no programs: the check would pass vacuously"
    );
    assert!(
        over.is_empty(),
        "call chains over the {LIMIT}-byte stack budget of older verifiers (frame sizes per subprogram start; shrink a frame on the chain, or call the deepest callee from higher up):\n{}",
        over.join("\n")
    );
}

#[test]
fn frames_are_charged_like_the_verifier_does() {
    assert_eq!(charge(0), 32, "an empty frame still costs 32 bytes");
    assert_eq!(charge(1), 32);
    assert_eq!(charge(192), 192);
    assert_eq!(charge(193), 224);
}
