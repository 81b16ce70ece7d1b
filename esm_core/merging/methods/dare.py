"""DARE (Yu et al., ICML 2024): Drop And REscale the task vectors, then merge.

For each factor (A and B separately; a LoRA factor is its own task vector, see ``_ops``):

    m^k ~ Bernoulli(1 - p)  elementwise,     tau_tilde^k = m^k * tau^k / (1 - p)

so E[tau_tilde^k] = tau^k. Then either

- ``dare_linear``: Task Arithmetic on the rescaled vectors, theta = scaling * sum_k w_k tau_tilde^k;
- ``dare_ties``:   TIES's sign election and disjoint mean on the rescaled vectors (DARE replaces the
  magnitude trim), theta = scaling * disjoint_mean.

Seeded: the masks come from one ``torch.Generator`` seeded with the merge seed (``ctx.seed``), drawn
factor by factor in the model's module order (A, then B; specialists in order). The same seed
gives the same drops, and the same drops as stock PEFT's ``add_weighted_adapter`` when torch's
global RNG holds that seed where PEFT starts drawing (tests/test_methods.py shows it).
With ``rescale`` off the kept entries are not divided by (1 - p) (the paper's ablation).
"""

from __future__ import annotations

from esm_core.merging.base import MergeMethod, MergeOutput, Param, weighted_sum
from esm_core.merging.methods._ops import bcast, dare_keep_masks, mask_fraction, parse_weights
from esm_core.merging.methods.ties import ties_lambda

PAPER = ("Yu, Yu, Yu, Huang, Li (2024). Language Models are Super Mario: Absorbing Abilities from Homologous "
         "Models as a Free Lunch. ICML 2024.")
URL = "https://arxiv.org/abs/2311.03099"


def dare_keep(ctx, drop_rate: float, rescale: bool, seed: int):
    masks = dare_keep_masks(ctx, drop_rate, seed)
    f = 1.0 / (1.0 - drop_rate) if rescale else 1.0
    return {k: m.float() * f for k, m in masks.items()}, masks


def _linear(ctx, params) -> MergeOutput:
    w = parse_weights(params["weights"], ctx.names) * params["scaling"]
    keep, masks = dare_keep(ctx, params["drop_rate"], params["rescale"], ctx.seed)
    lam = {k: bcast(w, v) * v for k, v in keep.items()}
    return MergeOutput(weighted_sum(ctx, lam), coefficients=lam,
                       info={"kept_fraction": mask_fraction(masks), "seed": ctx.seed})


def _ties(ctx, params) -> MergeOutput:
    w = parse_weights(params["weights"], ctx.names)
    keep, masks = dare_keep(ctx, params["drop_rate"], params["rescale"], ctx.seed)
    lam, agree = ties_lambda(ctx, keep=keep, weights=w, scaling=params["scaling"], sign_method=params["sign_method"])
    return MergeOutput(weighted_sum(ctx, lam), coefficients=lam,
                       info={"kept_fraction": mask_fraction(masks), "agreeing_fraction": mask_fraction(agree),
                             "seed": ctx.seed})


def _common(scaling: float):
    return (
        Param("drop_rate", 0.5, "p: fraction of each factor's entries dropped at random (the paper goes up "
              "to 0.9 for small deltas).", min=0.0, max=0.99),
        Param("rescale", True, "Divide the kept entries by (1 - p) so each factor keeps its expectation.",
              kind="bool"),
        Param("scaling", scaling, "lambda applied to the merged factors (A and B each).", min=0.0, max=10.0),
        Param("weights", "", "Optional per-specialist weights, '1,0.5,1' or 'mol=1,...'; empty = 1 each.",
              kind="str"),
    )


LINEAR = MergeMethod(
    name="dare_linear",
    pretty="DARE (linear)",
    paper=PAPER,
    url=URL,
    params=_common(0.4),
    fn=_linear,
    summary="Random drop with rate p, rescale by 1/(1-p), then Task Arithmetic. Seeded by the merge seed.",
)

TIES = MergeMethod(
    name="dare_ties",
    pretty="DARE (TIES)",
    paper=PAPER,
    url=URL,
    params=_common(1.0) + (Param("sign_method", "total", "Sign election of the TIES step: total mass or "
                                 "frequency.", kind="choice", choices=("total", "frequency")),),
    fn=_ties,
    summary="Random drop with rate p, rescale by 1/(1-p), then TIES sign election and disjoint mean.",
)
