"""Where a merge happens: on the LoRA factors (paper Eq. 1, the default) or on the weight updates.

``factors`` -- merged A = sum_k lam_k A_k and merged B = sum_k lam_k B_k, separately (Eq. 1, the
authors' code, PEFT's ``add_weighted_adapter(combination_type="linear")``). The merged update is

    (sum_k lam_k B_k)(sum_k lam_k A_k) = sum_k lam_k^2 B_k A_k + sum_{j != k} lam_j lam_k B_j A_k,

so specialist k's own update survives with about lam_k^2 (not lam_k), and cross terms B_j A_k that
no specialist learned appear (:func:`update_shares` measures both).

``delta`` -- per module, the specialists' updates dW_k = s_k B_k A_k (scaling s_k included) are
combined, then re-factorised by truncated SVD into one LoRA of rank R (default: the sum of the
input ranks, which holds any linear combination exactly); the relative residual per module is
reported. A method that combines tensors (TIES, DARE, ...) runs on the dW_k as it runs on factors.
A method whose weights come from elsewhere (ES coefficients, learned layer weights) keeps its
per-factor coefficients; the rule that carries them to dW (docs/METHOD.md section 0):

    lam_dW[k, i, j] = sign * sqrt(|mean_r lam_B[k, i, r] * mean_r lam_A[k, r, j]|)

(sign: the common sign of the two means, 0 when they differ), renormalised over k to sum to 1
where the factor coefficients do (ES). With lambda constant per module (layer mode, average,
learned layer weights) it is exactly that lambda.

This module holds the arithmetic only; ``MergeMethod.run`` (base.py) dispatches on the space.
"""

from __future__ import annotations

import torch

from esm_core.adapters import LoraKey

MERGE_SPACES = ("factors", "delta")
W = "W"  # LoraKey.ab of a module's whole update dW


def modules(keys) -> list[tuple[int, str]]:
    return sorted({(k.layer, k.module) for k in keys})


def deltas(tensors: dict[str, dict[LoraKey, torch.Tensor]], scaling) -> dict[str, dict[LoraKey, torch.Tensor]]:
    """Per specialist and module, dW = s * B @ A (float32), keyed LoraKey(layer, module, "W").
    ``scaling(name, layer, module)`` is the factor PEFT applies (1 where it is folded into B)."""
    out = {}
    for n, t in tensors.items():
        out[n] = {LoraKey(l, m, W): scaling(n, l, m) * (t[LoraKey(l, m, "B")].float() @ t[LoraKey(l, m, "A")].float())
                  for l, m in modules(t)}
    return out


def product(factors: dict[LoraKey, torch.Tensor], scale: float = 1.0) -> dict[LoraKey, torch.Tensor]:
    """A merged adapter's own updates: dW = scale * B @ A per module."""
    return {LoraKey(l, m, W): scale * (factors[LoraKey(l, m, "B")].float() @ factors[LoraKey(l, m, "A")].float())
            for l, m in modules(factors)}


def delta_coefficients(lam: dict[LoraKey, torch.Tensor], shapes: dict[LoraKey, tuple]) -> dict[LoraKey, torch.Tensor]:
    """Per-factor coefficients [K, *factor shape] (or broadcastable, e.g. [K]) -> per-update [K, out, in]."""
    out = {}
    for l, m in modules(lam):
        kA, kB = LoraKey(l, m, "A"), LoraKey(l, m, "B")
        a, b = _full(lam[kA], shapes[kA]), _full(lam[kB], shapes[kB])  # [K, r, in], [K, out, r]
        mb, ma = b.mean(-1), a.mean(-2)  # [K, out], [K, in]
        prod = mb.unsqueeze(-1) * ma.unsqueeze(-2)
        same = torch.sign(mb).unsqueeze(-1) == torch.sign(ma).unsqueeze(-2)
        g = torch.where(same, torch.sign(mb).unsqueeze(-1) * prod.abs().sqrt(), torch.zeros_like(prod))
        if _convex(a) and _convex(b):
            g = g / g.sum(0, keepdim=True).clamp_min(1e-12)
        out[LoraKey(l, m, W)] = g
    return out


def _full(c: torch.Tensor, shape: tuple) -> torch.Tensor:
    c = c.float()
    while c.ndim < len(shape) + 1:
        c = c.unsqueeze(-1)
    return c.expand(c.shape[0], *shape)


def _convex(c: torch.Tensor) -> bool:
    return bool((c >= -1e-6).all()) and bool(((c.sum(0) - 1).abs() < 1e-4).all())


