//! `fad score`: batch scoring of a merged table (SPEC section 6), through the same engine
//! as `fad stream`, so a row's result is the detection the stream would give.

use crate::cli::ScoreArgs;
use crate::engine::{Engine, Offer};
use crate::model::{Detection, Model};
use crate::table::{self, TableRow};
use anyhow::{Context, Result, anyhow, bail};
use std::io::{self, Write};
use std::sync::Arc;
use std::sync::mpsc;

pub const SCORE_HEADER: &str = "timestamp,group_id,sequence_id,bpm,uterus,bpm_anomaly,uterus_anomaly,anomaly_score";

/// Rows buffered before their windows are scored together.
const BATCH_ROWS: usize = 1 << 15;
/// Malformed rows reported one by one before the rest are only counted.
const MAX_REPORTED: u64 = 20;

#[derive(Default)]
struct Batch {
    /// The echoed part of each row ("ts,gid,sid,bpm,uterus"), back to back.
    text: Vec<u8>,
    rows: Vec<(usize, usize, Offer)>,
}

pub fn run(args: ScoreArgs) -> Result<()> {
    if let Some(n) = args.n_jobs {
        crate::set_threads(n)?;
    }
    let model = Arc::new(Model::load(&args.model)?);
    let name = table::input_name(&args.input);
    let input = table::open(&args.input, args.join, args.bad_files.skip_bad, "score")?;
    let opts = Output { all: args.all, features: args.with_features.then(|| model.n_features()) };
    let header = if args.with_features {
        format!("{SCORE_HEADER},{}\n", model.features.feature_cols().join(","))
    } else {
        format!("{SCORE_HEADER}\n")
    };
    // This thread reads rows and computes their features (a series' rows must be read in
    // order); each full batch is scored and formatted whole by one thread of the rayon
    // pool, and a writer thread puts the formatted batches out in order. Every thread
    // then has a batch's worth of work at a time: scoring a batch on the whole pool left
    // a core idle while its last chunk finished, and again while the batch was formatted
    // (full table, 2 cores: 1.88 -> 1.72 s). A batch's buffers come back for reuse;
    // at most IN_FLIGHT batches exist, which bounds memory and keeps the reader from
    // running ahead.
    let (done, finished) = mpsc::channel::<(u64, Job)>();
    let (recycle, spares) = mpsc::channel::<Job>();
    let writer = std::thread::Builder::new()
        .name("fad-score-writer".into())
        .spawn(move || -> io::Result<()> {
            let stdout = io::stdout();
            let mut out = io::BufWriter::with_capacity(1 << 16, crate::Stdout(stdout.lock()));
            out.write_all(header.as_bytes())?;
            in_order(finished, |job: Job| {
                out.write_all(&job.text)?;
                let _ = recycle.send(job);
                Ok(())
            })?;
            out.flush()
        })
        .context("cannot start the writer thread")?;
    let mut engine = Engine::new(Arc::clone(&model));
    let mut job = Job::default();
    let mut made = 1;
    let mut sent = 0u64;
    let mut bad_rows = 0u64;
    let mut writer_gone = false;
    let mut send = |job: &mut Job, engine: &mut Engine| -> Result<()> {
        let next = if made < IN_FLIGHT {
            made += 1;
            Job::default()
        } else {
            // Only the writer sends spares back: when it has stopped, nothing will come.
            let Ok(spare) = spares.recv() else {
                writer_gone = true;
                bail!("the writer stopped");
            };
            spare.cleared()
        };
        let mut full = std::mem::replace(job, next);
        engine.swap_pending(&mut full.rows);
        let (model, done, seq) = (Arc::clone(&model), done.clone(), sent);
        sent += 1;
        rayon::spawn(move || {
            full.format(&model, opts);
            let _ = done.send((seq, full));
        });
        Ok(())
    };
    let read = table::for_each_row(input, &name, |row| {
        match row {
            Ok(r) => {
                push_row(&mut engine, &mut job.batch, &r);
                if job.batch.rows.len() >= BATCH_ROWS {
                    send(&mut job, &mut engine)?;
                }
            }
            Err(e) => {
                bad_rows += 1;
                if bad_rows <= MAX_REPORTED {
                    eprintln!("fad score: {e}");
                }
            }
        }
        Ok(())
    });
    let last = if read.is_ok() { send(&mut job, &mut engine) } else { Ok(()) };
    drop(done);
    let written = writer.join().map_err(|_| anyhow!("the writer thread panicked"))?;
    // A failed write (a closed stdout, say) is the error to report, not its echo here.
    written?;
    if !writer_gone {
        read?;
        last?;
    }
    if bad_rows > 0 {
        bail!(
            "{bad_rows} malformed row(s) in {name} were not scored (the first {} are named above)",
            bad_rows.min(MAX_REPORTED)
        );
    }
    Ok(())
}

