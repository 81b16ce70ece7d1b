"""One real-browser test: `streamlit run` on 127.0.0.1, Debian's chromium driven by Playwright through
the main flow (overview -> run -> layer signals -> element signals -> embeddings -> merge -> query),
asserting on rendered text and saving a screenshot of each page under test-artifacts/.

Skipped when /usr/bin/chromium is absent, unless ESM_REQUIRE_BROWSER=1 (CI sets it), which makes
the absence a failure.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(world, app_run_yaml, log_name: str):
    """Start `streamlit run app.py` on a free port; yields its URL, stops it after."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("ESM_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing but ESM_REQUIRE_BROWSER=1 (install Debian's chromium)")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); the browser test is skipped")
    pytest.importorskip("playwright.sync_api")
    port = _free_port()
    env = dict(os.environ, ESM_ALLOWED_ROOTS=os.pathsep.join([str(app_run_yaml.parent), str(world["dir"])]),
               PYTHONUNBUFFERED="1")
    if app_run_yaml.resolve() != (ROOT / "assets" / "zoo" / "run.yaml").resolve():
        env["ESM_DEMO_SPEC"] = str(app_run_yaml)
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / log_name, "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true",
                             "--browser.gatherUsageStats", "false"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < 90:
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"streamlit did not start within 90 s; see test-artifacts/{log_name}")
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def server(world, app_run_yaml):
    yield from _serve(world, app_run_yaml, "streamlit.log")


@pytest.fixture
def fresh_server(world, app_run_yaml):
    """A server process no session has used yet."""
    yield from _serve(world, app_run_yaml, "streamlit_fresh.log")


