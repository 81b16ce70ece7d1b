"""LoRA extraction from a full fine-tune (esm_core/importing/extract.py, ``extract-lora``).

Tiny LLaMA checkpoints are built here: a base (one safetensors file), a fine-tune whose change is
exactly rank R on every adapted module (saved in shards + index), and one whose change is full-rank
with a decaying spectrum (plus a changed embedding and norm, which are not extracted).

- exact rank R: the residual is ~0, and the adapter through stock ``PeftModel.from_pretrained`` on
  the base gives the fine-tune's logits;
- full rank: residual, singular-value residual and rank-for-1 % equal numpy.linalg.svd's on the same dW;
- bad inputs, table-driven: exit status 2, one line with the fragment, the inputs unchanged, nothing written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import esm_core.cli as cli
from esm_core.adapters import LoraKey, read_adapter
from esm_core.cli import extract as extract_cli
from esm_core.errors import Cancelled, ESMError
from esm_core.importing.extract import REPORT, extract_lora, extract_to, rank_for
from esm_core.tiny import ALL_TARGETS, build_tiny_base

R = 4


def _blocks(model):
    for i, layer in enumerate(model.model.layers):
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                yield i, name, mod


def _fine_tune(base: Path, out: Path, delta, *, max_shard_size=None, touch_rest: bool = False) -> Path:
    """Save base + delta(shape, generator) on every block linear (optionally also change embedding and norm)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, _, mod in _blocks(model):
            mod.weight += delta(tuple(mod.weight.shape), g)
        if touch_rest:
            model.model.embed_tokens.weight[:5] += 0.01
            model.model.norm.weight.mul_(1.1)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kw)
    return out


def _low_rank(shape, g):
    return (torch.randn(shape[0], R, generator=g) @ torch.randn(R, shape[1], generator=g)) * 0.05


def _decaying(shape, g):
    n = min(shape)
    q1, _ = torch.linalg.qr(torch.randn(shape[0], n, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(shape[1], n, generator=g))
    return (q1 * (0.3 * torch.exp(-torch.arange(n) / 3.0))) @ q2.T


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("extract")
    base = build_tiny_base(d / "base", layers=2, hidden=32, intermediate=48, heads=4, kv_heads=2, seed=0)
    low = _fine_tune(base, d / "ft_low", _low_rank, max_shard_size="20KB")
    full = _fine_tune(base, d / "ft_full", _decaying, touch_rest=True)
    assert (low / "model.safetensors.index.json").is_file() and len(list(low.glob("*.safetensors"))) > 2
    return {"dir": d, "base": base, "low": low, "full": full}


def _run_cli(argv: list[str], monkeypatch) -> int:
    """Through esm_core.cli.main (exit status, one error line), with extract-lora in the command table."""
    if not any(c[0] == "extract-lora" for c in cli.COMMANDS):
        monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, *extract_cli.COMMANDS])
    return cli.main(argv)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------------------------ exact rank R
