#!/usr/bin/env python3
"""Driver of `bench/perf`: runs fad and the Python reference (bench/reference.py) side by
side on real recordings and prints one table. Run it through `bench/perf`, which builds
fad, unpacks the data and makes the virtualenv first.

Every fad figure is the median of several runs, with the range [min-max] beside it (the
machine may be shared). The reference's per-message loop is far too slow for the whole
feed: it is timed on a slice of the same feed (its earlier messages only fill the
windows) and extrapolated to the whole feed from its cost per scored and per unscored
message, which is said in the table.
"""
import argparse
import json
import os
import platform
import selectors
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import reference  # noqa: E402


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def run(cmd, stdin=None, stdout=None):
    """Runs cmd; returns (wall seconds, peak RSS KiB, stdout bytes if captured, CPU
    seconds user+sys). The peak RSS comes from GNU time when it is installed (a child
    forked from this Python would report the Python's own RSS), else from polling
    /proc/PID/status for VmHWM."""
    fin = open(stdin, "rb") if isinstance(stdin, str) else subprocess.DEVNULL
    fout = open(stdout, "wb") if isinstance(stdout, str) else (subprocess.PIPE if stdout is True else subprocess.DEVNULL)
    rss_file = None
    if TIME:
        rss_file = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fad-bench-rss-{os.getpid()}")
        cmd = [TIME, "-f", "%M", "-o", rss_file, *cmd]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=subprocess.PIPE)
    hwm = 0
    if stdout is True:
        out = p.stdout.read()
    else:
        out = None
        while not TIME and p.poll() is None:
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    hwm = max(hwm, next(int(l.split()[1]) for l in f if l.startswith("VmHWM")))
            except (OSError, StopIteration):
                pass
            time.sleep(0.005)
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    for f in (fin, fout):
        if hasattr(f, "close"):
            f.close()
    if code != 0:
        sys.exit(f"bench: {' '.join(map(str, cmd))} failed ({code}): {err.decode(errors='replace')[-2000:]}")
    if rss_file:
        with open(rss_file) as f:
            hwm = int(f.read().split()[-1])
        os.unlink(rss_file)
    return wall, hwm, out, ru.ru_utime + ru.ru_stime


def repeat(n, fn):
    vals = [fn() for _ in range(n)]
    return vals


def med(vals):
    return statistics.median(vals)


def rng(vals, fmt):
    return f"[{fmt(min(vals))}-{fmt(max(vals))}]" if len(vals) > 1 else ""


def reference_cmd(args, *a):
    return [sys.executable, os.path.join(HERE, "reference.py"), *map(str, a)]


def ref_json(args, *a):
    _, _, out, _ = run(reference_cmd(args, *a), stdout=True)
    return json.loads(out)


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    import sklearn
    import pandas
    import numpy
    return (f"{cpu}, {os.cpu_count()} cores, {mem_kib / 2**20:.1f} GiB RAM, Linux {platform.release()}; "
            f"{rustc}; Python {platform.python_version()}, scikit-learn {sklearn.__version__}, "
            f"pandas {pandas.__version__}, numpy {numpy.__version__}")


def make_tree(data, dest, per_class):
    """A symlink tree holding both sources, folders prefixed by source so that group ids
    stay apart; `per_class` folders per class and source (None: all)."""
    if os.path.isdir(dest):
        return dest
    tmp = dest + ".tmp"
    for src in ("lct2025", "ctu-uhb"):
        for cls in ("hypoxia", "regular"):
            cdir = os.path.join(data, src, cls)
            folders = sorted(os.listdir(cdir), key=reference.natural_key)
            if per_class:
                folders = folders[:per_class]
            os.makedirs(os.path.join(tmp, cls), exist_ok=True)
            for fo in folders:
                os.symlink(os.path.join(cdir, fo), os.path.join(tmp, cls, f"{src[:3]}{fo}"))
    os.rename(tmp, dest)
    return dest


def count_lines(path):
    with open(path, "rb") as f:
        return sum(buf.count(b"\n") for buf in iter(lambda: f.read(1 << 20), b""))


def count_scored(path):
    n = 0
    with open(path, "rb") as f:
        for line in f:
            n += line.startswith(b"ready:true")
    return n


