"""Loading specialists on one base, reading adapters by (layer, module, A|B), and every refusal.

Each refusal is checked twice: the message names the cause (adapter, module, shapes), and the CLI
leaves no output directory behind.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from esm_core.adapters import LoraKey, parse_peft_key, read_adapter
from esm_core.cli import main as cli
from esm_core.errors import ESMError
from esm_core.models import SpecialistSet
from esm_core.tiny import build_tiny_base, make_lora_adapter


def test_parse_peft_keys():
    k, path = parse_peft_key("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight")
    assert k == LoraKey(3, "self_attn.q_proj", "A") and path == "model.layers.3.self_attn.q_proj"
    k, _ = parse_peft_key("base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight")
    assert k == LoraKey(0, "mlp.down_proj", "B")
    assert parse_peft_key("base_model.model.lm_head.weight") is None
    assert LoraKey.parse(str(k)) == k


def test_one_base_copy_and_switching(world):
    sset = SpecialistSet.load(str(world["base"]), {n: str(p) for n, p in world["adapters"].items()})
    assert sset.names == ["mol", "prot", "cell"] and sset.num_layers == 2
    n_base = sum(p.numel() for n, p in sset.model.named_parameters() if "lora_" not in n)
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(world["base"]))
    assert n_base == sum(p.numel() for p in ref.parameters())  # one copy, not K+1
    x = torch.randint(5, 60, (1, 9))
    outs = {}
    for name in [None, *sset.names]:
        with sset.use(name):
            outs[name] = sset.model(input_ids=x).logits
    assert torch.allclose(outs[None], ref(input_ids=x).logits, atol=1e-5)
    assert all(not torch.allclose(outs[None], outs[n]) for n in sset.names)
    # reading factors by key gives what PEFT holds in the model
    k = LoraKey(1, "mlp.up_proj", "B")
    assert torch.equal(sset.parameters_of("prot")[k].detach(), sset.adapters["prot"].tensors[k])
    rows = sset.describe()
    assert rows[0]["rank"] == 4 and rows[0]["target_modules"] == sorted(
        ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])


# ------------------------------------------------------------------------------------ refusals
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(d, **kv):
    p = Path(d) / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(kv)
    p.write_text(json.dumps(cfg))


def _poison(d):
    p = Path(d) / "adapter_model.safetensors"
    sd = load_file(str(p))
    k = sorted(sd)[3]
    sd[k][0, 0] = float("nan")
    save_file(sd, str(p))
    return k


@pytest.fixture(scope="module")
def bad(world, tmp_path_factory):
    """A set of broken or mismatched adapters, each built from scratch or edited from a good one."""
    d = tmp_path_factory.mktemp("bad")
    good = world["adapters"]["prot"]
    out = {}
    out["ia3"] = _copy(good, d / "ia3")
    _edit_config(out["ia3"], peft_type="IA3")
    out["nan"] = _copy(good, d / "nan")
    out["nan_key"] = _poison(out["nan"])
    out["targets"] = make_lora_adapter(world["base"], d / "targets", seed=9, r=4, targets=("q_proj", "v_proj"))
    out["rank"] = make_lora_adapter(world["base"], d / "rank", seed=9, r=8)
    other = build_tiny_base(d / "other_base", layers=2, hidden=48, intermediate=48, heads=4, kv_heads=2)
    out["size"] = make_lora_adapter(other, d / "size", seed=9, r=4)
    deeper = build_tiny_base(d / "deep_base", layers=3, hidden=32, intermediate=48, heads=4, kv_heads=2)
    out["depth"] = make_lora_adapter(deeper, d / "depth", seed=9, r=4)
    out["pickle"] = _copy(good, d / "pickle")
    (out["pickle"] / "adapter_model.safetensors").rename(out["pickle"] / "adapter_model.bin")
    out["notpeft"] = d / "notpeft"
    out["notpeft"].mkdir()
    (out["notpeft"] / "weights.safetensors").write_bytes(b"")
    out["dora"] = _copy(good, d / "dora")
    _edit_config(out["dora"], use_dora=True)
    out["alpha"] = make_lora_adapter(world["base"], d / "alpha", seed=7, r=4, alpha=32)
    return out


REFUSALS = [  # (bad adapter, words the message must contain)
    ("ia3", ["'bad'", "IA3", "not LoRA"]),
    ("nan", ["'bad'", "NaN"]),
    ("targets", ["'bad'", "different modules", "lacks", "k_proj"]),
    ("rank", ["'bad'", "ranks differ", "(4, 48) vs (8, 48)"]),
    ("size", ["'bad'", "do not fit the base", "lora_B (48, 4)", "48 -> 32"]),
    ("depth", ["'bad'", "block 2", "only 2"]),
    ("pickle", ["'bad'", "adapter_model.bin", "pickle"]),
    ("notpeft", ["'bad'", "not a PEFT adapter directory"]),
    ("dora", ["'bad'", "DoRA"]),
]


@pytest.mark.parametrize("which,words", REFUSALS)
def test_refusal_names_the_cause(world, bad, which, words):
    adapters = [("mol", str(world["adapters"]["mol"])), ("bad", str(bad[which]))]
    with pytest.raises(ESMError) as ei:
        SpecialistSet.load(str(world["base"]), adapters)
    msg = str(ei.value)
    for w in words:
        assert w in msg, (w, msg)
    if which == "nan":
        assert str(parse_peft_key(bad["nan_key"])[0]) in msg


def _write_yaml(path, world, adapters):
    cfg = dict(base=str(world["base"]),
               specialists=[dict(name=n, adapter=str(p), modality=m) for (n, p), m in
                            zip(adapters, ["molecule", "protein"])],
               modalities=[dict(name="molecule", prefix="Molecule: ", kind="smiles",
                                data=dict(path=str(path.parent / "mol.csv"), column="smiles")),
                           dict(name="protein", prefix="Protein: ", kind="protein",
                                data=dict(path=str(path.parent / "prot.csv"), column="seq"))],
               method=dict(probes_per_modality=8, batch_size=4))
    from conftest import MOLECULES, PROTEINS

    (path.parent / "mol.csv").write_text("smiles\n" + "\n".join(MOLECULES) + "\n")
    (path.parent / "prot.csv").write_text("seq\n" + "\n".join(PROTEINS) + "\n")
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("which,words", REFUSALS)
def test_cli_refusal_leaves_no_output(world, bad, which, words, tmp_path, capsys):
    cfg = _write_yaml(tmp_path / "run.yaml", world, [("mol", world["adapters"]["mol"]), ("bad", bad[which])])
    out = tmp_path / "out"
    rc = cli(["merge", "--config", str(cfg), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1  # one line, no traceback
    assert words[1] in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dirs either


def test_differing_alpha_is_folded_into_B(world, bad):
    from esm_core.merging.base import MergeContext

    sset = SpecialistSet.load(str(world["base"]), [("mol", str(world["adapters"]["mol"])), ("alpha", str(bad["alpha"]))])
    ctx = MergeContext.from_specialists(sset)
    assert ctx.folded and ctx.scalings == {"mol": 2.0, "alpha": 8.0}
    k = LoraKey(0, "self_attn.q_proj", "B")
    assert torch.allclose(ctx.tensors["alpha"][k], sset.adapters["alpha"].tensors[k] * 8.0)
    kA = LoraKey(0, "self_attn.q_proj", "A")
    assert torch.equal(ctx.tensors["alpha"][kA], sset.adapters["alpha"].tensors[kA])


def test_read_adapter_rejects_missing_dir(tmp_path):
    with pytest.raises(ESMError, match="does not exist"):
        read_adapter(tmp_path / "nope", "x")
