"""Formula tests on hand-made signals for every step of docs/METHOD.md sections 2-4, both presets."""

import math

import numpy as np
import pytest
import torch

from esm_core.adapters import LoraKey
from esm_core.coefficients import combine, element_coefficients, layer_coefficients, modality_weights, zscore
from esm_core.config import MethodConfig

PRESETS = ["reference", "paper"]


def _np_z(x):
    x = np.asarray(x, dtype=float)
    sd = x.std()
    return np.zeros_like(x) if sd == 0 else (x - x.mean()) / sd


def _np_softmax(cols, tau):
    e = np.exp(np.asarray(cols, dtype=float) / tau)
    return e / e.sum(0)


D = torch.tensor([  # [K=3, M=2, L+1=4]
    [[0.0, 1.0, 3.0, 4.0], [0.0, 0.5, 0.7, 2.0]],
    [[0.2, 0.4, 0.5, 1.5], [0.0, 2.0, 2.5, 2.6]],
    [[0.0, 0.3, 0.3, 0.3], [0.1, 0.1, 0.1, 0.1]],
])


@pytest.mark.parametrize("preset", PRESETS)
def test_layer_steps_by_hand(preset):
    cfg = MethodConfig.from_preset(preset)
    w = torch.tensor([[1.0, 0.5], [0.5, 1.0], [1.0, 1.0]])
    ls = layer_coefficients(D, cfg, w)
    K, M, L1 = D.shape
    for k in range(K):
        for m in range(M):
            d = D[k, m].double().numpy()
            if preset == "paper":  # Delta_l = D_l - D_{l-1}, l = 1..L
                delta = [d[l] - d[l - 1] for l in range(1, L1)]
            else:  # reference: Delta_1 = D_1
                delta = [d[1]] + [d[l] - d[l - 1] for l in range(2, L1)]
            assert np.allclose(ls.delta[k, m].numpy(), delta, atol=1e-6)
            assert np.allclose(ls.z[k, m].numpy(), _np_z(delta), atol=1e-5)
    s = np.einsum("kml,km->kl", ls.z.double().numpy(), w.double().numpy())
    assert np.allclose(ls.s.numpy(), s, atol=1e-5)
    tau = 1.0 if preset == "paper" else 0.5
    assert cfg.tau_layer == tau
    assert np.allclose(ls.alpha.numpy(), _np_softmax(s, tau), atol=1e-6)


def test_first_delta_only_differs_when_inputs_differ():
    base = MethodConfig.from_preset("reference")
    a = layer_coefficients(D, base)
    b = layer_coefficients(D, base.replace(first_delta="diff"))
    # specialist 0 has D_0 = 0 for modality 0: same Delta there; specialist 1 has D_0 = 0.2: different
    assert torch.allclose(a.delta[0, 0], b.delta[0, 0])
    assert not torch.allclose(a.delta[1, 0], b.delta[1, 0])


def test_constant_increments_give_zero_z():
    Dc = torch.zeros(2, 1, 5)
    Dc[0, 0] = torch.tensor([0.0, 1, 2, 3, 4])  # Delta = 1 everywhere
    ls = layer_coefficients(Dc, MethodConfig.from_preset("paper"))
    assert torch.equal(ls.z, torch.zeros_like(ls.z))
    assert torch.allclose(ls.alpha, torch.full_like(ls.alpha, 0.5))


def test_modality_weights_own_and_others():
    w = modality_weights(["molecule", "protein", "cell"], ["protein", None], 0.25)
    assert w.tolist() == [[0.25, 1.0, 0.25], [1.0, 1.0, 1.0]]


