"""SWD against POT on the same projections, and its invariants (docs/METHOD.md section 2, step 2)."""

import numpy as np
import ot
import pytest
import torch
from sklearn.preprocessing import StandardScaler

from esm_core.signals.swd import projections, sliced_wasserstein, standardize_pair


def _pair(n, m, d, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = torch.randn(m, d, generator=g, dtype=torch.float64) * 1.7 + 0.4
    return X, Y


@pytest.mark.parametrize("n,m,d,p", [(50, 50, 8, 2.0), (40, 40, 16, 1.0), (33, 21, 5, 2.0), (30, 47, 12, 3.0),
                                     (330, 330, 64, 2.0)])
def test_matches_pot_on_same_projections(n, m, d, p):
    X, Y = _pair(n, m, d, seed=n + m + d)
    P = projections(d, 256, seed=7)
    ours = float(sliced_wasserstein(X, Y, P, p=p))
    ref = ot.sliced_wasserstein_distance(X.numpy(), Y.numpy(), projections=P.numpy(), p=p)
    assert abs(ours - ref) / ref < 1e-6


def test_batched_equals_one_by_one_and_log_holds_per_projection_emd():
    Xs = torch.randn(3, 4, 20, 6, dtype=torch.float64)
    Ys = torch.randn(3, 4, 20, 6, dtype=torch.float64) + 1
    P = projections(6, 64, seed=1)
    D, log = sliced_wasserstein(Xs, Ys, P, log=True, chunk=5)
    assert D.shape == (3, 4) and log["projected_emd"].shape == (3, 4, 64)
    for i in range(3):
        for j in range(4):
            one = sliced_wasserstein(Xs[i, j], Ys[i, j], P)
            assert torch.allclose(D[i, j], one, rtol=1e-12)
    assert torch.allclose(log["projected_emd"].mean(-1).sqrt(), D)


def test_standardized_swd_matches_sklearn_scaler_then_pot():
    X, Y = _pair(40, 40, 9, seed=3)
    X[:, 2] = 5.0
    Y[:, 2] = 5.0  # a constant feature: StandardScaler keeps scale 1
    sc = StandardScaler().fit(np.vstack([X.numpy(), Y.numpy()]))
    P = projections(9, 128, seed=2)
    ref = ot.sliced_wasserstein_distance(sc.transform(X.numpy()), sc.transform(Y.numpy()), projections=P.numpy())
    ours = float(sliced_wasserstein(X, Y, P, standardize=True))
    assert abs(ours - ref) / ref < 1e-6
    Xs, Ys = standardize_pair(X, Y)
    assert torch.allclose(Xs, torch.from_numpy(sc.transform(X.numpy())), atol=1e-12)


def test_distance_of_a_set_to_itself_is_zero_and_distance_is_symmetric():
    X, Y = _pair(25, 25, 4, seed=5)
    P = projections(4, 50, seed=0)
    assert float(sliced_wasserstein(X, X, P)) == 0.0
    assert torch.allclose(sliced_wasserstein(X, Y, P), sliced_wasserstein(Y, X, P))


def test_projections_are_seeded_unit_columns():
    a, b, c = projections(10, 30, 4), projections(10, 30, 4), projections(10, 30, 5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a.norm(dim=0), torch.ones(30, dtype=a.dtype))


def test_bad_shapes_raise():
    P = projections(4, 8, 0)
    with pytest.raises(ValueError, match="dimension mismatch"):
        sliced_wasserstein(torch.randn(5, 3), torch.randn(5, 3), P)
    with pytest.raises(ValueError, match="batch shapes differ"):
        sliced_wasserstein(torch.randn(2, 5, 4), torch.randn(3, 5, 4), P)
    with pytest.raises(ValueError, match="empty"):
        sliced_wasserstein(torch.randn(0, 4), torch.randn(5, 4), P)
