"""The Merge page (pages/merge.py) with streamlit.testing.v1.AppTest, and the engine functions it uses.

Runs on the demo zoo when assets/zoo/run.yaml exists (with a small probe count, so the estimation is
quick), else on the tiny world of conftest.py written as a run.yaml in a temporary directory. Drives
the method list, generated parameter widgets, ES without a result, merges, the session list, the
comparison table (checked against the MergeOutput coefficients), the downloads, the training-data
choices of the learned methods; unit tests for the zip (round trip through stock PEFT), the
coefficient comparison and the skill training prompts.

    python -m pytest tests/test_app_merge.py -q
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import SAMPLES, make_spec

from esm_core import paths
from esm_core.paths import DEMO_DIR

ROOT = Path(__file__).resolve().parents[1]
ZOO_YAML = ROOT / "assets" / "zoo" / "run.yaml"
APP = str(ROOT / "app.py")
TIMEOUT = 240


@pytest.fixture(scope="module")
def run_yaml(world, tmp_path_factory) -> tuple[Path, Path]:
    """(run.yaml, directory to allow): the demo zoo with few probes when present, else the tiny world."""
    from esm_core.runspec import load_run_spec, run_spec_to_dict

    d = tmp_path_factory.mktemp("merge_app")
    if ZOO_YAML.is_file():
        sp = load_run_spec(ZOO_YAML)
        cfg = run_spec_to_dict(sp)
        cfg.pop("source", None)
        cfg["method"] = {"preset": sp.method.preset,
                         **{k: getattr(sp.method, k) for k in sp.method.overridden},
                         "probes_per_modality": 16, "batch_size": 8}
        cfg["method"]["token_layers"] = list(sp.method.token_layers)
    else:
        sp = make_spec(world)
        cfg = run_spec_to_dict(sp)
        cfg.pop("source", None)
        for m in cfg["modalities"]:
            f = d / f"{m['name']}.csv"
            f.write_text("raw\n" + "\n".join(SAMPLES[m["name"]]) + "\n")
            m["data"] = {"path": str(f), "column": "raw"}
        cfg["method"] = {"preset": sp.method.preset, "probes_per_modality": 12, "batch_size": 4}
    p = d / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p, d


@pytest.fixture
def app(run_yaml, world, monkeypatch):
    from streamlit.testing.v1 import AppTest

    path, d = run_yaml
    monkeypatch.setenv("ESM_DEMO_SPEC", str(path))
    monkeypatch.setenv("ESM_ALLOWED_ROOTS", os.pathsep.join([str(d), str(world["dir"])]))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    at.switch_page("pages/merge.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _errors(at) -> list[str]:
    return [e.value for e in at.error]


def _click(at, key: str):
    at.button(key=key).click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]


def _dataframe_with(at, column: str):
    for d in at.dataframe:
        if column in d.value.columns:
            return d.value
    raise AssertionError(f"no table with column {column!r}")


# ------------------------------------------------------------------------------------ page
def test_method_list_and_generated_parameter_widgets(app):
    from esm_core.merging.registry import get_method, list_methods

    sb = app.selectbox(key="mg_method")
    assert sb.options == [m.pretty for m in list_methods()]
    assert sb.options[0] == "ES-Merging"
    sb.select("ties")
    app.run()
    ties = get_method("ties")
    page = " ".join(m.value for m in app.markdown) + " ".join(c.value for c in app.caption)
    assert ties.summary in page and ties.url in page and ties.paper in page
    for p in ties.params:
        w = {"float": app.number_input, "int": app.number_input, "choice": app.selectbox,
             "str": app.text_input, "bool": app.checkbox}[p.kind](key=f"mg_ties_{p.name}")
        assert w.label == p.name and w.help == p.help
        assert w.value == p.default
    assert app.selectbox(key="mg_ties_sign_method").options == list(ties.params[2].choices)


def test_es_without_a_result_says_to_run_it_first(app):
    app.selectbox(key="mg_method").select("es")
    app.run()
    assert any("none are computed" in i.value for i in app.info)
    _click(app, "mg_run")
    errs = _errors(app)
    assert any("ES-Merging needs the coefficients" in e and "run ES-Merging" in e for e in errs), errs
    assert not app.session_state["esm"].merges


def test_merge_list_comparison_and_downloads(app):
    from esm_core.merging.registry import get_method

    app.selectbox(key="mg_method").select("es")
    app.run()
    _click(app, "run_merge_es")  # the estimation, from this page
    _click(app, "mg_run")
    assert not _errors(app), _errors(app)
    assert any("merged_es_1" in s.value for s in app.success)

    app.selectbox(key="mg_method").select("ties")
    app.run()
    app.number_input(key="mg_ties_density").set_value(0.5)
    app.run()
    _click(app, "mg_run")
    assert not _errors(app), _errors(app)

    merges = app.session_state["esm"].merges
    assert list(merges) == ["merged_es_1", "merged_ties_1"]
    assert merges["merged_ties_1"]["params"]["density"] == 0.5

    listing = _dataframe_with(app, "parameters")
    row = listing.set_index("name").loc["merged_ties_1"]
    assert row["method"] == get_method("ties").pretty
    assert "density=0.5" in row["parameters"] and "sign_method='total'" in row["parameters"]
    assert row["coefficients"] == "per element"
    assert listing.set_index("name").loc["merged_es_1", "method"] == "ES-Merging"

    # the comparison defaults to the two merges, block 1, the first module, factor A
    assert app.selectbox(key="mg_cmp_a").value == "merged_es_1"
    assert app.selectbox(key="mg_cmp_b").value == "merged_ties_1"
    ca, cb = merges["merged_es_1"]["output"].coefficients, merges["merged_ties_1"]["output"].coefficients
    keys = sorted(ca)
    module = app.selectbox(key="mg_cmp_module").value
    key = next(k for k in keys if k.layer == 0 and k.module == module and k.ab == "A")
    a, b = ca[key].numpy(), cb[key].numpy()
    table = _dataframe_with(app, "mean |λ1−λ2|").set_index("specialist")
    names = list(table.index)
    assert len(names) == a.shape[0]
    for i, n in enumerate(names):
        assert table.loc[n, "mean |λ1−λ2|"] == pytest.approx(np.abs(a[i] - b[i]).mean(), rel=1e-5, abs=1e-7)
        assert table.loc[n, "max |λ1−λ2|"] == pytest.approx(np.abs(a[i] - b[i]).max(), rel=1e-5, abs=1e-7)
        assert table.loc[n, "mean λ · merged_ties_1"] == pytest.approx(b[i].mean(), rel=1e-5, abs=1e-7)
        whole = np.concatenate([np.abs(ca[k][i].numpy() - cb[k][i].numpy()).ravel() for k in keys]).mean()
        assert table.loc[n, "mean |λ1−λ2| (whole adapter)"] == pytest.approx(whole, rel=1e-5, abs=1e-7)

    def top(c):
        c = c.reshape(c.shape[0], -1)
        s = np.sort(c, axis=0)
        return np.where(s[-1] - s[-2] <= 1e-7, -1, c.argmax(0))

    share = float((top(a) != top(b)).mean())
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["top specialist differs (this factor)"] == f"{share:.1%}"

    # switching the factor changes the numbers to that factor's
    app.radio(key="mg_cmp_ab").set_value("B")
    app.run()
    kb = next(k for k in keys if k.layer == 0 and k.module == module and k.ab == "B")
    table = _dataframe_with(app, "mean |λ1−λ2|").set_index("specialist")
    assert table.iloc[0]["mean |λ1−λ2|"] == pytest.approx(np.abs(ca[kb][0].numpy() - cb[kb][0].numpy()).mean(),
                                                            rel=1e-5, abs=1e-7)

    labels = {b.label for b in app.get("download_button")}
    assert {"Merged adapter (zip)", "Coefficients (safetensors)", "Manifest (JSON)", "HTML", "CSV"} <= labels
    assert app.selectbox(key="mg_dl").value == "merged_ties_1"

    # a user mistake: the same merge twice
    app.selectbox(key="mg_cmp_b").set_value("merged_es_1")
    app.run()
    assert any("same merge is chosen twice" in e for e in _errors(app))


def test_bad_parameter_and_average_without_coefficients(app):
    app.selectbox(key="mg_method").select("task_arithmetic")
    app.run()
    app.text_input(key="mg_task_arithmetic_weights").input("1,2")
    app.run()
    _click(app, "mg_run")
    assert any("has 2 value(s) for 3 specialists" in e for e in _errors(app)), _errors(app)
    assert not app.session_state["esm"].merges

    app.selectbox(key="mg_method").select("average")
    app.run()
    assert any("has no parameters" in c.value for c in app.caption)
    _click(app, "mg_run")
    assert list(app.session_state["esm"].merges) == ["merged_average_1"]
    assert any("Average has no coefficients to download" in c.value for c in app.caption)
    assert any("Needs two merges with per-element coefficients" in i.value for i in app.info)
    labels = {b.label for b in app.get("download_button")}
    assert "Merged adapter (zip)" in labels and "Coefficients (safetensors)" not in labels


def test_learned_method_says_when_no_data_is_available(app, tmp_path, monkeypatch):

    monkeypatch.setenv("ESM_DATA_DIR", str(tmp_path))
    app.selectbox(key="mg_method").select("adamerging")
    app.run()
    assert app.radio(key="mg_source").value == "task"
    assert any("No task data is available" in e for e in _errors(app))
    _click(app, "mg_run")
    assert any("the chosen source has no data" in e for e in _errors(app))
    assert not app.session_state["esm"].merges

    monkeypatch.setattr(paths, "DEMO_DIR", tmp_path / "no_demo")
    app.radio(key="mg_source").set_value("skills")
    app.run()
    assert any("The demo data is missing" in e for e in _errors(app))


def test_adamerging_learns_from_skill_prompts_with_progress(app):
    from esm_core.zoo.data import DEMO_FILES

    if not all((Path(DEMO_DIR) / f).is_file() for f in DEMO_FILES):
        pytest.skip("demo data (assets/demo) not present")
    app.selectbox(key="mg_method").select("adamerging")
    app.run()
    app.radio(key="mg_source").set_value("skills")
    app.run()
    app.multiselect(key="mg_skills").set_value(["cell_t"])
    app.number_input(key="mg_skill_n").set_value(2)
    app.number_input(key="mg_skill_k").set_value(0)
    app.number_input(key="mg_adamerging_steps").set_value(1)
    app.number_input(key="mg_adamerging_batch_size").set_value(1)
    app.run()
    _click(app, "mg_run")
    assert not _errors(app), _errors(app)
    e = app.session_state["esm"].merges["merged_adamerging_1"]
    assert e["params"]["steps"] == 1 and e["output"].info["n_prompts"] == 2
    assert "2 prompts from skills cell_t (train split)" in e["data"]
    assert len(e["output"].info["entropy_trace"]) == 1
    assert any("merged_adamerging_1: done in" in x.label for x in app.get("status"))
    row = _dataframe_with(app, "parameters").set_index("name").loc["merged_adamerging_1"]
    assert "steps=1" in row["parameters"] and "cell_t" in row["data"] and "entropy_after=" in row["details"]


# ------------------------------------------------------------------------------------ engine functions
def _ties(workspace):
    from esm_core.merging.base import MergeContext
    from esm_core.merging.registry import get_method

    ctx = MergeContext.from_specialists(workspace.sset, workspace=workspace)
    return ctx, get_method("ties").run(ctx, {"density": 0.5})


def test_zip_round_trips_through_stock_peft(world, workspace, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from esm_core.adapters import merged_config
    from esm_core.merging.output import zip_merged

    ctx, out = _ties(workspace)
    sset = workspace.sset
    data = zip_merged(out, sset, folder="merged_ties_9", spec=workspace.spec, folded=ctx.folded,
                      scalings=ctx.scalings, manifest_extra={"merge_name": "merged_ties_9"})
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = set(z.namelist())
        assert {"merged_ties_9/adapter_config.json", "merged_ties_9/adapter_model.safetensors",
                "merged_ties_9/coefficients.safetensors", "merged_ties_9/manifest.json",
                "merged_ties_9/encoders.json"} <= names
        assert all(n.startswith("merged_ties_9/") for n in names)
        z.extractall(tmp_path)
    folder = tmp_path / "merged_ties_9"
    man = json.loads((folder / "manifest.json").read_text())
    assert man["merge"]["method"] == "ties" and man["merge"]["params"]["density"] == 0.5
    assert man["merge_name"] == "merged_ties_9"
    assert man["updates"]["space"] == "factors" and len(man["updates"]["modules"]) == len(out.tensors) // 2
    assert [s["name"] for s in man["specialists"]] == sset.names
    coef = load_file(str(folder / "coefficients.safetensors"))
    for k, v in out.coefficients.items():
        assert torch.equal(coef[f"lambda/{k}"], v.float())

    base = AutoModelForCausalLM.from_pretrained(str(world["base"]))
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    sd = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    template = sset.adapters[sset.names[0]]
    for k, t in out.tensors.items():  # every merged factor arrives unchanged, under PEFT's own key
        fk = template.file_keys[k].replace(".weight", ".default.weight")
        assert torch.allclose(sd[fk], t.to(sd[fk].dtype)), k
    ids = torch.tensor([[1, 5, 9, 13, 7, 3, 11]])
    sset.add_adapter("zip_check", out.tensors, merged_config(template, sset.base_path, ctx.folded))
    try:
        with torch.no_grad(), sset.use("zip_check"):
            ref = sset.model(input_ids=ids).logits
        with torch.no_grad():
            got = model(input_ids=ids).logits
    finally:
        sset.remove_adapter("zip_check")
    assert torch.allclose(got, ref, atol=1e-5)
    with torch.no_grad(), model.disable_adapter():
        bare = model(input_ids=ids).logits
    assert not torch.allclose(got, bare, atol=1e-4)  # the adapter does something


def test_zip_files_keeps_paths_and_refuses_escapes():
    from esm_core.io import zip_files

    data = zip_files({"a.json": b"{}", "encoders/mol/x.bin": b"\x00\x01"}, "m")
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert sorted(z.namelist()) == ["m/a.json", "m/encoders/mol/x.bin"]
        assert z.read("m/encoders/mol/x.bin") == b"\x00\x01"
    with pytest.raises(ValueError):
        zip_files({"../evil": b""})


def test_compare_coefficients_on_hand_made_tensors():
    from esm_core.analysis.compare import compare_coefficients

    names = ["a", "b"]
    c1 = torch.tensor([[[0.9, 0.2, 0.5]], [[0.1, 0.8, 0.5]]])  # tops: a, b, tie
    c2 = torch.tensor([[[0.6, 0.7, 0.0]], [[0.4, 0.3, 0.0]]])  # tops: a, a, tie
    rows, overall = compare_coefficients(c1, c2, names)
    assert overall["elements"] == 3
    assert overall["top_differs"] == pytest.approx(1 / 3)
    assert overall["ties_1"] == pytest.approx(1 / 3) and overall["ties_2"] == pytest.approx(1 / 3)
    assert rows[0]["specialist"] == "a"
    assert rows[0]["mean_abs_diff"] == pytest.approx((0.3 + 0.5 + 0.5) / 3)
    assert rows[1]["max_abs_diff"] == pytest.approx(0.5)
    assert rows[1]["mean_1"] == pytest.approx(1.4 / 3) and rows[1]["mean_2"] == pytest.approx(0.7 / 3)
    # several factors are compared as one set of elements
    rows2, overall2 = compare_coefficients([c1, c1[:, :, :1]], [c2, c2[:, :, :1]], names)
    assert overall2["elements"] == 4 and overall2["top_differs"] == pytest.approx(1 / 4)
    with pytest.raises(Exception, match="different elements"):
        compare_coefficients(c1, c2[:, :, :2], names)


def test_skill_training_prompts_come_from_the_train_split():
    from esm_core.zoo.data import DEMO_FILES, load_demo
    from esm_core.zoo.training import skill_training_prompts

    if not all((Path(DEMO_DIR) / f).is_file() for f in DEMO_FILES):
        pytest.skip("demo data (assets/demo) not present")
    ps = skill_training_prompts(["mol_aromatic", "cell_t"], 6, k=2, seed=3)
    assert len(ps) == 12
    assert [p.meta["task"] for p in ps] == ["mol_aromatic"] * 6 + ["cell_t"] * 6
    for skill in ("mol_aromatic", "cell_t"):
        answers = [p.answer for p in ps if p.meta["task"] == skill]
        assert answers.count("Yes") == answers.count("No") == 3
    demo = load_demo()
    train = set(demo.molecules_train["smiles"])
    held = set(demo.molecules_heldout["smiles"]) - train
    mol_items = [s.raw for p in ps if p.meta["task"] == "mol_aromatic" for s in p.segments
                 if getattr(s, "modality", None) == "molecule"]
    assert len(mol_items) == 6 * 3  # 2 examples + the query, per prompt
    assert all(r in train for r in mol_items) and not any(r in held for r in mol_items)
    again = skill_training_prompts(["mol_aromatic", "cell_t"], 6, k=2, seed=3)
    assert [p.text() for p in again] == [p.text() for p in ps]
    with pytest.raises(Exception, match="Unknown"):
        skill_training_prompts(["no_such_skill"], 2)


def test_delta_space_merge_and_what_each_merge_keeps_of_the_updates(app):
    app.selectbox(key="mg_method").select("average")
    app.run()
    _click(app, "mg_run")  # factors (the default)
    app.radio(key="mg_space").set_value("delta")
    app.run()
    assert app.session_state["esm"].method.merge_space == "delta"
    _click(app, "mg_run")
    made = app.session_state["esm"].merges
    assert list(made) == ["merged_average_1", "merged_average_2"]
    assert made["merged_average_2"]["output"].info["space"] == "delta"
    rows = _dataframe_with(app, "space")
    assert rows["space"].tolist()[0] == "factors" and rows["space"].tolist()[1].startswith("delta (rank ")
    metrics = {m.label: m.value for m in app.metric}
    # an average of the updates keeps a third of each, with no cross terms
    shares = [float(v) for k, v in metrics.items() if k.startswith("mean share")]
    assert shares and all(abs(s - 1 / 3) < 1e-3 for s in shares), metrics
    assert metrics["mean cross energy"] == "0.0%"
    app.selectbox(key="mg_upd").select("merged_average_1")
    app.run()
    factors = {m.label: m.value for m in app.metric}
    assert float(factors["mean cross energy"].rstrip("%")) > 30  # Eq. 1 on factors: mostly cross terms
    assert all(float(v) < 0.2 for k, v in factors.items() if k.startswith("mean share"))
