"""Benchmark: `esm_core stability` on the demo zoo (B=20 probe draws and 20 projection seeds).

    python bench/bench_stability.py [--draws 20]

Prints the wall time of the whole stability run (one grouped pass, then draws from the cached states
and grouped scores, then the probe-count sweep of alpha), its parts, and its ratio to one plain
estimation measured first in the same process. Target (issue 13): under 2 minutes on the 2-core
development machine with B=20.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=20)
    args = ap.parse_args()
    from esm_core.analysis.stability import stability
    from esm_core.pipeline import Workspace, estimate
    from esm_core.zoo.load import demo_spec

    ws = Workspace.from_spec(demo_spec())
    t0 = time.perf_counter()
    estimate(ws)
    one = time.perf_counter() - t0
    t1 = time.perf_counter()
    st = stability(ws, draws=args.draws)
    total = time.perf_counter() - t1
    s = st.summary()
    print(f"one estimation {one:.1f} s; stability (B={args.draws}) {total:.1f} s = {total / one:.1f} estimations "
          f"(pass {st.seconds['pass_s']:.1f} s, draws {st.seconds['draws_s']:.1f} s, probe-count sweep "
          f"{total - st.seconds['pass_s'] - st.seconds['draws_s']:.1f} s); target < 120 s")
    print(f"alpha std {s['alpha std (probes)']:.4f} (probes) / {s['alpha std (seeds)']:.4f} (seeds); lambda std "
          f"{s['lambda std (probes)']:.4f} / {s['lambda std (seeds)']:.4f}; stable top {s['stable top (probes)']:.1%} / "
          f"{s['stable top (seeds)']:.1%}; alpha std by samples per modality {s['alpha std by probes']}")


if __name__ == "__main__":
    main()
