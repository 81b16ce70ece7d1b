"""AppTest of the analysis pages (Overview, Layer signals, Element signals, Embeddings, Explain).

Each test runs the app on the demo zoo (or the tiny world when the zoo is absent), computes once
(st.cache_resource keeps the result for the whole test session) and checks that what the page
shows equals the result held in the session (values, not only "no exception").
"""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch
from conftest import ROOT
from streamlit.testing.v1 import AppTest

from esm_core.zoo.generic import rule_value


def _ok(at):
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _computed_app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.run()
    _ok(at)
    at.button(key="run").click().run()
    _ok(at)
    if page:
        at.switch_page(f"pages/{page}.py").run()
        _ok(at)
    return at


def _figures(at) -> list[dict]:
    return [json.loads(p.proto.spec) for p in at.get("plotly_chart")]


def _arr(v) -> np.ndarray:
    """A plotly JSON array: a list, or a typed array {dtype, bdata (base64), shape}."""
    if isinstance(v, dict) and "bdata" in v:
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        return a.reshape([int(x) for x in str(v["shape"]).split(",")]) if "shape" in v else a
    return np.asarray(v, dtype=float)


def test_overview_runs_and_reports(app_env):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.run()
    _ok(at)
    names = list(at.dataframe[0].value["name"])
    assert at.title[0].value == "ES-Merging workbench" and len(names) >= 2
    assert at.session_state["esm"].base_result is None and not at.metric  # nothing computed before Run
    at.button(key="run").click().run()
    _ok(at)
    res = at.session_state["esm"].base_result
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["probes"] == str(res.probe_summary["n_probes"])
    assert metrics["LoRA factors"] == str(len(res.lam))
    mean_lam = next(d.value for d in at.dataframe if "specialist" in d.value.columns and "block 1" in d.value.columns)
    assert list(mean_lam["specialist"]) == res.specialists
    assert np.allclose(mean_lam.drop(columns="specialist").sum(axis=0).to_numpy(), 1.0, atol=2e-3)
    figs = _figures(at)
    heat = next(f for f in figs if "α per block" in f["layout"]["title"]["text"])
    assert np.allclose(_arr(heat["data"][0]["z"]), res.layer.alpha.numpy().T, atol=1e-6)
    # the session file round-trips what the sidebar saves (AppTest does not rerun the sidebar script)
    from ui.session_io import read_session, session_bytes

    esm = at.session_state["esm"]
    sp, cfg, samples = esm.spec, esm.method, esm.samples
    for with_states in (False, True):
        data = session_bytes(sp, cfg, samples, res, include_states=with_states)
        sp2, cfg2, samples2, res2 = read_session(data)
        assert cfg2 == cfg and samples2 == samples and [s.name for s in sp2.specialists] == res.specialists
        for k in res.lam:  # re-derived from the stored signals, bit for bit
            assert torch.equal(res2.lam[k], res.lam[k])
        assert torch.equal(res2.layer.alpha, res.layer.alpha)
        if with_states:
            assert torch.equal(res2.states.pooled[res.modalities[0]], res.states.pooled[res.modalities[0]])
        else:
            assert res2.states is None
    with pytest.raises(Exception, match="not a safetensors session file|not a workbench session"):
        read_session(b"not a session")


def test_layer_page_shows_alpha_and_temperature_rederives(app_env):
    at = _computed_app("layer_signals")
    res = at.session_state["esm"].base_result
    figs = _figures(at)
    swd = next(f for f in figs if "Sliced Wasserstein" in f["layout"]["title"]["text"])
    ys = np.concatenate([_arr(t["y"]) for t in swd["data"]])
    assert np.isclose(ys.max(), float(res.layer.D.max()), rtol=1e-5)
    tau = at.number_input(key="layer_tau_layer")
    tau.set_value(3.0).run()
    _ok(at)
    cfg = at.session_state["esm"].method
    assert cfg.tau_layer == 3.0 and at.session_state["esm"].base_result is res  # no new pass
    heat = next(f for f in _figures(at) if "α per block" in f["layout"]["title"]["text"])
    expect = torch.softmax(res.layer.s.double() / 3.0, dim=0).numpy().T
    assert np.allclose(_arr(heat["data"][0]["z"]), expect, atol=1e-5)
    at.button(key="ls_sweep_btn").click().run()
    _ok(at)
    assert any("Table 7" in f["layout"]["title"]["text"] for f in _figures(at))


