"""esm_core.analysis.describe: the compatibility verdict records every engine check, adapter tables, B·A norms.

The verdict must reach the same conclusions as SpecialistSet.load (which stops at the first refusal),
but list every failure at once, and build the base's module tree without reading its weights.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from esm_core.adapters import read_adapter
from esm_core.analysis.describe import (
    adapter_rows,
    base_skeleton,
    check_specialists,
    delta_norm_matrix,
    scalings_differ,
)
from esm_core.errors import ESMError
from esm_core.merging.base import prepare_tensors
from esm_core.runspec import EncoderSpec
from esm_core.tiny import build_tiny_base, make_lora_adapter

ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def odd(world, tmp_path_factory):
    d = tmp_path_factory.mktemp("odd")
    out = {}
    out["rank"] = make_lora_adapter(world["base"], d / "rank", seed=9, r=8)
    out["alpha"] = make_lora_adapter(world["base"], d / "alpha", seed=7, r=4, alpha=32)
    other = build_tiny_base(d / "other_base", layers=2, hidden=48, intermediate=48, heads=4, kv_heads=2)
    out["size"] = make_lora_adapter(other, d / "size", seed=9, r=4)
    out["nan"] = Path(shutil.copytree(world["adapters"]["prot"], d / "nan"))
    sd = load_file(str(out["nan"] / "adapter_model.safetensors"))
    sd[sorted(sd)[0]][0, 0] = float("inf")
    save_file(sd, str(out["nan"] / "adapter_model.safetensors"))
    out["notpeft"] = d / "notpeft"
    out["notpeft"].mkdir()
    out["noweights"] = d / "noweights"
    out["noweights"].mkdir()
    (out["noweights"] / "config.json").write_text("{}")
    return out


def _pairs(world, **extra):
    return [("mol", str(world["adapters"]["mol"])), *[(n, str(p)) for n, p in extra.items()]]


def test_compatible_world_passes_every_check(world):
    v = check_specialists([(n, str(p)) for n, p in world["adapters"].items()], str(world["base"]))
    assert v.ok and not v.folded and v.num_layers == 2
    names = [c.name for c in v.checks]
    assert names == ["at least 2 specialists", "mol: PEFT LoRA adapter, finite weights",
                     "prot: PEFT LoRA adapter, finite weights", "cell: PEFT LoRA adapter, finite weights",
                     "same target modules", "same rank and shapes", "scaling alpha/r", "base model readable",
                     "mol: fits the base", "prot: fits the base", "cell: fits the base"]
    assert v.summary().startswith("Compatible: the 3 specialists")
    assert "LlamaForCausalLM, 2 blocks, hidden size 32" in v.checks[7].detail
    # the skeleton holds no real weights
    assert all(p.device.type == "meta" for p in base_skeleton(str(world["base"])).parameters())


def test_every_failure_is_listed_at_once(world, odd):
    v = check_specialists(_pairs(world, bad=odd["nan"], plain=odd["notpeft"]), str(world["base"]))
    assert not v.ok
    fails = {c.name: c for c in v.failures}
    assert set(fails) == {"bad: PEFT LoRA adapter, finite weights", "plain: PEFT LoRA adapter, finite weights"}
    assert "NaN/Inf" in fails["bad: PEFT LoRA adapter, finite weights"].detail
    assert "not a PEFT adapter directory" in fails["plain: PEFT LoRA adapter, finite weights"].detail
    assert fails["plain: PEFT LoRA adapter, finite weights"].fix
    assert "2 of" in v.summary() and "Not mergeable" in v.summary()
    # the adapter that did read is still described
    assert list(v.adapters) == ["mol"]


@pytest.mark.parametrize("which,check,words", [
    ("rank", "same rank and shapes", ["ranks differ", "(4, 48) vs (8, 48)"]),
    ("size", "odd: fits the base", ["do not fit the base", "48 -> 32"]),
])
def test_rank_and_base_size(world, odd, which, check, words):
    v = check_specialists(_pairs(world, odd=odd[which]), str(world["base"]))
    fails = {c.name: c for c in v.failures}
    assert check in fails, v.table()
    for w in words:
        assert w in fails[check].detail


def test_differing_alpha_is_allowed_and_folded(world, odd):
    v = check_specialists(_pairs(world, loud=odd["alpha"]), str(world["base"]))
    assert v.ok and v.folded
    assert "folded into its B factor" in v.summary()
    scaling = next(c for c in v.checks if c.name == "scaling alpha/r")
    assert "mol: 2" in scaling.detail and "loud: 8" in scaling.detail
    ads = [read_adapter(p, n) for n, p in _pairs(world, loud=odd["alpha"])]
    assert scalings_differ(ads)[0] == prepare_tensors(ads)[1] is True
    same = [read_adapter(p, n) for n, p in world["adapters"].items()]
    assert scalings_differ(same)[0] == prepare_tensors(same)[1] is False


def test_base_and_encoder_refusals(world, odd, tmp_path):
    v = check_specialists(_pairs(world, prot=world["adapters"]["prot"]), str(odd["noweights"]))
    fail = {c.name: c for c in v.failures}["base model readable"]
    assert "no .safetensors" in fail.detail
    with pytest.raises(ESMError, match="not a directory"):
        base_skeleton(str(tmp_path / "nope"))
    v = check_specialists(_pairs(world, prot=world["adapters"]["prot"]), str(world["base"]),
                          encoders=[("molecule", EncoderSpec("soft_token", str(tmp_path))),
                                    ("cell", EncoderSpec("esm9000")), ("protein", EncoderSpec("text"))])
    fails = {c.name: c.detail for c in v.failures}
    assert set(fails) == {"encoder of molecule", "encoder of cell"}
    assert "lacks encoder_config.json" in fails["encoder of molecule"]
    assert "Unknown encoder type 'esm9000'" in fails["encoder of cell"]


def test_adapter_rows_and_delta_norms(world):
    ad = read_adapter(world["adapters"]["prot"], "prot")
    row = adapter_rows([ad], {"prot": "protein"})[0]
    cfg = json.loads((Path(world["adapters"]["prot"]) / "adapter_config.json").read_text())
    assert row["rank"] == cfg["r"] == 4 and row["alpha"] == cfg["lora_alpha"] == 8
    assert row["scaling"] == "2" and row["modality"] == "protein" and row["blocks"] == 2
    assert row["target_modules"] == ", ".join(ORDER)
    sd = load_file(str(Path(world["adapters"]["prot"]) / "adapter_model.safetensors"))
    assert row["parameters"] == sum(t.numel() for t in sd.values())
    blocks, modules, norms = delta_norm_matrix(ad)
    assert blocks == [0, 1] and [m.rsplit(".", 1)[-1] for m in modules] == ORDER
    a = sd["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"]
    b = sd["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]
    assert norms[1, ORDER.index("up_proj")] == pytest.approx(float(torch.linalg.matrix_norm(2.0 * b @ a)), rel=1e-5)