/// Hands `emit` the items numbered 0, 1, 2, ... in that order, whatever order they come in.
fn in_order<T>(
    numbered: impl IntoIterator<Item = (u64, T)>,
    mut emit: impl FnMut(T) -> io::Result<()>,
) -> io::Result<()> {
    let mut next = 0u64;
    let mut early = std::collections::BTreeMap::new();
    for (seq, item) in numbered {
        early.insert(seq, item);
        while let Some(item) = early.remove(&next) {
            emit(item)?;
            next += 1;
        }
    }
    Ok(())
}

/// Batches that may exist at once (being read, scored, or waiting for the writer).
const IN_FLIGHT: usize = 6;

/// A batch on its way out: the rows' echoed text and offers, the feature rows to score
/// (row-major, in batch order), and at last the formatted output.
#[derive(Default)]
struct Job {
    batch: Batch,
    rows: Vec<f32>,
    detections: Vec<Detection>,
    text: Vec<u8>,
}

impl Job {
    fn cleared(mut self) -> Job {
        self.batch.text.clear();
        self.batch.rows.clear();
        self.rows.clear();
        self.text.clear();
        self
    }

    /// Scores the batch and formats its output lines into `self.text`.
    fn format(&mut self, model: &Model, opts: Output) {
        let (mut text, mut detections) = (std::mem::take(&mut self.text), std::mem::take(&mut self.detections));
        write_batch(model, self, &mut detections, opts, &mut text).expect("writing to memory");
        (self.text, self.detections) = (text, detections);
    }
}

fn push_row(engine: &mut Engine, batch: &mut Batch, r: &TableRow) {
    let offer = engine.offer_in_runs(r.group_id, r.sequence_id, r.time, r.bpm, r.uterus);
    let start = batch.text.len();
    for (i, part) in [r.timestamp, r.group_id, r.sequence_id, r.bpm_text, r.uterus_text].iter().enumerate() {
        if i > 0 {
            batch.text.push(b',');
        }
        batch.text.extend_from_slice(part.as_bytes());
    }
    batch.rows.push((start, batch.text.len(), offer));
}

/// What goes into the output besides the scored rows.
#[derive(Clone, Copy)]
struct Output {
    all: bool,
    /// Feature row width, when the features are written too.
    features: Option<usize>,
}

fn write_batch(
    model: &Model,
    job: &Job,
    detections: &mut Vec<Detection>,
    opts: Output,
    out: &mut impl Write,
) -> io::Result<()> {
    let w = model.n_features();
    let n = job.rows.len() / w.max(1);
    detections.clear();
    detections.resize(n, Detection::default());
    model.detect_batch(&job.rows, detections);
    let batch = &job.batch;
    for &(s, e, offer) in &batch.rows {
        match offer {
            Offer::Pending(i) => {
                let d = &detections[i];
                out.write_all(&batch.text[s..e])?;
                out.write_all(&[b',', b'0' + d.bpm_anomaly as u8, b',', b'0' + d.uterus_anomaly as u8, b','])?;
                crate::model::write_f64(out, d.score)?;
                if let Some(w) = opts.features {
                    for v in &job.rows[i * w..(i + 1) * w] {
                        out.write_all(b",")?;
                        crate::model::write_f32(out, *v)?;
                    }
                }
                out.write_all(b"\n")?;
            }
            _ if opts.all => {
                out.write_all(&batch.text[s..e])?;
                out.write_all(b",,,")?;
                if let Some(w) = opts.features {
                    out.write_all(&b",".repeat(w))?;
                }
                out.write_all(b"\n")?;
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::in_order;

    #[test]
    fn batches_finished_in_any_order_are_written_in_order() {
        let mut got = Vec::new();
        in_order([(2, 'c'), (0, 'a'), (3, 'd'), (1, 'b'), (5, 'f'), (4, 'e')], |c| {
            got.push(c);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, ['a', 'b', 'c', 'd', 'e', 'f']);
    }
}
