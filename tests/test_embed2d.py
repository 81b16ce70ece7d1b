"""2-D maps: gathering points from hidden states, PCA against numpy, UMAP shape and determinism."""

import numpy as np
import pytest

from esm_core.analysis.embed2d import gather_points, pca_2d, project_2d
from esm_core.errors import ESMError
from esm_core.pipeline import estimate


@pytest.fixture(scope="module")
def states(workspace):
    return estimate(workspace).states


def test_gather_sample_and_token_points(states):
    p = gather_points([states], -1, "protein", ["base", "prot"])
    n = states.pooled["protein"].shape[2]
    assert p.X.shape == (2 * n, 32) and p.model[:n] == ["base"] * n and p.model[n:] == ["prot"] * n
    assert np.array_equal(p.X[n:], states.pooled["protein"][2, -1].numpy())
    t = gather_points([states], -1, "cell", ["mol"], level="token")
    rows = states.tokens[states.num_layers]["cell"][1]
    assert np.array_equal(t.X, rows.numpy()) and t.token[0] == 0 and (t.token >= 0).all()
    with pytest.raises(ESMError, match="Per-token states of block 1"):
        gather_points([states], 1, "cell", ["mol"], level="token")
    with pytest.raises(ESMError, match="No hidden states"):
        gather_points([states], -1, "cell", ["merged"])


def test_pca_matches_numpy_variance_and_umap_runs():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 8)) * np.array([5, 3, 1, 1, 1, 1, 1, 1])
    xy = pca_2d(X)
    Xc = X - X.mean(0)
    ev = np.linalg.svd(Xc, compute_uv=False) ** 2
    assert np.allclose(np.sort((xy.astype(float) ** 2).sum(0))[::-1], ev[:2], rtol=1e-4)
    u1, u2 = project_2d(X, "umap", seed=1), project_2d(X, "umap", seed=1)
    assert u1.shape == (60, 2) and np.allclose(u1, u2)
    with pytest.raises(ESMError):
        project_2d(X, "tsne")
