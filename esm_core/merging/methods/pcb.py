"""PCB-Merging (Du et al., NeurIPS 2024): Parameter Competition Balancing.

For each factor tensor (A and B separately; a LoRA factor is its own task vector, see ``_ops``),
with the K specialists' entries flattened to tau_i in R^d and Norm = min-max scaling to [0, 1]
over the d entries:

    intra-balancing  beta_intra,i = Softmax(K * Norm(tau_i * tau_i))             (paper Eq. 2)
    inter-balancing  beta_inter,i = sum_j Softmax(Norm(tau_i * tau_j))           (paper Eq. 3)
    balance          beta_i = beta_intra,i * beta_inter,i                         (Eq. 4)
    drop             keep the d - int(drop_ratio * d) largest beta_i, zero the rest
                     (the paper's ratio r of kept entries is 1 - drop_ratio)
    rescale/merge    tau_m = sum_i beta_hat_i tau_i / sum_i beta_hat_i,   theta = scaling * tau_m

``variant = reference`` follows the authors' released code instead, which differs from the text:
|tau| is clipped at its 0.01% / 99.99% order statistics, intra = exp(K * Norm(|tau|)^2),
inter = tanh(tau_i * sum_j tau_j), and the kept scores are min-max rescaled above the drop
threshold (so the weakest kept entry gets weight 0).

Balancing runs per factor tensor, not over the whole adapter: A and B factors have very different
scales (A starts random, B at zero), and one min-max over both would drop nearly all of B.
As Eq. 1 coefficients: lambda_i = scaling * beta_hat_i / sum_j beta_hat_j (times |clipped|/|tau| for
the reference variant's clipping).
"""

from __future__ import annotations

import torch

from esm_core.merging.base import MergeMethod, MergeOutput, Param, weighted_sum
from esm_core.merging.methods._ops import topk_mask


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Per row of [K, d]: (x - min) / (max - min); a constant row becomes 0."""
    lo = x.min(1, keepdim=True).values
    hi = x.max(1, keepdim=True).values
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x))


def n_keep(d: int, drop_ratio: float) -> int:
    return d - int(drop_ratio * d)


def pcb_scores(X: torch.Tensor, variant: str = "paper") -> tuple[torch.Tensor, torch.Tensor]:
    """(beta [K, d], the task vectors the merge averages [K, d]) for flattened task vectors X [K, d]."""
    K, d = X.shape
    if variant == "paper":
        intra = torch.softmax(K * minmax(X * X), dim=1)
        inter = sum(torch.softmax(minmax(X * X[j:j + 1]), dim=1) for j in range(K))
        return intra * inter, X
    a = X.abs()
    srt = a.sort(dim=1).values
    lo = srt[:, int(d * 1e-4)].unsqueeze(1)
    hi = srt[:, max(0, int(d * (1 - 1e-4) - 1))].unsqueeze(1)
    a = torch.minimum(torch.maximum(a, lo), hi)
    Xc = X.sign() * a
    intra = torch.exp(K * minmax(a) ** 2)
    inter = torch.tanh(X * X.sum(0, keepdim=True))
    return intra * inter, Xc


def pcb_weights(beta: torch.Tensor, drop_ratio: float, variant: str = "paper") -> torch.Tensor:
    """beta_hat [K, d]: scores with the lowest int(drop_ratio * d) of each row dropped (set to 0)."""
    K, d = beta.shape
    keep = torch.stack([topk_mask(beta[i], n_keep(d, drop_ratio)) for i in range(K)])
    if variant == "paper":
        return beta * keep
    # reference: min-max above the threshold (the smallest kept score); dropped entries -> 0
    thr = torch.where(keep, beta, torch.full_like(beta, float("inf"))).min(1, keepdim=True).values
    top = beta.max(1, keepdim=True).values
    span = (top - thr).clamp_min(1e-30)
    return torch.where(keep, (beta - thr) / span, torch.zeros_like(beta)).clamp_min(0.0)


def pcb_lambda(X: torch.Tensor, drop_ratio: float, variant: str, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1 coefficients [K, d] and the dropped-score weights beta_hat for flattened X [K, d]."""
    beta, Xc = pcb_scores(X, variant)
    bh = pcb_weights(beta, drop_ratio, variant)
    tot = bh.sum(0, keepdim=True)
    lam = torch.where(tot > 0, bh / torch.where(tot > 0, tot, torch.ones_like(tot)), torch.zeros_like(bh))
    if variant == "reference":  # the merge averages clipped values: fold |clipped| / |tau| into lambda
        ratio = torch.where(X != 0, Xc / torch.where(X != 0, X, torch.ones_like(X)), torch.zeros_like(X))
        lam = lam * ratio
    return lam * scaling, bh


def _run(ctx, params) -> MergeOutput:
    lam, kept, total = {}, 0, 0
    for k in ctx.keys:
        st = ctx.stacked(k)
        K = st.shape[0]
        X = st.reshape(K, -1)
        l, bh = pcb_lambda(X, params["drop_ratio"], params["variant"], params["scaling"])
        lam[k] = l.reshape(st.shape)
        kept += int((bh > 0).sum())
        total += bh.numel()
    return MergeOutput(weighted_sum(ctx, lam), coefficients=lam,
                       info={"variant": params["variant"], "kept_fraction": kept / max(1, total)})


METHOD = MergeMethod(
    name="pcb",
    pretty="PCB-Merging",
    paper="Du et al. (2024). Parameter Competition Balancing for Model Merging. NeurIPS 2024.",
    url="https://arxiv.org/abs/2410.02396",
    params=(
        Param("drop_ratio", 0.9, "Fraction of each specialist's entries (per factor) dropped by balanced score; "
              "the paper keeps r = 1 - drop_ratio (0.1 in the authors' code).", min=0.0, max=0.99),
        Param("scaling", 1.0, "lambda applied to the balanced average (each factor).", min=0.0, max=10.0),
        Param("variant", "paper", "Balancing as the paper's equations (softmax intra/inter) or as the authors' "
              "code (tanh inter, clipping, min-max rescale).", kind="choice", choices=("paper", "reference")),
    ),
    fn=_run,
    summary="Intra- and inter-task balancing scores, drop the low ones, score-weighted average of the rest.",
)
