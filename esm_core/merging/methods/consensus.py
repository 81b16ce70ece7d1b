"""Consensus Merging with TALL masks (Wang et al., ICML 2024): drop selfish and catastrophic weights.

For each factor (A and B separately; a LoRA factor is its own task vector, see ``_ops``):

    tau_MTL = sum_k tau^k                                   (multi-task vector)
    m^k     = [ |tau^k| >= tall_lambda * |tau_MTL - tau^k| ]  (TALL mask of task k: the entries
                                                              where task k matters more than the rest)
    m_cons  = [ sum_k m^k >= min_agreement ]                (consensus mask; default 2)

Entries that no task needs ("catastrophic", count 0) and entries only one task needs ("selfish",
count 1) are removed from the merged vector: theta = m_cons * merge(tau^1..tau^K), where merge is
Task Arithmetic (scaling * sum_k w_k tau^k; "Consensus TA") or TIES ("Consensus TIES"). The paper
tunes tall_lambda per task in {0.2, ..., 0.6}; here one value serves all specialists.
The TALL masks and the consensus mask are saved (``consensus/tall/<specialist>/<factor>``,
``consensus/mask/<factor>``). As Eq. 1 coefficients: lambda = m_cons * lambda_base.
"""

from __future__ import annotations

import torch

from esm_core.errors import ESMError
from esm_core.merging.base import MergeMethod, MergeOutput, Param, weighted_sum
from esm_core.merging.methods._ops import parse_weights, trim_masks
from esm_core.merging.methods.task_arithmetic import task_arithmetic_lambda
from esm_core.merging.methods.ties import ties_lambda


def tall_masks(stack: torch.Tensor, tall_lambda: float) -> torch.Tensor:
    """[K, *shape] TALL masks from a [K, *shape] stack of task vectors."""
    mtl = stack.sum(0, keepdim=True)
    return stack.abs() >= tall_lambda * (mtl - stack).abs()


def _run(ctx, params) -> MergeOutput:
    K = len(ctx.names)
    kmin = params["min_agreement"]
    if kmin > K:
        raise ESMError(f"Consensus parameter min_agreement={kmin} exceeds the number of specialists ({K}).",
                       fix=f"use a value from 0 to {K} (the paper uses 2).")
    if params["base"] == "task_arithmetic":
        base, _ = task_arithmetic_lambda(ctx, params["scaling"], params["weights"])
    else:
        w = parse_weights(params["weights"], ctx.names)
        keep = {k: m.float() for k, m in trim_masks(ctx, params["density"]).items()}
        base, _ = ties_lambda(ctx, keep=keep, weights=w, scaling=params["scaling"])
    lam, extra = {}, {}
    counts = torch.zeros(K + 1, dtype=torch.long)
    for k in ctx.keys:
        tall = tall_masks(ctx.stacked(k), params["tall_lambda"])
        c = tall.sum(0)
        cons = c >= kmin
        lam[k] = base[k] * cons.unsqueeze(0).float()
        counts += torch.bincount(c.reshape(-1), minlength=K + 1)
        extra[f"consensus/mask/{k}"] = cons.float()
        for i, n in enumerate(ctx.names):
            extra[f"consensus/tall/{n}/{k}"] = tall[i].float()
    total = int(counts.sum())
    info = {"base": params["base"],
            "catastrophic_fraction": float(counts[0]) / max(1, total),
            "selfish_fraction": float(counts[1]) / max(1, total),
            "removed_fraction": float(counts[:kmin].sum()) / max(1, total) if kmin > 0 else 0.0}
    return MergeOutput(weighted_sum(ctx, lam), coefficients=lam, info=info, extra_tensors=extra)


METHOD = MergeMethod(
    name="consensus",
    pretty="Consensus (TALL masks)",
    paper="Wang, Dimitriadis, Ortiz-Jimenez, Fleuret, Frossard (2024). Localizing Task Information for Improved "
          "Model Merging and Compression. ICML 2024.",
    url="https://arxiv.org/abs/2405.07813",
    params=(
        Param("tall_lambda", 0.4, "TALL mask threshold: keep entry j for task k when |tau^k_j| >= tall_lambda * "
              "|tau_MTL_j - tau^k_j| (paper: tuned in 0.2-0.6).", min=0.0, max=10.0),
        Param("min_agreement", 2, "Keep entries that at least this many TALL masks select (2 removes selfish "
              "and catastrophic weights).", kind="int", min=0, max=64),
        Param("base", "task_arithmetic", "Merge that the consensus mask filters.", kind="choice",
              choices=("task_arithmetic", "ties")),
        Param("scaling", 0.4, "lambda of the base merge (each factor).", min=0.0, max=10.0),
        Param("density", 0.2, "TIES trim density (base = ties only).", min=0.0, max=1.0),
        Param("weights", "", "Optional per-specialist weights of the base merge; empty = 1 each.", kind="str"),
    ),
    fn=_run,
    summary="Task Arithmetic (or TIES) restricted to entries at least two specialists' TALL masks select.",
)
