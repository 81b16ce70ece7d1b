"""The estimation end to end on the tiny world: invariants, determinism, recompute, save/load."""

import shutil

import pytest
import torch
from conftest import SAMPLES, make_spec

from esm_core.coefficients import alpha_projection_sweep, modality_weights
from esm_core.pipeline import Workspace, estimate, load_result, recompute, save_result


@pytest.fixture(scope="module")
def result(workspace):
    return estimate(workspace)


def _check_lambda(res):
    for k, v in res.lam.items():
        assert v.shape[0] == 3
        assert (v >= 0).all()
        assert torch.allclose(v.sum(0), torch.ones_like(v[0]), atol=1e-5), str(k)


def test_shapes_and_invariants(result):
    L = 2
    assert result.layer.D.shape == (3, 3, L + 1)
    assert result.layer.alpha.shape == (3, L)
    assert torch.allclose(result.layer.alpha.sum(0), torch.ones(L))
    assert torch.equal(result.layer.D[:, :, 0], torch.zeros(3, 3))  # shared encoders: same inputs
    assert (result.layer.D[:, :, 1:] > 0).all()
    assert len(result.lam) == 2 * 7 * L
    _check_lambda(result)
    st = result.states
    assert st.models == ["base", "mol", "prot", "cell"]
    assert st.pooled["molecule"].shape == (4, L + 1, 12, 32)
    last = st.tokens[L]["protein"]
    assert last.shape[0] == 4 and last.shape[1] == st.token_sample["protein"].shape[0]


def test_same_seed_same_coefficients_bitwise(world, result):
    ws2 = Workspace.from_spec(make_spec(world), samples=SAMPLES)
    again = estimate(ws2)
    assert torch.equal(again.layer.D, result.layer.D)
    for k in result.lam:
        assert torch.equal(again.lam[k], result.lam[k])
        assert torch.equal(again.element.g[k], result.element.g[k])


def test_identical_specialists_give_one_over_k(world, tmp_path):
    # identical = same weights AND same declared modality (the reference preset reads the own modality)
    ads = {n: shutil.copytree(world["adapters"]["prot"], tmp_path / n) for n in ("a", "b", "c")}
    for preset in ("reference", "paper"):
        ws = Workspace.from_spec(make_spec(world, names=("a", "b", "c"), mods=("protein",) * 3, adapters=ads,
                                           preset=preset), samples=SAMPLES)
        res = estimate(ws)
        for v in res.lam.values():
            assert torch.allclose(v, torch.full_like(v, 1 / 3), atol=1e-6)


def test_permuting_specialists_permutes_coefficients(world, workspace, result):
    """With shared projections the coefficients follow the specialists; with the authors' per-pair
    stream (the reference default) each specialist's projections depend on its place in the list."""
    perm_names = ("cell", "mol", "prot")
    ws = Workspace.from_spec(make_spec(world, names=perm_names, mods=("cell", "molecule", "protein")), samples=SAMPLES)
    shared = result.config.replace(swd_projections="shared")
    res, ref = estimate(ws, shared), estimate(workspace, shared)
    order = [2, 0, 1]  # position in the original order of cell, mol, prot
    assert torch.allclose(res.layer.D, ref.layer.D[order], atol=1e-6)
    for k in ref.lam:
        assert torch.allclose(res.lam[k], ref.lam[k][order], atol=1e-5)
    stream = estimate(ws)
    assert stream.config.swd_projections == "per_pair_stream"
    assert not torch.allclose(stream.layer.D, result.layer.D[order], atol=1e-4)


def test_recompute_cheap_changes_equal_a_fresh_run(workspace, result):
    cfg = result.config.replace(tau_elem=0.7, tau_layer=2.0, zscore_scope="layer", mode="element")
    cheap = recompute(result, cfg)
    fresh = estimate(workspace, cfg)
    for k in result.lam:
        assert torch.allclose(cheap.lam[k], fresh.lam[k], atol=1e-6)
    assert torch.equal(cheap.layer.D, result.layer.D)
    swd = recompute(result, result.config.replace(n_projections=64))
    assert not torch.equal(swd.layer.D, result.layer.D)
    with pytest.raises(Exception, match="needs a new pass"):
        recompute(result, result.config.replace(element_group=1))


