"""merge_space=delta (esm_core/merging/space.py): every method on the updates s*B*A, re-factorised by SVD.

Oracles: stock PEFT (``get_delta_weight`` of each specialist and of the merged adapter loaded with
``PeftModel.from_pretrained``; PEFT's own ``svd`` combination of ``add_weighted_adapter``) and a
numpy SVD of the target update.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esm_core.adapters import LoraKey
from esm_core.merging import space
from esm_core.merging.base import MergeContext
from esm_core.merging.registry import get_method, list_methods

STATIC = {"average": {}, "task_arithmetic": {"weights": "0.5,1.0,2.0"}, "ties": {"density": 0.5},
          "dare_linear": {"drop_rate": 0.5}, "dare_ties": {"drop_rate": 0.5}, "emr": {}, "pcb": {"drop_ratio": 0.2},
          "consensus": {}}


@pytest.fixture(scope="module")
def sset(world):
    from esm_core.models import SpecialistSet

    return SpecialistSet.load(str(world["base"]), {n: str(p) for n, p in world["adapters"].items()},
                              device="cpu", dtype="float32")


def peft_deltas(sset) -> dict[str, dict[LoraKey, torch.Tensor]]:
    """Each specialist's update per module, from stock PEFT's LoRA layers."""
    out = {}
    for n in sset.names:
        out[n] = {}
        for l, blk in enumerate(sset.blocks):
            for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                out[n][LoraKey(l, m, "W")] = blk.get_submodule(m).get_delta_weight(n).detach().float()
    return out


def truncated(d: torch.Tensor, rank: int) -> tuple[np.ndarray, float]:
    """numpy: the best rank-``rank`` approximation of d and its relative residual."""
    x = d.double().numpy()
    u, s, vh = np.linalg.svd(x, full_matrices=False)
    approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
    n = np.linalg.norm(x)
    return approx, (float(np.linalg.norm(x - approx) / n) if n > 0 else 0.0)


def test_the_coefficient_rule_keeps_a_module_constant_lambda_and_convexity():
    shapes = {LoraKey(0, "q", "A"): (2, 5), LoraKey(0, "q", "B"): (3, 2)}
    const = {k: torch.tensor([0.2, 0.3, 0.5]) for k in shapes}
    torch.testing.assert_close(space.delta_coefficients(const, shapes)[LoraKey(0, "q", "W")],
                               torch.tensor([0.2, 0.3, 0.5]).view(3, 1, 1).expand(3, 3, 5))
    g = torch.Generator().manual_seed(0)
    es = {k: torch.softmax(torch.randn(3, *s, generator=g), 0) for k, s in shapes.items()}
    lam = space.delta_coefficients(es, shapes)[LoraKey(0, "q", "W")]
    torch.testing.assert_close(lam.sum(0), torch.ones(3, 5))
    # by hand, one entry: geometric mean of B's row mean and A's column mean, then normalised over k
    raw = torch.stack([(es[LoraKey(0, "q", "B")][k, 1].mean() * es[LoraKey(0, "q", "A")][k, :, 4].mean()).sqrt()
                       for k in range(3)])
    torch.testing.assert_close(lam[:, 1, 4], raw / raw.sum())
    signs = {LoraKey(0, "q", "A"): torch.tensor([1.0, -1.0]), LoraKey(0, "q", "B"): torch.tensor([-1.0, -1.0])}
    mixed = space.delta_coefficients(signs, shapes)[LoraKey(0, "q", "W")]
    assert torch.equal(mixed[0], torch.zeros(3, 5)) and torch.equal(mixed[1], -torch.ones(3, 5))


def test_delta_task_arithmetic_equals_peft_svd_combination(sset):
    """PEFT's add_weighted_adapter(combination_type="svd") is the same construction: sum_k w_k dW_k, SVD."""
    w = [0.5, 1.0, 2.0]
    for rank in (12, 3):  # the sum of the three rank-4 inputs (exact), and a truncation
        name = f"peft_svd_{rank}"
        sset.model.add_weighted_adapter(sset.names, w, name, combination_type="svd", svd_rank=rank)
        ctx = MergeContext.from_specialists(sset, space="delta", delta_rank=rank)
        out = get_method("task_arithmetic").run(ctx, {"weights": ",".join(map(str, w)), "scaling": 1.0})
        assert out.rank == rank and out.scaling_one
        for k in [k for k in ctx.keys if k.ab == "A"]:
            mod = sset.blocks[k.layer].get_submodule(k.module)
            ours = out.tensors[LoraKey(k.layer, k.module, "B")] @ out.tensors[k]
            torch.testing.assert_close(ours, mod.get_delta_weight(name).detach(), atol=2e-6, rtol=1e-4)
        sset.model.delete_adapter(name)