@pytest.mark.parametrize("method,rank", [("svd", R), ("gram", R), ("svd", R + 2), ("gram", R + 2)])
def test_exact_rank_delta_is_recovered_and_loads_in_stock_peft(ckpts, tmp_path, monkeypatch, capsys, method, rank):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    out = tmp_path / "lora"
    assert _run_cli(["extract-lora", str(ckpts["low"]), "--base", str(ckpts["base"]), "--rank", str(rank),
                     "--out", str(out), "--no-progress", "--method", method], monkeypatch) == 0
    printed = capsys.readouterr().out
    assert "self_attn.q_proj" in printed and "identical in both checkpoints" in printed

    report = json.loads((out / REPORT).read_text())
    assert report["totals"]["modules"] == 2 * 7 and report["totals"]["rel_residual"] < 1e-6
    assert all(m["rel_residual"] < 1e-6 and m["rank_for_1pct"] <= R for m in report["modules"])
    assert report["not_extracted"] == []  # embeddings, norms and LM head are untouched here
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == rank and cfg["lora_alpha"] == rank and cfg["target_modules"] == list(ALL_TARGETS)

    ad = read_adapter(out, "extracted")
    assert ad.file_keys[LoraKey(1, "mlp.down_proj", "A")] == "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    assert ad.tensors[LoraKey(0, "self_attn.k_proj", "B")].shape == (16, rank)

    ids = torch.randint(4, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    ft = LlamaForCausalLM.from_pretrained(str(ckpts["low"])).eval()
    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(ckpts["base"])), str(out)).eval()
    base_logits = _logits(LlamaForCausalLM.from_pretrained(str(ckpts["base"])).eval(), ids)
    want, got = _logits(ft, ids), _logits(peft, ids)
    assert (want - base_logits).abs().max() > 1e-2  # the fine-tune really changes the answer
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_bfloat16_factors_and_fewer_modules(ckpts):
    ext = extract_lora(ckpts["low"], ckpts["base"], R, modules="q_proj, mlp.down_proj", dtype="bfloat16")
    assert {(k.module, k.ab) for k in ext.tensors} == {(m, ab) for m in ("self_attn.q_proj", "mlp.down_proj")
                                                       for ab in "AB"}
    assert all(t.dtype == torch.bfloat16 for t in ext.tensors.values())
    res = [m["rel_residual"] for m in ext.report["modules"]]
    assert max(res) < 1e-2 and min(res) > 1e-5  # bf16 rounding of the saved factors, measured as saved
    assert max(m["rel_residual_svd"] for m in ext.report["modules"]) < 1e-6
    # the other five modules differ but are not extracted: reported
    assert {d["kind"] for d in ext.report["not_extracted"]} == {"block tensor not extracted"}
    assert len(ext.report["not_extracted"]) == 2 * 5


# ------------------------------------------------------------------------------------ full rank vs numpy
@pytest.mark.parametrize("method,precision,tol", [("svd", "auto", 1e-6), ("svd", "float32", 1e-4),
                                                  ("gram", "auto", 1e-6)])
def test_full_rank_residual_matches_numpy_svd(ckpts, method, precision, tol):
    rank = 3
    progress = []
    ext = extract_lora(ckpts["full"], ckpts["base"], rank, precision=precision, method=method,
                       progress=lambda msg, f: progress.append(f))
    assert progress[-1] == 1.0 and progress == sorted(progress)
    ft, base = load_file(str(ckpts["full"] / "model.safetensors")), load_file(str(ckpts["base"] / "model.safetensors"))
    tot_d2 = tot_r2 = 0.0
    for m in ext.report["modules"]:
        name = m["path"] + ".weight"
        dw = ft[name].double().numpy() - base[name].double().numpy()
        u, s, vh = np.linalg.svd(dw, full_matrices=False)
        approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
        want = np.linalg.norm(dw - approx) / np.linalg.norm(dw)
        assert m["rel_residual"] == pytest.approx(want, rel=tol, abs=1e-12), name
        assert m["rel_residual_svd"] == pytest.approx(want, rel=tol), name
        assert m["delta_norm"] == pytest.approx(np.linalg.norm(dw), rel=1e-6)
        k = next(k for k in range(len(s) + 1) if np.sqrt((s[k:] ** 2).sum()) <= 0.01 * np.sqrt((s ** 2).sum()))
        assert m["rank_for_1pct"] == k and 3 < k < len(s), name
        # the written factors are what B @ A gives: singular values in B, orthonormal rows in A
        a = ext.tensors[LoraKey(m["layer"], m["module"], "A")]
        assert a.untyped_storage().nbytes() == a.numel() * 4  # its own storage, not a view of all of V^T
        np.testing.assert_allclose(a.double().numpy() @ a.double().numpy().T, np.eye(rank), atol=1e-5)
        b = ext.tensors[LoraKey(m["layer"], m["module"], "B")].double().numpy()
        np.testing.assert_allclose(np.linalg.norm(b, axis=0), s[:rank], rtol=1e-5)  # singular values in B
        tot_d2 += np.linalg.norm(dw) ** 2
        tot_r2 += np.linalg.norm(dw - approx) ** 2
    assert ext.report["totals"]["rel_residual"] == pytest.approx(np.sqrt(tot_r2 / tot_d2), rel=tol)
    # embedding and final norm changed: not extracted, reported
    diff = {d["name"]: d for d in ext.report["not_extracted"]}
    assert set(diff) == {"model.embed_tokens.weight", "model.norm.weight"}
    assert diff["model.norm.weight"]["rel_delta"] == pytest.approx(0.1, rel=1e-5)


