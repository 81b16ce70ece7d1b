"""Benchmark: the workbench's server time per page once the demo zoo is computed, and its cold start.

1. Page opens (AppTest, server time = one script run): the estimation runs once, then every page is
   opened `--repeats` times; the median time per page is printed next to what a naive app that
   recomputed on every open would pay (the estimation's own time), and their ratio.
   Target: every page under 1 s.
2. Cold start: a fresh `streamlit run` process until the Overview's text is rendered in Debian's
   chromium (Playwright), or, without chromium, until the server answers and AppTest's first run of
   the Overview finishes. Target: under 10 s.

    python bench/bench_app.py                 # demo zoo (assets/zoo/run.yaml)
    python bench/bench_app.py --spec /path/run.yaml --allow /path
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAGES = ["overview", "specialists", "probe", "layer_signals", "element_signals", "embeddings", "merge", "query",
         "explain"]


def page_times(repeats: int) -> None:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=900)
    t0 = time.perf_counter()
    at.run()
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    at.button(key="run").click().run()
    t_est = time.perf_counter() - t0
    if at.exception:
        raise SystemExit(f"app raised: {at.exception[0].value}")
    res = at.session_state["esm"].base_result
    print(f"first Overview run (AppTest, imports included): {t_first:.2f} s")
    print(f"estimation on the Overview: {t_est:.2f} s ({res.probe_summary.get('n_probes')} probes, "
          f"{res.config.n_projections} projections)")
    print(f"\n{'page':<18} {'median s':>9} {'max s':>7} {'naive s':>8} {'ratio':>7}")
    worst = 0.0
    for page in PAGES:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            at.switch_page(f"pages/{page}.py").run()
            times.append(time.perf_counter() - t0)
            if at.exception:
                raise SystemExit(f"{page} raised: {at.exception[0].value}")
        med = statistics.median(times[1:] if len(times) > 1 else times)  # the first open may build caches
        worst = max(worst, med)
        print(f"{page:<18} {med:9.3f} {max(times):7.3f} {t_est:8.2f} {t_est / max(med, 1e-9):6.0f}x")
    print(f"\nslowest page (median): {worst:.3f} s — target < 1 s: {'met' if worst < 1 else 'NOT met'}")


def cold_start() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port",
                             str(port), "--server.address", "127.0.0.1", "--server.headless", "true"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
            if time.perf_counter() - t0 > 120:
                raise SystemExit("server did not start in 120 s")
        t_server = time.perf_counter() - t0
        if Path("/usr/bin/chromium").exists():
            from playwright.sync_api import expect, sync_playwright

            with sync_playwright() as p:
                b = p.chromium.launch(executable_path="/usr/bin/chromium",
                                      args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                            "--disable-component-update", "--disable-sync", "--no-first-run"])
                t_browser = time.perf_counter()
                page = b.new_page()
                page.goto(url)
                expect(page.get_by_text("Modalities and probe samples")).to_be_visible(timeout=120_000)
                t_ready = time.perf_counter() - t0
                launch = t_browser - t0 - t_server
                b.close()
            print(f"cold start: server up {t_server:.2f} s, Overview usable {t_ready:.2f} s after launch "
                  f"(of which {launch:.2f} s starting chromium) — target < 10 s: "
                  f"{'met' if t_ready - launch < 10 else 'NOT met'}")
        else:
            print(f"cold start: server up {t_server:.2f} s (no chromium: page render not measured)")
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", help="run.yaml to open instead of the demo zoo")
    ap.add_argument("--allow", help="extra allowed root for --spec")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--skip-cold", action="store_true")
    args = ap.parse_args()
    if args.spec:
        os.environ["ESM_DEMO_SPEC"] = str(Path(args.spec).resolve())
    if args.allow:
        os.environ["ESM_ALLOWED_ROOTS"] = args.allow
    if not args.skip_cold:
        cold_start()
    page_times(args.repeats)


if __name__ == "__main__":
    main()
