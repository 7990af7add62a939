//! `fad score`: batch scoring of a merged table (SPEC section 6), through the same engine
//! as `fad stream`, so a row's result is the detection the stream would give.

use crate::cli::ScoreArgs;
use crate::engine::{Engine, Offer};
use crate::model::{Detection, Model};
use crate::table::{self, TableRow};
use anyhow::{Result, bail};
use std::io::{self, Write};
use std::sync::Arc;

pub const SCORE_HEADER: &str = "timestamp,group_id,sequence_id,bpm,uterus,bpm_anomaly,uterus_anomaly,anomaly_score";

/// Rows buffered before their windows are scored together.
const BATCH_ROWS: usize = 1 << 15;
/// Malformed rows reported one by one before the rest are only counted.
const MAX_REPORTED: u64 = 20;

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
    let input = table::open(&args.input, args.join)?;
    let stdout = io::stdout();
    let mut out = io::BufWriter::with_capacity(1 << 16, stdout.lock());
    if args.with_features {
        writeln!(out, "{SCORE_HEADER},{}", model.features.feature_cols().join(","))?;
    } else {
        writeln!(out, "{SCORE_HEADER}")?;
    }
    let opts = Output { all: args.all, features: args.with_features.then(|| model.n_features()) };
    let mut engine = Engine::new(model);
    let mut batch = Batch { text: Vec::new(), rows: Vec::new() };
    let mut detections = Vec::new();
    let mut bad_rows = 0u64;
    table::for_each_row(input, &name, |row| {
        match row {
            Ok(r) => {
                push_row(&mut engine, &mut batch, &r);
                if batch.rows.len() >= BATCH_ROWS {
                    flush_batch(&mut engine, &mut batch, &mut detections, opts, &mut out)?;
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
    })?;
    flush_batch(&mut engine, &mut batch, &mut detections, opts, &mut out)?;
    out.flush()?;
    if bad_rows > 0 {
        bail!(
            "{bad_rows} malformed row(s) in {name} were not scored (the first {} are named above)",
            bad_rows.min(MAX_REPORTED)
        );
    }
    Ok(())
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

fn flush_batch(
    engine: &mut Engine,
    batch: &mut Batch,
    detections: &mut Vec<Detection>,
    opts: Output,
    out: &mut impl Write,
) -> Result<()> {
    let features = opts.features.map(|w| (w, engine.pending_rows().to_vec()));
    engine.score_pending_parallel(detections);
    for &(s, e, offer) in &batch.rows {
        match offer {
            Offer::Pending(i) => {
                let d = &detections[i];
                out.write_all(&batch.text[s..e])?;
                write!(out, ",{},{},{}", d.bpm_anomaly as u8, d.uterus_anomaly as u8, d.score)?;
                if let Some((w, rows)) = &features {
                    for v in &rows[i * w..(i + 1) * w] {
                        write!(out, ",{v}")?;
                    }
                }
                out.write_all(b"\n")?;
            }
            _ if opts.all => {
                out.write_all(&batch.text[s..e])?;
                out.write_all(b",,,")?;
                if let Some((w, _)) = features {
                    out.write_all(&b",".repeat(w))?;
                }
                out.write_all(b"\n")?;
            }
            _ => {}
        }
    }
    batch.text.clear();
    batch.rows.clear();
    Ok(())
}
