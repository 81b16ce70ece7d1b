"""Importing published specialists (esm_core/importing, ``python -m esm_core import``, the Specialists page).

Tiny replicas of how the real specialists are published, built from the conftest ``world`` (nothing
downloaded):

- Mol-LLaMA: a full checkpoint whose LoRA sits under ``llm.base_model.model.model.layers.N....lora_A.default``
  next to the LLM's own weights, graph encoders, a LoRA'd Q-Former and a projector ``llm_proj``, with a
  composite config.json (``llm_config``) and a tokenizer that adds ``<mol>`` (vocabulary + 1);
- Prot2Text-V2: a PEFT folder saved by PEFT from a wrapper model (``llama_decoder`` + ``adapter.fc1/fc2`` as
  ``modules_to_save``, alpha = 2r), and the same model's whole state dict pickled as ``.pt``.

An import must load with ``read_adapter`` and with stock ``PeftModel.from_pretrained`` and give the
logits of the adapter it was built from. Bad inputs are refused with one line naming the cause, and
the source is never changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from streamlit.testing.v1 import AppTest
from torch import nn
from transformers import AutoTokenizer, LlamaForCausalLM

from esm_core import cli
from esm_core.adapters import LoraKey, read_adapter
from esm_core.cli import importing as cli_importing
from esm_core.errors import ESMError
from esm_core.importing import check_bases, compare_bases, import_specialist, read_base_facts
from esm_core.tiny import ALL_TARGETS, build_tiny_base, make_lora_adapter

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "assets" / "zoo" / "run.yaml"


# ------------------------------------------------------------------------------------ replicas
def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def mol_llama_state(world) -> dict[str, torch.Tensor]:
    """The state dict of a Mol-LLaMA-shaped model whose LoRA is the world's 'mol' adapter."""
    base = load_file(str(world["base"] / "model.safetensors"))
    lora = load_file(str(world["adapters"]["mol"] / "adapter_model.safetensors"))
    sd = {}
    for k, t in base.items():
        if k.startswith("model.layers.") and k.endswith("_proj.weight"):
            k = k.replace(".weight", ".base_layer.weight")
        elif k in ("model.embed_tokens.weight", "lm_head.weight"):
            t = torch.cat([t, _rand(1, t.shape[1], seed=9)])  # the row of the added <mol> token
        sd["llm.base_model.model." + k] = t
    for k, t in lora.items():
        sd["llm." + k.replace(".weight", ".default.weight")] = t
    sd["encoder.graph_encoder.layers.0.weight"] = _rand(16, 16, seed=1)
    sd["encoder.graph_encoder.layers.0.bias"] = _rand(16, seed=2)
    sd["encoder.qformer.layers.0.attention.query.lora_A.default.weight"] = _rand(2, 16, seed=3)
    sd["encoder.qformer.layers.0.attention.query.lora_B.default.weight"] = _rand(16, 2, seed=4)
    sd["encoder.qformer.query_tokens"] = _rand(1, 4, 16, seed=5)
    sd["llm_proj.weight"] = _rand(32, 16, seed=6)
    sd["llm_proj.bias"] = _rand(32, seed=7)
    return sd


