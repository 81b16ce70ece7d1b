"""The Learn page (pages/learn.py): every step shows its figure and reveals an answer computed from the live
result (esm_core/analysis/lesson.py, checked here against the result's own tensors)."""

from __future__ import annotations

import pytest
from conftest import ROOT
from streamlit.testing.v1 import AppTest

from esm_core.analysis.lesson import answer, element_sharpness, sharpness
from esm_core.coefficients import combine, element_coefficients, layer_coefficients


def _ok(at):
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _reveal(at, step):
    at.select_slider(key="lesson_step").set_value(step).run()
    _ok(at)
    at.toggle(key=f"lesson_reveal_{step}").set_value(True).run()
    _ok(at)
    return [s.value for s in at.success]


def test_lesson_steps_reveal_live_answers(app_env):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.run()
    at.button(key="run").click().run()
    at.switch_page("pages/learn.py").run()
    _ok(at)
    res = at.session_state["esm"].base_result
    names = res.specialists
    for step in range(1, 9):
        got = _reveal(at, step)
        assert len(got) == 1, (step, got)
        assert at.get("plotly_chart") or step == 1, step  # the live figure of the step
    # step 7: the question of the issue, "set tau_elem to 1.0: what happens to lambda?"
    at.select_slider(key="lesson_step").set_value(7).run()
    at.select_slider(key="lesson_q7").set_value(1.0)
    at.toggle(key="lesson_reveal_7").set_value(True).run()
    _ok(at)
    text = at.success[0].value
    el = element_coefficients(res.element.g, res.config.replace(tau_elem=1.0))
    assert f"{element_sharpness(el.beta):.3f}" in text
    assert f"{element_sharpness(combine(res.layer.alpha, el.beta, res.config.mode)):.3f}" in text
    # step 5 at the same tau as the run: unchanged
    at.select_slider(key="lesson_step").set_value(5).run()
    at.select_slider(key="lesson_q5").set_value(res.config.tau_layer)
    at.toggle(key="lesson_reveal_5").set_value(True).run()
    assert "unchanged" in at.success[0].value
    # step 9: merge with ES, then the merged model answers held-out skill questions next to base and specialist
    at.select_slider(key="lesson_step").set_value(9).run()
    _ok(at)
    if any(b.key == "lesson_merge" for b in at.button):  # the demo zoo's skill questions are here
        at.button(key="lesson_merge").click().run()
        at.toggle(key="lesson_reveal_9").set_value(True).run()
        _ok(at)
        assert "held-out questions" in at.success[0].value and "%" in at.success[0].value
    # step 10: what each specialist's update keeps, in both spaces
    at.select_slider(key="lesson_step").set_value(10).run()
    at.toggle(key="lesson_reveal_10").set_value(True).run()
    _ok(at)
    factors = at.success[0].value
    at.radio(key="lesson_q10").set_value("delta").run()
    _ok(at)
    assert at.success[0].value != factors and all(n in factors for n in names)


def test_lesson_answers_follow_the_numbers(app_env):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.run()
    at.button(key="run").click().run()
    res = at.session_state["esm"].base_result
    D = res.layer.D
    assert answer(res, "d0", "0").value == pytest.approx(float(D[:, :, 0].abs().max()))
    k = 0
    far = answer(res, "farthest", res.modalities[0], specialist=res.specialists[k]).value
    assert far == res.modalities[int(D[k, :, -1].argmax())]
    hot = layer_coefficients(D, res.config.replace(tau_layer=100.0), res.layer.weights).alpha
    a = answer(res, "tau_layer", 100.0)
    assert a.value == pytest.approx(sharpness(hot)) and "flatter" in a.text
    cold = answer(res, "tau_layer", 0.01)
    assert cold.value >= sharpness(res.layer.alpha) - 1e-9
    same = answer(res, "mode", res.config.mode)
    assert same.value == 0.0
    other = answer(res, "mode", "layer")
    lam = combine(res.layer.alpha, res.element.beta, "layer")
    n = sum(v[0].numel() for v in lam.values())
    changed = sum(int((res.lam[k_].argmax(0) != lam[k_].argmax(0)).sum()) for k_ in lam)
    assert other.value == pytest.approx(changed / n)