@pytest.mark.parametrize("method", sorted(STATIC))
def test_every_static_method_in_delta_space_loads_in_peft_and_matches_the_refactorised_target(
        sset, world, tmp_path, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from esm_core.merging.output import write_merged

    ctx = MergeContext.from_specialists(sset, seed=3, space="delta", delta_rank=6)
    out = get_method(method).run(ctx, STATIC[method])
    # the target: the same method on the updates read from stock PEFT
    dctx = MergeContext(names=list(sset.names), tensors=peft_deltas(sset), sset=sset, seed=3)  # the same draw order
    target = get_method(method).fn(dctx, get_method(method).resolve_params(STATIC[method])).tensors
    path = write_merged(tmp_path / method, out, sset, ctx=ctx)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(world["base"])), str(path))
    residuals = out.extra_tensors["delta_residual"].tolist()
    for i, (k, d) in enumerate(sorted(target.items(), key=lambda kv: (kv[0].layer, kv[0].module))):
        approx, resid = truncated(d, 6)
        loaded = model.base_model.model.model.layers[k.layer].get_submodule(k.module).get_delta_weight("default")
        np.testing.assert_allclose(loaded.detach().double().numpy(), approx, atol=3e-6, rtol=1e-4)
        assert residuals[i] == pytest.approx(resid, abs=1e-5)
    assert out.info["space"] == "delta" and out.info["rank"] == 6


def test_es_layer_mode_in_delta_space_is_the_alpha_weighted_sum_of_updates(sset, workspace):
    from esm_core.pipeline import estimate

    res = estimate(workspace)
    ctx = MergeContext.from_specialists(workspace.sset, es_result=res, space="delta")
    out = get_method("es").run(ctx, {"mode": "layer"})
    dW = peft_deltas(sset)  # the same adapters, read by stock PEFT
    assert out.rank == 12 and out.info["residual_max"] < 1e-5
    for k in dW[sset.names[0]]:
        want = sum(float(res.layer.alpha[i, k.layer]) * dW[n][k] for i, n in enumerate(sset.names))
        got = out.tensors[LoraKey(k.layer, k.module, "B")] @ out.tensors[LoraKey(k.layer, k.module, "A")]
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-4)
    combined = get_method("es").run(ctx, {"mode": "combined"})
    lam = combined.extra_tensors[f"delta_lambda/{LoraKey(0, 'self_attn.q_proj', 'W')}"]
    torch.testing.assert_close(lam.sum(0), torch.ones(lam.shape[1:]))


def test_learned_methods_take_the_delta_space_too(workspace):
    from test_methods import _clean, synthetic_prompts

    prompts = synthetic_prompts(4)
    for name, params in (("adamerging", {"steps": 2, "batch_size": 2}), ("finetune", {"steps": 2, "batch_size": 2})):
        ctx = MergeContext.from_specialists(workspace.sset, workspace=workspace, data=prompts, seed=1, space="delta")
        out = get_method(name).run(ctx, params)
        assert out.info["space"] == "delta" and out.rank == 12 and all(torch.isfinite(v).all() for v in out.tensors.values())
        _clean(workspace.sset)
    lam_ctx = MergeContext.from_specialists(workspace.sset, workspace=workspace, data=prompts, seed=1)
    f = get_method("adamerging").run(lam_ctx, {"steps": 2, "batch_size": 2})
    _clean(workspace.sset)
    # layer-wise learned weights carry over unchanged (the rule keeps a module-constant lambda)
    assert f.coefficients is not None