def write_mol_llama(world, d: Path, *, shards: bool = False, sd: dict | None = None) -> Path:
    """A Mol-LLaMA-shaped checkpoint folder: model.safetensors (or 2 shards + index), config.json, tokenizer."""
    d.mkdir(parents=True)
    sd = mol_llama_state(world) if sd is None else sd
    if shards:
        keys = sorted(sd)
        parts = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for f, ks in parts.items():
            save_file({k: sd[k].contiguous() for k in ks}, str(d / f), metadata={"format": "pt"})
        (d / "model.safetensors.index.json").write_text(json.dumps(dict(
            metadata=dict(total_size=sum(t.numel() * 4 for t in sd.values())),
            weight_map={k: f for f, ks in parts.items() for k in ks})))
    else:
        save_file({k: t.contiguous() for k, t in sd.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    llm = json.loads((world["base"] / "config.json").read_text())
    llm["vocab_size"] += 1
    (d / "config.json").write_text(json.dumps(dict(model_type="mol_llama", architectures=["MolLLaMA"],
                                                   llm_config=llm, graph_config=dict(hidden=16))))
    tok = AutoTokenizer.from_pretrained(str(world["base"]))
    tok.add_tokens(["<mol>"], special_tokens=True)
    tok.save_pretrained(str(d))
    return d


class _Projector(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 32)


class _Prot2Text(nn.Module):
    """Prot2Text-V2's shape: a LLaMA decoder and a projector 'adapter' trained in full."""

    def __init__(self, base):
        super().__init__()
        self.llama_decoder = LlamaForCausalLM.from_pretrained(str(base))
        self.adapter = _Projector()


@pytest.fixture(scope="module")
def rep(world, tmp_path_factory):
    """The replicas, and the logits the imported adapters must reproduce."""
    d = tmp_path_factory.mktemp("imports")
    out = {"dir": d, "mol": write_mol_llama(world, d / "src" / "mol_llama"),
           "shards": write_mol_llama(world, d / "src" / "mol_llama_shards", shards=True)}
    torch.manual_seed(0)
    p2t = _Prot2Text(world["base"])
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(ALL_TARGETS),
                     modules_to_save=["adapter.fc1", "adapter.fc2"],
                     init_lora_weights=False, lora_dropout=0.0)
    pm = get_peft_model(p2t, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(str(d / "src" / "prot2text"))
    out["prot2text"] = d / "src" / "prot2text"
    out["pt"] = d / "src" / "prot2text_full.pt"
    torch.save(pm.state_dict(), out["pt"])
    out["ids"] = torch.tensor([[1, 5, 9, 14, 22, 30, 7, 3]])
    with torch.no_grad():
        out["p2t_logits"] = pm.base_model.model.llama_decoder(out["ids"]).logits
    out["fc1"] = pm.base_model.model.adapter.fc1.modules_to_save["default"].weight.detach().clone()
    return out


def peft_logits(base: Path, adapter: Path, ids) -> torch.Tensor:
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(base)), str(adapter))
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def tree_hashes(p: Path) -> dict[str, str]:
    files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture
def run_cli(monkeypatch):
    """``python -m esm_core ...`` in-process, with the import command in the table (added here until
    esm_core/cli/__init__.py lists it)."""
    if not any(c[0] == "import" for c in cli.COMMANDS):
        monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, *cli_importing.COMMANDS])
    return cli.main


