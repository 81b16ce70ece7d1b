"""The workshop load test at N = 3 (bench/bench_workshop.py): three real browser sessions press Run at once
on one server, two on the default selection and one on its own rows; each then asks the lesson a question.
Every session must see no error and the coefficients of a solo run of its selection, bit for bit, and the
two default sessions must share one computation."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def test_three_sessions_at_once(world, app_run_yaml, tmp_path):
    if not Path("/usr/bin/chromium").exists():
        if os.environ.get("ESM_REQUIRE_BROWSER") == "1":
            pytest.fail("/usr/bin/chromium is missing but ESM_REQUIRE_BROWSER=1")
        pytest.skip("chromium not installed")
    pytest.importorskip("playwright.async_api")
    from bench_workshop import run_workshop

    env = dict(os.environ, ESM_ALLOWED_ROOTS=os.pathsep.join([str(app_run_yaml.parent), str(world["dir"])]))
    zoo = (ROOT / "assets" / "zoo" / "run.yaml").resolve()
    spec = None if app_run_yaml.resolve() == zoo else app_run_yaml
    res = run_workshop(3, spec_path=spec, env=env, log_dir=tmp_path)
    for r in res["sessions"]:
        assert not r["errors"], r
        assert r["equal_to_solo"], r
        assert r.get("lesson", "").startswith("Mean tokens per block"), r
    assert len(res["default_lag_after_first_s"]) == 1
    # the two default sessions share one computation: one computed it, the other joined it (or found it stored)
    how = [r["how"] for r in res["sessions"] if r["selection"] == "default"]
    assert how.count("computed") == 1 and set(how) - {"computed"} <= {"cached", "joined"}, how
    assert next(r["how"] for r in res["sessions"] if r["selection"] != "default") == "computed"
    # timing figures (health, waits) are the benchmark's to print, not this test's to assert


def test_server_config_keeps_the_event_loop_free():
    """The two server settings the room's health figures depend on (bench/bench_workshop.py): no source
    watcher walking every imported module, and no full garbage collection (GIL held ~0.5 s) after every
    script run."""
    import tomllib

    cfg = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["fileWatcherType"] == "none"
    assert cfg["runner"]["postScriptGC"] is False
