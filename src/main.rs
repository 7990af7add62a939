//! The `fad` binary: parse the command line, run a subcommand, map errors to exit codes.

use clap::Parser;
use fad::UsageError;
use fad::cli::{Cli, Command};
use std::io::ErrorKind;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Convert(a) => fad::cmd::convert::run(a),
        Command::Train(a) => fad::cmd::train::run(a),
        Command::Score(a) => fad::cmd::score::run(a),
        Command::Stream(a) => fad::cmd::stream::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit_code_for(&e),
    }
}

/// The one place errors become exit codes: a closed stdout ends quietly with 0, a usage
/// error is 2, anything else (data, I/O) is 1 with one sentence on stderr.
fn exit_code_for(e: &anyhow::Error) -> ExitCode {
    let broken_pipe =
        e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == ErrorKind::BrokenPipe));
    if broken_pipe {
        return ExitCode::SUCCESS;
    }
    eprintln!("fad: {}", fad::escape_controls(&format!("{e:#}")));
    if e.chain().any(|c| c.downcast_ref::<UsageError>().is_some()) { ExitCode::from(2) } else { ExitCode::from(1) }
}
