"""Coefficients from signals: layer-wise alpha, element-wise beta, combined lambda (docs/METHOD.md sections 2-4).

Pure functions of arrays; every intermediate is returned because the app plots it.

Layer-wise (section 2), for specialist k, modality m, block l = 1..L:
    D^k_{m,l}     = SWD_p(base points, specialist points)            (swd_matrix)
    Delta^k_{m,l} = D_l - D_{l-1}     (first_delta='diff'; 'raw': Delta_1 = D_1)
    z^k_{m,l}     = (Delta - mean_l) / std_l      (population std; std = 0 -> zeros)
    s^k_l         = sum_m w_{k,m} z^k_{m,l}       (w = 1 for own modality, other_modality_weight else)
    alpha^k_l     = softmax_k(s^k_l / tau_layer)                            (Eq. 2)

Element-wise (section 3):
    gz^k_{l,j}    = z-score of g^k_{l,j} within layer l (or within each A/B tensor)
    beta^k_{l,j}  = softmax_k(gz^k_{l,j} / tau_elem)                        (Eq. 3)

Combined (section 4, Eq. 4):
    lambda^k_{l,j} = alpha^k_l beta^k_{l,j} / sum_k' alpha^k'_l beta^k'_{l,j}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esm_core.adapters import LoraKey
from esm_core.signals.swd import projections, sliced_wasserstein


@dataclass
class LayerSignals:
    D: torch.Tensor  # [K, M, L+1] SWD per specialist, modality, layer (l = 0: input embeddings)
    delta: torch.Tensor  # [K, M, L]
    z: torch.Tensor  # [K, M, L]
    s: torch.Tensor  # [K, L]
    alpha: torch.Tensor  # [K, L]
    weights: torch.Tensor  # [K, M] modality weights of the layer score


@dataclass
class ElementSignals:
    g: dict[LoraKey, torch.Tensor]  # raw scores [K, *shape]
    gz: dict[LoraKey, torch.Tensor]  # z-scored [K, *shape]
    beta: dict[LoraKey, torch.Tensor]  # [K, *shape]


# ------------------------------------------------------------------------------------ helpers
def zscore(x: torch.Tensor, dim=-1) -> torch.Tensor:
    """(x - mean) / std over `dim` (population std); zeros where the std is 0."""
    mu = x.mean(dim=dim, keepdim=True)
    sd = x.std(dim=dim, keepdim=True, correction=0)
    out = (x - mu) / torch.where(sd > 0, sd, torch.ones_like(sd))
    return torch.where(sd > 0, out, torch.zeros_like(out))


def softmax_over_specialists(x: torch.Tensor, tau: float) -> torch.Tensor:
    """softmax along dim 0 (the specialists) of x / tau."""
    return torch.softmax(x.double() / float(tau), dim=0).to(x.dtype)


# ------------------------------------------------------------------------------------ layer-wise
def swd_matrix(states, n_specialists: int, cfg, *, n_projections: int | None = None, seed: int | None = None,
               device=None, dtype=torch.float32, log: bool = False):
    """D [K, M, L+1]: SWD between base and each specialist, per modality and layer, shared projections."""
    first = states.pooled[states.modalities[0]]
    d = first.shape[-1]
    n_proj = n_projections or cfg.n_projections
    P = projections(d, n_proj, cfg.seed if seed is None else seed, dtype=dtype, device=device or "cpu")
    K = n_specialists
    if getattr(cfg, "swd_projections", "shared") == "per_pair_stream":
        return _swd_per_pair(states, K, cfg, P, n_proj, cfg.seed if seed is None else seed, log=log)
    Ds, emds = [], []
    for m in states.modalities:
        pooled = states.pooled[m]  # [n_models, L+1, N, d]; model 0 = base
        X = pooled[0:1].expand(K, *pooled.shape[1:])
        Y = pooled[1:K + 1]
        D, lg = sliced_wasserstein(X, Y, P, p=cfg.swd_p, standardize=cfg.standardize, log=True)
        Ds.append(D)
        emds.append(lg["projected_emd"])
    D = torch.stack(Ds, dim=1).float().cpu()  # [K, M, L+1]
    if log:
        return D, {"projected_emd": torch.stack(emds, dim=1).float().cpu(), "projections": P.cpu()}
    return D


def _swd_per_pair(states, K: int, cfg, P0: torch.Tensor, n_proj: int, seed: int, log: bool):
    """The authors' projections: for each specialist, modality and block (that loop order) a fresh
    [n_proj, d] standard-normal draw from ONE numpy stream seeded with ``seed``, rows made unit
    directions. Block 0 (the inputs, identical for every model: D_0 = 0) takes the shared set P0 and
    no draw from the stream."""
    import numpy as np

    rs = np.random.RandomState(int(seed))
    mods = states.modalities
    L1 = states.pooled[mods[0]].shape[1]
    D = torch.zeros(K, len(mods), L1, dtype=torch.float64)
    emd = torch.zeros(K, len(mods), L1, n_proj, dtype=torch.float64)
    for k in range(K):
        for mi, m in enumerate(mods):
            pooled = states.pooled[m]
            for l in range(L1):
                if l == 0:
                    P = P0
                else:
                    raw = torch.from_numpy(rs.randn(n_proj, pooled.shape[-1])).T
                    P = (raw / torch.linalg.vector_norm(raw, dim=0, keepdim=True)).to(P0.dtype).to(P0.device)
                d, lg = sliced_wasserstein(pooled[0, l], pooled[k + 1, l], P, p=cfg.swd_p,
                                           standardize=cfg.standardize, log=True)
                D[k, mi, l], emd[k, mi, l] = d, lg["projected_emd"]
    if log:
        return D.float(), {"projected_emd": emd.float(), "projections": P0.cpu()}
    return D.float()


def modality_weights(modalities: list[str], own: list[str | None], other_weight: float) -> torch.Tensor:
    """[K, M]: 1 for the specialist's own modality, other_weight for the rest (1 everywhere if unknown)."""
    w = torch.full((len(own), len(modalities)), float(other_weight))
    for k, o in enumerate(own):
        if o is None:
            w[k] = 1.0
        else:
            w[k, modalities.index(o)] = 1.0
    return w