def test_layer_mode_needs_no_gradients(workspace):
    cfg = workspace.spec.method.replace(mode="layer")
    res = estimate(workspace, cfg)
    assert res.element is None and res.timings["backward_s"] == 0.0
    for k, v in res.lam.items():
        assert torch.allclose(v, res.layer.alpha[:, k.layer].reshape(3, 1, 1).expand_as(v))


def test_separate_layout(workspace):
    cfg = workspace.spec.method.replace(layout="separate", probes_per_modality=8)
    res = estimate(workspace, cfg)
    assert res.probe_summary["n_probes"] == 24 and res.probe_summary["layout"] == "separate"
    _check_lambda(res)
    assert res.states.pooled["cell"].shape[2] == 8


def test_save_and_load_roundtrip(result, tmp_path):
    p = tmp_path / "c.safetensors"
    save_result(result, p, include_states=True)
    back = load_result(p)
    assert back.config == result.config and back.specialists == result.specialists
    for k in result.lam:
        assert torch.equal(back.lam[k], result.lam[k])
        assert torch.equal(back.element.beta[k], result.element.beta[k])
    assert torch.equal(back.states.pooled["cell"], result.states.pooled["cell"])
    # cheap recompute works from the file alone
    r2 = recompute(back, back.config.replace(tau_elem=0.5))
    _check_lambda(r2)


def test_projection_sweep_settles(result):
    w = modality_weights(result.modalities, result.own_modalities, 1.0)
    sweep = alpha_projection_sweep(result.states, 3, result.config, w, counts=(4, 256), seeds=range(4))
    spread = {n: a.std(0).mean().item() for n, a in sweep.items()}
    assert spread[256] < spread[4]


def test_batchers_for_two_probe_settings_keep_their_own_caps(world):
    """Workspace.batcher: a batcher built for another probe setting (here a lower max_modality_tokens) leaves an
    earlier one's encoders, probes and batches as they were, and leaves the workspace's own encoders (what
    answering uses) at the caps it was made with; the earlier one is kept and served again."""
    ws = Workspace.from_spec(make_spec(world), samples=SAMPLES)
    long_cfg = ws.spec.method
    short_cfg = long_cfg.replace(max_modality_tokens=3)
    caps = {m: e.max_tokens for m, e in ws.encoders.items()}
    b_long = ws.batcher(long_cfg)
    idx = list(range(min(4, b_long.probes.n_probes)))
    before = b_long.batch(idx)
    b_short = ws.batcher(short_cfg)
    assert b_short is not b_long and sum(b_short.lengths) < sum(b_long.lengths)
    assert all(e.max_tokens == 3 for e in b_short.encoders.values())
    assert {m: e.max_tokens for m, e in b_long.encoders.items()} == caps == {m: 128 for m in caps}
    assert {m: e.max_tokens for m, e in ws.encoders.items()} == caps
    after = b_long.batch(idx)
    assert torch.equal(before.inputs_embeds, after.inputs_embeds) and torch.equal(before.spans, after.spans)
    assert ws.batcher(long_cfg.replace(batch_size=2)) is b_long  # not a probe setting: the same batcher
    assert ws.batcher(short_cfg) is b_short


def test_probes_and_cost_need_no_turn_on_the_shared_model(world):
    """Building a probe setting's batcher and its cost estimate (what the app shows before Run) goes ahead while
    another thread holds the shared model, as an estimation does for tens of seconds in a busy room."""
    import threading

    from esm_core.pipeline import cost_of

    ws = Workspace.from_spec(make_spec(world), samples=SAMPLES)
    held, release = threading.Event(), threading.Event()

    def hold():
        with ws.sset.exclusive("someone's estimation"):
            held.set()
            release.wait(120)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(60)
    out = {}
    worker = threading.Thread(target=lambda: out.update(cost=cost_of(ws, ws.spec.method.replace(
        max_modality_tokens=5))), daemon=True)
    worker.start()
    worker.join(60)
    finished_while_held = not worker.is_alive() and holder.is_alive()
    release.set()
    holder.join(60)
    worker.join(60)
    assert finished_while_held and out["cost"].flops > 0
