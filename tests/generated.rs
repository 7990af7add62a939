//! Man pages (`man/`) and shell completions (`completions/`) are generated from the clap
//! definitions in src/cli.rs and committed. This test fails when they are stale; run
//! `FAD_REGENERATE=1 cargo test --test generated` to rewrite them.

use clap::CommandFactory;
use clap_complete::Shell;
use fad::cli::Cli;
use std::path::{Path, PathBuf};

fn render_all() -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let cmd = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page).expect("render fad.1");
    files.push((PathBuf::from("man/fad.1"), page));
    for sub in cmd.get_subcommands() {
        let name = format!("fad-{}", sub.get_name());
        let static_name: &'static str = Box::leak(name.clone().into_boxed_str());
        let sub = sub.clone().name(static_name);
        let mut page = Vec::new();
        clap_mangen::Man::new(sub).render(&mut page).expect("render subcommand page");
        files.push((PathBuf::from(format!("man/{name}.1")), page));
    }
    for (shell, file) in [(Shell::Bash, "fad.bash"), (Shell::Zsh, "_fad"), (Shell::Fish, "fad.fish")] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "fad", &mut out);
        files.push((PathBuf::from(format!("completions/{file}")), out));
    }
    files
}

#[test]
fn man_pages_and_completions_are_up_to_date() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let regenerate = std::env::var_os("FAD_REGENERATE").is_some();
    let mut stale = Vec::new();
    for (rel, want) in render_all() {
        let path = root.join(&rel);
        if regenerate {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &want).unwrap();
        } else if std::fs::read(&path).ok().as_deref() != Some(&want[..]) {
            stale.push(rel.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "stale generated files: {} (run FAD_REGENERATE=1 cargo test --test generated)",
        stale.join(", ")
    );
}

#[test]
fn every_subcommand_has_a_man_page_and_examples() {
    for sub in Cli::command().get_subcommands() {
        let help = sub.get_after_help().map(|h| h.to_string()).unwrap_or_default();
        assert!(help.contains("Examples:"), "fad {} --help has no examples", sub.get_name());
    }
    let names: Vec<String> = render_all().into_iter().map(|(p, _)| p.display().to_string()).collect();
    for sub in ["convert", "train", "score", "stream"] {
        assert!(names.contains(&format!("man/fad-{sub}.1")));
    }
}
