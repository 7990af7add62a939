//! `fad convert`: a folder tree of recordings -> one merged table, or a live feed.

use crate::cli::{ConvertArgs, ConvertOutput, Join};
use crate::data::{Merged, Pair, discover, merge_pair};
use crate::progress;
use crate::table::{bad_id, csv_breaking};
use anyhow::{Result, bail};
use rayon::prelude::*;
use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, Instant};

pub const TABLE_HEADER: &str = "timestamp,group_id,sequence_id,bpm,uterus,target";

/// Pairs read in parallel at a time; output order is kept.
const BATCH: usize = 32;

/// Writes the merged table of `dir` to `out`. Returns the number of rows. Bad files are
/// an error, or with `skip_bad` named on stderr and left out. Warnings on stderr are
/// prefixed `fad <command>:`.
pub fn write_table(dir: &Path, join: Join, skip_bad: bool, command: &str, out: &mut dyn Write) -> Result<u64> {
    let pairs = usable_pairs(dir, command)?;
    writeln!(out, "{TABLE_HEADER}")?;
    let bar = progress::bar(pairs.len() as u64, "converting");
    let mut rows = 0u64;
    let mut skipped = 0usize;
    for batch in pairs.chunks(BATCH) {
        let rendered: Vec<Result<(Vec<u8>, u64, usize)>> = batch.par_iter().map(|p| render_pair(p, join)).collect();
        for (pair, r) in batch.iter().zip(rendered) {
            match r {
                Ok((bytes, n, repeated)) => {
                    out.write_all(&bytes)?;
                    rows += n;
                    warn_repeated(command, pair, repeated);
                }
                Err(e) if skip_bad => {
                    warn(command, &format!("skipped {}: {e:#}", pair.stem));
                    skipped += 1;
                }
                Err(e) => return Err(with_skip_bad_hint(e)),
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    report_skipped(command, skipped);
    Ok(rows)
}

/// The context of a malformed file's error, for every command that takes `--skip-bad`.
pub const SKIP_BAD_HINT: &str = "use --skip-bad to leave bad files out";

/// The error of a malformed file, then the hint (the problem first, as users read it).
pub fn with_skip_bad_hint(e: anyhow::Error) -> anyhow::Error {
    anyhow::anyhow!("{e:#} ({SKIP_BAD_HINT})")
}

/// The count at the end of the files `--skip-bad` left out.
pub fn report_skipped(command: &str, skipped: usize) {
    if skipped > 0 {
        warn(command, &format!("{skipped} malformed file pair(s) skipped"));
    }
}

/// The pairs of `dir` whose files are read. Files without a partner, and pairs whose
/// folder or file names cannot make ids, are named on stderr and left out. A directory
/// without any pair is an error.
pub fn usable_pairs(dir: &Path, command: &str) -> Result<Vec<Pair>> {
    let found = discover(dir)?;
    report_unpaired(command, &found.unpaired);
    if found.pairs.is_empty() {
        // Given one level too deep, DIR holds <folder>/bpm/ itself.
        let class_folder = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().join("bpm").is_dir() || e.path().join("uterus").is_dir());
        let hint = if class_folder { "; it looks like one class folder: give the folder above it" } else { "" };
        bail!(
            "{} holds no recordings: expected <class>/<folder>/bpm/<stem>_1.csv files (or _3) below it, \
             each with its partner <class>/<folder>/uterus/<stem>_2.csv (or _4){hint}",
            dir.display()
        );
    }
    let mut pairs = Vec::with_capacity(found.pairs.len());
    let mut refused = 0usize;
    for pair in found.pairs {
        match id_problem(&pair) {
            None => pairs.push(pair),
            Some(why) => {
                warn(command, &format!("skipped {}: {why}", pair.bpm.display()));
                refused += 1;
            }
        }
    }
    if refused > 0 {
        warn(command, &format!("{refused} file pair(s) with unusable ids left out"));
    }
    if pairs.is_empty() {
        bail!("{} holds no usable recordings: all {refused} pair(s) were left out (named above)", dir.display());
    }
    Ok(pairs)
}

/// Why a pair's group id (`<class>-<folder>`) or sequence id (the bpm file's stem) cannot
/// be written: the ids `fad stream` refuses, and a comma or double quote, which would
/// break the CSV fields of the table and of stream messages.
fn id_problem(pair: &Pair) -> Option<String> {
    for (what, id) in [("group id", pair.group_id()), ("sequence id", pair.stem.clone())] {
        let why = match (bad_id(&id), csv_breaking(&id)) {
            (Some(bad), _) => format!("{} ({})", bad.describe(), bad.reason()),
            (None, Some(why)) => why.into(),
            (None, None) => continue,
        };
        return Some(format!("its {what} {id:?} {why}"));
    }
    None
}

/// A warning of `fad <command>` on stderr, control characters (from file names) escaped.
pub fn warn(command: &str, text: &str) {
    eprintln!("fad {command}: {}", crate::escape_controls(text));
}

fn report_unpaired(command: &str, unpaired: &[std::path::PathBuf]) {
    for p in unpaired {
        warn(command, &format!("no partner for {}", p.display()));
    }
    if !unpaired.is_empty() {
        warn(command, &format!("{} unpaired file(s) left out", unpaired.len()));
    }
}

/// Names a pair with repeated times (kept as they are, as a merge on time would).
fn warn_repeated(command: &str, pair: &Pair, repeated: usize) {
    if repeated > 0 {
        let what = format!("{} row(s) repeat the time of the row before", repeated);
        warn(command, &format!("{}: {what}; only the first of each is scored", pair.bpm.display()));
    }
}

/// A pair's table rows, their count and how many repeat the time before them.
fn render_pair(pair: &Pair, join: Join) -> Result<(Vec<u8>, u64, usize)> {
    let merged = merge_pair(pair, join)?;
    let gid = pair.group_id();
    // ",<group>,<sequence>," and ",<class>\n" are the same on every row.
    let mid = format!(",{gid},{},", pair.stem);
    let tail = format!(",{}\n", pair.class);
    let mut buf = Vec::with_capacity(merged.len() * (mid.len() + tail.len() + 32));
    for i in 0..merged.len() {
        let (t, b, u) = merged.row(i);
        buf.extend_from_slice(t.as_bytes());
        buf.extend_from_slice(mid.as_bytes());
        buf.extend_from_slice(b.as_bytes());
        buf.push(b',');
        buf.extend_from_slice(u.as_bytes());
        buf.extend_from_slice(tail.as_bytes());
    }
    Ok((buf, merged.len() as u64, merged.repeated_times()))
}

/// Writes every pair as stream messages merged in timestamp order, optionally paced.
fn write_feed(dir: &Path, join: Join, skip_bad: bool, realtime: Option<f64>, out: &mut dyn Write) -> Result<()> {
    let pairs = usable_pairs(dir, "convert")?;
    let bar = progress::bar(pairs.len() as u64, "reading");
    let merged: Vec<(usize, Result<Merged>)> =
        pairs.par_iter().enumerate().map(|(i, p)| (i, merge_pair(p, join))).collect();
    // (time, pair index, row index) for a global, deterministic timestamp order
    let mut order: Vec<(f64, u32, u32)> = Vec::new();
    let mut tables: Vec<Merged> = Vec::with_capacity(merged.len());
    let mut skipped = 0usize;
    for (i, r) in merged {
        let rows = match r {
            Ok(rows) => {
                warn_repeated("convert", &pairs[i], rows.repeated_times());
                rows
            }
            Err(e) if skip_bad => {
                warn("convert", &format!("skipped {}: {e:#}", pairs[i].stem));
                skipped += 1;
                Merged::default()
            }
            Err(e) => return Err(with_skip_bad_hint(e)),
        };
        for j in 0..rows.len() {
            order.push((rows.time(j), i as u32, j as u32));
        }
        tables.push(rows);
        bar.inc(1);
    }
    bar.finish_and_clear();
    report_skipped("convert", skipped);
    order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    // ",<group>,<sequence>\n" of every pair
    let tails: Vec<String> = pairs.iter().map(|p| format!(",{},{}\n", p.group_id(), p.stem)).collect();
    let start = Instant::now();
    let t0 = order.first().map_or(0.0, |o| o.0);
    for &(t, i, j) in &order {
        if let Some(factor) = realtime {
            let due = Duration::from_secs_f64(((t - t0) / factor).max(0.0));
            let now = start.elapsed();
            if due > now {
                out.flush()?;
                std::thread::sleep(due - now);
            }
        }
        let (ts, b, u) = tables[i as usize].row(j as usize);
        out.write_all(ts.as_bytes())?;
        out.write_all(b",")?;
        out.write_all(b.as_bytes())?;
        out.write_all(b",")?;
        out.write_all(u.as_bytes())?;
        out.write_all(tails[i as usize].as_bytes())?;
    }
    out.flush()?;
    Ok(())
}

pub fn run(args: ConvertArgs) -> Result<()> {
    if let Some(f) = args.realtime
        && !(f > 0.0 && f.is_finite())
    {
        bail!(crate::UsageError(format!("--realtime must be a positive number, got {f}")));
    }
    if args.realtime.is_some() && args.output != ConvertOutput::Feed {
        bail!(crate::UsageError("--realtime goes with --as feed".into()));
    }
    let stdout = io::stdout();
    let mut out = io::BufWriter::with_capacity(1 << 16, crate::Stdout(stdout.lock()));
    match args.output {
        ConvertOutput::Table => {
            write_table(&args.data_dir, args.join, args.bad_files.skip_bad, "convert", &mut out)?;
        }
        ConvertOutput::Feed => write_feed(&args.data_dir, args.join, args.bad_files.skip_bad, args.realtime, &mut out)?,
    }
    out.flush()?;
    Ok(())
}