@pytest.mark.parametrize("s,k", [([10.0, 1.0, 0.05, 0.0], 2), ([10.0, 1.0, 0.2], 3), ([0.0, 0.0], 0),
                                 ([1.0], 1), ([1.0, 1.0], 2), ([1.0, 0.01], 1), ([1.0, 0.0101], 2)])
def test_rank_for_1pct(s, k):
    assert rank_for(np.array(s)) == k


def test_report_table_names_what_is_not_extracted(ckpts):
    ext = extract_lora(ckpts["full"], ckpts["base"], 2, modules=["v_proj"])
    table = extract_cli.format_table(ext.report)
    assert "self_attn.v_proj" in table and "NOT extracted but different" in table
    assert "model.embed_tokens.weight" in json.dumps(ext.report["not_extracted"])


def test_cancel_from_progress_writes_nothing(ckpts, tmp_path):
    def cancel(msg, frac):
        if frac > 0.3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        extract_to(tmp_path / "out", ckpts["low"], ckpts["base"], R, progress=cancel)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_cuda_gives_the_cpu_numbers(ckpts):
    cpu = extract_lora(ckpts["full"], ckpts["base"], 3, precision="float32")
    gpu = extract_lora(ckpts["full"], ckpts["base"], 3, precision="float32", device="cuda")
    for a, b in zip(cpu.report["modules"], gpu.report["modules"]):
        assert a["rel_residual"] == pytest.approx(b["rel_residual"], rel=1e-3)
        assert a["rank_for_1pct"] == b["rank_for_1pct"]


