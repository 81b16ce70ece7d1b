"""EMR-Merging (Huang et al., NeurIPS 2024): Elect, Mask & Rescale.

For each factor (A and B separately; a LoRA factor is its own task vector, see ``_ops``):

    gamma   = sgn(sum_k tau^k)                                  (elected sign; a tie goes to +1)
    eps     = max_k |tau^k| over the k with sgn(tau^k) = gamma    (elected magnitude)
    tau_uni = gamma * eps                                       (unified task vector)
    M^k     = [tau^k * tau_uni > 0]                             (task-specific mask)
    r^k     = sum |tau^k| / sum |M^k * tau_uni|                 (task-specific rescaler; the sums run
                                                                 over the whole adapter, the paper's
                                                                 choice, or per factor: rescale_scope)

EMR is per task by design: task k is served by  theta^k = r^k * M^k * tau_uni.

**Serving ONE merged model** (this workbench's prompts mix modalities, so one adapter must answer
every task). ``serve`` chooses:

- ``mean`` (default): the average of the K task-specific models,
  theta = (1/K) sum_k r^k M^k tau_uni = tau_uni * mean_k(r^k M^k): the unified vector with the
  averaged modulator. It treats every task alike and needs no task id at inference.
- ``task``: the model of one specialist (``task`` = its name), as EMR serves that task.
- ``unified``: tau_uni alone (the paper's "no masks, no rescalers" ablation).

The masks, rescalers and unified vector are saved (``MergeOutput.extra_tensors``, in
coefficients.safetensors: ``emr/unified/<factor>``, ``emr/mask/<specialist>/<factor>``,
``emr/rescaler/<specialist>`` or ``.../<factor>``) so every task-specific model can be rebuilt with
:func:`task_factors`. As Eq. 1 coefficients: tau_uni takes each entry from the specialist that
holds the elected magnitude, so lambda is that specialist's (serving) factor at the entry, 0 elsewhere.
"""

from __future__ import annotations

import torch

from esm_core.adapters import LoraKey
from esm_core.errors import ESMError
from esm_core.merging.base import MergeMethod, MergeOutput, Param, weighted_sum
from esm_core.merging.methods._ops import agree_mask, elect_sign


def emr_elect(ctx):
    """Per factor: (tau_uni, masks [K, *shape] bool, source [*shape] index of the specialist it came from)."""
    out = {}
    for k in ctx.keys:
        st = ctx.stacked(k)
        gamma = elect_sign(st, "total")
        mag = st.abs() * agree_mask(st, gamma)
        eps, src = mag.max(0)  # first specialist among equal maxima
        uni = gamma * eps
        masks = (st * uni.unsqueeze(0)) > 0
        out[k] = (uni, masks, src)
    return out


def emr_rescalers(ctx, elected, scope: str = "model") -> dict:
    """r^k = sum|tau^k| / sum|M^k tau_uni|: {name: [1]} for scope 'model', {(name, key): [1]} for 'tensor'.

    A specialist with nothing under its mask (all entries zero or against the elected sign) gets 0.
    """
    num, den = {}, {}
    for k, (uni, masks, _) in elected.items():
        for i, n in enumerate(ctx.names):
            a = float(ctx.tensors[n][k].float().abs().sum())
            b = float((masks[i].float() * uni.abs()).sum())
            key = n if scope == "model" else (n, k)
            num[key] = num.get(key, 0.0) + a
            den[key] = den.get(key, 0.0) + b
    return {key: torch.tensor([num[key] / den[key] if den[key] > 0 else 0.0]) for key in num}


def _rescaler(res: dict, name: str, key: LoraKey) -> float:
    return float(res[name] if name in res else res[(name, key)])


def task_factors(ctx_keys, unified: dict, masks: dict, rescalers: dict, name: str) -> dict:
    """Rebuild specialist `name`'s EMR model: r * M * tau_uni per factor (masks[name][key], rescalers as saved)."""
    return {k: _rescaler(rescalers, name, k) * masks[name][k].float() * unified[k] for k in ctx_keys}


def _run(ctx, params) -> MergeOutput:
    serve, task, scope = params["serve"], params["task"].strip(), params["rescale_scope"]
    if serve == "task" and task not in ctx.names:
        raise ESMError(f"EMR serve='task' needs parameter task to name a specialist, got {task!r}.",
                       fix=f"set task to one of {ctx.names}, or serve 'mean'.")
    if serve != "task" and task:
        raise ESMError(f"EMR parameter task={task!r} is only used with serve='task' (serve is {serve!r}).",
                       fix="clear task, or set serve to 'task'.")
    elected = emr_elect(ctx)
    res = emr_rescalers(ctx, elected, scope)
    K = len(ctx.names)
    lam, extra = {}, {}
    for k, (uni, masks, src) in elected.items():
        r = torch.tensor([_rescaler(res, n, k) for n in ctx.names]).reshape((K,) + (1,) * uni.ndim)
        if serve == "mean":
            mod = (r * masks.float()).mean(0)
        elif serve == "task":
            i = ctx.names.index(task)
            mod = r[i] * masks[i].float()
        else:
            mod = torch.ones_like(uni)
        mod = mod * (uni != 0)
        lam[k] = torch.nn.functional.one_hot(src, K).movedim(-1, 0).float() * mod.unsqueeze(0)
        extra[f"emr/unified/{k}"] = uni
        for i, n in enumerate(ctx.names):
            extra[f"emr/mask/{n}/{k}"] = masks[i].float()
    for key, v in res.items():
        extra[f"emr/rescaler/{key}" if isinstance(key, str) else f"emr/rescaler/{key[0]}/{key[1]}"] = v
    info = {"serve": serve, "task": task or None,
            "rescalers": {n: float(res[n]) for n in ctx.names} if scope == "model" else "per factor (saved)",
            "mask_fraction": {n: float(sum(int(m[i].sum()) for _, m, _ in elected.values()))
                              / max(1, sum(m[i].numel() for _, m, _ in elected.values()))
                              for i, n in enumerate(ctx.names)}}
    return MergeOutput(weighted_sum(ctx, lam), coefficients=lam, info=info, extra_tensors=extra)


METHOD = MergeMethod(
    name="emr",
    pretty="EMR-Merging",
    paper="Huang et al. (2024). EMR-Merging: Tuning-Free High-Performance Model Merging. NeurIPS 2024.",
    url="https://arxiv.org/abs/2405.17461",
    params=(
        Param("serve", "mean", "How ONE merged model is served (EMR is per task): mean of the task-specific "
              "models, one task's model, or the unified vector alone.", kind="choice",
              choices=("mean", "task", "unified")),
        Param("task", "", "Specialist whose task-specific model is served when serve = task.", kind="str"),
        Param("rescale_scope", "model", "Rescaler sums over each specialist's whole adapter (paper) or per "
              "factor tensor.", kind="choice", choices=("model", "tensor")),
    ),
    fn=_run,
    summary="Elected unified vector + per-specialist masks and rescalers (saved); one model served as their mean.",
)
