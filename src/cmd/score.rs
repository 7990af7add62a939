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
    // Two stages: this thread reads rows and computes their features; the writer thread
    // scores each full batch (on the rayon pool) and writes it, while the next batch is
    // being read. Batches travel in order through a channel of four (with one, the reader
    // waited while the writer formatted, and a core sat idle), and their buffers come
    // back for reuse.
    let (to_writer, batches) = mpsc::sync_channel::<Job>(4);
    let (recycle, spares) = mpsc::channel::<Job>();
    let writer_model = Arc::clone(&model);
    let writer = std::thread::Builder::new()
        .name("fad-score-writer".into())
        .spawn(move || -> io::Result<()> {
            let stdout = io::stdout();
            let mut out = io::BufWriter::with_capacity(1 << 16, crate::Stdout(stdout.lock()));
            out.write_all(header.as_bytes())?;
            let mut detections = Vec::new();
            for job in batches {
                write_batch(&writer_model, &job, &mut detections, opts, &mut out)?;
                let _ = recycle.send(job);
            }
            out.flush()
        })
        .context("cannot start the writer thread")?;
    let mut engine = Engine::new(model);
    let mut job = Job::default();
    let mut bad_rows = 0u64;
    let mut writer_gone = false;
    let read = table::for_each_row(input, &name, |row| {
        match row {
            Ok(r) => {
                push_row(&mut engine, &mut job.batch, &r);
                if job.batch.rows.len() >= BATCH_ROWS {
                    let next = spares.try_recv().map(Job::cleared).unwrap_or_default();
                    engine.swap_pending(&mut job.rows);
                    if to_writer.send(std::mem::replace(&mut job, next)).is_err() {
                        writer_gone = true;
                        bail!("the writer stopped");
                    }
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
    if read.is_ok() {
        engine.swap_pending(&mut job.rows);
        let _ = to_writer.send(job);
    }
    drop(to_writer);
    let written = writer.join().map_err(|_| anyhow!("the writer thread panicked"))?;
    // A failed write (a closed stdout, say) is the error to report, not its echo here.
    written?;
    if !writer_gone {
        read?;
    }
    if bad_rows > 0 {
        bail!(
            "{bad_rows} malformed row(s) in {name} were not scored (the first {} are named above)",
            bad_rows.min(MAX_REPORTED)
        );
    }
    Ok(())
}

/// A batch on its way to the writer: the rows' echoed text and offers, and the feature
/// rows to score (row-major, in batch order).
#[derive(Default)]
struct Job {
    batch: Batch,
    rows: Vec<f32>,
}

impl Job {
    fn cleared(mut self) -> Job {
        self.batch.text.clear();
        self.batch.rows.clear();
        self.rows.clear();
        self
    }
}

fn push_row(engine: &mut Engine, batch: &mut Batch, r: &TableRow) {
    let offer = engine.offer(r.group_id, r.sequence_id, r.time, r.bpm, r.uterus);
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
    use rayon::prelude::*;
    let w = model.n_features();
    let n = job.rows.len() / w.max(1);
    detections.clear();
    detections.resize(n, Detection::default());
    const CHUNK: usize = 2048;
    detections.par_chunks_mut(CHUNK).zip(job.rows.par_chunks(CHUNK * w)).for_each(|(o, r)| model.detect_batch(r, o));
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
