//! The operator's documentation generated from the CLI definition
//! (`cli::Cli`): shell completion scripts and man pages. `meshlb
//! completions SHELL` prints a script; `meshlb manpages DIR` writes
//! `meshlb.1` and one `meshlb-SUBCOMMAND.1` per subcommand, which `cargo
//! xtask package` puts into the .deb files.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

/// Writes the completion script for `shell` to `out`.
pub fn completions(shell: Shell, out: &mut dyn Write) {
    clap_complete::generate(shell, &mut Cli::command(), "meshlb", out);
}

/// Writes the man pages into `dir` (created if missing); returns their
/// paths, sorted.
pub fn manpages(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(Cli::command(), dir)?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    pages.sort();
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_name_the_subcommands_and_flags() {
        let mut out = Vec::new();
        completions(Shell::Bash, &mut out);
        let script = String::from_utf8(out).unwrap();
        for sub in ["run", "status", "explain", "cleanup", "service", "task"] {
            assert!(script.contains(sub), "bash completion lacks {sub}");
        }
        assert!(
            script.contains("--dataplane"),
            "bash completion lacks run's flags"
        );
    }

    #[test]
    fn one_man_page_per_command() {
        let dir = std::env::temp_dir().join(format!("meshlb-manual-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pages = manpages(&dir).unwrap();
        let names: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "meshlb.1",
            "meshlb-run.1",
            "meshlb-cleanup.1",
            "meshlb-service.1",
        ] {
            assert!(names.iter().any(|n| n == want), "no {want} in {names:?}");
        }
        let run = std::fs::read_to_string(dir.join("meshlb-run.1")).unwrap();
        assert!(
            run.starts_with(".ie") || run.contains(".TH"),
            "not roff: {run:.80}"
        );
        assert!(run.contains("dataplane"), "meshlb-run.1 lacks --dataplane");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
