"""Baselines through the CLI: the written adapter loads in stock PEFT and equals the Eq. 1 merge of its saved lambdas."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import CELLS, MOLECULES, PROTEINS

from esm_core.adapters import LoraKey, read_adapter
from esm_core.cli import main as cli

NAMES = [("mol", "molecule"), ("prot", "protein"), ("cell", "cell")]


@pytest.fixture(scope="module")
def run_yaml(world, tmp_path_factory):
    d = tmp_path_factory.mktemp("methods_cli")
    for fname, col, rows in (("mol.csv", "smiles", MOLECULES), ("prot.csv", "seq", PROTEINS), ("cell.csv", "genes", CELLS)):
        (d / fname).write_text(col + "\n" + "\n".join(rows) + "\n")
    cfg = {
        "base": str(world["base"]),
        "specialists": [{"name": n, "adapter": str(world["adapters"][n]), "modality": m} for n, m in NAMES],
        "modalities": [
            {"name": "molecule", "prefix": "Molecule: ", "kind": "smiles", "data": {"path": "mol.csv", "column": "smiles"}},
            {"name": "protein", "prefix": "Protein: ", "kind": "protein", "data": {"path": "prot.csv", "column": "seq"}},
            {"name": "cell", "prefix": "Cell: ", "kind": "genes", "data": {"path": "cell.csv", "column": "genes"}},
        ],
        "method": {"preset": "reference", "probes_per_modality": 8, "batch_size": 4},
    }
    p = d / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.parametrize("method,params", [
    ("ties", ["density=0.5"]), ("dare_ties", ["drop_rate=0.3"]), ("emr", []), ("pcb", ["drop_ratio=0.5"]),
    ("consensus", ["base=ties"]), ("task_arithmetic", ["scaling=0.5", "weights=mol=1,prot=0.5,cell=2"]),
])
def test_cli_baseline_merge_loads_in_peft_and_matches_its_saved_coefficients(world, run_yaml, tmp_path, method, params):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    args = ["merge", "--config", str(run_yaml), "--out", str(out), "--method", method, "--no-progress"]
    for p in params:
        args += ["--param", p]
    assert cli(args) == 0
    coef = load_file(str(out / "coefficients.safetensors"))
    ads = [read_adapter(world["adapters"][n], n) for n, _ in NAMES]
    hand = AutoModelForCausalLM.from_pretrained(str(world["base"]))
    mods = dict(hand.named_modules())
    for layer, module in ads[0].modules():
        fac = {}
        for ab in "AB":
            k = LoraKey(layer, module, ab)
            lam = coef[f"lambda/{k}"]
            assert lam.shape == (3, *ads[0].tensors[k].shape)
            fac[ab] = (lam * torch.stack([a.tensors[k] for a in ads])).sum(0)
        with torch.no_grad():
            mods[ads[0].module_paths[(layer, module)]].weight += ads[0].scaling_for(layer, module) * fac["B"] @ fac["A"]
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(world["base"])), str(out)).eval()
    x = torch.randint(5, 90, (2, 13))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x).logits, hand.eval()(input_ids=x).logits, atol=1e-5)
    man = json.loads((out / "manifest.json").read_text())
    assert man["merge"]["method"] == method and man["merge"]["params"]


def test_cli_learned_methods_say_they_need_task_data(run_yaml, tmp_path, capsys):
    rc = cli(["merge", "--config", str(run_yaml), "--out", str(tmp_path / "ada"), "--method", "adamerging",
              "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and "task data" in err and not (tmp_path / "ada").exists()