def test_update_shares_show_what_eq1_on_factors_does(sset):
    ctx = MergeContext.from_specialists(sset)
    fac = get_method("average").run(ctx, {})
    delta = get_method("average").run(MergeContext.from_specialists(sset, space="delta"), {})
    s = ctx.scaling(sset.names[0], 0, "self_attn.q_proj")
    rows_f = space.update_shares(fac.tensors, ctx.tensors, ctx.scaling, merged_scale=s)
    rows_d = space.update_shares(delta.tensors, ctx.tensors, ctx.scaling)
    for r in rows_d:  # an average of updates keeps a third of each and adds nothing else
        assert r["cross energy"] < 1e-8
        assert all(r[f"share {n}"] == pytest.approx(1 / 3, abs=1e-5) for n in sset.names)
    assert np.mean([r["cross energy"] for r in rows_f]) > 0.3  # Eq. 1 on factors: mostly cross terms B_j A_k
    shares = [r[f"share {n}"] for r in rows_f for n in sset.names]
    assert np.mean(shares) == pytest.approx(1 / 9, abs=0.04)  # about lambda^2 = 1/K^2, not 1/K
    # the factor-form arithmetic equals a plain least squares on the full updates (numpy)
    dW = peft_deltas(sset)
    for r in rows_f[:4]:
        k = LoraKey(r["layer"], r["module"], "W")
        X = np.stack([dW[n][k].double().numpy().ravel() for n in sset.names], 1)
        y = (s * fac.tensors[LoraKey(k.layer, k.module, "B")] @ fac.tensors[LoraKey(k.layer, k.module, "A")])
        y = y.double().numpy().ravel()
        c, *_ = np.linalg.lstsq(X, y, rcond=None)
        np.testing.assert_allclose([r[f"share {n}"] for n in sset.names], c, rtol=1e-5, atol=1e-8)
        assert r["cross energy"] == pytest.approx(float(((y - X @ c) ** 2).sum() / (y @ y)), rel=1e-4)


def test_every_method_name_is_covered():
    assert set(STATIC) | {"es", "adamerging", "finetune", "ls_merge"} == {m.name for m in list_methods()}


def test_ls_merge_in_delta_space_loads_in_peft(sset, world, tmp_path):
    """LS-Merge trains a VAE on the updates: its merge is checked for shape, rank and loading (the VAE's
    training is not an exact function to compare with an oracle)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from esm_core.merging.output import write_merged

    ctx = MergeContext.from_specialists(sset, seed=3, space="delta", delta_rank=6)
    out = get_method("ls_merge").run(ctx, {"steps": 20})
    assert out.rank == 6 and out.info["space"] == "delta" and "reconstruction_error" in out.info
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(world["base"])),
                              str(write_merged(tmp_path / "ls", out, sset, ctx=ctx)))


def test_an_unknown_space_is_refused():
    from esm_core.errors import ESMError

    ctx = MergeContext(names=["a"], tensors={"a": {LoraKey(0, "q", "A"): torch.ones(1, 2),
                                                   LoraKey(0, "q", "B"): torch.ones(2, 1)}}, space="weights")
    with pytest.raises(ESMError, match="Merge space 'weights'"):
        get_method("average").run(ctx, {})


def test_the_cli_merges_in_delta_space_and_reports_what_each_update_keeps(world, tmp_path):
    import json

    from conftest import write_run_yaml

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from esm_core.cli import main as cli

    run_yaml = write_run_yaml(tmp_path, world)
    out = tmp_path / "ties_delta"
    assert cli(["merge", "--config", str(run_yaml), "--out", str(out), "--method", "ties", "--param", "density=0.5",
                "--set", "merge_space=delta", "--set", "delta_rank=8", "--no-progress"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 8
    man = json.loads((out / "manifest.json").read_text())
    assert man["updates"]["space"] == "delta" and len(man["updates"]["modules"]) == 14
    assert set(man["updates"]["summary"]) == {"share mol", "share prot", "share cell", "cross energy"}
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(world["base"])), str(out))
