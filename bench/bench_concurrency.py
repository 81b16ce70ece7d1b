"""Benchmark: N sessions press "Run" at the same moment on one server (one shared demo-zoo model).

    python bench/bench_concurrency.py [--sessions 4] [--threads 2]

Each session is a thread asking the shared model (the model gate: one estimation at a time, first
come first served) for an estimation with its own seed, as the app does for tabs with different
selections (identical selections are computed once: tests/test_app_concurrency.py). Prints, per
session, how long it waited for the
model and how long until its result, the expected wait the gate announced while it waited, the
total against N solo runs measured in the same process, and checks every result against its solo
run. Not a timed test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from esm_core.pipeline import Workspace, estimate
    from esm_core.zoo.load import demo_spec

    ws = Workspace.from_spec(demo_spec())
    cfgs = [ws.spec.method.replace(seed=100 + i) for i in range(args.sessions)]
    estimate(ws, cfgs[0])  # warm-up: first-call costs outside every measurement
    solo, solo_t = [], []
    for c in cfgs:
        t = time.perf_counter()
        solo.append(estimate(ws, c))
        solo_t.append(time.perf_counter() - t)
    print("solo estimations: " + ", ".join(f"{t:.1f} s" for t in solo_t))

    gate = ws.sset.gate
    start = threading.Barrier(args.sessions)
    rows, errors = {}, []

    def session(i: int) -> None:
        announced = []
        try:
            start.wait()
            t0 = time.perf_counter()
            with gate.waiting(lambda ahead, secs, who: announced.append((ahead, secs))):
                res = estimate(ws, cfgs[i])
            done = time.perf_counter() - t0
            rows[i] = (res.timings["model_wait_s"], done, announced[0] if announced else (0, 0.0), res)
        except BaseException as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=session, args=(i,)) for i in range(args.sessions)]
    t_all = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = time.perf_counter() - t_all
    if errors:
        print("errors:", errors)
        return 1
    for i in sorted(rows, key=lambda i: rows[i][1]):
        waited, done, (ahead, secs), res = rows[i]
        want = solo[i]
        same = all(torch.equal(res.lam[k], want.lam[k]) for k in want.lam)
        print(f"session {i}: result after {done:5.1f} s (waited {max(0.0, waited):5.1f} s for the model; "
              f"first announced: {ahead} ahead, about {secs:.0f} s) · equal to its solo run: {same}")
        if not same:
            return 1
    base = sum(solo_t)
    print(f"{args.sessions} sessions at once: all results after {total:.1f} s; the same work one after another "
          f"alone: {base:.1f} s (ratio {total / base:.2f}); median time to result "
          f"{statistics.median(r[1] for r in rows.values()):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
