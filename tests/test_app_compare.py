"""The Compare page (pages/compare.py, ui/comparisons.py): the CLI's numbers for the same settings, the
questions behind a cell, and one computation shared by every session."""

from __future__ import annotations

import json
import random

import pytest
from conftest import MOLECULES, PROTEINS, ROOT
from streamlit.testing.v1 import AppTest

from esm_core.cli import main as cli


def _ok(at):
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


@pytest.fixture
def task_data(tmp_path, monkeypatch):
    rnd = random.Random(5)
    d = tmp_path / "data" / "public" / "dti"
    d.mkdir(parents=True)
    pairs = rnd.sample([(m, p) for m in MOLECULES for p in PROTEINS[:4]], 40)
    for split, rows in (("train", pairs[10:]), ("test", pairs[:10])):
        (d / f"human_random_{split}.csv").write_text(
            "SMILES,Protein,Y\n" + "".join(f"{m},{p},{rnd.choice(['0', '1'])}\n" for m, p in rows))
    monkeypatch.setenv("ESM_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def _page(s=None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    if s is not None:
        at.session_state["esm"] = s
    at.run()
    at.switch_page("pages/compare.py").run()
    _ok(at)
    at.multiselect(key="cmp_methods").set_value(["average", "ties"])
    at.multiselect(key="cmp_tasks").set_value(["human"])
    at.number_input(key="cmp_n").set_value(6)
    at.number_input(key="cmp_k").set_value(2)
    at.run()
    _ok(at)
    return at


def test_compare_page_equals_the_cli_and_shows_the_rows_behind_a_cell(app_env, app_run_yaml, task_data, tmp_path):
    at = _page()
    at.button(key="cmp_run").click().run()
    _ok(at)
    key, rep, how = at.session_state["esm"].comparison
    assert how == "computed"
    assert any("| Average |" in m.value for m in at.markdown)
    out = tmp_path / "cmp"
    assert cli(["compare", "--config", str(app_run_yaml), "--data-dir", str(task_data), "--task", "human", "--n", "6",
                "--k", "2", "--modes", "likelihood", "--methods", "average,ties", "--no-progress",
                "--out", str(out)]) == 0
    want = {(r["model"], r["task"], r["mode"]): (r["acc"], r["f1"], r["acc_lo"], r["acc_hi"], r["n"])
            for r in json.loads((out / "results.json").read_text())["rows"]}
    got = {(r["model"], r["task"], r["mode"]): (r["acc"], r["f1"], r["acc_lo"], r["acc_hi"], r["n"])
           for r in rep.to_json()["rows"]}
    assert got.keys() == want.keys() and {m for m, _, _ in got} >= {"base", "Average", "TIES-Merging"}
    for k_, v in want.items():
        assert got[k_] == pytest.approx(v, abs=1e-9), k_
    # the rows behind a cell: each question with its gold label, the model's answer and its examples
    at.selectbox(key="cmp_cell_model").set_value("Average").run()
    _ok(at)
    df = next(d.value for d in at.dataframe if "gold" in d.value.columns)
    acc = next(r["acc"] for r in rep.to_json()["rows"] if r["model"] == "Average" and r["mode"] == "likelihood")
    assert len(df) == 6 and (df["answer (likelihood)"] == df["gold"]).mean() == pytest.approx(acc)
    assert df["examples (label, similarity)"].str.count(r"\(").eq(2).all()  # k = 2 examples, each with a score
    assert "Final answer" in at.code[0].value or "Answer" in at.code[0].value
    # a second session with the same choice gets the stored comparison (computed once for the server)
    other = _page()
    other.button(key="cmp_run").click().run()
    _ok(other)
    assert other.session_state["esm"].comparison[2] == "cached"
    assert other.session_state["esm"].comparison[1] is rep