def test_deep_link_into_a_fresh_server_opens_that_view_through_the_app(fresh_server):
    """The first request a server process gets is an instructor's link to lesson step 4. Streamlit routes a
    process's first run by the pages/ folder; the page goes through app.py (ui/routes.py): the lesson at step
    4, the app's sidebar, and no "Page not found"."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=120_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.goto(fresh_server + "/learn?lesson_step=4")
        expect(page.get_by_text("Step 4: Where the distance grows").first).to_be_visible()
        expect(page.get_by_text("Workspace").first).to_be_visible()  # app.py's sidebar ran
        expect(page).to_have_url(re.compile(r"/learn\?lesson_step=4$"))
        assert page.get_by_text("Page not found").count() == 0
        # a second page of the app, by the sidebar's navigation, still works
        page.get_by_role("link", name="Probe").first.click()
        expect(page).to_have_url(re.compile(r"/probe"))
        page.screenshot(path=str(ARTIFACTS / "00_deep_link.png"))
        browser.close()


def test_main_flow_in_chromium(server):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=120_000)  # waits end on the app's own text; a loaded machine is slow
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.set_default_timeout(120_000)

        def shot(name: str) -> None:
            page.wait_for_timeout(800)  # let plots finish drawing
            page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

        def go(title: str, expect_text: str) -> None:
            page.get_by_role("link", name=title).first.click()
            expect(page.get_by_text(expect_text).first).to_be_visible(timeout=180_000)

        page.goto(server)
        expect(page.get_by_text("ES-Merging workbench").first).to_be_visible()
        expect(page.get_by_text("Modalities and probe samples")).to_be_visible()
        shot("01_overview")

        page.get_by_role("button", name="Run ES-Merging").click()
        expect(page.get_by_text("computed in").first).to_be_visible(timeout=600_000)
        expect(page.get_by_text("Mean merge coefficient λ per block")).to_be_visible()
        shot("02_overview_computed")

        go("Layer signals", "Sliced Wasserstein distance per layer")
        expect(page.get_by_text("From distances to layer coefficients").first).to_be_visible()
        shot("03_layer_signals")

        go("Element signals", "Where the specialists disagree most")
        expect(page.get_by_text("Share of elements where each specialist has the largest λ")).to_be_visible()
        shot("04_element_signals")

        go("Embeddings", "Distance of each model's centroid from the base")
        shot("05_embeddings")

        go("Merge", "1 · Method and parameters")
        page.get_by_role("button", name="Merge with ES-Merging").click()
        expect(page.get_by_text("merged_es_1").first).to_be_visible(timeout=300_000)
        shot("06_merge")

        go("Query", "Query the models")
        page.get_by_text("Write a prompt").click()
        box = page.get_by_label("Molecule (smiles; leave empty to omit)")
        box.fill("CC(=O)Oc1ccccc1C(=O)O")
        box.press("Enter")
        page.get_by_role("button", name="Answer").click()
        expect(page.get_by_text("Label probabilities (normalised over the answers)").first).to_be_visible(timeout=300_000)
        shot("07_query")

        go("Learn in 10 steps", "Step 1: Probes hold every modality")
        shot("08_learn")
        # a link with view state opens that view in a fresh session (an instructor sends a room to step 4)
        other = browser.new_page(viewport={"width": 1440, "height": 1000})
        other.goto(server.rstrip("/") + "/learn?lesson_step=4")
        expect(other.get_by_text("Step 4: Where the distance grows").first).to_be_visible()
        expect(other).to_have_url(re.compile(r"lesson_step=4"))
        other.close()
        browser.close()
    assert (ARTIFACTS / "07_query.png").stat().st_size > 10_000


def test_many_page_visits_after_a_run_leave_the_app_responsive(server):
    """The issue's failure: after ~5 page visits following a run, inputs stayed grey and downloads hung
    (each rerun's session-file download held one of Chromium's 6 connections). 15 visits, then a text
    input, a CSV download and the session file must all work."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=120_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.set_default_timeout(120_000)
        page.goto(server)
        expect(page.get_by_text("Modalities and probe samples")).to_be_visible()
        page.get_by_role("button", name="Run ES-Merging").click()
        expect(page.get_by_text("Mean merge coefficient λ per block")).to_be_visible(timeout=600_000)
        tour = [("Layer signals", "Sliced Wasserstein distance per layer"),
                ("Element signals", "Where the specialists disagree most"),
                ("Explain", "λ"), ("Probe", "Probe"), ("Specialists", "Compatibility")]
        for i in range(15):
            title, text = tour[i % len(tour)]
            page.get_by_role("link", name=title).first.click()
            expect(page.get_by_text(text).first).to_be_visible(timeout=120_000)
        t0 = time.monotonic()
        ok = page.evaluate("async () => (await fetch('/_stcore/health')).ok")
        assert ok and time.monotonic() - t0 < 10  # the browser still gets a connection at once
        page.get_by_role("link", name="Query").first.click()
        page.get_by_text("Write a prompt").click()
        box = page.get_by_label("Molecule (smiles; leave empty to omit)")
        expect(box).to_be_editable(timeout=30_000)  # not a grey skeleton
        box.fill("CCO")
        box.press("Enter")
        expect(page.get_by_role("button", name="Answer")).to_be_enabled()
        page.get_by_role("link", name="Layer signals").first.click()
        expect(page.get_by_text("Sliced Wasserstein distance per layer").first).to_be_visible()
        with page.expect_download(timeout=60_000) as dl:
            page.get_by_role("button", name="CSV").first.click()
        path = dl.value.path()
        assert path and "," in Path(path).read_text().splitlines()[0]  # a CSV header came through
        save = page.get_by_role("button", name=re.compile(r"Save session \("))
        label = save.inner_text()
        with page.expect_download(timeout=120_000) as dl:
            save.click()
        size = Path(dl.value.path()).stat().st_size
        assert 0 < size < 8 * 2**20, (label, size)  # a few MB at most for the demo's full run
        page.screenshot(path=str(ARTIFACTS / "08_after_15_visits.png"), full_page=True)
        browser.close()