def test_element_page_tables_match_result(app_env):
    at = _computed_app("element_signals")
    res = at.session_state["esm"].base_result
    df = next(d.value for d in at.dataframe if "spread of z" in d.value.columns)
    key = sorted(res.lam)[0]  # the first block/module/A is selected by default
    for _, row in df.head(5).iterrows():
        for k, n in enumerate(res.specialists):
            assert row[f"λ·{n}"] == pytest.approx(float(res.lam[key][k, int(row["row"]), int(row["col"])]), abs=1e-4)
    assert df["spread of z"].is_monotonic_decreasing
    at.radio(key="el_ab").set_value("B").run()
    _ok(at)
    assert any(".lora_B`" in c.value for c in at.caption)


def test_embeddings_page_maps_every_model(app_env):
    at = _computed_app("embeddings")
    res = at.session_state["esm"].base_result
    fig = next(f for f in _figures(at) if "PCA" in f["layout"]["title"]["text"])
    n_points = sum(len(_arr(t["x"])) for t in fig["data"])
    n_samples = res.states.pooled[res.modalities[0]].shape[2]
    assert n_points == (1 + len(res.specialists)) * n_samples
    assert any("centroid" in c.value for c in at.caption)


def test_embeddings_colour_search_density_and_side_by_side(app_env):
    from esm_core.analysis.properties import sample_properties

    at = _computed_app("embeddings")
    res = at.session_state["esm"].base_result
    mod = res.modalities[0]
    colours = at.selectbox(key="emb_color").options
    kind = {"molecule": "smiles", "protein": "protein", "cell": "genes"}.get(mod)
    if kind == "smiles":
        assert "molecular weight" in colours and "logP" in colours
        at.selectbox(key="emb_color").set_value("molecular weight").run()
        _ok(at)
        fig = next(f for f in _figures(at) if "PCA" in f["layout"]["title"]["text"])
        shown = np.concatenate([_arr(t["marker"]["color"]) for t in fig["data"] if t.get("type") in ("scatter", "scattergl")
                                and "color" in t.get("marker", {}) and not isinstance(t["marker"]["color"], str)])
        raws = at.session_state["esm"].samples  # the session's samples; the map shows the drawn probes of them
        want = sample_properties("smiles", list(dict.fromkeys(raws[mod])))["molecular weight"]
        assert shown.min() >= want.min() - 1e-6 and shown.max() <= want.max() + 1e-6
    # search rings the matches; density adds contours; two models side by side get one panel each
    first = at.session_state["esm"].samples[mod][0]
    at.text_input(key="emb_search").set_value(first[:6]).run()
    at.toggle(key="emb_density").set_value(True).run()
    at.toggle(key="emb_pair").set_value(True).run()
    _ok(at)
    fig = next(f for f in _figures(at) if "PCA" in f["layout"]["title"]["text"])
    names = {t.get("name") for t in fig["data"]}
    assert "search matches" in names and "density" in names
    assert "xaxis2" in fig["layout"]  # two panels
    assert any("match" in c.value for c in at.caption)


def test_explain_page_traces_to_the_stored_lambda(app_env):
    at = _computed_app("explain")
    res = at.session_state["esm"].base_result
    at.selectbox(key="ex_spec").set_value(res.specialists[1]).run()
    at.number_input(key="ex_row").set_value(1).run()
    _ok(at)
    key = sorted(res.lam)[0]
    lam = float(res.lam[key][1, 1, 0])
    head = next(h.value for h in at.header if h.value.startswith("λ ="))
    assert float(head.split("=")[1]) == pytest.approx(lam, rel=1e-3, abs=1e-6)
    assert len(at.get("latex")) >= 6


