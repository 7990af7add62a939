#!/usr/bin/env python3
"""Reference implementation of fad's algorithm in Python, for `bench/perf`.

Written from SPEC.md, the way the Python prototype worked: pandas for the merge and the
window features (SPEC sections 1-2), scikit-learn's IsolationForest for the model, and a
service class whose `process_message(line)` answers one stream message at a time with a
one-row DataFrame and two scikit-learn calls (`decision_function`, `predict`).

Subcommands (each prints one JSON object with its timings on stdout, unless it writes
data there):

  merge DATA_DIR OUT_CSV            pandas merge of the folder tree
  train DATA_DIR ARTIFACTS          merge + window features + group split + fit (300
                                    trees) + report + model_if.pkl and meta.json
  export ARTIFACTS FAD_DIR          the fitted trees as a fad model (forest.json +
                                    meta.json), so fad scores the very same trees
  batch ARTIFACTS ROWS_CSV N        decision_function on N feature rows, n_jobs=2
  service ARTIFACTS FEED START N    the per-message loop on messages [START, START+N)
                                    of FEED (earlier ones only fill the windows)
  serve ARTIFACTS                   the service on stdin -> stdout (latency runs)
  memory ARTIFACTS FEED             peak RSS of the service state after FEED
"""
import collections
import hashlib
import json
import math
import os
import pickle
import re
import resource
import sys
import time

import numpy as np
import pandas as pd
from sklearn.ensemble import IsolationForest

LAGS = [1, 2, 3, 6, 12, 24]
ROLLS = [3, 6, 12]
MAX_LAG = 24
BPM_RANGE = (50.0, 240.0)
MAX_GAP_S = 2.0
SIGNALS = ["bpm", "uterus"]


def feature_cols():
    cols = [f"{s}_lag_{l}" for l in LAGS for s in SIGNALS]
    for w in ROLLS:
        for stat in ("rollmean", "rollstd"):
            cols += [f"{s}_{stat}_{w}" for s in SIGNALS]
    return cols


FEATURES = feature_cols()


