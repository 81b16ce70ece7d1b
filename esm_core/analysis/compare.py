"""Two merges side by side: how their per-element coefficients differ (the Merge page's comparison)."""

from __future__ import annotations

import torch

from esm_core.errors import ESMError


def _top_labels(c: torch.Tensor, tol: float) -> torch.Tensor:
    """[K, N] -> [N] index of the largest coefficient, -1 where the largest is tied (within tol)."""
    if c.shape[0] == 1:
        return torch.zeros(c.shape[1], dtype=torch.long)
    top2 = torch.topk(c, 2, dim=0)
    lab = top2.indices[0].clone()
    lab[(top2.values[0] - top2.values[1]) <= tol] = -1
    return lab


def compare_coefficients(c1, c2, names: list[str], *, tol: float = 1e-7) -> tuple[list[dict], dict]:
    """Compare two merges' per-element coefficients over the same elements.

    ``c1``, ``c2``: a [K, *shape] tensor each, or lists of them (several factors, compared together).
    Returns (one row per specialist: mean lambda of each merge, mean and max |lambda1 - lambda2|;
    overall: number of elements, share where the top specialist differs, shares of ties). The top
    specialist of an element is the one with the largest lambda; where the largest is tied (within
    ``tol``, e.g. an entry every specialist trimmed to 0) it is "tie", a label of its own.
    """
    def flat(c):
        cs = c if isinstance(c, (list, tuple)) else [c]
        return torch.cat([torch.as_tensor(x).detach().float().reshape(len(names), -1) for x in cs], dim=1)

    a, b = flat(c1), flat(c2)
    if a.shape != b.shape:
        raise ESMError(f"The two coefficient sets cover different elements ({tuple(a.shape)} vs {tuple(b.shape)}).",
                       fix="compare merges of the same specialists.")
    d = (a - b).abs()
    rows = [dict(specialist=n, mean_1=float(a[k].mean()), mean_2=float(b[k].mean()),
                 mean_abs_diff=float(d[k].mean()), max_abs_diff=float(d[k].max()))
            for k, n in enumerate(names)]
    t1, t2 = _top_labels(a, tol), _top_labels(b, tol)
    overall = dict(elements=int(a.shape[1]), top_differs=float((t1 != t2).float().mean()),
                   ties_1=float((t1 < 0).float().mean()), ties_2=float((t2 < 0).float().mean()),
                   mean_abs_diff=float(d.mean()))
    return rows, overall
