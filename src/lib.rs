//! fad: isolation-forest anomaly detection for cardiotocography (CTG) streams.
//!
//! Pure logic lives in the library (features, forest, fitting, model artifacts, engine);
//! the subcommands in [`cmd`] do the I/O at the edges.

// `!(x <= t)` is deliberate throughout: it is how NaN falls (right in a tree, "not after"
// for times, "invalid" for limits), exactly as scikit-learn and the SPEC have it.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

pub mod cli;
pub mod cmd;
pub mod data;
pub mod engine;
pub mod features;
pub mod fit;
pub mod forecast;
pub mod forest;
pub mod model;
pub mod pickle;
pub mod progress;
pub mod sklearn;
pub mod state;
pub mod table;

use std::fmt;

/// An error in how fad was called (exit status 2), as opposed to bad data (exit 1).
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Sizes rayon's global pool; `--n-jobs` never changes results, only speed.
pub fn set_threads(n: usize) -> anyhow::Result<()> {
    if n == 0 {
        anyhow::bail!(UsageError("--n-jobs must be at least 1".into()));
    }
    // A second call (tests in one process) finds the pool built already: keep it.
    let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    Ok(())
}

/// Text from input files (ids, column names, globals of a pickle, file names) can reach a
/// message on stderr; control characters in it are escaped, so that the message stays one
/// line and cannot move the cursor or colour the terminal.
/// Standard output whose write errors name it: a full disk would otherwise read
/// "fad: No space left on device", naming nothing. A broken pipe stays as it is (a closed
/// `| head` ends quietly).
pub struct Stdout<W>(pub W);

impl<W: std::io::Write> std::io::Write for Stdout<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf).map_err(name_stdout)
    }
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.0.write_all(buf).map_err(name_stdout)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush().map_err(name_stdout)
    }
}

fn name_stdout(e: std::io::Error) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        e
    } else {
        std::io::Error::new(e.kind(), format!("cannot write to standard output: {e}"))
    }
}

pub fn escape_controls(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_in_messages_are_escaped() {
        assert_eq!(super::escape_controls("column a\nfad: x \u{1b}[2J ok é"), "column a\\nfad: x \\u{1b}[2J ok é");
    }
}
