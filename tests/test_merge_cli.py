"""The CLI end to end: a merged adapter loads with stock PEFT and gives the hand-computed logits.

Also: coefficients output, overwrite rules, inputs never overwritten, and the manifest's records.
"""

import json

import pytest
import torch
from conftest import MOLECULES, write_run_yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from esm_core.adapters import LoraKey, read_adapter
from esm_core.cli import main as cli
from esm_core.pipeline import load_result


@pytest.fixture(scope="module")
def run_yaml(world, tmp_path_factory):
    return write_run_yaml(tmp_path_factory.mktemp("cli"), world, molecules=MOLECULES + ["not_a_smiles(("])


def _hand_merged_model(world, lam, names):
    """The base with W + s * B_merged @ A_merged applied by hand, B/A = sum_k lam_k * factor_k."""
    model = AutoModelForCausalLM.from_pretrained(str(world["base"]))
    ads = [read_adapter(world["adapters"][n], n) for n in names]
    mods = dict(model.named_modules())
    for layer, module in ads[0].modules():
        fac = {}
        for ab in "AB":
            k = LoraKey(layer, module, ab)
            w = lam[k]
            st = torch.stack([a.tensors[k] for a in ads])
            while w.ndim < st.ndim:
                w = w.unsqueeze(-1)
            fac[ab] = (w * st).sum(0)
        lin = mods[ads[0].module_paths[(layer, module)]]
        with torch.no_grad():
            lin.weight += ads[0].scaling_for(layer, module) * fac["B"] @ fac["A"]
    return model


@pytest.mark.parametrize("method", ["es", "average"])
def test_merged_adapter_loads_in_stock_peft_and_matches_hand_sum(world, run_yaml, tmp_path, method):
    out = tmp_path / f"merged_{method}"
    rc = cli(["merge", "--config", str(run_yaml), "--out", str(out), "--method", method, "--no-progress"])
    assert rc == 0
    for f in ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]:
        assert (out / f).is_file()
    names = ["mol", "prot", "cell"]
    if method == "es":
        res = load_result(out / "coefficients.safetensors")
        lam = res.lam
        assert res.config.preset == "reference" and res.specialists == names
    else:
        keys = read_adapter(world["adapters"]["mol"], "mol").tensors
        lam = {k: torch.full((3,), 1 / 3) for k in keys}
    base = AutoModelForCausalLM.from_pretrained(str(world["base"]))
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    hand = _hand_merged_model(world, lam, names).eval()
    x = torch.randint(5, 90, (2, 17))
    with torch.no_grad():
        a = peft_model(input_ids=x).logits
        b = hand(input_ids=x).logits
        c = AutoModelForCausalLM.from_pretrained(str(world["base"]))(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-3)  # the merge changed something
    man = json.loads((out / "manifest.json").read_text())
    assert man["merge"]["method"] == method
    assert set(man["packages"]) >= {"torch", "transformers", "peft"}
    assert man["inputs"]["adapter:mol"]["files"]["adapter_model.safetensors"]
    assert man["scaling"]["folded_into_B"] is False
    if method == "es":
        assert man["preset"] == "reference" and man["method_config"]["tau_elem"] == 0.1
        assert man["probes"]["molecule"]["bad"] == 1  # the unparsable SMILES was reported and skipped
        assert "probe_data:molecule" in man["inputs"]


def test_coefficients_command_and_overwrite_rules(run_yaml, tmp_path, capsys):
    out = tmp_path / "coef"
    assert cli(["coefficients", "--config", str(run_yaml), "--out", str(out), "--no-progress",
                "--set", "tau_elem=0.3", "--seed", "5"]) == 0
    res = load_result(out / "coefficients.safetensors")
    assert res.config.tau_elem == 0.3 and res.config.seed == 5 and set(res.config.overridden) >= {"tau_elem", "seed"}
    assert res.layer.D.shape == (3, 3, 3) and res.element is not None
    first = (out / "coefficients.safetensors").read_bytes()
    capsys.readouterr()
    # refuses to overwrite, leaves the old output intact
    assert cli(["coefficients", "--config", str(run_yaml), "--out", str(out), "--no-progress", "--seed", "6"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "coefficients.safetensors").read_bytes() == first
    # --overwrite replaces it
    assert cli(["coefficients", "--config", str(run_yaml), "--out", str(out), "--no-progress", "--seed", "6",
                "--overwrite"]) == 0
    assert load_result(out / "coefficients.safetensors").config.seed == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coef"]


def test_inputs_are_never_overwritten(world, run_yaml, capsys):
    before = (world["adapters"]["prot"] / "adapter_model.safetensors").read_bytes()
    rc = cli(["merge", "--config", str(run_yaml), "--out", str(world["adapters"]["prot"]), "--overwrite",
              "--no-progress"])
    assert rc == 2
    assert "input" in capsys.readouterr().err
    assert (world["adapters"]["prot"] / "adapter_model.safetensors").read_bytes() == before


@pytest.mark.parametrize("args,words", [
    (["--set", "tau_elem=-1"], "out of range"),
    (["--set", "layout=diagonal"], "not allowed"),
    (["--set", "nonsense=1"], "Unknown method setting"),
    (["--preset", "fancy"], "Unknown preset"),
    (["--method", "nope"], "Unknown merge method"),
    (["--param", "mode=weird"], "not allowed"),
])
def test_bad_settings_are_one_line_errors(run_yaml, tmp_path, capsys, args, words):
    out = tmp_path / "o"
    rc = cli(["merge", "--config", str(run_yaml), "--out", str(out), "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and err.count("\n") == 1
    assert not out.exists()


def test_bad_config_files(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("base: x\nspecialists: []\nfoo: 1\n")
    assert cli(["coefficients", "--config", str(tmp_path / "a.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "Unknown key(s) ['foo']" in capsys.readouterr().err
    (tmp_path / "b.yaml").write_text("base: x\nspecialists: [{name: a, adapter: a}]\nmodalities: [{name: m}]\n")
    assert cli(["coefficients", "--config", str(tmp_path / "b.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "at least 2 specialists" in capsys.readouterr().err
    assert cli(["coefficients", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_es_merge_in_another_mode_saves_the_coefficients_it_used(world, run_yaml, tmp_path):
    out = tmp_path / "es_layer"
    assert cli(["merge", "--config", str(run_yaml), "--out", str(out), "--param", "mode=layer", "--no-progress"]) == 0
    res = load_result(out / "coefficients.safetensors")
    assert res.config.mode == "combined"  # the estimation's mode
    for k, v in res.lam.items():  # ... but lambda/ holds the layer-mode coefficients the merge used
        assert torch.allclose(v, res.layer.alpha[:, k.layer].reshape(3, 1, 1).expand_as(v))