def test_query_page_answers_side_by_side(app_env):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.run()
    at.switch_page("pages/query.py").run()
    _ok(at)
    at.radio(key="q_source").set_value("Write a prompt").run()
    at.text_input(key="q_f_molecule").input("C1CC").run()  # an unparsable SMILES: a clear error, app runs on
    assert any("RDKit cannot parse" in e.value for e in at.error)
    at.text_input(key="q_f_molecule").input("CC(=O)Oc1ccccc1C(=O)O").run()
    _ok(at)
    at.button(key="q_go").click().run()
    _ok(at)
    df = next(d.value for d in at.dataframe if "answer_likelihood" in d.value.columns)
    specs = at.session_state["esm"].spec.specialists
    assert list(df["model"]) == ["base", *[s.name for s in specs]]
    p = df[["p(Yes)", "p(No)"]].to_numpy()
    assert np.allclose(p.sum(1), 1.0, atol=1e-5)
    assert (df["answer_likelihood"] == np.where(p[:, 0] >= p[:, 1], "Yes", "No")).all()


def test_query_page_cross_modal_questions_with_gold_facts_and_oracle(app_env):
    from esm_core.zoo.composite import composite_sets
    from esm_core.zoo.data import load_demo

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.run()
    at.switch_page("pages/query.py").run()
    at.radio(key="q_source").set_value("Cross-modal questions").run()
    _ok(at)
    name = at.selectbox(key="q_comp").options[0]
    sets = composite_sets(load_demo())
    cs = next(c for c in sets.values() if name.endswith(c.name))
    at.number_input(key="q_comp_i").set_value(3).run()
    p = cs.prompts[3]
    gold = next(m.value for m in at.markdown if m.value.startswith("Gold answer"))
    assert f"**{p.answer}**" in gold and cs.a.name in gold and cs.b.name in gold and cs.rule in gold
    at.toggle(key="q_gen").set_value(False).run()
    at.button(key="q_go").click().run()
    _ok(at)
    df = next(d.value for d in at.dataframe if "answer_likelihood" in d.value.columns)
    names = [s.name for s in at.session_state["esm"].spec.specialists]
    assert list(df["model"])[:1 + len(names)] == ["base", *names]
    assert (df["gold"] == p.answer).all()
    if {cs.a.modality, cs.b.modality} <= set(names):  # the zoo: specialists named by their modality
        oracle = df[df["model"].str.startswith("oracle")].iloc[0]
        said = [w == "yes" for w in re.findall(r"says (yes|no)", oracle["model"])]
        assert oracle["answer_likelihood"] == ("Yes" if rule_value(cs.rule, *said) else "No")


def test_layer_page_error_bars_and_the_element_page_stable_mask(app_env):
    at = _computed_app("layer_signals")
    at.slider(key="ls_stab_draws").set_value(3).run()
    at.button(key="ls_stab_btn").click().run()
    _ok(at)
    stab = at.session_state["esm"].stability[1]
    fig = next(f for f in _figures(at) if "±1 std over probe bootstrap" in f["layout"]["title"]["text"])
    first = fig["data"][0]
    np.testing.assert_allclose(_arr(first["error_y"]["array"]), stab.alpha_boot.std(0)[0].numpy(), atol=1e-6)
    assert any("stable in ≥ 90 % of draws" in c.value for c in at.caption)
    at.switch_page("pages/element_signals.py").run()
    _ok(at)
    key = sorted(stab.stable_mask)[0]
    mask = next(f for f in _figures(at) if "Stable top specialist" in f["layout"]["title"]["text"])
    z = _arr(mask["data"][0]["z"])  # large factors are shown as block means: the share of stable elements holds
    assert 0 < z.size <= stab.stable_mask[key].numel()
    assert float(z.mean()) == pytest.approx(float(stab.stable_mask[key].double().mean()), abs=1e-6)
