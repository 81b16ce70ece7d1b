"""Task Arithmetic (Ilharco et al., ICLR 2023): add the scaled sum of the task vectors to the base.

    theta = theta_0 + lambda * sum_k w_k tau^k                     (Ilharco et al., Sec. 2)

For LoRA factors the base adapter is zero and tau^k is specialist k's factor itself (see ``_ops``), so
per factor (A and B separately, paper Eq. 1 with lambda^k = scaling * w_k):

    theta_{l,j} = scaling * sum_k w_k * theta^k_{l,j}

With ``density`` < 1 each specialist's factor is first trimmed to its int(density * numel) largest
magnitudes (this is stock PEFT's ``magnitude_prune`` combination). ``weights`` are optional
per-specialist multipliers (empty = 1 each). Scaling applies to A and B alike, so a module's update
B A grows with scaling**2; stock PEFT's ``add_weighted_adapter(weights=w)`` instead puts sqrt(w * s)
on each factor (s = alpha/r) and sets the merged scaling to 1: PEFT's w equals our w**2. A negative weight here negates both
factors of that specialist (its own B A term keeps its sign; only the cross terms flip), whereas PEFT
puts the sign on A only; use positive weights when comparing with PEFT.
"""

from __future__ import annotations

from esm_core.merging.base import MergeMethod, MergeOutput, Param, weighted_sum
from esm_core.merging.methods._ops import bcast, constant_lambda, mask_fraction, parse_weights, trim_masks


def task_arithmetic_lambda(ctx, scaling: float, weights: str = "", density: float = 1.0, trim_scope: str = "tensor"):
    w = parse_weights(weights, ctx.names) * float(scaling)
    if density >= 1.0:
        return constant_lambda(ctx, w), None
    masks = trim_masks(ctx, density, trim_scope)
    return {k: bcast(w, m) * m.float() for k, m in masks.items()}, masks


def _run(ctx, params) -> MergeOutput:
    lam, masks = task_arithmetic_lambda(ctx, params["scaling"], params["weights"], params["density"],
                                        params["trim_scope"])
    info = {"kept_fraction": mask_fraction(masks) if masks is not None else 1.0}
    return MergeOutput(weighted_sum(ctx, lam), coefficients=lam, info=info)


METHOD = MergeMethod(
    name="task_arithmetic",
    pretty="Task Arithmetic",
    paper="Ilharco et al. (2023). Editing Models with Task Arithmetic. ICLR 2023.",
    url="https://arxiv.org/abs/2212.04089",
    params=(
        Param("scaling", 0.4, "lambda: multiplies the summed factors (each of A and B, so B A scales with "
              "lambda^2). The paper picks it on validation data; 0.4 is its usual value.", min=0.0, max=10.0),
        Param("weights", "", "Optional per-specialist weights, '1,0.5,1' or 'mol=1,prot=0.5'; empty = 1 each.",
              kind="str"),
        Param("density", 1.0, "Fraction of each factor's entries kept by magnitude before summing "
              "(1 = no trimming; < 1 is PEFT's magnitude_prune).", min=0.0, max=1.0),
        Param("trim_scope", "tensor", "Trim per factor tensor, or over each specialist's whole adapter.",
              kind="choice", choices=("tensor", "model")),
    ),
    fn=_run,
    summary="Scaled sum of the specialists' factors (optionally magnitude-trimmed).",
)
