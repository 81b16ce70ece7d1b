"""Benchmark: the full ES coefficient estimation on the committed demo zoo with default settings.

    python bench/bench_zoo_estimate.py [--repeats 3] [--threads 2] [--preset reference]

Default settings = the zoo's run.yaml with the reference preset: 330 joint probes (one molecule,
one protein window and one cell each), 1024 SWD projections, combined mode (hidden states of the
base and the three specialists, SWD, per-unit gradients, alpha, beta, lambda). Prints the time of
each repeat (models loaded once, outside the timing) and the timing breakdown of the last one;
the acceptance target on the 2-core development machine is at most 15 s. Not a timed test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--preset", default="reference")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from esm_core.pipeline import Workspace, estimate
    from esm_core.zoo.load import demo_spec

    t0 = time.perf_counter()
    spec = demo_spec(preset=args.preset)
    ws = Workspace.from_spec(spec)
    print(f"loaded zoo + probe samples in {time.perf_counter() - t0:.1f} s "
          f"(threads={args.threads}, load average {os.getloadavg()[0]:.1f})")
    times, res = [], None
    for i in range(args.repeats):
        t = time.perf_counter()
        res = estimate(ws)
        times.append(time.perf_counter() - t)
        print(f"repeat {i + 1}: {times[-1]:.2f} s")
    cfg = res.config
    print(f"preset={cfg.preset} mode={cfg.mode} probes={res.probe_summary['n_probes']} "
          f"projections={cfg.n_projections} max probe length={res.probe_summary['max_probe_length']} tokens")
    print("breakdown (last repeat): " + ", ".join(f"{k}={v:.2f}s" for k, v in sorted(res.timings.items())))
    print(f"ES estimation on the demo zoo: median {statistics.median(times):.2f} s, best {min(times):.2f} s "
          f"(target <= 15 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
