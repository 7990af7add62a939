//! Future points for `fad stream --horizon K` (SPEC section 5): the last values held, or
//! what an external forecaster co-process predicts.
//!
//! The co-process protocol is one JSON line each way per scored message. fad writes
//!
//! ```text
//! {"id":1,"group_id":"G","sequence_id":"S","k":3,"history":{"timestamp":[..],"bpm":[..],"uterus":[..]}}
//! ```
//!
//! (history oldest first, the newest sample last) and reads back
//!
//! ```text
//! {"id":1,"bpm":[b1,b2,b3],"uterus":[u1,u2,u3]}        optionally "timestamp":[t1,t2,t3]
//! ```
//!
//! Without timestamps, the points follow the newest sample at its last sampling interval.
//! The answer echoes the request's "id": an answer to another request (an extra line,
//! a late one) means the two are out of step, and the co-process is stopped, whatever
//! the timing. A line already waiting before a request is out of step too.

use serde::Deserialize;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

/// Longest answer line read from a forecaster.
const MAX_ANSWER: usize = 1 << 20;

/// Why a message got no forecast; `as_str` is the token in its reply.
#[derive(Clone, Debug, PartialEq)]
pub enum ForecastError {
    /// The co-process could not be written to, closed its output or has died.
    Gone(String),
    /// No answer within the timeout (the co-process is then stopped).
    Timeout,
    /// An answer that is not the JSON the protocol asks for.
    BadAnswer(String),
    /// Answers no longer pair with requests (an extra line, another request's id).
    OutOfStep(String),
}

impl ForecastError {
    pub fn as_str(&self) -> &'static str {
        match self {
            ForecastError::Gone(_) => "forecaster_gone",
            ForecastError::Timeout => "forecaster_timeout",
            ForecastError::BadAnswer(_) => "forecaster_bad_answer",
            ForecastError::OutOfStep(_) => "forecaster_out_of_step",
        }
    }
    pub fn detail(&self) -> String {
        match self {
            ForecastError::Gone(why) => format!("the forecaster is gone ({why})"),
            ForecastError::Timeout => "the forecaster did not answer in time; it was stopped".into(),
            ForecastError::BadAnswer(why) => format!("the forecaster's answer is not usable: {why}"),
            ForecastError::OutOfStep(why) => {
                format!("the forecaster's answers are out of step with the requests ({why}); it was stopped")
            }
        }
    }
}

/// The K points after `newest` at the interval `dt`, with the newest values held.
pub fn hold(newest: [f64; 3], dt: f64, k: usize) -> Vec<[f64; 3]> {
    let [t, b, u] = newest;
    (1..=k).map(|i| [t + dt * i as f64, b, u]).collect()
}

/// The request line (without its newline) for a series' history.
pub fn request(id: u64, group_id: &str, sequence_id: &str, k: usize, history: &[[f64; 3]]) -> String {
    let col = |i: usize| history.iter().map(|p| p[i]).collect::<Vec<f64>>();
    serde_json::json!({
        "id": id,
        "group_id": group_id,
        "sequence_id": sequence_id,
        "k": k,
        "history": {"timestamp": col(0), "bpm": col(1), "uterus": col(2)},
    })
    .to_string()
}

#[derive(Deserialize)]
struct Answer {
    bpm: Vec<Option<f64>>,
    uterus: Vec<Option<f64>>,
    #[serde(default)]
    timestamp: Option<Vec<f64>>,
    /// The request's id, echoed: it pairs answers with requests whatever the timing.
    id: u64,
}

/// Reads an answer for `k` points after `newest` (sampled every `dt`). A `null` value is
/// a missing one (the point is then not scored, like signal loss in the feed).
pub fn parse_answer(line: &str, id: u64, k: usize, newest: [f64; 3], dt: f64) -> Result<Vec<[f64; 3]>, ForecastError> {
    let a: Answer = serde_json::from_str(line).map_err(|e| ForecastError::BadAnswer(e.to_string()))?;
    let bad = |why: String| Err(ForecastError::BadAnswer(why));
    if a.id != id {
        return Err(ForecastError::OutOfStep(format!("an answer for request {} came to request {id}", a.id)));
    }
    if a.bpm.len() != k || a.uterus.len() != k {
        return bad(format!(
            "{k} values per signal were asked for, {} bpm and {} uterus came",
            a.bpm.len(),
            a.uterus.len()
        ));
    }
    let times = match a.timestamp {
        Some(ts) if ts.len() != k => return bad(format!("{k} timestamps were asked for, {} came", ts.len())),
        Some(ts) => {
            let mut last = newest[0];
            for &t in &ts {
                if !(t > last) || !t.is_finite() {
                    return bad("timestamps must be finite and increase after the newest sample".into());
                }
                last = t;
            }
            ts
        }
        None => hold(newest, dt, k).into_iter().map(|p| p[0]).collect(),
    };
    Ok((0..k).map(|i| [times[i], a.bpm[i].unwrap_or(f64::NAN), a.uterus[i].unwrap_or(f64::NAN)]).collect())
}