# ------------------------------------------------------------------------------------ bad inputs
def _hash_tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def bad(ckpts):
    """Broken variants of the inputs, built once."""
    from transformers import LlamaForCausalLM

    d, base = ckpts["dir"] / "bad", ckpts["base"]
    d.mkdir()
    (d / "pickle").mkdir()
    torch.save(LlamaForCausalLM.from_pretrained(str(base)).state_dict(), d / "pickle" / "pytorch_model.bin")
    build_tiny_base(d / "wide", layers=2, hidden=32, intermediate=64, heads=4, kv_heads=2, seed=0)
    shutil.copytree(ckpts["full"], d / "missing")
    sd = load_file(str(d / "missing" / "model.safetensors"))
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, str(d / "missing" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(ckpts["full"], d / "int8")
    sd = load_file(str(d / "int8" / "model.safetensors"))
    sd["model.layers.0.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"].to(torch.int8)
    save_file(sd, str(d / "int8" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(ckpts["full"], d / "corrupt")
    (d / "corrupt" / "model.safetensors").write_bytes(b"\x00" * 64)
    shutil.copytree(ckpts["low"], d / "noshard")
    next(iter(sorted((d / "noshard").glob("model-*.safetensors")))).unlink()
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_config.json").write_text("{}")
    (d / "done").mkdir()  # an existing output folder of the user's own
    return d


# (name, argv with {ft} {base} {bad} {out} placeholders, fragment)
CASES = [
    ("missing FT folder", "{bad}/nope --base {base} --rank 2 --out {out}", "does not exist"),
    ("missing base folder", "{ft} --base {bad}/nope --rank 2 --out {out}", "does not exist"),
    ("FT is a file", "{ft}/config.json --base {base} --rank 2 --out {out}", "is not a folder"),
    ("pickle-only FT", "{bad}/pickle --base {base} --rank 2 --out {out}", "only pickle weights"),
    ("pickle-only base", "{ft} --base {bad}/pickle --rank 2 --out {out}", "only pickle weights"),
    ("corrupt safetensors", "{bad}/corrupt --base {base} --rank 2 --out {out}", "not a readable safetensors"),
    ("shard missing", "{bad}/noshard --base {base} --rank 2 --out {out}", "is missing"),
    ("LoRA folder as FT", "{bad}/adapter --base {base} --rank 2 --out {out}", "LoRA adapter folder"),
    ("same folder twice", "{ft} --base {ft} --rank 2 --out {out}", "same folder"),
    ("shape mismatch", "{ft} --base {bad}/wide --rank 2 --out {out}", "shape [32, 48]"),
    ("module missing in FT", "{bad}/missing --base {base} --rank 2 --out {out}", "missing in the fine-tuned"),
    ("module missing in base", "{base} --base {bad}/missing --rank 2 --out {out}", "missing in the base"),
    ("unknown module", "{ft} --base {base} --rank 2 --out {out} --modules qproj", "no block module"),
    ("quantized tensor", "{bad}/int8 --base {base} --rank 2 --out {out}", "floating-point"),
    ("rank too large", "{ft} --base {base} --rank 17 --out {out}", "larger than"),
    ("rank zero", "{ft} --base {base} --rank 0 --out {out}", "not a positive integer"),
    ("output inside FT", "{ft} --base {base} --rank 2 --out {ft}/lora", "inside the fine-tuned checkpoint"),
    ("output is the base", "{ft} --base {base} --rank 2 --out {base}", "is the base checkpoint"),
    ("output holds the inputs", "{ft} --base {base} --rank 2 --out {root}", "contains the"),
    ("output exists", "{ft} --base {base} --rank 2 --out {bad}/done --overwrite", "did not write"),
    ("bad device", "{ft} --base {base} --rank 2 --out {out} --device tpu", "is not cpu, cuda or auto"),
    ("bad module name", "{ft} --base {base} --rank 2 --out {out} --modules q_proj,,../x", "does not name"),
]
if not torch.cuda.is_available():
    CASES.append(("no GPU", "{ft} --base {base} --rank 2 --out {out} --device cuda", "no CUDA GPU"))


@pytest.mark.parametrize("name,argv,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(ckpts, bad, tmp_path, monkeypatch, capsys, name, argv, fragment):
    root = ckpts["dir"]
    before = _hash_tree(root)
    out = tmp_path / "out"
    args = argv.format(ft=ckpts["full"], base=ckpts["base"], bad=bad, out=out, root=root).split()
    assert _run_cli(["extract-lora", *args, "--no-progress"], monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0] and "Fix:" in err[0], err
    assert _hash_tree(root) == before and not out.exists() and list(tmp_path.iterdir()) == []


def test_the_python_api_refuses_with_esmerror(ckpts):
    with pytest.raises(ESMError, match="larger than"):
        extract_lora(ckpts["full"], ckpts["base"], 100)
    with pytest.raises(ESMError, match="not a positive integer"):
        extract_lora(ckpts["full"], ckpts["base"], 2.5)
    with pytest.raises(ESMError, match="--method 'qr' is not one of svd, gram"):
        extract_lora(ckpts["full"], ckpts["base"], 2, method="qr")


def test_overwrite_replaces_only_an_output_of_ours(ckpts, tmp_path, monkeypatch):
    out = tmp_path / "lora"
    argv = ["extract-lora", str(ckpts["low"]), "--base", str(ckpts["base"]), "--rank", "2", "--out", str(out),
            "--no-progress", "--modules", "q_proj"]
    assert _run_cli(argv, monkeypatch) == 0
    assert _run_cli(argv, monkeypatch) == 2  # exists
    assert _run_cli([*argv[:5], "3", *argv[6:], "--overwrite"], monkeypatch) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3