def layer_coefficients(D: torch.Tensor, cfg, weights: torch.Tensor | None = None) -> LayerSignals:
    """alpha [K, L] from the SWD matrix D [K, M, L+1] (docs/METHOD.md section 2, steps 3-6)."""
    D = D.double()
    if cfg.first_delta == "diff":
        delta = D[..., 1:] - D[..., :-1]
    else:
        delta = torch.cat([D[..., 1:2], D[..., 2:] - D[..., 1:-1]], dim=-1)
    z = zscore(delta, dim=-1)
    if weights is None:
        weights = torch.ones(D.shape[0], D.shape[1])
    s = (z * weights.double().unsqueeze(-1)).sum(dim=1)
    alpha = softmax_over_specialists(s, cfg.tau_layer)
    f = torch.float32
    return LayerSignals(D.to(f), delta.to(f), z.to(f), s.to(f), alpha.to(f), weights.to(f))


# ------------------------------------------------------------------------------------ element-wise
def stack_scores(scores: dict[str, dict[LoraKey, torch.Tensor]], names: list[str]) -> dict[LoraKey, torch.Tensor]:
    keys = sorted(scores[names[0]])
    return {k: torch.stack([scores[n][k].float() for n in names]) for k in keys}


def element_coefficients(g: dict[LoraKey, torch.Tensor], cfg) -> ElementSignals:
    """beta per element from raw scores g[key] = [K, *shape] (docs/METHOD.md section 3, steps 3-4)."""
    gz: dict[LoraKey, torch.Tensor] = {}
    if cfg.zscore_scope == "tensor":
        for k, v in g.items():
            gz[k] = zscore(v.double().reshape(v.shape[0], -1)).reshape(v.shape).float()
    else:
        by_layer: dict[int, list[LoraKey]] = {}
        for k in g:
            by_layer.setdefault(k.layer, []).append(k)
        for layer, keys in by_layer.items():
            flat = torch.cat([g[k].double().reshape(g[k].shape[0], -1) for k in keys], dim=1)
            zf = zscore(flat)
            o = 0
            for k in keys:
                n = g[k][0].numel()
                gz[k] = zf[:, o:o + n].reshape(g[k].shape).float()
                o += n
    beta = {k: softmax_over_specialists(v, cfg.tau_elem) for k, v in gz.items()}
    return ElementSignals(g, gz, beta)


