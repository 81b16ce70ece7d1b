"""The Specialists page (AppTest): adapter tables, the compatibility verdict, the own-models form.

Runs on the demo zoo when assets/zoo/run.yaml exists, else on the tiny world of conftest written
out as a run.yaml. Expected values are read from the adapters' files, not from the page's helpers.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_run_yaml
from safetensors.torch import load_file
from streamlit.testing.v1 import AppTest

from esm_core.runspec import load_run_spec
from esm_core.tiny import make_lora_adapter

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "assets" / "zoo" / "run.yaml"


@pytest.fixture(scope="module")
def extra(world, tmp_path_factory):
    """A run.yaml for the tiny world, plus adapters that must be refused or folded."""
    d = tmp_path_factory.mktemp("app_sp")
    write_run_yaml(d, world)
    out = {"dir": d, "spec": d / "run.yaml"}
    out["rank8"] = make_lora_adapter(world["base"], d / "rank8", seed=11, r=8)
    out["loud"] = make_lora_adapter(world["base"], d / "loud", seed=12, r=4, alpha=32)
    out["notpeft"] = d / "notpeft"
    out["notpeft"].mkdir()
    (out["notpeft"] / "model.safetensors").write_bytes(b"")
    return out


@pytest.fixture
def demo(extra):
    return load_run_spec(ZOO if ZOO.is_file() else extra["spec"])


@pytest.fixture
def at(monkeypatch, world, extra):
    monkeypatch.setenv("ESM_ALLOWED_ROOTS", os.pathsep.join([str(extra["dir"]), str(world["dir"])]))
    if ZOO.is_file():
        monkeypatch.delenv("ESM_DEMO_SPEC", raising=False)
    else:
        monkeypatch.setenv("ESM_DEMO_SPEC", str(extra["spec"]))
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    app.run()
    app.switch_page("pages/specialists.py")
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def _frame(at, column):
    return next(d.value for d in at.dataframe if column in d.value.columns)


def _submit(at):
    next(b for b in at.button if b.label == "Check and apply").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]


def _errors(at) -> str:
    return "\n".join(e.value for e in at.error)


def test_tables_norms_and_verdict(at, demo):
    K = len(demo.specialists)
    assert any(s.value.startswith(f"Compatible: the {K} specialists") for s in at.success)
    assert not at.error
    checks = _frame(at, "check")
    assert set(checks["result"]) == {"pass"} and len(checks) >= 2 * K + 4
    table = _frame(at, "rank")
    assert table["specialist"].tolist() == [s.name for s in demo.specialists]
    files = {s.name: Path(s.adapter) for s in demo.specialists}
    for s in demo.specialists:
        cfg = json.loads((files[s.name] / "adapter_config.json").read_text())
        row = table[table["specialist"] == s.name].iloc[0]
        assert int(row["rank"]) == cfg["r"] and float(row["alpha"]) == float(cfg["lora_alpha"])
        sd = load_file(str(files[s.name] / "adapter_model.safetensors"))
        assert int(row["parameters"]) == sum(t.numel() for t in sd.values())
        assert row["modality"] == s.modality
    # the per-block norm table of the first adapter: block 0, first module, from the raw factors
    first = demo.specialists[0]
    cfg = json.loads((files[first.name] / "adapter_config.json").read_text())
    sd = load_file(str(files[first.name] / "adapter_model.safetensors"))
    key = next(k for k in sorted(sd) if ".layers.0.self_attn.q_proj.lora_A" in k)
    a, b = sd[key].float(), sd[key.replace("lora_A", "lora_B")].float()
    want = float(torch.linalg.matrix_norm(b @ a)) * cfg["lora_alpha"] / cfg["r"]
    norms = next(d.value for d in at.dataframe if "q_proj" in d.value.columns and "specialist" not in d.value.columns)
    assert float(norms["q_proj"].iloc[0]) == pytest.approx(want, rel=1e-4)
    # the heatmap of every adapter is drawn and downloadable
    assert len(at.get("plotly_chart")) == 1
    labels = [d.label for d in at.get("download_button")]
    assert "HTML" in labels and labels.count("CSV") == K + 1
    assert not at.checkbox(key="spf0_trust").value  # trust_remote_code is off unless opted in


def test_paths_outside_the_roots_are_refused(at, demo, world, tmp_path):
    outside = shutil.copytree(world["adapters"]["prot"], tmp_path / "elsewhere")  # a good adapter, wrong place
    at.text_input(key="spf0_s1_adapter").set_value(str(outside))
    _submit(at)
    err = _errors(at)
    assert "is outside the directories this workbench may read" in err and str(outside) in err
    assert "ESM_ALLOWED_ROOTS" in err
    assert [s.adapter for s in at.session_state["esm"].spec.specialists] == [s.adapter for s in demo.specialists]
    at.text_input(key="sp_yaml").set_value("/etc/hosts")
    next(b for b in at.button if b.label == "Load and apply").click()
    at.run()
    assert "Run config '/etc/hosts' is outside" in _errors(at)


def test_not_peft_and_incompatible_adapters_are_refused(at, world, extra):
    at.text_input(key="spf0_s1_adapter").set_value(str(extra["notpeft"]))
    _submit(at)
    err = _errors(at)
    assert "Not applied (your models)" in err
    assert "not a PEFT adapter directory (no adapter_config.json)" in err
    assert "Fix: save the adapter with PeftModel.save_pretrained" in err
    # a rank-8 adapter next to rank-4 ones on the world base
    at.text_input(key="spf0_base").set_value(str(world["base"]))
    at.text_input(key="spf0_s0_adapter").set_value(str(world["adapters"]["mol"]))
    at.text_input(key="spf0_s1_adapter").set_value(str(extra["rank8"]))
    for i in range(2, int(at.number_input(key="spf0_K").value)):
        at.text_input(key=f"spf0_s{i}_adapter").set_value(str(world["adapters"]["cell"]))
    _submit(at)
    err = _errors(at)
    assert "same rank and shapes" in err and "ranks differ" in err and "(4, 48) vs (8, 48)" in err
    assert "Not applied" in err


def test_apply_own_models_with_differing_alpha_then_reset(at, world, extra, demo):
    at.number_input(key="spf0_K").set_value(2)
    at.number_input(key="spf0_M").set_value(2)
    at.run()
    at.text_input(key="spf0_base").set_value(str(world["base"]))
    for i, (name, prefix, kind, f, col) in enumerate([("molecule", "Molecule: ", "smiles", "mol.csv", "smiles"),
                                                      ("protein", "Protein: ", "protein", "prot.tsv", "seq")]):
        at.text_input(key=f"spf0_m{i}_name").set_value(name)
        at.text_input(key=f"spf0_m{i}_prefix").set_value(prefix)
        at.selectbox(key=f"spf0_m{i}_kind").set_value(kind)
        at.selectbox(key=f"spf0_m{i}_enc").set_value("text")
        at.text_input(key=f"spf0_m{i}_encpath").set_value("")
        at.text_input(key=f"spf0_m{i}_data").set_value(str(extra["dir"] / f))
        at.text_input(key=f"spf0_m{i}_col").set_value(col)
    for i, (name, path, mod) in enumerate([("mol", world["adapters"]["mol"], "molecule"),
                                           ("loud", extra["loud"], "protein")]):
        at.text_input(key=f"spf0_s{i}_name").set_value(name)
        at.text_input(key=f"spf0_s{i}_adapter").set_value(str(path))
        at.text_input(key=f"spf0_s{i}_mod").set_value(mod)
    _submit(at)
    assert not at.error, _errors(at)
    ok = " ".join(s.value for s in at.success)
    assert "Applied your models: 2 specialists, modalities molecule, protein." in ok
    assert "Compatible: the 2 specialists" in ok and "folded into its B factor" in ok
    table = _frame(at, "rank")
    assert table["specialist"].tolist() == ["mol", "loud"]
    assert table["rank"].astype(int).tolist() == [4, 4] and table["alpha"].astype(float).tolist() == [8.0, 32.0]
    assert table["scaling"].tolist() == ["2", "8"]
    current = _frame(at, "adapter")  # the "Current run" table follows
    assert current["specialist"].tolist() == ["mol", "loud"] and current["modality"].tolist() == ["molecule", "protein"]
    assert at.session_state["esm"].spec.base == str(world["base"])
    # the form now shows the applied run
    assert at.text_input(key="spf1_s1_adapter").value == str(extra["loud"])
    next(b for b in at.button if b.label == "Reset to the demo zoo").click()
    at.run()
    assert any(s.value == "Back to the demo zoo." for s in at.success)
    assert [s.name for s in at.session_state["esm"].spec.specialists] == [s.name for s in demo.specialists]
