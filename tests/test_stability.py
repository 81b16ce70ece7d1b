"""esm_core/analysis/stability.py and `python -m esm_core stability`: spread of alpha and lambda."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SAMPLES, make_spec

from esm_core.errors import ESMError
from esm_core.pipeline import Workspace


@pytest.fixture(scope="module")
def ws(world):
    return Workspace.from_spec(make_spec(world, probes_per_modality=12, n_projections=64), samples=SAMPLES)


def test_grouped_scores_sum_to_the_plain_scores_and_follow_the_units(ws):
    from esm_core.signals.collect import compute_signals

    cfg = ws.spec.method
    plain = compute_signals(ws.sset, ws.batcher(cfg), cfg)
    grouped = compute_signals(ws.sset, ws.batcher(cfg), cfg, n_groups=4)
    for n in ws.sset.names:
        for k, v in plain.scores[n].items():
            g = grouped.scores[n][k]
            assert g.shape == (4, *v.shape)
            torch.testing.assert_close(g.sum(0), v, rtol=1e-5, atol=1e-8)
    # group 0 holds units 0 and 4 (probes 0-1 and 8-9): its scores are those of a pass over those probes alone
    ps = ws.batcher(cfg).probes
    picked = {m: [ps.samples[m][r] for i in (0, 1, 8, 9) for (mm, r) in ps.probes[i] if mm == m] for m in ps.modalities}
    sub = Workspace.from_spec(make_spec(ws_world(ws), probes_per_modality=4, min_probes=2, n_projections=64),
                              samples=picked)
    assert [[r for _, r in p] for p in sub.batcher(sub.spec.method).probes.probes] == [[i] * 3 for i in range(4)]
    alone = compute_signals(sub.sset, sub.batcher(sub.spec.method), sub.spec.method)
    for n in ws.sset.names:
        for k, v in alone.scores[n].items():
            torch.testing.assert_close(grouped.scores[n][k][0], v, rtol=1e-4, atol=1e-7)


def ws_world(ws):
    from pathlib import Path

    base = Path(ws.spec.base)
    return {"base": base, "adapters": {s.name: s.adapter for s in ws.spec.specialists}, "dir": base.parent}


def s_lam(st) -> float:
    return st.summary()["lambda std (probes)"]


def test_stability_reports_spread_and_stable_tops(ws):
    from esm_core.analysis.stability import stability

    st = stability(ws, draws=4, groups=4, counts=(5, 10))
    K, L = st.alpha.shape
    assert st.alpha_boot.shape == st.alpha_seed.shape == (4, K, L)
    # two blocks: z-scores over two increments are +-1, so alpha is 1/3 whatever the draw (the zoo test below
    # sees alpha move); lambda moves through beta
    assert (st.alpha_boot.std(0) >= 0).all()
    assert s_lam(st) > 0
    s = st.summary()
    assert 0.0 <= s["stable top (probes)"] <= 1.0 and 0.0 <= s["stable top (seeds)"] <= 1.0
    assert set(s["alpha std by probes"]) == {"5", "10", "12"}
    assert len(st.block_rows()) == K * L and len(st.module_rows()) == len(st.stable_mask)
    for k, m in st.stable_mask.items():
        assert m.dtype == torch.bool and m.shape == ws.sset.adapters[ws.sset.names[0]].tensors[k].shape


@pytest.mark.parametrize("kw,needle", [
    ({"draws": 1}, "at least 2 draws"),
    ({"cfg_mode": "layer"}, "needs the element signal"),
])
def test_bad_stability_requests_are_refused(ws, kw, needle):
    from esm_core.analysis.stability import stability

    cfg = ws.spec.method.replace(mode=kw.pop("cfg_mode")) if "cfg_mode" in kw else None
    with pytest.raises(ESMError, match=needle):
        stability(ws, cfg, **kw)


def test_the_cli_writes_the_report(world, tmp_path, capsys):
    from conftest import write_run_yaml

    from esm_core.cli import main as cli

    run_yaml = write_run_yaml(tmp_path, world)
    out = tmp_path / "stab"
    assert cli(["stability", "--config", str(run_yaml), "--out", str(out), "--draws", "3", "--groups", "3",
                "--set", "n_projections=32", "--no-progress"]) == 0
    rep = json.loads((out / "stability.json").read_text())
    assert rep["summary"]["draws"] == 3 and rep["blocks"] and rep["modules"]
    assert "elements with a stable top specialist" in capsys.readouterr().out
    assert (out / "stability.safetensors").is_file()


def test_on_the_zoo_alpha_moves_with_probes_and_seeds_and_shrinks_with_more_probes():
    from esm_core.analysis.stability import stability
    from esm_core.paths import ZOO_DIR
    from esm_core.zoo.load import demo_spec

    if not (ZOO_DIR / "run.yaml").is_file():
        pytest.skip("the demo zoo is not built")
    # 6 draws: on the 8-block zoo, where many alphas sit near 0 or 1, 4 draws did not always order 10 vs 40
    ws = Workspace.from_spec(demo_spec(probes_per_modality=80, n_projections=128))
    st = stability(ws, draws=6, groups=10, counts=(10, 20))
    assert float(st.alpha_boot.std(0).mean()) > 0 and (st.alpha_seed - st.alpha).abs().max() > 0
    assert st.shrink[10] > st.shrink[20] > st.shrink[80]  # fewer probes, more spread
