"""Tensor operations shared by the task-vector baselines (trim, sign election, disjoint mean, DARE drops).

Conventions for every baseline in this package:

- **Task vectors of LoRA factors.** A LoRA specialist's adapter is a *difference* from the base (the
  base has no adapter, i.e. a zero adapter), so the "task vector" of specialist k for a factor is the
  factor itself: tau^k_{l,j} = theta^k_{l,j} (A and B separately). There is no pretrained LoRA factor
  to subtract. All methods therefore act on the A and the B factors separately, as ES-Merging does
  (paper Eq. 1), and a method's ``scaling`` multiplies each factor, so the weight update B A of a
  module scales with scaling**2.
- **Every baseline is Eq. 1 with element-wise coefficients.** Each method returns
  lambda^k_{l,j} ([K, *shape] per factor) and the merged factor is sum_k lambda^k_{l,j} theta^k_{l,j}
  (``merge.weighted_sum``), so the app can show any method's coefficients next to ES-Merging's.
- **Ties in a sign election go to +1**; trimming keeps ``int(density * numel)`` entries (the rule
  stock PEFT uses, so results can be compared).
"""

from __future__ import annotations

import re

import torch

from esm_core.adapters import LoraKey
from esm_core.errors import ESMError


# ------------------------------------------------------------------------------------ weights
def parse_weights(text: str, names: list[str], param: str = "weights") -> torch.Tensor:
    """Per-specialist weights from '' (all 1), '0.5,1,2' (specialist order) or 'mol=0.5,prot=1,cell=2'."""
    K = len(names)
    text = (text or "").strip()
    if not text:
        return torch.ones(K)
    items = [s.strip() for s in re.split(r"[,;]", text) if s.strip()]
    vals: list[float | None] = [None] * K
    try:
        if any("=" in s for s in items):
            for s in items:
                if "=" not in s:
                    raise ESMError(f"Parameter {param}={text!r} mixes 'name=value' and plain values.",
                                   fix=f"write e.g. {','.join(f'{n}=1' for n in names)}.")
                n, v = (x.strip() for x in s.split("=", 1))
                if n not in names:
                    raise ESMError(f"Parameter {param}={text!r} names {n!r}, which is not a specialist.",
                                   fix=f"use the specialists {names}.")
                vals[names.index(n)] = float(v)
            missing = [n for n, v in zip(names, vals) if v is None]
            if missing:
                raise ESMError(f"Parameter {param}={text!r} gives no weight for {missing}.",
                               fix="give one weight per specialist.")
        else:
            if len(items) != K:
                raise ESMError(f"Parameter {param}={text!r} has {len(items)} value(s) for {K} specialists {names}.",
                               fix=f"give {K} comma-separated numbers (or name=value pairs), or leave it empty "
                                   "for weight 1 each.")
            vals = [float(s) for s in items]
    except ValueError:
        raise ESMError(f"Parameter {param}={text!r} is not a list of numbers.",
                       fix="write e.g. '1,0.5,1' or 'mol=1,prot=0.5,cell=1'.") from None
    w = torch.tensor(vals, dtype=torch.float32)
    if not torch.isfinite(w).all():
        raise ESMError(f"Parameter {param}={text!r} holds a NaN or infinite weight.", fix="use finite numbers.")
    return w


