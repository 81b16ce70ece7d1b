"""The teaching trace recomputes every step for one element and agrees with the estimation."""

import pytest

from esm_core.analysis.explain import trace
from esm_core.pipeline import estimate, recompute


@pytest.fixture(scope="module")
def by_preset(workspace):
    """One pass per preset; the modes are cheap re-derivations of it."""
    base = workspace.spec.method
    return {p: estimate(workspace, base.replace(preset=p)) for p in ("reference", "paper")}


@pytest.mark.parametrize("preset", ["reference", "paper"])
@pytest.mark.parametrize("mode", ["combined", "layer", "element"])
def test_trace_agrees_with_stored_coefficients(by_preset, preset, mode):
    res = by_preset[preset]
    r = recompute(res, res.config.replace(mode=mode))
    keys = sorted(r.lam)
    for key, idx, name in [(keys[0], (0, 0), "mol"), (keys[5], (2, 1), "prot"), (keys[-1], (3, 1), "cell")]:
        t = trace(r, name, key, idx)
        assert t["layer"]["alpha"] == pytest.approx(t["layer"]["stored_alpha"], rel=1e-5)
        assert t["element"]["beta"] == pytest.approx(t["element"]["stored_beta"], rel=1e-4, abs=1e-7)
        assert t["element"]["gz"] == pytest.approx(t["element"]["gz_all"][r.specialists.index(name)], abs=1e-4)
        assert t["lambda"] == pytest.approx(t["stored_lambda"], rel=1e-4, abs=1e-7)
        assert sum(t["lambda_all"]) == pytest.approx(1.0)
        first = t["layer"]["modalities"][0]
        if preset == "paper" or key.layer > 0:
            assert first["delta"] == pytest.approx(first["D"] - first["D_prev"], abs=1e-6)
        else:  # reference: Delta_1 = D_1
            assert first["delta"] == pytest.approx(first["D"], abs=1e-6)
