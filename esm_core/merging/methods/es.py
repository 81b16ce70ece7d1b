"""ES-Merging (Lee, Kim, Hwang 2026): element-wise merge with embedding-space coefficients.

lambda^k_{l,j} comes from the ES estimation (pipeline.estimate): layer-wise alpha from sliced
Wasserstein increments, element-wise beta from absolute hidden-state-distance gradients, combined
by Eq. 4 (or one of them alone, per the ``mode`` parameter). The merge is Eq. 1 on the A and B
factors separately.
"""

from __future__ import annotations

from esm_core.coefficients import combine
from esm_core.errors import ESMError
from esm_core.merging.base import MergeMethod, MergeOutput, Param, weighted_sum


def _run(ctx, params) -> MergeOutput:
    res = ctx.es_result
    mode = params["mode"] or res.config.mode
    if mode == res.config.mode:
        lam = res.lam
    elif mode == "layer":
        shapes = {k: tuple(v.shape) for k, v in ctx.tensors[ctx.names[0]].items()}
        lam = combine(res.layer.alpha, None, "layer", keys=sorted(shapes), shapes=shapes)
    else:
        if res.element is None:

            raise ESMError(f"ES mode {mode!r} needs element coefficients, but they were not computed "
                           "(the estimation ran in layer mode).", fix="re-run the estimation with mode combined.")
        lam = combine(res.layer.alpha, res.element.beta, mode)
    if list(res.specialists) != list(ctx.names):

        raise ESMError(f"ES coefficients were computed for specialists {res.specialists}, not {ctx.names}.",
                       fix="re-run the estimation on these specialists.")
    return MergeOutput(weighted_sum(ctx, lam), coefficients=lam,
                       info={"preset": res.config.preset, "mode": mode})


METHOD = MergeMethod(
    name="es",
    pretty="ES-Merging",
    paper="Lee, Kim, Hwang (2026). Biological MLLM Merging via Embedding Space Signals.",
    url="https://github.com/WonbinLee067/es-merging",
    params=(Param("mode", "", "Coefficient to merge with: combined (Eq. 4), layer (alpha) or element (beta); "
                  "empty = the estimation's mode.", kind="choice", choices=("", "combined", "layer", "element")),),
    fn=_run,
    needs=frozenset({"es"}),
    summary="Layer-wise SWD signal x element-wise gradient signal, merged element by element.",
)