def bcast(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[K] -> [K, 1, ..., 1] to broadcast against a [K, *shape] stack."""
    return w.reshape(w.shape + (1,) * (like.ndim - w.ndim))


def constant_lambda(ctx, w: torch.Tensor) -> dict[LoraKey, torch.Tensor]:
    """Per-specialist constants as [K, *shape] coefficients (expanded views, no copies)."""
    out = {}
    for k in ctx.keys:
        shape = ctx.tensors[ctx.names[0]][k].shape
        out[k] = w.float().reshape(-1, *([1] * len(shape))).expand(len(w), *shape)
    return out


def factor_order(ctx) -> list[LoraKey]:
    """The factors in the model's module order (block by block, modules as the block lists them, A then B).

    Random draws (DARE) follow this order so that one seed gives the same drops as stock PEFT's
    ``add_weighted_adapter``, which walks ``named_modules()`` and draws for A, then B, specialist by
    specialist. Without a loaded model (hand-made tensors) the canonical sorted order is used.
    """
    keys = ctx.keys
    sset = getattr(ctx, "sset", None)
    if sset is None:
        return keys
    pos: dict[tuple[int, str], int] = {}
    for layer in sorted({k.layer for k in keys}):
        for i, (name, _) in enumerate(sset.blocks[layer].named_modules()):
            pos.setdefault((layer, name), i)
    return sorted(keys, key=lambda k: (k.layer, pos.get((k.layer, k.module), 10**9), k.module, k.ab))


# ------------------------------------------------------------------------------------ trimming
def topk_mask(score: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Boolean mask of the n_keep largest entries of a tensor (ties broken by torch.topk)."""
    flat = score.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    n_keep = max(0, min(int(n_keep), flat.numel()))
    if n_keep:
        mask[torch.topk(flat, n_keep, largest=True, sorted=False).indices] = True
    return mask.reshape(score.shape)


def magnitude_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) entries of largest magnitude (TIES 'trim'); density >= 1 keeps all."""
    if density >= 1.0:
        return torch.ones_like(x, dtype=torch.bool)
    return topk_mask(x.abs(), int(density * x.numel()))


def trim_masks(ctx, density: float, scope: str = "tensor") -> dict[LoraKey, torch.Tensor]:
    """[K, *shape] keep-masks of the top-density magnitudes, per factor tensor or over each whole specialist."""
    K = len(ctx.names)
    if scope == "tensor":
        return {k: torch.stack([magnitude_mask(ctx.tensors[n][k].float(), density) for n in ctx.names])
                for k in ctx.keys}
    if scope != "model":
        raise ESMError(f"Parameter trim_scope={scope!r} is not known.", fix="use 'tensor' or 'model'.")
    keys = ctx.keys
    out = {k: torch.zeros((K,) + tuple(ctx.tensors[ctx.names[0]][k].shape), dtype=torch.bool) for k in keys}
    for i, n in enumerate(ctx.names):
        flat = torch.cat([ctx.tensors[n][k].float().reshape(-1) for k in keys])
        m = magnitude_mask(flat, density)
        s = 0
        for k in keys:
            numel = ctx.tensors[n][k].numel()
            out[k][i] = m[s:s + numel].reshape(out[k].shape[1:])
            s += numel
    return out


# ------------------------------------------------------------------------------------ sign election
def elect_sign(stack: torch.Tensor, method: str = "total") -> torch.Tensor:
    """gamma = sgn(sum_k tau_k) ('total', TIES paper) or sgn(sum_k sgn tau_k) ('frequency'); 0 -> +1."""
    if method == "total":
        s = stack.sum(0)
    elif method == "frequency":
        s = stack.sign().sum(0)
    else:
        raise ESMError(f"Sign election method {method!r} is not known.", fix="use 'total' or 'frequency'.")
    return torch.where(s >= 0, 1.0, -1.0)


def agree_mask(stack: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """[K, *shape]: entries whose sign equals the elected sign (zeros never agree)."""
    return stack.sign() == gamma.unsqueeze(0)


def disjoint_lambda(mask: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Coefficients of the TIES disjoint mean: lambda_k = w_k * mask_k / max(1, sum_k mask_k)."""
    m = mask.float()
    return bcast(w.float(), m) * m / m.sum(0).clamp_min(1.0)


# ------------------------------------------------------------------------------------ DARE
def dare_keep_masks(ctx, drop_rate: float, seed: int) -> dict[LoraKey, torch.Tensor]:
    """Bernoulli(1 - p) keep-masks [K, *shape], drawn in ``factor_order`` with one torch.Generator(seed)."""
    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for k in factor_order(ctx):
        ms = []
        for n in ctx.names:
            t = ctx.tensors[n][k]
            if drop_rate <= 0.0:
                ms.append(torch.ones(t.shape, dtype=torch.bool))
            else:
                ms.append(torch.bernoulli(torch.full(t.shape, 1.0 - drop_rate, dtype=torch.float32),
                                          generator=g).bool())
        out[k] = torch.stack(ms)
    return out


# ------------------------------------------------------------------------------------ reporting
def mask_fraction(masks: dict[LoraKey, torch.Tensor]) -> float:
    """Fraction of True entries over all masks."""
    tot = sum(m.numel() for m in masks.values())
    return float(sum(int(m.sum()) for m in masks.values())) / max(1, tot)
