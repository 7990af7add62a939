#!/usr/bin/env python3
"""Test forecaster for `fad stream --forecaster`: continues each signal by the mean step
of its last few samples (a linear drift), and gives no uterus value for the last point
when asked to (FAD_TEST_NULL_LAST=1), to exercise unscorable points."""
import json
import os
import sys

null_last = os.environ.get("FAD_TEST_NULL_LAST") == "1"
log = os.environ.get("FAD_TEST_LOG")  # each request's history length, one per line
for line in sys.stdin:
    req = json.loads(line)
    k, h = req["k"], req["history"]
    out = {"id": req["id"]}  # echoed, so fad can pair the answer with its request
    for sig in ("bpm", "uterus"):
        xs = h[sig][-5:]
        step = (xs[-1] - xs[0]) / max(1, len(xs) - 1)
        out[sig] = [xs[-1] + step * (i + 1) for i in range(k)]
    if null_last:
        out["uterus"][-1] = None
    if log:
        with open(log, "a") as f:
            f.write(f"{len(h['timestamp'])} {len(h['bpm'])} {len(h['uterus'])}\n")
    print(json.dumps(out), flush=True)
