//! Helpers shared by the stream and robustness tests: a small model trained once per test
//! binary from the bundled sample, and ways to run `fad` on bytes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

pub fn fad() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fad"))
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A scratch directory for this test binary run, under cargo's target tmp dir.
pub fn scratch(name: &str) -> PathBuf {
    static SWEPT: OnceLock<()> = OnceLock::new();
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    // Test binaries have no teardown: each removes what earlier, finished runs left.
    SWEPT.get_or_init(|| {
        for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("robust-")
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    });
    let dir = root.join(format!("robust-{}", std::process::id())).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Trains a small model on data/sample/lct2025 into `dir` (with a seed, so two calls with
/// different seeds give two different forests computing the same features). It uses the
/// SPEC's window features, whose warm-up of 24 samples these tests count on.
pub fn train(dir: &Path, seed: u64) {
    let out = fad()
        .args(["train", "--features", "window", "--n-estimators", "15", "--force", "--random-state"])
        .arg(seed.to_string())
        .arg("--out-dir")
        .arg(dir)
        .arg(repo().join("data/sample/lct2025"))
        .output()
        .unwrap();
    assert!(out.status.success(), "train failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// The model shared by the tests of one binary.
pub fn model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = scratch("shared-model").join("m");
        train(&dir, 7);
        dir
    })
}

/// Runs `fad stream` (extra args) on `input`, returning its output.
pub fn stream(args: &[&str], input: &[u8]) -> Output {
    let mut child = fad()
        .arg("stream")
        .arg("--model")
        .arg(model())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

pub fn lines(out: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(out).lines().map(str::to_owned).collect()
}

/// `n` good messages of one series, one a second from `t0`.
pub fn series_lines(g: &str, s: &str, t0: u64, n: u64) -> String {
    (t0..t0 + n).map(|t| format!("{t},{},{},{g},{s}\n", 130 + t % 7, 10 + t % 5)).collect()
}

/// A running `fad stream` fed line by line, whose replies are read with a time limit (a
/// guard against hanging, not a speed check).
pub struct Live {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    replies: mpsc::Receiver<String>,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

pub const PATIENCE: Duration = Duration::from_secs(20);

impl Live {
    pub fn start(model: &Path, args: &[&str]) -> Live {
        let mut child = fad()
            .arg("stream")
            .arg("--model")
            .arg(model)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stderr_text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = std::sync::Arc::clone(&stderr_text);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    return;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Live { child, stdin, replies: rx, stderr: stderr_text }
    }

    pub fn send(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// The next reply; panics when none comes within [`PATIENCE`].
    pub fn reply(&self) -> String {
        self.replies.recv_timeout(PATIENCE).expect("no reply from fad stream")
    }

    /// The next reply, or `f()` when none comes.
    pub fn reply_or(&self, f: impl FnOnce() -> String) -> String {
        self.replies.recv_timeout(PATIENCE).unwrap_or_else(|_| f())
    }

    pub fn replies(&self, n: usize) -> Vec<String> {
        (0..n).map(|_| self.reply()).collect()
    }

    /// Waits until stderr contains `text`.
    pub fn wait_stderr(&self, text: &str) -> String {
        let start = std::time::Instant::now();
        loop {
            let s = self.stderr.lock().unwrap().clone();
            if s.contains(text) {
                return s;
            }
            assert!(start.elapsed() < PATIENCE, "stderr never said {text:?}; it said: {s}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: i32) {
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0);
    }

    /// Closes stdin and waits for the exit; returns the status and the rest of stdout.
    pub fn finish(mut self) -> (std::process::ExitStatus, Vec<String>, String) {
        self.stdin.take();
        let status = wait_with_patience(&mut self.child);
        let rest: Vec<String> = self.replies.iter().collect();
        std::thread::sleep(Duration::from_millis(50));
        let err = self.stderr.lock().unwrap().clone();
        (status, rest, err)
    }
}

pub fn wait_with_patience(child: &mut Child) -> std::process::ExitStatus {
    let start = std::time::Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if start.elapsed() > PATIENCE {
            let _ = child.kill();
            panic!("fad did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Peak and current resident memory (KiB) of a live process, from /proc.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// An oracle table of scikit-learn scores (tests/fixtures): feature rows (float32 values)
/// and scikit-learn's score_samples, decision_function and predict of each.
pub struct Oracle {
    pub n_features: usize,
    pub rows: Vec<f32>,
    pub score_samples: Vec<f64>,
    pub decision_function: Vec<f64>,
    pub predict: Vec<i32>,
}

pub fn read_oracle(path: &Path) -> Oracle {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let w = header.len() - 3;
    assert_eq!(&header[w..], ["score_samples", "decision_function", "predict"]);
    let mut o = Oracle {
        n_features: w,
        rows: Vec::new(),
        score_samples: Vec::new(),
        decision_function: Vec::new(),
        predict: Vec::new(),
    };
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), w + 3, "{line}");
        for v in &f[..w] {
            let x: f64 = v.parse().unwrap();
            assert_eq!(x as f32 as f64, x, "oracle features are float32 values");
            o.rows.push(x as f32);
        }
        o.score_samples.push(py_number(f[w]));
        o.decision_function.push(py_number(f[w + 1]));
        o.predict.push(f[w + 2].parse().unwrap());
    }
    o
}

/// A float as Python's repr writes it; numpy 2 writes numpy scalars as `np.float64(x)`.
pub fn py_number(text: &str) -> f64 {
    let t = text.strip_prefix("np.float64(").and_then(|t| t.strip_suffix(')')).unwrap_or(text);
    t.parse().unwrap_or_else(|_| panic!("{text:?} is not a number"))
}