# ------------------------------------------------------------------------------------ Mol-LLaMA
def test_mol_llama_checkpoint_imports_into_a_stock_peft_adapter(world, rep, tmp_path):
    out = tmp_path / "mol"
    report = import_specialist(rep["mol"], out, alpha=8, base=world["base"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and not cfg.get("modules_to_save")
    assert sorted(cfg["target_modules"]) == sorted(ALL_TARGETS) and "layers_to_transform" not in cfg
    written = load_file(str(out / "adapter_model.safetensors"))
    original = load_file(str(world["adapters"]["mol"] / "adapter_model.safetensors"))
    assert set(written) == set(original)  # stock keys: base_model.model.model.layers.N.<module>.lora_A.weight
    assert all(torch.equal(written[k], original[k]) for k in original)
    ad = read_adapter(out, "mol")
    assert ad.rank == 4 and ad.alpha == 8 and len(ad.tensors) == 28
    # stock PEFT on the base gives the logits of the adapter the checkpoint was built from
    ids = rep["ids"]
    mine = peft_logits(world["base"], out, ids)
    assert torch.equal(mine, peft_logits(world["base"], world["adapters"]["mol"], ids))
    assert not torch.allclose(mine, LlamaForCausalLM.from_pretrained(str(world["base"]))(ids).logits.detach())
    # the encoders, the Q-Former's LoRA and the projector are kept apart; the LLM's own weights left out
    extra = load_file(str(out / "extra_weights.safetensors"))
    src = mol_llama_state(world)
    kept = {"encoder.graph_encoder.layers.0.weight", "encoder.graph_encoder.layers.0.bias",
            "encoder.qformer.query_tokens",
            "encoder.qformer.layers.0.attention.query.lora_A.default.weight",
            "encoder.qformer.layers.0.attention.query.lora_B.default.weight", "llm_proj.weight", "llm_proj.bias"}
    assert set(extra) == kept and all(torch.equal(extra[k], src[k]) for k in kept)
    on_disk = json.loads((out / "import_report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert report["source_format"] == "checkpoint" and report["found"]["tensors"] == len(src)
    assert report["found"]["lora_factors"] == 28 and report["found"]["blocks"] == [0, 1]
    assert report["found"]["block_list"] == "llm.base_model.model.model.layers"
    assert report["converted"]["count"] == 28
    ex = report["converted"]["examples"][0]
    assert ex["source"].startswith("llm.base_model.model.model.layers.0.") and ".lora_A.default.weight" in ex["source"]
    assert ex["written"] == ex["source"].replace("llm.", "", 1).replace(".default", "")
    groups = report["kept"]["groups"]
    assert report["kept"]["file"] == "extra_weights.safetensors" and report["kept"]["count"] == 7
    assert groups["component: encoder"]["count"] == 3 and groups["component: llm_proj"]["count"] == 2
    assert groups["LoRA outside the language model's blocks: encoder.qformer.layers"]["count"] == 2
    left = report["left_out"]["groups"]
    n_base = len(load_file(str(world["base"] / "model.safetensors")))
    assert report["left_out"]["count"] == n_base
    assert list(left) == ["language-model weights (the base's own, inside the checkpoint)"]
    lo = report["lora"]
    assert (lo["r"], lo["lora_alpha"], lo["scaling"]) == (4, 8.0, 2.0)
    assert lo["rank_source"].startswith("inferred") and lo["alpha_source"] == "--alpha"
    # the base verdict: one more token (<mol>) is a note, not a refusal
    assert report["compat"]["ok"] and report["source_base"]["model_type"] == "llama"
    notes = " ".join(report["notes"])
    v = read_base_facts(world["base"]).vocab_size
    assert f"vocabulary {v + 1} vs {v}" in notes and "<mol>" in notes and "not the embeddings" in notes


def test_shards_with_index_rank_inferred_and_a_wrong_rank_refused(world, rep, tmp_path):
    r = import_specialist(rep["shards"], tmp_path / "a", alpha=8)
    assert r["source_files"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert r["lora"]["r"] == 4 and r["lora"]["rank_source"].startswith("inferred")
    assert r["found"]["tensors"] == len(mol_llama_state(world))
    r = import_specialist(rep["shards"], tmp_path / "b", alpha=8, rank=4, fmt="checkpoint")
    assert r["lora"]["rank_source"].startswith("--rank")
    a, b = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ESMError) as ei:
        import_specialist(rep["shards"], tmp_path / "c", alpha=8, rank=8)
    assert "--rank 8 disagrees with the LoRA factors" in str(ei.value) and "has rank 4" in str(ei.value)
    assert "pass --rank 4" in ei.value.fix
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------ Prot2Text-V2
def test_peft_folder_with_modules_to_save(world, rep, tmp_path):
    out = tmp_path / "prot"
    report = import_specialist(rep["prot2text"], out)  # r and alpha from its adapter_config.json
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] is None and (cfg["r"], cfg["lora_alpha"]) == (4, 8)
    extra = load_file(str(out / "extra_weights.safetensors"))
    assert set(extra) == {f"base_model.model.adapter.{m}.{p}" for m in ("fc1", "fc2") for p in ("weight", "bias")}
    assert torch.equal(extra["base_model.model.adapter.fc1.weight"], rep["fc1"])
    groups = report["kept"]["groups"]
    assert groups["modules_to_save: adapter.fc1"]["count"] == 2 and groups["modules_to_save: adapter.fc2"]["count"] == 2
    assert any("vLLM refuses adapters that carry them" in n for n in report["notes"])
    assert report["found"]["block_list"] == "base_model.model.llama_decoder.model.layers"
    assert report["lora"]["alpha_source"] == "adapter_config.json" and report["lora"]["scaling"] == 2.0
    read_adapter(out, "prot")  # read_adapter refuses modules_to_save: the import has none
    assert torch.allclose(peft_logits(world["base"], out, rep["ids"]), rep["p2t_logits"], atol=1e-6)


def test_pickle_refused_without_the_flag_and_read_weights_only_with_it(world, rep, tmp_path, monkeypatch):
    with pytest.raises(ESMError) as ei:
        import_specialist(rep["pt"], tmp_path / "p", alpha=8)
    assert "pickle" in str(ei.value) and "--allow-pickle" in ei.value.fix and not (tmp_path / "p").exists()
    calls = []
    real = torch.load

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    report = import_specialist(rep["pt"], tmp_path / "p", alpha=8, allow_pickle=True)
    assert calls and all(kw.get("weights_only") is True and kw.get("map_location") == "cpu" for kw in calls)
    assert report["pickle"].startswith("read with torch.load") and report["source_format"] == "pickle"
    assert sorted(p.name for p in (tmp_path / "p").iterdir() if not p.name.startswith(".")) == [
        "adapter_config.json", "adapter_model.safetensors", "extra_weights.safetensors", "import_report.json"]
    # the whole training state dict: base_layer and original_module copies are left out, modules_to_save kept
    left = report["left_out"]["groups"]
    assert left["original copies of modules_to_save (base weights)"]["count"] == 4
    assert report["kept"]["groups"]["modules_to_save: adapter.fc1"]["count"] == 2
    assert torch.allclose(peft_logits(world["base"], tmp_path / "p", rep["ids"]), rep["p2t_logits"], atol=1e-6)


def test_cli_import(world, rep, tmp_path, run_cli, capsys):
    rc = run_cli(["import", str(rep["mol"]), "--out", str(tmp_path / "m"), "--alpha", "8",
                  "--base", str(world["base"])])
    out = capsys.readouterr().out
    assert rc == 0 and "- LoRA factors converted: 28; 14 modules in 2 blocks" in out and "scaling=2" in out
    assert "imported adapter written to" in out and (tmp_path / "m" / "adapter_model.safetensors").is_file()
    rc = run_cli(["import", str(rep["mol"]), "--out", str(tmp_path / "m"), "--alpha", "8"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "already exists" in err
    rc = run_cli(["import", str(rep["mol"]), "--out", str(tmp_path / "m"), "--alpha", "8", "--overwrite"])
    assert rc == 0


# ------------------------------------------------------------------------------------ base compatibility
def _llama8b(**over) -> dict:
    cfg = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, head_dim=128)
    return {**cfg, **over}


def _config_dir(d: Path, cfg: dict) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_compat_verdicts_from_configs_only(tmp_path):
    base = _config_dir(tmp_path / "llama", _llama8b())
    mol = _config_dir(tmp_path / "mol", dict(model_type="mol_llama", llm_config=_llama8b(vocab_size=128257)))
    (mol / "added_tokens.json").write_text(json.dumps({"<mol>": 128256}))
    qwen = _config_dir(tmp_path / "qwen", dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28,
                                                num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
                                                vocab_size=152064))
    llama2 = _config_dir(tmp_path / "llama2", _llama8b(vocab_size=32000, num_key_value_heads=32,
                                                       intermediate_size=11008))
    vs = {v.name: v for v in check_bases(base, {"mol": mol, "cell": qwen, "old": llama2})}
    assert vs["mol"].ok and "vocabulary 128257 vs 128256" in vs["mol"].notes[0] and "(<mol>)" in vs["mol"].notes[0]
    assert vs["mol"].facts.where == "config.json -> llm_config"
    assert not vs["cell"].ok and vs["cell"].reasons[0] == "model_type qwen2 vs llama"
    assert "blocks 28 vs 32" in vs["cell"].summary()
    assert not vs["old"].ok and "KV heads 32 vs 8" in vs["old"].reasons and "vocabulary 32000 vs 128256" in \
        vs["old"].summary()
    with pytest.raises(ESMError, match="model_type qwen2 vs llama"):
        vs["cell"].raise_if_refused(str(base))
    same = compare_bases(read_base_facts(base), read_base_facts(base), "same")
    assert same.ok and not same.notes


def test_compat_of_adapter_folders_by_shapes(world, rep, tmp_path):
    other = build_tiny_base(tmp_path / "wide", layers=3, hidden=48, intermediate=48, heads=4, kv_heads=2)
    wide = make_lora_adapter(other, tmp_path / "wide_ad", seed=1, r=4)
    vs = check_bases(world["base"], {"mol": world["adapters"]["mol"], "wide": wide})
    assert vs[0].ok and "shapes of its LoRA factors only" in vs[0].notes[0]
    assert not vs[1].ok and "block 2" in vs[1].reasons[0] and "down_proj maps 48 -> 32" in vs[1].summary()
    # an imported folder answers with what its report recorded of the source's base (else its shapes)
    import_specialist(world["adapters"]["mol"], tmp_path / "from_peft")
    import_specialist(rep["mol"], tmp_path / "from_ckpt", alpha=8)
    vs = check_bases(world["base"], {"a": tmp_path / "from_peft", "b": tmp_path / "from_ckpt"})
    assert vs[0].ok and "shapes of its LoRA factors only" in vs[0].notes[0]
    assert vs[1].ok and vs[1].facts.where == "config.json -> llm_config" and "the specialist added 1 token(s) (<mol>)" \
        in vs[1].notes[0]


# ------------------------------------------------------------------------------------ bad inputs
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    return dst


def _edit_state(world, d: Path, edit) -> Path:
    sd = mol_llama_state(world)
    edit(sd)
    return write_mol_llama(world, d, sd=sd)


def _nan(sd):
    k = next(k for k in sorted(sd) if "layers.1.mlp.up_proj.lora_B" in k)
    sd[k] = sd[k].clone()
    sd[k][0, 0] = float("nan")


def _rank_mismatch(sd):
    k = next(k for k in sorted(sd) if "llm." in k and "layers.0.self_attn.v_proj.lora_B" in k)
    sd[k] = sd[k][:, :3].contiguous()


def _no_lora(sd):
    for k in [k for k in sd if ".lora_" in k]:
        del sd[k]


def _drop_b(sd):
    del sd[next(k for k in sorted(sd) if "llm." in k and "layers.0.mlp.down_proj.lora_B" in k)]


def _dora(sd):
    sd["llm.base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight"] = torch.ones(32)


class _Evil:
    def __reduce__(self):
        return (print, ("this would run",))


def _pickled_code(world, d, rep):
    d.mkdir()
    torch.save({"state_dict": {"x": torch.ones(1)}, "hook": _Evil()}, d / "model.pt")
    return d / "model.pt"


def _qwen_source(world, d, rep):
    src = write_mol_llama(world, d)
    cfg = json.loads((src / "config.json").read_text())
    cfg["llm_config"]["model_type"] = "qwen2"
    (src / "config.json").write_text(json.dumps(cfg))
    return src


def _missing_shard(world, d, rep):
    src = _copy(rep["shards"], d)
    (src / "model-00002-of-00002.safetensors").unlink()
    return src


def _broken(world, d, rep):
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return d


def _ia3(world, d, rep):
    src = _copy(world["adapters"]["cell"], d)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    return src


def _wide(world, d, rep):
    other = build_tiny_base(d.parent / f"{d.name}_base", layers=2, hidden=48, intermediate=48, heads=4, kv_heads=2)
    return make_lora_adapter(other, d, seed=1, r=4)


def _existing_out(world, d, rep):
    (d.parent / "out").mkdir()
    return _copy(world["adapters"]["cell"], d)


_OUT = "{tmp}/out"
BAD = [  # (id, source builder, extra arguments, --out, words the one-line error must hold)
    ("missing folder", lambda w, d, r: d / "nope", [], _OUT, ["does not exist"]),
    ("no LoRA tensors", lambda w, d, r: _edit_state(w, d, _no_lora), ["--alpha", "8"], _OUT,
     ["holds no LoRA tensors", "full fine-tune"]),
    ("mismatched A/B", lambda w, d, r: _edit_state(w, d, _rank_mismatch), ["--alpha", "8"], _OUT,
     ["layers.0.self_attn.v_proj", "disagree on the rank (4 vs 3)"]),
    ("lora_B missing", lambda w, d, r: _edit_state(w, d, _drop_b), ["--alpha", "8"], _OUT,
     ["layers.0.mlp.down_proj", "no lora_B"]),
    ("NaN", lambda w, d, r: _edit_state(w, d, _nan), ["--alpha", "8"], _OUT, ["layers.1.mlp.up_proj.lora_B", "NaN"]),
    ("DoRA", lambda w, d, r: _edit_state(w, d, _dora), ["--alpha", "8"], _OUT, ["DoRA"]),
    ("output inside the source", lambda w, d, r: _copy(r["mol"], d), ["--alpha", "8"], "{src}/imported",
     ["lies inside the source"]),
    ("output is the source", lambda w, d, r: _copy(r["mol"], d), ["--alpha", "8", "--overwrite"], "{src}",
     ["is the source"]),
    ("output exists", _existing_out, [], _OUT, ["already exists", "--overwrite"]),
    ("no alpha", lambda w, d, r: _copy(r["mol"], d), [], _OUT, ["no adapter_config.json says lora_alpha", "--alpha"]),
    ("alpha disagrees", lambda w, d, r: _copy(w["adapters"]["cell"], d), ["--alpha", "16"], _OUT,
     ["--alpha 16 disagrees", "lora_alpha=8"]),
    ("bad rank", lambda w, d, r: _copy(w["adapters"]["cell"], d), ["--rank", "0"], _OUT,
     ["--rank 0 is not a positive"]),
    ("pickle without the flag", lambda w, d, r: _copy(r["pt"], d.with_suffix(".pt")), ["--alpha", "8"], _OUT,
     ["pickle", "--allow-pickle", "weights_only=True"]),
    ("pickle holding code", _pickled_code, ["--allow-pickle"], _OUT, ["objects other than tensors", "weights_only"]),
    ("missing shard", _missing_shard, ["--alpha", "8"], _OUT, ["model-00002-of-00002.safetensors", "is missing"]),
    ("unreadable safetensors", _broken, ["--alpha", "8"], _OUT, ["not a readable safetensors file"]),
    ("not a PEFT folder", lambda w, d, r: _copy(r["mol"], d), ["--format", "peft"], _OUT,
     ["not a PEFT adapter folder", "--format checkpoint"]),
    ("IA3 adapter", _ia3, [], _OUT, ["IA3", "not LoRA"]),
    ("another base (qwen2)", _qwen_source, ["--alpha", "8", "--base", "{base}"], _OUT, ["model_type qwen2 vs llama"]),
    ("shapes do not fit the base", _wide, ["--base", "{base}"], _OUT,
     ["does not fit the base", "down_proj maps 48 -> 32"]),
    ("base without config", lambda w, d, r: _copy(w["adapters"]["cell"], d), ["--base", "{tmp}"], _OUT,
     ["has no config.json"]),
]


@pytest.mark.parametrize("case,build,args,out,words", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_are_refused_in_one_line_and_the_source_is_unchanged(world, rep, tmp_path, run_cli, capsys, case,
                                                                         build, args, out, words):
    src = build(world, tmp_path / "src", rep)
    before = tree_hashes(src) if src.exists() else {}
    fill = dict(tmp=tmp_path, src=src, base=world["base"])
    out_path = Path(out.format(**fill))
    existed = out_path.exists()
    rc = run_cli(["import", str(src), "--out", str(out_path), *[a.format(**fill) for a in args]])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    for w in words:
        assert w in err, (w, err)
    assert (tree_hashes(src) if src.exists() else {}) == before  # nothing in the source changed
    if not existed:
        assert not out_path.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.esm-tmp")]


# ------------------------------------------------------------------------------------ the app
@pytest.fixture
def at(monkeypatch, world, rep, app_run_yaml, tmp_path):
    monkeypatch.setenv("ESM_ALLOWED_ROOTS", os.pathsep.join([str(app_run_yaml.parent), str(world["dir"]),
                                                             str(rep["dir"]), str(tmp_path / "ok")]))
    if app_run_yaml == ZOO:
        monkeypatch.delenv("ESM_DEMO_SPEC", raising=False)
    else:
        monkeypatch.setenv("ESM_DEMO_SPEC", str(app_run_yaml))
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    app.run()
    app.switch_page("pages/specialists.py")
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def _press_import(at):
    at.button(key="imp_go").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]


def test_app_import_expander(at, world, rep, tmp_path):
    assert at.checkbox(key="imp_pickle").value is False  # pickles stay off unless ticked
    at.text_input(key="imp_src").set_value(str(rep["pt"]))
    at.text_input(key="imp_out").set_value(str(tmp_path / "ok" / "prot"))
    at.number_input(key="imp_alpha").set_value(8.0)
    _press_import(at)
    err = "\n".join(e.value for e in at.error)
    assert "pickle" in err and "allow pickle" in err and not (tmp_path / "ok" / "prot").exists()
    at.checkbox(key="imp_pickle").check()
    at.text_input(key="imp_base").set_value(str(world["base"]))
    _press_import(at)
    assert not at.error, [e.value for e in at.error]
    assert any("Imported 28 LoRA factors" in s.value and "r=4, alpha=8" in s.value for s in at.success)
    table = next(d.value for d in at.dataframe if "what" in d.value.columns)
    assert "kept: modules_to_save: adapter.fc1" in table["what"].tolist()
    assert "left out: original copies of modules_to_save (base weights)" in table["what"].tolist()
    assert read_adapter(tmp_path / "ok" / "prot", "prot").rank == 4
    # a path outside the allowed roots is refused before anything is read
    at.text_input(key="imp_src").set_value(str(world["adapters"]["mol"]))
    at.text_input(key="imp_out").set_value(str(tmp_path / "elsewhere"))
    _press_import(at)
    err = "\n".join(e.value for e in at.error)
    assert "Import output" in err and "is outside the directories this workbench may read" in err
    assert not (tmp_path / "elsewhere").exists()
    assert LoraKey(0, "self_attn.q_proj", "A") in read_adapter(tmp_path / "ok" / "prot", "prot").tensors
