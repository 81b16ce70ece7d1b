"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

For each factor (A and B separately; the task vector of a LoRA factor is the factor itself, see ``_ops``):

1. Trim:  tau_hat^k = keep the int(density * numel) largest |tau^k| (per factor tensor by default; the
   paper trims each whole task vector, ``trim_scope = model``), zero the rest.
2. Elect: gamma = sgn(sum_k tau_hat^k)  ('total' mass, the paper; 'frequency' = majority of signs);
   a tie goes to +1.
3. Disjoint merge: A = {k : sgn(tau_hat^k) = gamma} per entry,
       tau_m = (1/|A|) sum_{k in A} w_k tau_hat^k,   theta = scaling * tau_m.

As Eq. 1 coefficients: lambda^k = scaling * w_k * [k in A] / max(1, |A|). The optional per-specialist
weights w_k are applied after the election (as stock PEFT does); the paper has none.
"""

from __future__ import annotations

from esm_core.merging.base import MergeMethod, MergeOutput, Param, weighted_sum
from esm_core.merging.methods._ops import (
    agree_mask,
    disjoint_lambda,
    elect_sign,
    mask_fraction,
    parse_weights,
    trim_masks,
)


def ties_lambda(ctx, *, keep: dict, weights, scaling: float, sign_method: str = "total"):
    """Coefficients of the sign election + disjoint mean over already-sparsified factors.

    keep[key]: [K, *shape] multiplier applied to each specialist's factor before the election (a 0/1
    trim mask for TIES, mask/(1-p) for DARE-TIES). Returns (lambda, agree masks).
    """
    lam, agree = {}, {}
    for k in ctx.keys:
        pruned = ctx.stacked(k) * keep[k]
        gamma = elect_sign(pruned, sign_method)
        a = agree_mask(pruned, gamma)
        lam[k] = disjoint_lambda(a, weights * scaling) * keep[k]
        agree[k] = a
    return lam, agree


def _run(ctx, params) -> MergeOutput:
    w = parse_weights(params["weights"], ctx.names)
    masks = trim_masks(ctx, params["density"], params["trim_scope"])
    keep = {k: m.float() for k, m in masks.items()}
    lam, agree = ties_lambda(ctx, keep=keep, weights=w, scaling=params["scaling"], sign_method=params["sign_method"])
    info = {"kept_fraction": mask_fraction(masks), "agreeing_fraction": mask_fraction(agree)}
    return MergeOutput(weighted_sum(ctx, lam), coefficients=lam, info=info)


METHOD = MergeMethod(
    name="ties",
    pretty="TIES-Merging",
    paper="Yadav et al. (2023). TIES-Merging: Resolving Interference When Merging Models. NeurIPS 2023.",
    url="https://arxiv.org/abs/2306.01708",
    params=(
        Param("density", 0.2, "Fraction of each factor's entries kept by magnitude (the paper's top-k%; "
              "20% is its default).", min=0.0, max=1.0),
        Param("scaling", 1.0, "lambda applied to the disjoint mean (each factor; the paper uses 1).",
              min=0.0, max=10.0),
        Param("sign_method", "total", "Elect each entry's sign by total mass (paper) or by the number of "
              "specialists (frequency).", kind="choice", choices=("total", "frequency")),
        Param("weights", "", "Optional per-specialist weights applied after the election; empty = 1 each.",
              kind="str"),
        Param("trim_scope", "tensor", "Trim per factor tensor (PEFT, mergekit) or over each specialist's "
              "whole adapter (the paper's task vector).", kind="choice", choices=("tensor", "model")),
    ),
    fn=_run,
    summary="Trim small entries, elect a sign per entry, average the agreeing specialists.",
)