def combine_deltas(lam: dict[LoraKey, torch.Tensor], dW: dict[str, dict[LoraKey, torch.Tensor]],
                   names: list[str]) -> dict[LoraKey, torch.Tensor]:
    return {k: (lam[k] * torch.stack([dW[n][k] for n in names])).sum(0) for k in lam}


def refactorise(dW: dict[LoraKey, torch.Tensor], rank: int) -> tuple[dict[LoraKey, torch.Tensor], dict[str, float]]:
    """Truncated SVD of each module's update: B = U_R sqrt(S_R), A = sqrt(S_R) V_R^T (rank R, zero-padded
    where the update has fewer dimensions); returns the factors and each module's relative residual
    ||dW - B A||_F / ||dW||_F (0 for a zero update)."""
    factors, residual = {}, {}
    for k, d in sorted(dW.items(), key=lambda kv: (kv[0].layer, kv[0].module)):
        d64 = d.double()
        U, S, Vh = torch.linalg.svd(d64, full_matrices=False)
        R = min(rank, S.numel())
        root = S[:R].sqrt()
        B = torch.zeros(d.shape[0], rank, dtype=torch.float64)
        A = torch.zeros(rank, d.shape[1], dtype=torch.float64)
        B[:, :R] = U[:, :R] * root
        A[:R] = root.unsqueeze(-1) * Vh[:R]
        norm = float(d64.norm())
        residual[f"layers.{k.layer}.{k.module}"] = float((d64 - B @ A).norm()) / norm if norm > 0 else 0.0
        factors[LoraKey(k.layer, k.module, "A")] = A.float()
        factors[LoraKey(k.layer, k.module, "B")] = B.float()
    return factors, residual


def _inner(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
    """<B1 A1, B2 A2> (Frobenius) from the factors: sum((B1^T B2) * (A1 A2^T)), never forming B A."""
    return float(((b1.double().T @ b2.double()) * (a1.double() @ a2.double().T)).sum())


def update_shares(merged: dict[LoraKey, torch.Tensor], specialists: dict[str, dict[LoraKey, torch.Tensor]],
                  scaling, merged_scale: float = 1.0) -> list[dict]:
    """Per module: how much of each specialist's own update survives in the merged update, and how
    much of the merged update no specialist made.

    The merged update is written as sum_k c_k dW_k + rest (least squares): ``share k`` = c_k (1 = the
    update survives whole; lambda_k for a delta-space merge; about lambda_k^2 for Eq. 1 on factors),
    ``cross energy`` = ||rest||^2 / ||merged||^2 (terms such as B_j A_k that no specialist has).
    Computed from the factors (inner products of r x r Gram matrices), so it is cheap at 8B too.
    ``scaling(name, layer, module)``: each specialist's PEFT scaling; ``merged_scale``: the merge's (a number
    or a function of (layer, module))."""
    names = list(specialists)
    rows = []
    for l, m in modules(merged):
        kA, kB = LoraKey(l, m, "A"), LoraKey(l, m, "B")
        f = [(scaling(n, l, m) * specialists[n][kB].float(), specialists[n][kA].float()) for n in names]
        ms = merged_scale(l, m) if callable(merged_scale) else merged_scale
        mb, ma = ms * merged[kB].float(), merged[kA].float()
        G = torch.tensor([[_inner(*fj, *fk) for fk in f] for fj in f], dtype=torch.float64)
        g = torch.tensor([_inner(*fk, mb, ma) for fk in f], dtype=torch.float64)
        yy = _inner(mb, ma, mb, ma)
        c = torch.linalg.lstsq(G, g.unsqueeze(-1)).solution.squeeze(-1)
        row = {"layer": l, "module": m}
        row.update({f"share {n}": float(v) for n, v in zip(names, c)})
        # ||y - X c||^2 = yy - 2 c.g + c^T G c
        rest = yy - 2 * float(c @ g) + float(c @ G @ c)
        row["cross energy"] = max(rest, 0.0) / yy if yy > 0 else 0.0
        rows.append(row)
    return rows


def share_summary(rows: list[dict], names: list[str]) -> dict:
    """Mean share per specialist and mean cross energy over the modules."""
    n = max(len(rows), 1)
    out = {f"share {k}": sum(r[f"share {k}"] for r in rows) / n for k in names}
    out["cross energy"] = sum(r["cross energy"] for r in rows) / n
    return out
