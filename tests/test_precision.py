"""bf16 against float32 on the demo zoo: the signals accumulate in float32, so the coefficients stay close.

Measured on the zoo (16 probes a modality): the SWD matrix D differs by 0.3 % of its largest value,
alpha by up to 0.045, the top specialist of lambda agrees on 99 % of the LoRA elements. alpha moves
more than D because the layer score is a z-score of *differences* of consecutive layers' distances
(docs/METHOD.md section 2): a 0.3 % change of two close distances is a larger change of their
difference. Stated tolerance: D within 2 % of its largest value; alpha within 0.08; the specialist
with the largest alpha the same in every layer where float32's margin is at least 0.05 (near-ties
may flip); the top specialist of lambda the same for at least 97 % of the elements; and the
coefficient maps themselves run in float64 whatever the model's dtype.
"""

from __future__ import annotations

import pytest
import torch

from esm_core.paths import ZOO_DIR

pytestmark = pytest.mark.skipif(not (ZOO_DIR / "run.yaml").is_file(), reason="the demo zoo is not built")


def test_bf16_coefficients_stay_within_the_stated_tolerance_of_float32():
    from esm_core.coefficients import layer_coefficients
    from esm_core.pipeline import Workspace, estimate
    from esm_core.zoo.load import demo_spec

    res = {}
    for dtype in ("float32", "bfloat16"):
        ws = Workspace.from_spec(demo_spec(probes_per_modality=16, dtype=dtype))
        res[dtype] = estimate(ws)
    a, b = res["float32"], res["bfloat16"]
    assert (a.layer.D - b.layer.D).abs().max() < 0.02 * a.layer.D.abs().max()
    assert (a.layer.alpha - b.layer.alpha).abs().max() < 0.08
    top2 = a.layer.alpha.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) >= 0.05
    assert clear.any()
    assert torch.equal(a.layer.alpha.argmax(0)[clear], b.layer.alpha.argmax(0)[clear])
    again = layer_coefficients(b.layer.D, b.config, b.layer.weights)
    assert torch.allclose(again.alpha, b.layer.alpha, atol=1e-5)
    same = sum(int((a.lam[k].argmax(0) == b.lam[k].argmax(0)).sum()) for k in a.lam)
    assert same / sum(a.lam[k][0].numel() for k in a.lam) >= 0.97
    assert all(torch.isfinite(v).all() for v in b.lam.values())