/// A running forecaster co-process (`sh -c CMD`), answering one line per request.
pub struct Forecaster {
    child: Child,
    stdin: Option<ChildStdin>,
    answers: Receiver<std::io::Result<String>>,
    timeout: Duration,
    /// Set once the co-process failed: every later request gets the same error at once.
    broken: Option<ForecastError>,
    /// Id of the next request.
    next_id: u64,
}

impl Forecaster {
    pub fn start(command: &str, timeout: Duration) -> std::io::Result<Forecaster> {
        use std::os::unix::process::CommandExt;
        // Its own process group, so that stopping it also stops what `sh -c` started
        // (an orphan would keep fad's stderr open).
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout was piped");
        // Answers are read on their own thread so that a silent co-process cannot hang
        // fad past the timeout.
        let (tx, answers) = mpsc::sync_channel(1);
        std::thread::Builder::new().name("fad-forecaster".into()).spawn(move || {
            let mut r = BufReader::new(stdout);
            loop {
                let mut line = Vec::new();
                let got = (&mut r).take(MAX_ANSWER as u64 + 1).read_until(b'\n', &mut line);
                let msg = match got {
                    Ok(0) => Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "it closed its output")),
                    Ok(_) if line.len() > MAX_ANSWER => {
                        Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "an answer longer than 1 MiB"))
                    }
                    Ok(_) => String::from_utf8(line).map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, "an answer that is not UTF-8")
                    }),
                    Err(e) => Err(e),
                };
                let end = msg.is_err();
                if tx.send(msg).is_err() || end {
                    return;
                }
            }
        })?;
        Ok(Forecaster { child, stdin, answers, timeout, broken: None, next_id: 1 })
    }

    /// Asks for the `k` points after a series' history (its newest sample last).
    pub fn ask(
        &mut self,
        group_id: &str,
        sequence_id: &str,
        k: usize,
        history: &[[f64; 3]],
        dt: f64,
    ) -> Result<Vec<[f64; 3]>, ForecastError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let newest = *history.last().expect("a scored series has a newest sample");
        let id = self.next_id;
        self.next_id += 1;
        // A line that came unasked would be taken for the next answer, and every later
        // answer would then belong to the message before it: stop trusting the co-process.
        let result = match self.answers.try_recv() {
            Ok(Ok(_)) => Err(ForecastError::OutOfStep("it wrote a line that no request asked for".into())),
            Ok(Err(e)) => Err(ForecastError::Gone(e.to_string())),
            Err(_) => self
                .exchange(&request(id, group_id, sequence_id, k, history))
                .and_then(|line| parse_answer(line.trim_end_matches(['\n', '\r']), id, k, newest, dt)),
        };
        if let Err(e @ (ForecastError::Gone(_) | ForecastError::Timeout | ForecastError::OutOfStep(_))) = &result {
            self.broken = Some(e.clone());
            self.stop();
        }
        result
    }

    fn exchange(&mut self, request: &str) -> Result<String, ForecastError> {
        let stdin = self.stdin.as_mut().ok_or_else(|| ForecastError::Gone("stopped".into()))?;
        stdin
            .write_all(request.as_bytes())
            .and_then(|_| stdin.write_all(b"\n"))
            .and_then(|_| stdin.flush())
            .map_err(|e| ForecastError::Gone(format!("cannot write to it: {e}")))?;
        match self.answers.recv_timeout(self.timeout) {
            Ok(Ok(line)) => Ok(line),
            Ok(Err(e)) => Err(ForecastError::Gone(e.to_string())),
            Err(RecvTimeoutError::Timeout) => Err(ForecastError::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(ForecastError::Gone("it closed its output".into())),
        }
    }

    fn stop(&mut self) {
        self.stdin = None;
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) with the negated id of the group this co-process leads.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Forecaster {
    fn drop(&mut self) {
        // End of input for the co-process; give it a moment to leave on its own.
        self.stdin = None;
        for _ in 0..20 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_repeats_the_newest_values_at_the_last_interval() {
        assert_eq!(hold([10.0, 140.0, 12.0], 0.25, 2), [[10.25, 140.0, 12.0], [10.5, 140.0, 12.0]]);
    }

    #[test]
    fn requests_carry_the_history_by_column() {
        let r = request(7, "g", "s", 2, &[[0.0, 140.0, 10.0], [0.25, 141.0, 11.0]]);
        let v: serde_json::Value = serde_json::from_str(&r).unwrap();
        assert_eq!(v["k"], 2);
        assert_eq!(v["id"], 7);
        assert_eq!(v["history"]["bpm"], serde_json::json!([140.0, 141.0]));
        assert_eq!(v["history"]["timestamp"], serde_json::json!([0.0, 0.25]));
    }

    #[test]
    fn answers_are_checked() {
        let newest = [1.0, 140.0, 10.0];
        let ok = parse_answer(r#"{"id":1,"bpm":[141,142],"uterus":[11,null]}"#, 1, 2, newest, 0.5).unwrap();
        assert_eq!(ok[0], [1.5, 141.0, 11.0]);
        assert_eq!(ok[1][0], 2.0);
        assert!(ok[1][2].is_nan());
        let timed = parse_answer(r#"{"bpm":[1],"uterus":[2],"timestamp":[7],"id":3}"#, 3, 1, newest, 0.5).unwrap();
        assert_eq!(timed, [[7.0, 1.0, 2.0]]);
        for bad in [
            "not json",
            r#"{"bpm":[1,2],"uterus":[2,3]}"#,
            r#"{"id":1,"bpm":[1],"uterus":[2]}"#,
            r#"{"id":1,"bpm":[1,2],"uterus":[2]}"#,
            r#"{"id":1,"bpm":[1,2],"uterus":[2,3],"timestamp":[0.5,3]}"#,
            r#"{"id":1,"bpm":["x",2],"uterus":[2,3]}"#,
        ] {
            assert!(matches!(parse_answer(bad, 1, 2, newest, 0.5), Err(ForecastError::BadAnswer(_))), "{bad}");
        }
        let other = parse_answer(r#"{"bpm":[1],"uterus":[2],"id":4}"#, 5, 1, newest, 0.5);
        assert!(matches!(other, Err(ForecastError::OutOfStep(_))), "{other:?}");
    }

    /// A shell forecaster answering each request with `bpm`/`uterus` values and its id,
    /// then `extra` (more shell commands, with $n the id).
    fn shell_forecaster(extra: &str) -> String {
        format!(
            r#"while read l; do n=$(echo "$l" | sed 's/.*"id":\([0-9]*\),.*/\1/'); echo "{{\"id\":$n,\"bpm\":[150],\"uterus\":[20]}}"; {extra} done"#
        )
    }

    #[test]
    fn a_co_process_answers_and_a_dead_one_is_reported_once_and_for_all() {
        let mut f = Forecaster::start(&shell_forecaster(""), Duration::from_secs(5)).unwrap();
        let h = [[0.0, 140.0, 10.0], [0.25, 141.0, 11.0]];
        assert_eq!(f.ask("g", "s", 1, &h, 0.25).unwrap(), [[0.5, 150.0, 20.0]]);
        assert_eq!(f.ask("g", "s", 1, &h, 0.25).unwrap(), [[0.5, 150.0, 20.0]], "the second request, id 2");
        let mut dead = Forecaster::start("exit 0", Duration::from_secs(5)).unwrap();
        assert!(matches!(dead.ask("g", "s", 1, &h, 0.25), Err(ForecastError::Gone(_))));
        assert!(matches!(dead.ask("g", "s", 1, &h, 0.25), Err(ForecastError::Gone(_))));
        // Each answer written twice, the copy late: whenever it comes, it answers the
        // request before, so the next request finds the two out of step.
        let twice = shell_forecaster(r#"sleep 0.05; echo "{\"id\":$n,\"bpm\":[1],\"uterus\":[1]}";"#);
        let mut chatty = Forecaster::start(&twice, Duration::from_secs(5)).unwrap();
        assert_eq!(chatty.ask("g", "s", 1, &h, 0.25).unwrap(), [[0.5, 150.0, 20.0]]);
        assert!(matches!(chatty.ask("g", "s", 1, &h, 0.25), Err(ForecastError::OutOfStep(_))));
        assert!(matches!(chatty.ask("g", "s", 1, &h, 0.25), Err(ForecastError::OutOfStep(_))));
        let mut silent = Forecaster::start("sleep 30", Duration::from_millis(200)).unwrap();
        assert_eq!(silent.ask("g", "s", 1, &h, 0.25), Err(ForecastError::Timeout));
    }
}