def peak_rss_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def natural_key(s):
    return [(0, int(p), p) if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", s) if p != ""]


# --- SPEC section 1: the folder tree -> one table -------------------------------------

def find_pairs(data_dir):
    pairs = []
    for cls in sorted(os.listdir(data_dir)):
        cdir = os.path.join(data_dir, cls)
        if not os.path.isdir(cdir):
            continue
        for folder in os.listdir(cdir):
            bdir = os.path.join(cdir, folder, "bpm")
            udir = os.path.join(cdir, folder, "uterus")
            if not os.path.isdir(bdir) or not os.path.isdir(udir):
                continue
            ufiles = set(os.listdir(udir))
            for f in os.listdir(bdir):
                stem, ext = os.path.splitext(f)
                base, _, suffix = stem.rpartition("_")
                partner = {"1": "2", "3": "4"}.get(suffix)
                if ext != ".csv" or partner is None or f"{base}_{partner}.csv" not in ufiles:
                    continue
                pairs.append((cls, folder, stem, os.path.join(bdir, f), os.path.join(udir, f"{base}_{partner}.csv")))
    pairs.sort(key=lambda p: (p[0], natural_key(p[1]), natural_key(p[2])))
    return pairs


def merge_tree(data_dir):
    frames = []
    for cls, folder, stem, bpath, upath in find_pairs(data_dir):
        b = pd.read_csv(bpath).rename(columns={"value": "bpm"})
        u = pd.read_csv(upath).rename(columns={"value": "uterus"})
        m = b.merge(u, on="time_sec", how="inner").sort_values("time_sec", kind="stable")
        m.insert(1, "group_id", f"{cls}-{folder}")
        m.insert(2, "sequence_id", stem)
        m["target"] = cls
        frames.append(m)
    df = pd.concat(frames, ignore_index=True).rename(columns={"time_sec": "timestamp"})
    return df[["timestamp", "group_id", "sequence_id", "bpm", "uterus", "target"]]


# --- SPEC section 2: window features ----------------------------------------------------

def window_features(df):
    """Feature rows of every scorable sample, as the prototype computed them with pandas:
    valid samples only, a new segment after a gap of more than MAX_GAP_S, lags with
    groupby-shift, rolling mean and population std with groupby-rolling."""
    df = df.sort_values(["group_id", "sequence_id", "timestamp"], kind="stable")
    valid = (
        np.isfinite(df["bpm"]) & df["bpm"].between(*BPM_RANGE) & np.isfinite(df["uterus"]) & (df["uterus"] >= 0)
    )
    df = df[valid].copy()
    new_series = (df["group_id"] != df["group_id"].shift()) | (df["sequence_id"] != df["sequence_id"].shift())
    gap = df["timestamp"].diff() > MAX_GAP_S
    df["segment"] = (new_series | gap).cumsum()
    g = df.groupby("segment", sort=False)
    out = {}
    for lag in LAGS:
        for s in SIGNALS:
            out[f"{s}_lag_{lag}"] = g[s].shift(lag - 1)
    for w in ROLLS:
        roll = g[SIGNALS].rolling(w)
        mean = roll.mean().reset_index(level=0, drop=True)
        std = roll.std(ddof=0).reset_index(level=0, drop=True)
        for s in SIGNALS:
            out[f"{s}_rollmean_{w}"] = mean[s]
            out[f"{s}_rollstd_{w}"] = std[s]
    feats = pd.DataFrame(out, index=df.index)[FEATURES].astype(np.float32)
    ready = g.cumcount() >= MAX_LAG - 1
    keep = ready.to_numpy()
    return df[keep], feats[keep]


# --- train ------------------------------------------------------------------------------

def group_split(meta_rows, val_size, seed):
    groups = meta_rows[["target", "group_id"]].drop_duplicates()
    groups = groups.sort_values(["target", "group_id"]).to_numpy().tolist()
    rng = np.random.RandomState(seed)
    rng.shuffle(groups)
    n_val = math.ceil(val_size * len(groups))
    val = {tuple(g) for g in groups[:n_val]}
    return np.array([(t, g) in val for t, g in zip(meta_rows["target"], meta_rows["group_id"])])


def side_report(scores):
    q = np.percentile(scores, [1, 5, 25, 50, 75, 95, 99]) if len(scores) else [None] * 7
    return {
        "rows": int(len(scores)),
        "anomaly_rate": float(np.mean(scores < 0)) if len(scores) else None,
        "score_quantiles": dict(zip(["p01", "p05", "p25", "p50", "p75", "p95", "p99"], map(float, q))),
    }


def cmd_train(data_dir, out_dir, n_estimators=300, seed=42):
    t = {}
    t0 = time.perf_counter()
    df = merge_tree(data_dir)
    t["merge_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    rows, X = window_features(df)
    t["features_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    is_val = group_split(rows, 0.2, seed)
    model = IsolationForest(n_estimators=n_estimators, max_samples="auto", contamination="auto",
                            max_features=1.0, random_state=seed, n_jobs=2)
    model.fit(X[~is_val])
    t["fit_s"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    report = {"train": side_report(model.decision_function(X[~is_val])),
              "validation": side_report(model.decision_function(X[is_val]))}
    t["report_s"] = time.perf_counter() - t3
    t4 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "model_if.pkl"), "wb") as f:
        pickle.dump(model, f)
    config = {
        "time_col": "timestamp", "group_col": "group_id", "seq_col": "sequence_id",
        "target_cols": SIGNALS, "lags": LAGS, "roll_windows": ROLLS, "val_size": 0.2,
        "random_state": seed, "n_estimators": n_estimators, "max_samples": "auto",
        "contamination": "auto", "max_features": 1.0, "n_jobs": 2,
        "bpm_valid_range": list(BPM_RANGE), "uterus_valid_min": 0.0, "max_gap_s": MAX_GAP_S,
    }
    meta = {"config": config, "feature_cols": FEATURES, "max_lag": MAX_LAG, "report": report}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    t["save_s"] = time.perf_counter() - t4
    t["total_s"] = time.perf_counter() - t0
    t["rows"] = int(len(df))
    t["feature_rows"] = int(len(X))
    t["train_rows"] = int((~is_val).sum())
    t["peak_rss_kib"] = peak_rss_kib()
    return t


def cmd_export(art_dir, fad_dir):
    """Writes the fitted trees in fad's own forest format, with a fad meta.json for the
    same window features, so that fad and scikit-learn score identical trees."""
    with open(os.path.join(art_dir, "model_if.pkl"), "rb") as f:
        model = pickle.load(f)
    with open(os.path.join(art_dir, "meta.json")) as f:
        proto = json.load(f)
    trees = []
    for est, feats in zip(model.estimators_, model.estimators_features_):
        tr = est.tree_
        trees.append({
            "features": [int(x) for x in feats],
            "children_left": tr.children_left.tolist(),
            "children_right": tr.children_right.tolist(),
            "feature": tr.feature.tolist(),
            "threshold": tr.threshold.tolist(),
            "n_node_samples": tr.n_node_samples.tolist(),
        })
    spec = {"n_features": int(model.n_features_in_), "max_samples": int(model.max_samples_),
            "offset": float(model.offset_), "trees": trees}
    os.makedirs(fad_dir, exist_ok=True)
    data = json.dumps(spec).encode()
    with open(os.path.join(fad_dir, "forest.json"), "wb") as f:
        f.write(data)
    config = dict(proto["config"], feature_set="window", zero_is_loss=False)
    meta = {"config": config, "feature_cols": FEATURES, "max_lag": MAX_LAG,
            "model_files": [{"name": "forest.json", "role": "joint", "sha256": hashlib.sha256(data).hexdigest()}]}
    with open(os.path.join(fad_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return {"trees": len(trees), "nodes_mean": float(np.mean([len(t["feature"]) for t in trees]))}


def load_model(art_dir):
    with open(os.path.join(art_dir, "model_if.pkl"), "rb") as f:
        return pickle.load(f)


def cmd_batch(art_dir, rows_csv, n):
    """decision_function on feature rows (the last 24 columns of `fad score
    --with-features` output) with both cores; also checks the scores against fad's."""
    model = load_model(art_dir)
    model.set_params(n_jobs=2)
    # Read as text and convert with numpy (correctly rounded), so the rows and fad's
    # scores are exactly the values fad printed.
    df = pd.read_csv(rows_csv, nrows=n, dtype=str, keep_default_na=False)
    X = pd.DataFrame({c: df[c].to_numpy().astype(np.float64).astype(np.float32) for c in FEATURES})
    from joblib import parallel_config
    model.decision_function(X.iloc[:1000])  # warm-up (caches)
    # scikit-learn 1.9 scores the trees sequentially whatever n_jobs is; a threading
    # backend with two workers lets it use both cores (tree.apply releases the GIL).
    # Both are timed and the faster one counts.
    t0 = time.perf_counter()
    s = model.decision_function(X)
    seq = time.perf_counter() - t0
    with parallel_config(backend="threading", n_jobs=2):
        t0 = time.perf_counter()
        s2 = model.decision_function(X)
        par = time.perf_counter() - t0
    dt = min(seq, par)
    fad = df["anomaly_score"].to_numpy().astype(np.float64)
    diff = np.abs(s - fad)
    return {"rows": int(len(X)), "seconds": dt, "us_per_row": dt / len(X) * 1e6,
            "sequential_s": seq, "threads2_s": par,
            "max_abs_diff_vs_fad": float(max(diff.max(), np.abs(s2 - fad).max())),
            "equal_rows": int((diff == 0).sum()), "flag_mismatches": int(((s < 0) != (fad < 0)).sum()),
            "peak_rss_kib": peak_rss_kib()}


# --- the per-message service (SPEC section 5), as the prototype had it -----------------

class Service:
    """One reply per message. State per series: the last MAX_LAG valid samples. A scored
    message builds a one-row DataFrame and calls decision_function and predict."""

    def __init__(self, art_dir, reload_per_series=False):
        self.art_dir = art_dir
        self.reload_per_series = reload_per_series
        self.model = load_model(art_dir)
        self.series = {}
        self.scoring = True

    def process_message(self, line):
        parts = [p.strip() for p in line.strip().split(",")]
        if len(parts) != 5:
            return f"ready:false,detection:,needed:{MAX_LAG},error:wrong_field_count"
        if parts[0].lower() == "timestamp":
            return f"ready:false,detection:,needed:{MAX_LAG}"
        ts, bpm_t, ut_t, gid, sid = parts
        key = (gid, sid)
        state = self.series.get(key)
        needed = MAX_LAG - len(state["window"]) if state else MAX_LAG
        try:
            t = float(ts)
            bpm = float(bpm_t) if bpm_t else math.nan
            ut = float(ut_t) if ut_t else math.nan
        except ValueError:
            return f"ready:false,detection:,needed:{needed},error:bad_value"
        if state is not None and not t > state["last"]:
            return f"ready:false,detection:,needed:{needed},error:timestamp_not_after_previous"
        if not (math.isfinite(bpm) and BPM_RANGE[0] <= bpm <= BPM_RANGE[1]):
            return f"ready:false,detection:,needed:{needed},error:bpm_signal_loss"
        if not (math.isfinite(ut) and ut >= 0):
            return f"ready:false,detection:,needed:{needed},error:uterus_signal_loss"
        if state is None:
            if self.reload_per_series:
                self.model = load_model(self.art_dir)
            state = {"window": collections.deque(maxlen=MAX_LAG), "last": None}
            self.series[key] = state
        if state["last"] is not None and t - state["last"] > MAX_GAP_S:
            state["window"].clear()
        state["window"].append((bpm, ut))
        state["last"] = t
        needed = MAX_LAG - len(state["window"])
        if needed > 0 or not self.scoring:
            return f"ready:false,detection:,needed:{needed}"
        w = np.array(state["window"])[::-1]  # newest first
        row = {}
        for lag in LAGS:
            row[f"bpm_lag_{lag}"] = w[lag - 1, 0]
            row[f"uterus_lag_{lag}"] = w[lag - 1, 1]
        for win in ROLLS:
            part = w[:win]
            m = part.mean(axis=0)
            sd = part.std(axis=0)
            row[f"bpm_rollmean_{win}"], row[f"uterus_rollmean_{win}"] = m
            row[f"bpm_rollstd_{win}"], row[f"uterus_rollstd_{win}"] = sd
        X = pd.DataFrame([row], columns=FEATURES).astype(np.float32)
        score = float(self.model.decision_function(X)[0])
        flag = int(self.model.predict(X)[0] == -1)
        return f"ready:true,detection:{ts},{gid},{sid},{bpm_t},{ut_t},{flag},{flag},{score!r},needed:0"


def cmd_service(art_dir, feed, start, n, reloads=5):
    svc = Service(art_dir)
    cost = {True: [0.0, 0], False: [0.0, 0]}
    with open(feed) as f:
        svc.scoring = False
        for i, line in enumerate(f):
            if i == start:
                svc.scoring = True
            if i >= start + n:
                break
            t0 = time.perf_counter()
            reply = svc.process_message(line)
            dt = time.perf_counter() - t0
            if i >= start:
                c = cost[reply.startswith("ready:true")]
                c[0] += dt
                c[1] += 1
    t0 = time.perf_counter()
    for _ in range(reloads):
        load_model(art_dir)
    reload_s = (time.perf_counter() - t0) / reloads
    return {
        "messages": cost[True][1] + cost[False][1],
        "scored": cost[True][1],
        "scored_s_each": cost[True][0] / max(cost[True][1], 1),
        "unscored_s_each": cost[False][0] / max(cost[False][1], 1),
        "reload_s": reload_s,
        "series": len(svc.series),
        "peak_rss_kib": peak_rss_kib(),
    }


def cmd_serve(art_dir):
    svc = Service(art_dir)
    out = sys.stdout
    for line in sys.stdin:
        out.write(svc.process_message(line) + "\n")
        out.flush()


def cmd_memory(art_dir, feed):
    svc = Service(art_dir)
    base = peak_rss_kib()
    with open(feed) as f:
        for line in f:
            svc.process_message(line)
    return {"series": len(svc.series), "model_rss_kib": base, "peak_rss_kib": peak_rss_kib()}


def main():
    a = sys.argv[1:]
    if not a:
        sys.exit(__doc__)
    cmd = a[0]
    if cmd == "merge":
        t0 = time.perf_counter()
        df = merge_tree(a[1])
        df.to_csv(a[2], index=False)
        res = {"seconds": time.perf_counter() - t0, "rows": int(len(df)), "peak_rss_kib": peak_rss_kib()}
    elif cmd == "train":
        res = cmd_train(a[1], a[2])
    elif cmd == "export":
        res = cmd_export(a[1], a[2])
    elif cmd == "batch":
        res = cmd_batch(a[1], a[2], int(a[3]))
    elif cmd == "service":
        res = cmd_service(a[1], a[2], int(a[3]), int(a[4]))
    elif cmd == "serve":
        return cmd_serve(a[1])
    elif cmd == "memory":
        res = cmd_memory(a[1], a[2])
    else:
        sys.exit(f"unknown subcommand {cmd}\n{__doc__}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