def paced_latency(cmd, lines, warm, rate, count):
    """Writes `warm` lines at once, then `count` lines at `rate` per second; returns the
    write-to-reply times (seconds) of the paced lines."""
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
    out = p.stdout.fileno()
    os.set_blocking(out, False)
    sel = selectors.DefaultSelector()
    sel.register(out, selectors.EVENT_READ)
    got = 0
    pending = b""
    recv = []

    def drain(timeout):
        nonlocal got, pending
        for _ in sel.select(timeout):
            try:
                data = os.read(out, 1 << 16)
            except BlockingIOError:
                return
            now = time.perf_counter()
            k = data.count(b"\n")
            recv.extend([now] * k)
            got += k

    inp = p.stdin
    # The warm-up lines go in from a thread, so that the replies are read meanwhile (both
    # pipes are bounded: writing everything first could block both sides).
    writer = threading.Thread(target=lambda: inp.write(b"".join(lines[:warm])))
    writer.start()
    while got < warm:
        drain(1.0)
    writer.join()
    sent = []
    t0 = time.perf_counter()
    for i in range(count):
        due = t0 + i / rate
        while True:
            now = time.perf_counter()
            if now >= due:
                break
            drain(due - now)
        inp.write(lines[warm + i])
        sent.append(time.perf_counter())
        drain(0)
    deadline = time.perf_counter() + 600
    while got < warm + count and time.perf_counter() < deadline:
        drain(1.0)
    inp.close()
    p.wait()
    lat = [r - s for r, s in zip(recv[warm:warm + count], sent)]
    return lat


def pct(vals, q):
    v = sorted(vals)
    return v[min(len(v) - 1, int(q / 100 * len(v)))]


