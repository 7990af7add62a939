//! The forest's limit: scores feature rows in a tight loop with fad's own scorer, on one
//! thread, with nothing else around it (no parsing, no state, no output). `bench/perf`
//! compares `fad stream` against this.
//!
//! ```text
//! fad score merged.csv --model DIR --with-features > rows.csv
//! cargo run --release --example forest_loop -- DIR rows.csv [REPEATS] [BATCH] [THREADS]
//! cargo run --release --example forest_loop -- DIR --load [REPEATS]
//! ```
//!
//! Rows are scored in batches of BATCH (default 1024, about what `fad stream` scores per
//! chunk of input) through every forest of the model, as `fad stream` does; with THREADS
//! above 1 the batches are spread over that many rayon threads. Prints one `key=value`
//! line: rows, the best and median time per row over REPEATS passes (ns; wall clock, and
//! the thread's CPU time), a checksum of the scores and the path the scorer chose. `--load` times loading the
//! model instead (best and median, ms).

use fad::model::{Detection, Model};
use std::io::{BufRead, BufReader};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: forest_loop MODEL_DIR ROWS_CSV [REPEATS] [BATCH] [THREADS] | MODEL_DIR --load [REPEATS]");
        std::process::exit(2);
    }
    let dir = std::path::Path::new(&args[1]);
    let load = || {
        Model::load(dir).unwrap_or_else(|e| {
            eprintln!("forest_loop: {e:#}");
            std::process::exit(1)
        })
    };
    let repeats: usize = args.get(3).map_or(5, |s| s.parse().expect("REPEATS is a count"));
    if args[2] == "--load" {
        let mut ms: Vec<f64> = (0..repeats.max(1))
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(load());
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        println!("load_best_ms={:.2} load_median_ms={:.2}", ms[0], ms[ms.len() / 2]);
        return;
    }
    let model = load();
    let batch: usize = args.get(4).map_or(1024, |s| s.parse().expect("BATCH is a count")).max(1);
    let threads: usize = args.get(5).map_or(1, |s| s.parse().expect("THREADS is a count"));
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
    let mut out = vec![Detection::default(); n];
    let mut times = Vec::with_capacity(repeats);
    let mut cpu_times = Vec::with_capacity(repeats);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads.max(1)).build().expect("a thread pool");
    for _ in 0..repeats {
        let t = Instant::now();
        let c = thread_cpu_seconds();
        if threads <= 1 {
            for (chunk, o) in rows.chunks(batch * w).zip(out.chunks_mut(batch)) {
                model.detect_batch(chunk, o);
            }
        } else {
            use rayon::prelude::*;
            pool.install(|| {
                rows.par_chunks(batch * w).zip(out.par_chunks_mut(batch)).for_each(|(c, o)| model.detect_batch(c, o))
            });
        }
        times.push(t.elapsed().as_secs_f64());
        cpu_times.push(thread_cpu_seconds() - c);
    }
    let checksum: f64 = out.iter().map(|d| d.score).sum();
    times.sort_by(f64::total_cmp);
    cpu_times.sort_by(f64::total_cmp);
    let per_row = |s: f64| s * 1e9 / n as f64;
    println!(
        "rows={n} threads={threads} forests={} trees={} best_ns_per_row={:.1} median_ns_per_row={:.1} \
         median_cpu_ns_per_row={:.1} checksum={checksum:.6} path={}",
        1 + 2 * model.per_signal.is_some() as usize,
        model.joint.n_trees(),
        per_row(times[0]),
        per_row(times[times.len() / 2]),
        per_row(cpu_times[cpu_times.len() / 2]),
        if model.joint.vector_path() { "vector" } else { "portable" },
    );
}

/// CPU time of this thread (with THREADS = 1, the scoring itself), in seconds: unlike the
/// wall clock, it does not count time the thread waited for a core on a shared machine.
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec pointer for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}
