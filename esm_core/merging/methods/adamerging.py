"""Layer-wise AdaMerging (Yang et al., ICLR 2024): merge coefficients learned by entropy minimisation.

Layer-wise AdaMerging learns one coefficient per specialist and layer, lambda^k_l, for

    theta_l = theta_0,l + sum_k lambda^k_l tau^k_l

by minimising the Shannon entropy of the merged model's predictions on unlabelled test inputs,
a surrogate for the loss (the paper's Sec. 3.2). Here theta_0 is the zero adapter and tau^k_l is
specialist k's LoRA factors in block l (see ``_ops``); following the paper's Eq. 1 form, each
factor of block l is sum_k lambda^k_l theta^k_{l,j}, A and B separately.

Prediction entropy: for each prompt (answers ignored: unlabelled), the label log-likelihoods
log p(" " + label | prompt) over the prompt's label set are normalised to a distribution p, and
H = -sum p log p is averaged over a batch (``batch_size`` prompts from each task, when prompts carry
``meta["task"]``). Adam minimises it for ``steps`` steps (paper: lr 1e-3, batch 16 per task,
init 0.3, 500 steps). ``constraint = clamp`` keeps each lambda in [0, 1] (as the authors' code
does); ``softmax`` makes the K coefficients of a layer a convex combination (like ES-Merging's),
starting uniform. Seeded; progress is reported each step; the temporary adapter is removed.
"""

from __future__ import annotations

import torch

from esm_core.merging.base import MergeMethod, MergeOutput, Param, weighted_sum
from esm_core.merging.methods._learn import Batches, Work, label_entropy, prepare, require_prompts, temporary_adapter


def coefficients(raw: torch.Tensor, constraint: str) -> torch.Tensor:
    return torch.softmax(raw, dim=0) if constraint == "softmax" else raw.clamp(0.0, 1.0)


def merged_factors(stacks: dict, lam: torch.Tensor, col: dict) -> dict:
    """Eq. 1 with layer-wise coefficients: factor = sum_k lam[k, layer] * theta^k (differentiable in lam)."""
    out = {}
    for k, st in stacks.items():
        w = lam[:, col[k.layer]]
        out[k] = (w.reshape((-1,) + (1,) * (st.ndim - 1)) * st).sum(0)
    return out


def mean_entropy(ov, factors, items, batch_size: int, tick=None) -> float:
    with torch.no_grad():
        tot = 0.0
        for s in range(0, len(items), batch_size):
            tot += float(label_entropy(ov, factors, items[s:s + batch_size]).sum())
            if tick:
                tick()
    return tot / len(items)


def _run(ctx, params) -> MergeOutput:
    prompts = require_prompts(ctx, "adamerging", answers=False)
    items = prepare(ctx, prompts, answers=False)
    K = len(ctx.names)
    layers = sorted({k.layer for k in ctx.keys})
    col = {l: i for i, l in enumerate(layers)}
    stacks = {k: ctx.stacked(k) for k in ctx.keys}
    if params["constraint"] == "softmax":
        raw = torch.zeros(K, len(layers))
    else:
        raw = torch.full((K, len(layers)), float(params["init"]))
    raw.requires_grad_(True)
    opt = torch.optim.Adam([raw], lr=params["lr"])
    batches = Batches(items, params["batch_size"], ctx.seed)
    steps = params["steps"]
    trace = []
    init = {k: v.detach() for k, v in merged_factors(stacks, coefficients(raw, params["constraint"]), col).items()}
    work = Work(ctx, "AdaMerging", steps, len(items), params["batch_size"])
    with temporary_adapter(ctx, init, "adamerging") as ov, torch.enable_grad():
        before = mean_entropy(ov, init, items, params["batch_size"], tick=work.eval_tick)
        for step in range(steps):
            idx = batches.next()
            lam = coefficients(raw, params["constraint"])
            h = label_entropy(ov, merged_factors(stacks, lam, col), [items[i] for i in idx]).mean()
            opt.zero_grad()
            h.backward()
            opt.step()
            trace.append(h.item())
            work.step(f"batch entropy {h.item():.4f} (initial mean {before:.4f})")
        lam = coefficients(raw, params["constraint"]).detach()
        final = merged_factors(stacks, lam, col)
        after = mean_entropy(ov, final, items, params["batch_size"], tick=work.eval_tick)
    coef = {k: lam[:, col[k.layer]].reshape((K,) + (1,) * (stacks[k].ndim - 1)).expand(stacks[k].shape)
            for k in ctx.keys}
    info = {"entropy_before": before, "entropy_after": after, "entropy_trace": trace, "layers": layers,
            "lambda": lam.tolist(), "n_prompts": len(items), "constraint": params["constraint"]}
    return MergeOutput(weighted_sum(ctx, coef), coefficients=coef, info=info,
                       extra_tensors={"adamerging/lambda": lam.clone()})


METHOD = MergeMethod(
    name="adamerging",
    pretty="AdaMerging (layer-wise)",
    paper="Yang et al. (2024). AdaMerging: Adaptive Model Merging for Multi-Task Learning. ICLR 2024.",
    url="https://arxiv.org/abs/2310.02575",
    params=(
        Param("steps", 100, "Optimisation steps (paper: 500).", kind="int", min=1, max=100000),
        Param("lr", 1e-3, "Adam learning rate (paper: 1e-3).", min=1e-8, max=10.0),
        Param("batch_size", 16, "Prompts per task per step (paper: 16).", kind="int", min=1, max=4096),
        Param("init", 0.3, "Initial lambda of every specialist and layer (paper: 0.3; clamp constraint only).",
              min=0.0, max=1.0),
        Param("constraint", "clamp", "Keep each lambda in [0, 1] (paper), or a softmax over specialists per "
              "layer (convex, like ES-Merging).", kind="choice", choices=("clamp", "softmax")),
    ),
    fn=_run,
    needs=frozenset({"model", "data"}),
    summary="Per-layer coefficients learned by minimising prediction entropy on unlabelled task prompts.",
)