def ward_lines(feed, n_series, limit):
    keys = set()
    out = []
    with open(feed, "rb") as f:
        for line in f:
            parts = line.rstrip(b"\n").split(b",")
            k = (parts[3], parts[4])
            if k not in keys:
                if len(keys) >= n_series:
                    continue
                keys.add(k)
            out.append(line)
            if len(out) >= limit:
                break
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fad", required=True)
    ap.add_argument("--forest-loop", required=True)
    ap.add_argument("--data", required=True, help="folder holding lct2025/ and ctu-uhb/")
    ap.add_argument("--work", required=True)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    q = a.quick
    reps = 1 if q else 3
    W = a.work
    os.makedirs(W, exist_ok=True)
    fad = a.fad
    t_start = time.perf_counter()
    desc = machine()
    log(desc)
    tree = make_tree(a.data, os.path.join(W, "tree-quick" if q else "tree-full"), 3 if q else None)
    tag = "quick" if q else "full"
    P = lambda name: os.path.join(W, f"{tag}-{name}")  # noqa: E731
    rows = []  # (item, fad, reference, ratio, target, pass)

    def row(item, fad_s, ref_s="", ratio=None, target="", ok=None):
        r = "" if ratio is None else (f"{ratio:,.0f}x" if ratio >= 100 else f"{ratio:.2f}x")
        rows.append((item, fad_s, ref_s, r, target, "" if ok is None else ("PASS" if ok else "FAIL")))

    # --- convert ---------------------------------------------------------------------
    log("convert")
    table = P("table.csv")
    conv = repeat(reps, lambda: run([fad, "convert", tree], stdout=table))
    n_table = count_lines(table) - 1
    ref_merge = ref_json(a, "merge", tree, P("ref-table.csv"))
    fad_conv = med([c[0] for c in conv])
    ratio = ref_merge["seconds"] / fad_conv
    row(f"convert: {n_table:,} rows (s)", f"{fad_conv:.2f} {rng([c[0] for c in conv], lambda x: f'{x:.2f}')}",
        f"{ref_merge['seconds']:.2f}", ratio, ">= 10x", ratio >= 10)

    # --- train -----------------------------------------------------------------------
    log("train (reference: merge, features, split, fit, report, save)")
    ref_art = P("ref-artifacts")
    ref_train = ref_json(a, "train", tree, ref_art)
    log(f"reference train: {ref_train}")
    fad_w = P("fad-window")
    trains = repeat(reps, lambda: run([fad, "train", "--features", "window", "--force", "--out-dir", fad_w, tree]))
    fad_train = med([t[0] for t in trains])
    ratio = ref_train["total_s"] / fad_train
    row("train --features window, 300 trees, from the data dir (s)",
        f"{fad_train:.2f} {rng([t[0] for t in trains], lambda x: f'{x:.2f}')}",
        f"{ref_train['total_s']:.2f}", ratio, ">= 10x", ratio >= 10)
    row("  reference phases: merge / features / fit / report (s)", "",
        f"{ref_train['merge_s']:.1f} / {ref_train['features_s']:.1f} / {ref_train['fit_s']:.1f} / "
        f"{ref_train['report_s']:.1f}")
    fad_f = P("fad-default")
    dtrain = repeat(1, lambda: run([fad, "train", "--force", "--out-dir", fad_f, tree]))
    row("train, fad's default model (filters; 3 forests) (s)", f"{dtrain[0][0]:.2f}", "n/a")

    # --- model load ------------------------------------------------------------------
    log("model load")
    def load_ms(model):
        _, _, out, _ = run([a.forest_loop, model, "--load", "7"], stdout=True)
        kv = dict(x.split("=") for x in out.decode().split())
        return float(kv["load_median_ms"])
    ref_load = ref_json(a, "service", ref_art, os.devnull, 0, 0)["reload_s"] * 1e3
    lp = load_ms(ref_art)
    row("model load, 300 trees: the reference's pickle (ms)", f"{lp:.1f}", f"{ref_load:.1f}", ref_load / lp,
        "< 50 ms", lp < 50)
    row("model load: fad's default model, 3 x 300 trees (ms)", f"{load_ms(fad_f):.1f}", "n/a", None, "< 50 ms",
        load_ms(fad_f) < 50)

    # --- score -----------------------------------------------------------------------
    log("score")
    feats = P("rows.csv")
    run([fad, "score", table, "--model", ref_art, "--with-features"], stdout=feats)
    n_scored = count_lines(feats) - 1
    scores = repeat(reps, lambda: run([fad, "score", table, "--model", ref_art, "--n-jobs", "2"]))
    fad_score = med([s[0] for s in scores])
    fad_us = fad_score / n_scored * 1e6
    nb = 20000 if q else 300000
    batch = ref_json(a, "batch", ref_art, feats, nb)
    log(f"reference batch: {batch}")
    ratio = batch["us_per_row"] / fad_us
    row(f"score: {n_scored:,} rows, CSV in -> CSV out, 2 cores (us/row)",
        f"{fad_us:.3f} {rng([s[0] / n_scored * 1e6 for s in scores], lambda x: f'{x:.3f}')}",
        f"{batch['us_per_row']:.3f}", ratio, ">= 8x", ratio >= 8)
    seq_us = batch["sequential_s"] / batch["rows"] * 1e6
    row("  the same against scikit-learn's sequential decision_function (what n_jobs gives) (us/row)",
        f"{fad_us:.3f}", f"{seq_us:.3f}", seq_us / fad_us)
    _, _, out, _ = run([a.forest_loop, ref_art, feats, "3", "1024", "2"], stdout=True)
    kv = dict(x.split("=") for x in out.decode().split())
    loop2 = float(kv["median_ns_per_row"]) / 1e3
    row("  scorer alone (decision_function vs fad's batch scorer, 2 threads) (us/row)", f"{loop2:.3f}",
        f"{batch['us_per_row']:.3f}", batch["us_per_row"] / loop2)
    row("  same trees: max |fad - sklearn| score, flag mismatches", "", f"{batch['max_abs_diff_vs_fad']:.1e}, "
        f"{batch['flag_mismatches']}")

    # --- stream ----------------------------------------------------------------------
    log("stream")
    feed = P("feed.csv")
    run([fad, "convert", "--as", "feed", tree], stdout=feed)
    n_feed = count_lines(feed)
    replies = P("replies.txt")
    streams = repeat(reps, lambda: run([fad, "stream", "--model", ref_art], stdin=feed, stdout=replies))
    n_ready = count_scored(replies)
    fad_stream = med([s[0] for s in streams])
    fad_mps = n_feed / fad_stream
    start = n_feed // 2
    nref = 300 if q else 1500
    svc = ref_json(a, "service", ref_art, feed, start, nref)
    log(f"reference service: {svc}")
    ref_total = n_ready * svc["scored_s_each"] + (n_feed - n_ready) * svc["unscored_s_each"]
    ref_mps = n_feed / ref_total
    n_series = len({tuple(l.split(b",")[3:5]) for l in open(feed, "rb")})
    ref_mps_reload = n_feed / (ref_total + n_series * svc["reload_s"])
    ratio = fad_mps / ref_mps
    row(f"stream: {n_feed:,} messages, {n_series} interleaved series, 300 trees (msg/s)",
        f"{fad_mps:,.0f} {rng([n_feed / s[0] for s in streams], lambda x: f'{x:,.0f}')}",
        f"{ref_mps:,.1f}", ratio, ">= 10,000x", ratio >= 10000)
    row("  reference: model reloaded for each new series, as the prototype (msg/s)", "", f"{ref_mps_reload:,.1f}",
        fad_mps / ref_mps_reload)
    row(f"  reference timed on {svc['messages']:,} messages ({svc['scored']} scored) from message {start:,}; "
        f"ms per scored / unscored message", "", f"{svc['scored_s_each'] * 1e3:.2f} / {svc['unscored_s_each'] * 1e3:.3f}")
    _, _, out, _ = run([a.forest_loop, ref_art, feats, "3", "1024", "1"], stdout=True)
    kv = dict(x.split("=") for x in out.decode().split())
    loop1 = float(kv["median_cpu_ns_per_row"])
    # Costs are CPU seconds (user + sys of the whole fad process; the loop thread's own),
    # which a shared machine disturbs less than the wall clock. The stream scores the
    # feed's own rows; the table's rows are the same samples.
    forest_s = loop1 * 1e-9 * n_ready
    sr = [s[3] / forest_s for s in streams]
    row(f"stream cost / forest's tight loop on its {n_ready:,} rows (CPU time, 1 core)",
        f"{med(sr):.2f} {rng(sr, lambda x: f'{x:.2f}')}", "", None, "<= 1.5", med(sr) <= 1.5)
    row("  stream CPU ns/message; tight loop CPU ns/row",
        f"{med([s[3] for s in streams]) / n_feed * 1e9:.0f}; {loop1:.0f}")
    # fad's default model, separately (no reference computes these features)
    drep = P("replies-default.txt")
    dstreams = repeat(reps, lambda: run([fad, "stream", "--model", fad_f], stdin=feed, stdout=drep))
    d_ready = count_scored(drep)
    dfeats = P("rows-default.csv")
    run([fad, "score", table, "--model", fad_f, "--with-features"], stdout=dfeats)
    _, _, out, _ = run([a.forest_loop, fad_f, dfeats, "3", "1024", "1"], stdout=True)
    dloop = float(dict(x.split("=") for x in out.decode().split())["median_cpu_ns_per_row"])
    dmps = [n_feed / s[0] for s in dstreams]
    row("stream, fad's default model (filters, 3 x 300 trees) (msg/s)",
        f"{med(dmps):,.0f} {rng(dmps, lambda x: f'{x:,.0f}')}", "n/a")
    dr = [s[3] / (dloop * 1e-9 * d_ready) for s in dstreams]
    row("  default model: stream cost / tight loop", f"{med(dr):.2f} {rng(dr, lambda x: f'{x:.2f}')}", "", None,
        "<= 1.5", med(dr) <= 1.5)
    row("  stream peak RSS on the feed (MiB)", f"{max(s[1] for s in streams) / 1024:.1f}",
        f"{svc['peak_rss_kib'] / 1024:.1f} (after {svc['series']} series)")

    # --- memory ---------------------------------------------------------------------
    # Peak RSS with N and with N/2 concurrent series; the cost of a series is the slope
    # between the two (the peak with one series holds transient memory of the model
    # load, which later series reuse, so a difference against it would flatter fad).
    log("memory")
    n_mem = 20000 if q else 100000
    def mem_feed(path, n, per):
        if not os.path.exists(path):
            with open(path, "w") as f:
                for k in range(per):
                    for i in range(n):
                        f.write(f"{k * 0.25:.2f},140,10,ward{i % 300},bed-{i}\n")
        return path
    def rss(model, feed):
        return min(run([fad, "stream", "--model", model], stdin=feed)[1] for _ in range(reps))
    full, half = mem_feed(P(f"mem-{n_mem}x30.csv"), n_mem, 30), mem_feed(P(f"mem-{n_mem // 2}x30.csv"), n_mem // 2, 30)
    warm, warm_half = mem_feed(P(f"mem-{n_mem}x23.csv"), n_mem, 23), mem_feed(P(f"mem-{n_mem // 2}x23.csv"), n_mem // 2, 23)
    one = mem_feed(P("mem-1x30.csv"), 1, 30)
    slope = lambda a, b: (a - b) * 1024 / (n_mem - n_mem // 2)  # noqa: E731
    base = rss(ref_art, one)
    full_rss, half_rss = rss(ref_art, full), rss(ref_art, half)
    warm_rss, warm_half_rss = rss(ref_art, warm), rss(ref_art, warm_half)
    per, warm_per = slope(full_rss, half_rss), slope(warm_rss, warm_half_rss)
    refm, refh = ref_json(a, "memory", ref_art, warm), ref_json(a, "memory", ref_art, warm_half)
    ref_per = slope(refm["peak_rss_kib"], refh["peak_rss_kib"])
    row(f"memory per series, window model: slope of peak RSS between {n_mem // 2:,} and {n_mem:,} series (bytes)",
        f"{per:.0f} (23 samples each: {warm_per:.0f})", f"{ref_per:.0f} (23 samples each)",
        ref_per / max(warm_per, 1), "<= 1024", per <= 1024)
    row(f"  peak RSS with {n_mem:,} series; with 1 series (MiB)", f"{full_rss / 1024:.1f}; {base / 1024:.1f}",
        f"{refm['peak_rss_kib'] / 1024:.1f}; {refm['model_rss_kib'] / 1024:.1f} (model loaded)")
    dfull, dhalf = rss(fad_f, full), rss(fad_f, half)
    dper = slope(dfull, dhalf)
    row(f"  default model: per series; peak RSS with {n_mem:,} series", f"{dper:.0f} B; {dfull / 1024:.1f} MiB",
        "n/a", None, "<= 1024", dper <= 1024)

    # --- latency ---------------------------------------------------------------------
    log("latency")
    ward = ward_lines(feed, 30, 40000)
    warm = 30 * 30
    secs = 5 if q else 10
    lats = [paced_latency([fad, "stream", "--model", ref_art], ward, warm, 240, min(240 * secs, len(ward) - warm))
            for _ in range(reps)]
    big = ward_lines(feed, 10 ** 9, 200000 if not q else 50000)
    hwarm = 20000
    hlats = [paced_latency([fad, "stream", "--model", ref_art], big, hwarm, 5000, min(5000 * secs, len(big) - hwarm))
             for _ in range(reps)]
    rn = 20 if q else 100
    rlat = paced_latency(reference_cmd(a, "serve", ref_art), ward, warm, 10, rn)
    fmt = lambda v: f"{v * 1e3:.2f}"  # noqa: E731
    def lat_cell(runs):
        p99 = [pct(r, 99) for r in runs]
        return (f"{fmt(med([pct(r, 50) for r in runs]))} / {fmt(med(p99))} {rng(p99, fmt)} / "
                f"{fmt(max(max(r) for r in runs))}")
    row(f"latency write->reply, ward: 30 series at 240 msg/s, {len(lats[0]):,} msgs x {reps}: p50 / p99 / max (ms)",
        lat_cell(lats), f"{fmt(pct(rlat, 50))} / {fmt(pct(rlat, 99))} / {fmt(max(rlat))} (at 10 msg/s)")
    row(f"  hospital: {len(hlats[0]):,} msgs of all series at 5,000 msg/s x {reps}: p50 / p99 / max (ms)",
        lat_cell(hlats), "cannot keep up")

    # --- print -----------------------------------------------------------------------
    print(f"\nfad performance benchmark ({'--quick' if q else 'full'} run, {time.strftime('%Y-%m-%d %H:%M')})")
    print(f"machine: {desc}")
    print(f"data: {tree} (both sources, {'3 folders per class and source' if q else 'all folders'}); "
          f"reference: bench/reference.py; model: the reference's own 300-tree IsolationForest "
          f"(model_if.pkl, window features), loaded by fad as is")
    widths = [max(len(str(r[i])) for r in rows + [("item", "fad", "reference", "ratio", "target", "")])
              for i in range(6)]
    hdr = ("item", "fad", "reference", "ratio", "target", "result")
    print("  ".join(h.ljust(w) for h, w in zip(hdr, widths)))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"(bench took {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
