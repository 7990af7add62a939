//! The forest's limit: scores feature rows in a tight loop with fad's own scorer, on one
//! thread, with nothing else around it (no parsing, no state, no output). `bench/perf`
//! compares `fad stream` against this.
//!
//! ```text
//! fad score merged.csv --model DIR --with-features > rows.csv
//! cargo run --release --example forest_loop -- DIR rows.csv [REPEATS] [BATCH]
//! ```
//!
//! Rows are scored in batches of BATCH (default 1024, about what `fad stream` scores per
//! chunk of input) through every forest of the model, as `fad stream` does. Prints one
//! `key=value` line: rows, the best and median time per row over REPEATS passes (ns), and
//! a checksum of the scores.

use fad::model::{Detection, Model};
use std::io::{BufRead, BufReader};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: forest_loop MODEL_DIR ROWS_CSV [REPEATS] [BATCH]");
        std::process::exit(2);
    }
    let model = Model::load(std::path::Path::new(&args[1])).unwrap_or_else(|e| {
        eprintln!("forest_loop: {e:#}");
        std::process::exit(1)
    });
    let repeats: usize = args.get(3).map_or(5, |s| s.parse().expect("REPEATS is a count"));
    let batch: usize = args.get(4).map_or(1024, |s| s.parse().expect("BATCH is a count"));
    let w = model.n_features();
    let file = std::fs::File::open(&args[2]).expect("cannot open the rows file");
    let mut rows: Vec<f32> = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.expect("readable rows file");
        if i == 0 {
            continue; // header
        }
        let fields: Vec<&str> = line.split(',').collect();
        assert!(fields.len() >= w, "line {}: fewer than {w} fields", i + 1);
        for f in &fields[fields.len() - w..] {
            rows.push(f.parse().expect("a feature value"));
        }
    }
    let n = rows.len() / w;
    assert!(n > 0, "no rows");
    let mut out = vec![Detection::default(); batch];
    let mut times = Vec::with_capacity(repeats);
    let mut checksum = 0.0;
    for _ in 0..repeats {
        checksum = 0.0;
        let t = Instant::now();
        for chunk in rows.chunks(batch * w) {
            let o = &mut out[..chunk.len() / w];
            model.detect_batch(chunk, o);
            checksum += o.iter().map(|d| d.score).sum::<f64>();
        }
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let per_row = |s: f64| s * 1e9 / n as f64;
    println!(
        "rows={n} forests={} trees={} best_ns_per_row={:.1} median_ns_per_row={:.1} checksum={checksum:.6}",
        1 + 2 * model.per_signal.is_some() as usize,
        model.joint.n_trees(),
        per_row(times[0]),
        per_row(times[times.len() / 2]),
    );
}
