"""Several people on one server: sessions estimate, merge and query at once on the one shared model.

Three AppTest sessions (each its own session state; the model, caches and result store are shared
by the process, as with browser tabs) run in threads at the same time, with different selections
(seeds, presets) and a TIES merge each with its own density. Every session's coefficients must
equal the same estimation run alone, and every session's merged model must answer as a merge with
its own density does: merges of the same method never answer for each other.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SAMPLES, make_spec
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
SESSIONS = [dict(seed=1, preset="reference", density=0.2), dict(seed=2, preset="reference", density=0.9),
            dict(seed=3, preset="paper", density=0.5)]
MOLECULE = "CC(=O)Oc1ccccc1C(=O)O"


@pytest.fixture(scope="module")
def tiny_app(world, tmp_path_factory):
    """The tiny world as the app's demo run (fast estimations)."""
    from esm_core.runspec import run_spec_to_dict

    d = tmp_path_factory.mktemp("conc")
    cfg = run_spec_to_dict(make_spec(world))
    cfg.pop("source", None)
    for m in cfg["modalities"]:
        f = d / f"{m['name']}.csv"
        f.write_text("raw\n" + "\n".join(SAMPLES[m["name"]]) + "\n")
        m["data"] = {"path": str(f), "column": "raw"}
    cfg["method"] = {"preset": "reference", "probes_per_modality": 12, "batch_size": 4, "n_projections": 64}
    p = d / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p, d


def _solo(run_yaml):
    """What each session must get: its estimation and its TIES merge's answers, computed alone."""
    from esm_core.adapters import merged_config
    from esm_core.answering.batched import BatchedAnswerer
    from esm_core.answering.prompts import Example, Item, few_shot_prompt
    from esm_core.benchmark.harness import answer_side_by_side
    from esm_core.merging.base import MergeContext
    from esm_core.merging.registry import get_method
    from esm_core.pipeline import Workspace, estimate, read_probe_samples
    from esm_core.runspec import load_run_spec

    spec = load_run_spec(run_yaml)
    ws = Workspace.from_spec(spec, samples=read_probe_samples(spec))
    out = []
    for s in SESSIONS:
        cfg = spec.method.replace(preset=s["preset"], seed=s["seed"])
        res = estimate(ws, cfg)
        ctx = MergeContext.from_specialists(ws.sset, seed=cfg.seed)
        merged = get_method("ties").run(ctx, {"density": s["density"]})
        name = f"solo_{s['seed']}"
        ws.sset.add_adapter(name, merged.tensors, merged_config(ws.sset.adapters[ws.sset.names[0]], None, ctx.folded))
        prompt = few_shot_prompt("You are an expert in drug discovery and molecular biology.",
                                 "Does the molecule interact with the protein?", ["Yes", "No"], [],
                                 Example([("Molecule", Item("molecule", MOLECULE))]))
        rows = answer_side_by_side(BatchedAnswerer(ws.sset, ws.encoders), prompt, {"m": name}, generate=False)
        out.append((res, rows[0]["p(Yes)"]))
    return out


def _shown(at) -> str:
    """What the page shows besides widgets: errors, warnings, infos, exceptions (for failure messages)."""
    return "; ".join(f"{kind}: {e.value}" for kind, els in (("exception", at.exception), ("error", at.error),
                                                          ("warning", at.warning), ("info", at.info))
                     for e in els) + f"; elements: {_walk(at.main)}"


def _walk(node, out=None) -> list:
    """The page's elements in order: type and key (widgets) or the first words of the value."""
    out = [] if out is None else out
    kids = getattr(node, "children", None)
    if isinstance(kids, dict) and kids:
        for k in sorted(kids):
            _walk(kids[k], out)
    else:
        key = getattr(node, "key", None)
        val = getattr(node, "value", None)
        out.append(f"{type(node).__name__}:{key or str(val)[:40]}")
    return out


def _session(i: int, env: dict, results: dict, errors: list):
    step, at = "start", None
    try:
        s = SESSIONS[i]
        at = AppTest.from_file(APP, default_timeout=600)
        at.run()
        esm = at.session_state["esm"]
        esm.method = esm.method.replace(preset=s["preset"], seed=s["seed"])
        at.run()
        step = "estimate"
        at.button(key="run").click().run()
        assert not at.exception, [e.value for e in at.exception]
        res = at.session_state["esm"].base_result
        assert res is not None, "no estimation result"
        step = "merge"
        at.switch_page("pages/merge.py").run()
        at.selectbox(key="mg_method").set_value("ties").run()
        at.number_input(key="mg_ties_density").set_value(s["density"]).run()
        at.button(key="mg_run").click().run()
        assert not at.exception, [e.value for e in at.exception]
        step = "query"
        at.switch_page("pages/query.py").run()
        at.radio(key="q_source").set_value("Write a prompt").run()
        at.text_input(key="q_f_molecule").input(MOLECULE).run()
        assert "merged_ties_1" in at.multiselect(key="q_models").options, at.multiselect(key="q_models").options
        at.multiselect(key="q_models").set_value(["merged_ties_1"]).run()
        at.toggle(key="q_gen").set_value(False).run()
        at.button(key="q_go").click().run()
        assert not at.exception, [e.value for e in at.exception]
        tables = [d.value for d in at.dataframe if "answer_likelihood" in d.value.columns]
        assert tables, "no answer table"
        df = tables[0]
        results[i] = (res, float(df.loc[df["model"] == "merged_ties_1", "p(Yes)"].iloc[0]),
                      [e.value for e in at.error])
    except BaseException as e:  # noqa: BLE001 - reported by the test
        errors.append(f"session {i} at {step}: {e!r}; the page shows: {_shown(at) if at is not None else '-'}")


