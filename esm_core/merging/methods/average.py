"""Plain average of the specialists' LoRA factors (the simplest baseline; Wortsman et al. 2022).

theta = (1/K) sum_k theta^k, applied to A and B separately like every method here (paper Eq. 1 with
lambda = 1/K). Note that averaging A and B separately is not averaging the weight updates B A.
"""

from __future__ import annotations

import torch

from esm_core.merging.base import MergeMethod, MergeOutput, weighted_sum


def _run(ctx, params) -> MergeOutput:
    K = len(ctx.names)
    lam = {k: torch.full((K,), 1.0 / K) for k in ctx.keys}
    return MergeOutput(weighted_sum(ctx, lam), coefficients=None, info={})


METHOD = MergeMethod(
    name="average",
    pretty="Average",
    paper="Wortsman et al. (2022). Model soups: averaging weights of multiple fine-tuned models.",
    url="https://arxiv.org/abs/2203.05482",
    params=(),
    fn=_run,
    summary="Uniform weights 1/K for every specialist.",
)