def _scores(K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = [LoraKey(0, "self_attn.q_proj", "A"), LoraKey(0, "self_attn.q_proj", "B"),
            LoraKey(1, "mlp.up_proj", "A"), LoraKey(1, "mlp.up_proj", "B")]
    shapes = [(2, 5), (5, 2), (2, 3), (4, 2)]
    return {k: torch.rand(K, *s, generator=g) * (1 + i) for i, (k, s) in enumerate(zip(keys, shapes))}


@pytest.mark.parametrize("preset", PRESETS)
def test_element_steps_by_hand(preset):
    cfg = MethodConfig.from_preset(preset)
    g = _scores()
    es = element_coefficients(g, cfg)
    K = 3
    for k in range(K):
        if cfg.zscore_scope == "tensor":
            for key, v in g.items():
                assert np.allclose(es.gz[key][k].numpy(), _np_z(v[k].numpy().ravel()).reshape(v[k].shape), atol=1e-5)
        else:
            for layer in (0, 1):
                keys = [key for key in g if key.layer == layer]
                flat = np.concatenate([g[key][k].numpy().ravel() for key in keys])
                zf = _np_z(flat)
                o = 0
                for key in keys:
                    n = g[key][k].numel()
                    assert np.allclose(es.gz[key][k].numpy().ravel(), zf[o:o + n], atol=1e-5)
                    o += n
    tau = 0.5 if preset == "paper" else 0.1
    for key in g:
        flat = es.gz[key].reshape(K, -1).double().numpy()
        assert np.allclose(es.beta[key].reshape(K, -1).numpy(), _np_softmax(flat, tau), atol=1e-6)


def test_layer_and_tensor_scopes_differ():
    g = _scores()
    a = element_coefficients(g, MethodConfig.from_preset("paper", zscore_scope="layer"))
    b = element_coefficients(g, MethodConfig.from_preset("paper", zscore_scope="tensor"))
    key = LoraKey(1, "mlp.up_proj", "B")
    assert not torch.allclose(a.gz[key], b.gz[key])


def test_combined_by_hand_and_modes():
    alpha = torch.tensor([[0.2, 0.5], [0.3, 0.25], [0.5, 0.25]])
    beta = element_coefficients(_scores(), MethodConfig.from_preset("paper")).beta
    lam = combine(alpha, beta, "combined")
    for key, b in beta.items():
        a = alpha[:, key.layer]
        for idx in np.ndindex(*b.shape[1:]):
            num = [a[k].item() * b[(k, *idx)].item() for k in range(3)]
            for k in range(3):
                assert math.isclose(lam[key][(k, *idx)].item(), num[k] / sum(num), rel_tol=1e-5)
    lay = combine(alpha, beta, "layer")
    ele = combine(alpha, beta, "element")
    for key in beta:
        assert torch.allclose(lay[key], alpha[:, key.layer].reshape(3, 1, 1).expand_as(beta[key]))
        assert torch.equal(ele[key], beta[key])


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("mode", ["combined", "layer", "element"])
def test_invariants_nonneg_sum_to_one_identical_and_permutation(preset, mode):
    cfg = MethodConfig.from_preset(preset, mode=mode)
    g = _scores(seed=3)
    ls = layer_coefficients(D, cfg)
    es = element_coefficients(g, cfg)
    lam = combine(ls.alpha, es.beta, mode)
    for v in lam.values():
        assert (v >= 0).all()
        assert torch.allclose(v.sum(0), torch.ones_like(v[0]), atol=1e-6)
    # K identical specialists -> 1/K everywhere
    Di = D[0:1].expand(3, -1, -1).clone()
    gi = {k: v[0:1].expand(3, *v.shape[1:]).clone() for k, v in g.items()}
    lam_i = combine(layer_coefficients(Di, cfg).alpha, element_coefficients(gi, cfg).beta, mode)
    for v in lam_i.values():
        assert torch.allclose(v, torch.full_like(v, 1 / 3), atol=1e-6)
    # permuting the specialists permutes the coefficients
    perm = [2, 0, 1]
    lam_p = combine(layer_coefficients(D[perm], cfg).alpha,
                    element_coefficients({k: v[perm] for k, v in g.items()}, cfg).beta, mode)
    for k in lam:
        assert torch.allclose(lam_p[k], lam[k][perm], atol=1e-6)


def test_temperature_sharpens():
    g = _scores()
    soft = element_coefficients(g, MethodConfig.from_preset("paper", tau_elem=5.0)).beta
    hard = element_coefficients(g, MethodConfig.from_preset("paper", tau_elem=0.05)).beta
    k = next(iter(g))
    assert hard[k].max(0).values.mean() > soft[k].max(0).values.mean()


def test_zscore_zero_std_gives_zeros():
    x = torch.ones(2, 7)
    assert torch.equal(zscore(x), torch.zeros_like(x))
