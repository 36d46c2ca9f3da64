//! Tidy checks of the source tree (no privileges needed):
//! * every Rust file opens with a `//!` doc line saying what it is for;
//! * the user-space crate's folders are layers (`src/lib.rs` lists them):
//!   a module names only its own layer and the layers below it, so the
//!   top-level modules have no import cycle;
//! * no file points outside the repository (to the shared workspace).

use std::path::{Path, PathBuf};

/// The layers of `src/`, lowest first (as `src/lib.rs` and ARCHITECTURE.md
/// describe them).
const LAYERS: [&str; 7] = [
    "model", "control", "kernel", "source", "engine", "daemon", "cli",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir` (sorted), skipping build output.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name();
            if p.is_dir() {
                if name != "target" && !name.to_string_lossy().starts_with('.') {
                    stack.push(p);
                }
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The layer of a file under `src/` (`None`: the crate roots).
fn layer_of(rel: &Path) -> Option<usize> {
    let first = rel.components().nth(1)?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    LAYERS.iter().position(|l| *l == name)
}

/// The code of a file without its unit tests (the `#[cfg(test)] mod` and
/// all that follows it: test modules close every file here) and without
/// comments.
fn non_test_code(text: &str) -> String {
    let code = match text.find("#[cfg(test)]\nmod ") {
        Some(i) => &text[..i],
        None => text,
    };
    code.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules a piece of code names: `crate::x` and
/// `use crate::{x, y::z}`.
fn crate_refs(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let head: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !head.is_empty() {
                    out.push(head);
                }
            }
        } else {
            let head: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.push(head);
        }
        rest = after;
    }
    out
}

#[test]
fn every_rust_file_starts_with_a_module_doc() {
    let root = root();
    let mut missing = Vec::new();
    for dir in ["src", "tests", "bench", "xtask/src", "ebpf", "build.rs"] {
        let path = root.join(dir);
        let files = if path.is_file() {
            vec![path]
        } else {
            rust_files(&path)
        };
        assert!(!files.is_empty(), "no Rust files under {dir}");
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty() && !l.starts_with("#!["))
                .unwrap_or("");
            if !first.starts_with("//!") {
                missing.push(f.strip_prefix(&root).unwrap().display().to_string());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "files without a `//!` module doc line first:\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn layers_import_only_downwards() {
    let root = root();
    let mut wrong = Vec::new();
    let mut seen = 0;
    for f in rust_files(&root.join("src")) {
        let rel = f.strip_prefix(&root).unwrap().to_path_buf();
        let Some(layer) = layer_of(&rel) else {
            continue;
        };
        seen += 1;
        let text = std::fs::read_to_string(&f).unwrap();
        for r in crate_refs(&non_test_code(&text)) {
            match LAYERS.iter().position(|l| *l == r) {
                Some(to) if to > layer => wrong.push(format!(
                    "{} ({}) imports crate::{r} (a higher layer)",
                    rel.display(),
                    LAYERS[layer]
                )),
                Some(_) => {}
                None if r == "EBPF_OBJECT" => {}
                None => wrong.push(format!(
                    "{} names crate::{r}, which is not a layer",
                    rel.display()
                )),
            }
        }
    }
    assert!(seen > 40, "only {seen} layered files found under src/");
    assert!(
        wrong.is_empty(),
        "layering broken (order: {}):\n  {}",
        LAYERS.join(" < "),
        wrong.join("\n  ")
    );
}

#[test]
fn the_layer_check_sees_what_it_must() {
    let code = non_test_code(
        "use crate::{model::X, engine};\n#[cfg(test)]\nfn g() {}\nfn f() { crate::cli::run(); } // crate::daemon\n#[cfg(test)]\nmod tests { use crate::daemon; }",
    );
    assert_eq!(crate_refs(&code), ["model", "engine", "cli"]);
    assert_eq!(layer_of(Path::new("src/engine/xdp/mod.rs")), Some(4));
    assert_eq!(layer_of(Path::new("src/model/mod.rs")), Some(0));
    assert_eq!(layer_of(Path::new("src/lib.rs")), None);
}

#[test]
fn nothing_points_outside_the_repository() {
    let root = root();
    let mut hits = Vec::new();
    let mut files = Vec::new();
    for dir in [
        "src", "tests", "bench", "xtask", "ebpf", "vm", "docs", ".ci",
    ] {
        let mut stack = vec![root.join(dir)];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    if e.file_name() != "target" {
                        stack.push(p);
                    }
                } else {
                    files.push(p);
                }
            }
        }
    }
    for top in std::fs::read_dir(&root).unwrap().flatten() {
        if top.path().is_file() {
            files.push(top.path());
        }
    }
    let needle = ["..", "/shared"].concat();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue; // binary
        };
        if text.contains(&needle) {
            hits.push(f.strip_prefix(&root).unwrap().display().to_string());
        }
    }
    assert!(
        hits.is_empty(),
        "files pointing outside the repository:\n  {}",
        hits.join("\n  ")
    );
}