def _one_compile_at_a_time(monkeypatch):
    """Each AppTest compiles its page scripts with its own script cache; CPython 3.11's ast module is not
    safe for parses in several threads at once ("AST constructor recursion depth mismatch"). A real
    server compiles under one shared cache lock, so the sessions' page compiles take turns here too."""
    from streamlit.runtime.scriptrunner import magic

    lock, add_magic = threading.Lock(), magic.add_magic

    def locked(*a, **k):
        with lock:
            return add_magic(*a, **k)
    monkeypatch.setattr(magic, "add_magic", locked)


def _one_runtime(monkeypatch):
    """AppTest sets and clears process-wide state around each of its runs: ``Runtime._instance`` (a
    fresh mock runtime, then None) and ``PagesManager.uses_pages_directory`` (reset, then guessed from
    the ``pages/`` folder). Runs in several threads would clear them under each other's feet (a run
    that sees the guess executes the old pages-folder router and lands on the default page). A real
    server has one runtime and, with st.navigation, the flag stays False; the test pins both so, and
    AppTest's own assignments land on look-alike subclasses nobody reads."""
    from unittest.mock import MagicMock

    from streamlit.components.v2.component_manager import BidiComponentManager
    from streamlit.runtime import Runtime
    from streamlit.runtime.caching.storage.dummy_cache_storage import MemoryCacheStorageManager
    from streamlit.runtime.dataframe_source_manager import DataframeSourceManager
    from streamlit.runtime.media_file_manager import MediaFileManager
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.testing.v1 import app_test

    runtime = MagicMock(spec=Runtime)
    runtime.media_file_mgr = MediaFileManager(MemoryMediaFileStorage("/mock/media"))
    runtime.dataframe_source_mgr = DataframeSourceManager()
    runtime.cache_storage_manager = MemoryCacheStorageManager()
    runtime.bidi_component_registry = BidiComponentManager()
    runtime.bidi_component_registry.discover_and_register_components(start_file_watching=False)
    monkeypatch.setattr(Runtime, "_instance", runtime)
    monkeypatch.setattr(PagesManager, "uses_pages_directory", False)
    monkeypatch.setattr(app_test, "Runtime", type("TestRuntime", (Runtime,), {}))
    monkeypatch.setattr(app_test, "PagesManager", type("TestPagesManager", (PagesManager,), {}))
    # Around each run AppTest also patches ``config.get_option`` process-wide (global.appTest = True) and
    # restores it on exit; runs in threads restore it under each other, so a run can execute with
    # appTest off, and its widgets' test registry (format_func) stays empty (KeyError in a later run).
    # Pin the option on for the whole test and make AppTest's per-run patch a no-op.
    import contextlib

    from streamlit import config

    real_get = config.get_option
    monkeypatch.setattr(config, "get_option", lambda key: True if key == "global.appTest" else real_get(key))
    monkeypatch.setattr(app_test, "patch_config_options", lambda overrides: contextlib.nullcontext())


def test_three_sessions_at_once_equal_their_solo_runs(tiny_app, world, monkeypatch):
    _one_compile_at_a_time(monkeypatch)
    _one_runtime(monkeypatch)
    run_yaml, d = tiny_app
    monkeypatch.setenv("ESM_DEMO_SPEC", str(run_yaml))
    monkeypatch.setenv("ESM_ALLOWED_ROOTS", os.pathsep.join([str(d), str(world["dir"])]))
    solo = _solo(run_yaml)
    results, errors = {}, []
    threads = [threading.Thread(target=_session, args=(i, dict(os.environ), results, errors))
               for i in range(len(SESSIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    assert not errors, errors
    for i, (want_res, want_p) in enumerate(solo):
        res, p_yes, errs = results[i]
        assert not errs, errs
        assert res.config.seed == SESSIONS[i]["seed"] and res.config.preset == SESSIONS[i]["preset"]
        assert torch.equal(res.layer.alpha, want_res.layer.alpha), i
        assert all(torch.equal(res.lam[k], want_res.lam[k]) for k in want_res.lam), i
        assert p_yes == pytest.approx(want_p, abs=1e-5), (i, p_yes, want_p)
    # the three densities give three different merged models: had they been mixed up, two would agree
    ps = [results[i][1] for i in range(len(SESSIONS))]
    assert len({round(p, 6) for p in ps}) == len(ps), ps
