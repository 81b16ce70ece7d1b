"""How solid the coefficients are: a bootstrap over the probes and a sweep over the projection seeds.

One pass over the probes keeps the element scores per group of units (unit u in group u % G), next
to the pooled hidden states. Then, with no further pass:

- **probe bootstrap** (B draws): draw G groups with replacement; alpha from the SWD of the drawn
  groups' probes (pooled states, repeated as drawn), beta from the drawn groups' summed scores,
  lambda by Eq. 4 (the config's mode);
- **projection seeds** (B seeds): alpha from the full probe set with ``seed + 1 ... seed + B`` for the
  projections (every SWD scheme takes the seed), lambda with the full beta;
- **probe count** (alpha only): B subsets of n probes drawn without replacement, n in 10, 30, 110,
  330 (those below the probe count): how the spread of alpha shrinks with the probes.

Reported per block and module: the standard deviation of alpha and of lambda over the draws, and the
share of elements whose top specialist (largest lambda) is the full-data top in >= 90 % of draws.
Statistics are accumulated draw by draw (sum, sum of squares, agreement counts), so memory stays at
one draw's lambda whatever B. A drawn probe brings all its modalities' rows (joint layout: one of
each; separate: its one modality).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from esm_core.adapters import LoraKey
from esm_core.coefficients import (
    combine,
    element_coefficients,
    layer_coefficients,
    modality_weights,
    stack_scores,
    swd_matrix,
)
from esm_core.errors import ESMError
from esm_core.pipeline import Workspace
from esm_core.progress import ProgressFn
from esm_core.signals.collect import compute_signals

PROBE_COUNTS = (10, 30, 110, 330)
STABLE = 0.9  # a top specialist is stable when it is the full-data top in at least this share of draws


@dataclass
class Stability:
    names: list[str]
    draws: int
    groups: int
    alpha: torch.Tensor  # [K, L] full data
    alpha_boot: torch.Tensor  # [B, K, L] probe bootstrap
    alpha_seed: torch.Tensor  # [B, K, L] projection seeds
    lam_std: dict[str, dict[LoraKey, float]]  # "probes" / "seeds" -> key -> mean over elements of std over draws
    stable_top: dict[str, dict[LoraKey, float]]  # "probes" / "seeds" -> key -> share of stable elements
    stable_mask: dict[LoraKey, torch.Tensor]  # probe bootstrap: element's top is stable (bool, shape of the factor)
    shrink: dict[int, float] = field(default_factory=dict)  # probes -> mean std of alpha
    seconds: dict[str, float] = field(default_factory=dict)

    def block_rows(self) -> list[dict]:
        """Per block and specialist: alpha, its std over probe draws and over projection seeds."""
        rows = []
        for k, n in enumerate(self.names):
            for l in range(self.alpha.shape[1]):
                rows.append({"block": l + 1, "specialist": n, "alpha": float(self.alpha[k, l]),
                             "std (probes)": float(self.alpha_boot[:, k, l].std()),
                             "std (seeds)": float(self.alpha_seed[:, k, l].std())})
        return rows

    def module_rows(self) -> list[dict]:
        """Per LoRA factor: std of lambda and the share of elements with a stable top specialist."""
        return [{"block": k.layer + 1, "module": k.module, "factor": k.ab,
                 "lambda std (probes)": self.lam_std["probes"][k], "lambda std (seeds)": self.lam_std["seeds"][k],
                 "stable top (probes)": self.stable_top["probes"][k], "stable top (seeds)": self.stable_top["seeds"][k]}
                for k in sorted(self.lam_std["probes"])]

    def summary(self) -> dict:
        def mean(d):
            return sum(d.values()) / max(len(d), 1)
        return {"draws": self.draws, "groups": self.groups,
                "alpha std (probes)": float(self.alpha_boot.std(0).mean()),
                "alpha std (seeds)": float(self.alpha_seed.std(0).mean()),
                "lambda std (probes)": mean(self.lam_std["probes"]), "lambda std (seeds)": mean(self.lam_std["seeds"]),
                "stable top (probes)": mean(self.stable_top["probes"]),
                "stable top (seeds)": mean(self.stable_top["seeds"]),
                "alpha std by probes": {str(n): v for n, v in self.shrink.items()}}


class _Acc:
    """Streaming std of lambda and agreement of its top specialist with the full-data top."""

    def __init__(self, full: dict[LoraKey, torch.Tensor]):
        self.top = {k: v.argmax(0) for k, v in full.items()}
        self.s = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in full.items()}
        self.ss = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in full.items()}
        self.agree = {k: torch.zeros(v.shape[1:], dtype=torch.int32) for k, v in full.items()}
        self.n = 0

    def add(self, lam: dict[LoraKey, torch.Tensor]) -> None:
        self.n += 1
        for k, v in lam.items():
            v = v.double()
            self.s[k] += v
            self.ss[k] += v * v
            self.agree[k] += (v.argmax(0) == self.top[k]).int()

    def std(self) -> dict[LoraKey, float]:
        out = {}
        for k in self.s:
            var = (self.ss[k] / self.n - (self.s[k] / self.n) ** 2).clamp_min(0) * self.n / max(self.n - 1, 1)
            out[k] = float(var.sqrt().mean())
        return out

    def stable(self) -> dict[LoraKey, torch.Tensor]:
        return {k: a.double() / self.n >= STABLE for k, a in self.agree.items()}


def _subset(states, rows: dict[str, torch.Tensor]):
    return SimpleNamespace(pooled={m: states.pooled[m][:, :, rows[m]] for m in states.modalities},
                           modalities=states.modalities)


def stability(ws: Workspace, cfg=None, *, draws: int = 20, groups: int = 20, seed: int = 0,
              counts=PROBE_COUNTS, progress: ProgressFn | None = None) -> Stability:
    """The bootstrap and seed sweep of the module docstring (one pass over the probes, then none)."""
    cfg = cfg or ws.spec.method
    if draws < 2:
        raise ESMError(f"stability needs at least 2 draws, got {draws}.", fix="use --draws 2 or more (20 is usual).")
    if cfg.mode == "layer":
        raise ESMError("stability reports lambda, which needs the element signal; mode is 'layer'.",
                       fix="use mode combined or element.")
    t0 = time.perf_counter()
    batcher = ws.batcher(cfg)
    n_units = math.ceil(batcher.probes.n_probes / max(1, cfg.element_group))
    G = max(2, min(int(groups), n_units))
    with ws.sset.exclusive("stability"):
        sig = compute_signals(ws.sset, batcher, cfg, progress=progress, n_groups=G)
    t_pass = time.perf_counter() - t0
    names = list(ws.sset.names)
    K = len(names)
    states, mods = sig.states, sig.states.modalities
    w = modality_weights(mods, list(ws.sset.modalities), cfg.other_modality_weight)
    grouped = stack_scores(sig.scores, names)  # key -> [K, G, *shape]

    def alpha_of(st, s=None):
        return layer_coefficients(swd_matrix(st, K, cfg, seed=s), cfg, w).alpha

    def lam_of(alpha, g):
        return combine(alpha, element_coefficients(g, cfg).beta, cfg.mode)

    full_alpha = alpha_of(states)
    full_g = {k: v.sum(1) for k, v in grouped.items()}
    full = lam_of(full_alpha, full_g)
    n_rows = {m: states.pooled[m].shape[2] for m in mods}
    probes = batcher.probes.probes  # probe i -> [(modality, row of that modality's pooled states), ...]
    probe_group = torch.arange(len(probes)) // max(1, cfg.element_group) % G  # the group of each probe's unit

    def rows_of(idx) -> dict[str, torch.Tensor]:
        return {m: torch.tensor([r for i in idx for (mm, r) in probes[i] if mm == m], dtype=torch.long) for m in mods}

    gen = torch.Generator().manual_seed(int(seed))
    acc_p, acc_s = _Acc(full), _Acc(full)
    boot, seeds = [], []
    for b in range(draws):
        cnt = torch.bincount(torch.randint(G, (G,), generator=gen), minlength=G)  # groups drawn with replacement
        idx = torch.cat([torch.nonzero(probe_group == g).flatten().repeat(int(c)) for g, c in enumerate(cnt)])
        a = alpha_of(_subset(states, rows_of(idx.tolist())))
        boot.append(a)
        g = {k: (v * cnt.view(1, G, *([1] * (v.ndim - 2))).to(v.dtype)).sum(1) for k, v in grouped.items()}
        acc_p.add(lam_of(a, g))
        a_s = alpha_of(states, int(cfg.seed) + 1 + b)
        seeds.append(a_s)
        acc_s.add(lam_of(a_s, full_g))
        if progress:
            progress(f"draw {b + 1}/{draws}", (b + 1) / draws)
    t_draws = time.perf_counter() - t0 - t_pass
    shrink = {}
    per_mod = min(n_rows.values())
    for n in counts:  # n samples per modality, drawn without replacement
        if n >= per_mod:
            continue
        sub = []
        for _ in range(draws):
            sub.append(alpha_of(_subset(states, {m: torch.randperm(n_rows[m], generator=gen)[:n] for m in mods})))
        shrink[n] = float(torch.stack(sub).std(0).mean())
    shrink[per_mod] = float(torch.stack(boot).std(0).mean())  # all samples: the bootstrap's spread
    mask = acc_p.stable()
    return Stability(names, draws, G, full_alpha, torch.stack(boot), torch.stack(seeds),
                     {"probes": acc_p.std(), "seeds": acc_s.std()},
                     {"probes": {k: float(v.double().mean()) for k, v in mask.items()},
                      "seeds": {k: float(v.double().mean()) for k, v in acc_s.stable().items()}},
                     mask, shrink,
                     {"pass_s": t_pass, "draws_s": t_draws, "total_s": time.perf_counter() - t0})
