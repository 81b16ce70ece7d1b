"""Trace one merge coefficient from the raw signals to lambda, every step with its live values.

For teaching (the app's Explain page): given a result, a specialist, a LoRA factor and an element,
:func:`trace` recomputes each step of docs/METHOD.md sections 2-4 for that element from the stored raw
numbers (D and g), so the intermediate values can be shown next to their formulas, and it checks
that they agree with what the estimation produced.

    t = trace(res, "molecule", LoraKey(3, "self_attn.q_proj", "B"), (17, 2))
    t["layer"]["alpha"], t["element"]["beta"], t["lambda"]
"""

from __future__ import annotations

import math

import torch

from esm_core.adapters import LoraKey


def _z(values: torch.Tensor, x: float) -> tuple[float, float, float]:
    v = values.double()
    mu = float(v.mean())
    sd = float(v.std(correction=0))
    return mu, sd, (x - mu) / sd if sd > 0 else 0.0


def trace(res, specialist: str, key: LoraKey, idx: tuple[int, int]) -> dict:
    """Every intermediate for lambda^k at (key, idx); values per specialist where the softmax needs them."""
    cfg = res.config
    names = res.specialists
    k = names.index(specialist)
    l = key.layer  # 0-based block index; the layer signal of block l+1 (block outputs are 1..L)
    D = res.layer.D.double()
    mods = res.modalities
    out: dict = {"specialist": specialist, "key": str(key), "index": tuple(idx), "block": l + 1,
                 "preset": cfg.preset, "config": cfg.resolved()}

    # ---- layer-wise (section 2)
    per_mod = []
    for m, mod in enumerate(mods):
        d_cur, d_prev = float(D[k, m, l + 1]), float(D[k, m, l])
        delta_all = res.layer.delta[k, m].double()
        delta = float(delta_all[l])
        mu, sd, z = _z(delta_all, delta)
        per_mod.append(dict(modality=mod, D=d_cur, D_prev=d_prev, delta=delta, mean=mu, std=sd, z=z,
                            weight=float(res.layer.weights[k, m]),
                            first_block_raw=(cfg.first_delta == "raw" and l == 0)))
    s_all = res.layer.s[:, l].double()
    s = float(sum(p["weight"] * p["z"] for p in per_mod))
    exp_s = [math.exp(float(v) / cfg.tau_layer) for v in s_all]
    alpha = exp_s[k] / sum(exp_s)
    out["layer"] = dict(modalities=per_mod, s=s, s_all=[float(v) for v in s_all], tau=cfg.tau_layer,
                        alpha=alpha, alpha_all=[e / sum(exp_s) for e in exp_s],
                        stored_alpha=float(res.layer.alpha[k, l]))

    # ---- element-wise (section 3)
    if res.element is not None:
        g = res.element.g
        gval = float(g[key][(k, *idx)])
        if cfg.zscore_scope == "tensor":
            scope_vals = g[key][k].reshape(-1)
            scope = f"tensor {key}"
        else:
            scope_vals = torch.cat([g[kk][k].reshape(-1) for kk in sorted(g) if kk.layer == l])
            scope = f"all LoRA elements of block {l + 1}"
        mu, sd, gz = _z(scope_vals, gval)
        gz_all = [float(res.element.gz[key][(j, *idx)]) for j in range(len(names))]
        exp_g = [math.exp(v / cfg.tau_elem) for v in gz_all]
        beta = exp_g[k] / sum(exp_g)
        out["element"] = dict(g=gval, scope=scope, scope_size=int(scope_vals.numel()), mean=mu, std=sd, gz=gz,
                              gz_all=gz_all, tau=cfg.tau_elem, beta=beta, beta_all=[e / sum(exp_g) for e in exp_g],
                              g_all=[float(g[key][(j, *idx)]) for j in range(len(names))],
                              stored_beta=float(res.element.beta[key][(k, *idx)]))

    # ---- combination (section 4)
    a_all = out["layer"]["alpha_all"]
    if cfg.mode == "layer" or res.element is None:
        lam_all = a_all
    elif cfg.mode == "element":
        lam_all = out["element"]["beta_all"]
    else:
        prod = [a * b for a, b in zip(a_all, out["element"]["beta_all"])]
        lam_all = [p / sum(prod) for p in prod]
    out["lambda"] = lam_all[k]
    out["lambda_all"] = lam_all
    out["stored_lambda"] = float(res.lam[key][(k, *idx)])
    out["mode"] = cfg.mode
    return out