# ------------------------------------------------------------------------------------ combination
def combine(alpha: torch.Tensor, beta: dict[LoraKey, torch.Tensor] | None, mode: str,
            keys: list[LoraKey] | None = None, shapes: dict[LoraKey, tuple] | None = None) -> dict[LoraKey, torch.Tensor]:
    """lambda[key] = [K, *shape] per mode: 'combined' (Eq. 4), 'layer' (alpha), 'element' (beta)."""
    if mode == "element":
        if beta is None:
            raise ValueError("element mode needs element coefficients")
        return {k: v.clone() for k, v in beta.items()}
    if mode == "layer":
        keys = keys or sorted(beta)
        out = {}
        for k in keys:
            shape = shapes[k] if shapes is not None else tuple(beta[k].shape[1:])
            a = alpha[:, k.layer].reshape(-1, *([1] * len(shape)))
            out[k] = a.expand(alpha.shape[0], *shape).clone()
        return out
    if beta is None:
        raise ValueError("combined mode needs element coefficients")
    out = {}
    for k, b in beta.items():
        a = alpha[:, k.layer].double().reshape(-1, *([1] * (b.ndim - 1)))
        num = a * b.double()
        out[k] = (num / num.sum(0, keepdim=True)).float()
    return out


def alpha_projection_sweep(states, n_specialists: int, cfg, weights: torch.Tensor, counts=(32, 256, 1024),
                           seeds=range(5), progress=None) -> dict[int, torch.Tensor]:
    """alpha [n_seeds, K, L] per projection count: how alpha settles as projections grow (Table 7).
    ``progress(message, fraction)`` is called after each projection set."""
    out = {}
    seeds = list(seeds)
    total, done = len(counts) * len(seeds), 0
    for n in counts:
        runs = []
        for s in seeds:
            D = swd_matrix(states, n_specialists, cfg, n_projections=n, seed=cfg.seed + 1000 * s)
            runs.append(layer_coefficients(D, cfg, weights).alpha)
            done += 1
            if progress:
                progress(f"{n} projections, set {len(runs)} of {len(seeds)}", done / total)
        out[int(n)] = torch.stack(runs)
    return out


def mean_lambda_per_layer(lam: dict[LoraKey, torch.Tensor], num_layers: int) -> torch.Tensor:
    """[K, L]: mean merge coefficient of each specialist over all LoRA elements of each block."""
    K = next(iter(lam.values())).shape[0]
    tot = torch.zeros(K, num_layers, dtype=torch.float64)
    cnt = torch.zeros(num_layers, dtype=torch.float64)
    for k, v in lam.items():
        tot[:, k.layer] += v.double().reshape(K, -1).sum(1)
        cnt[k.layer] += v[0].numel()
    return (tot / cnt.clamp_min(1)).float()


def disagreements(gz: torch.Tensor, top: int = 20) -> list[tuple[tuple[int, ...], float]]:
    """Elements where the specialists' z-scored scores differ most: (index, max - min across specialists)."""
    spread = (gz.max(0).values - gz.min(0).values).reshape(-1)
    n = min(int(top), spread.numel())
    vals, idx = torch.topk(spread, n)
    shape = tuple(gz.shape[1:])
    out = []
    for v, i in zip(vals.tolist(), idx.tolist()):
        coord = []
        for s in reversed(shape):
            coord.append(i % s)
            i //= s
        out.append((tuple(reversed(coord)), float(v)))
    return out
