"""Links that open the same view (ui/links.py): a URL's query parameters set the page's selections, the
settings and the probe rows; the address bar follows the view; a bad link value is skipped with a note."""

from __future__ import annotations

import pytest
from conftest import ROOT
from streamlit.testing.v1 import AppTest

from ui.links import parse_rows, rows_text


def _ok(at):
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


@pytest.fixture
def router(monkeypatch):
    """Run every page through app.py, as a server with st.navigation does: AppTest otherwise guesses from the
    pages/ folder that the app uses the old pages-directory router and runs a page file alone (no app.py,
    so no sidebar and no link handling). AppTest's own assignments land on a look-alike subclass."""
    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.testing.v1 import app_test

    monkeypatch.setattr(PagesManager, "uses_pages_directory", False)
    monkeypatch.setattr(app_test, "PagesManager", type("TestPagesManager", (PagesManager,), {}))


def _app(params: dict[str, str]) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    for k, v in params.items():
        at.query_params[k] = v
    return at


@pytest.mark.parametrize("rows", [[0], [0, 1, 2, 5, 7, 8], [3, 4, 5, 6], []])
def test_rows_text_round_trip(rows):
    assert parse_rows(rows_text(rows), 10) == rows


@pytest.mark.parametrize("text, match", [("0-3,x", "not a row number"), ("5-2", "outside"), ("12", "outside"),
                                         ("1-", "not a row number")])
def test_rows_text_refusals(text, match):
    from esm_core.errors import ESMError
    with pytest.raises(ESMError, match=match):
        parse_rows(text, 10)


def test_a_link_opens_the_same_view(app_env, router):
    # first session: compute, go to the element page, pick a view; the address bar follows
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.run()
    _ok(at)
    at.button(key="run").click().run()
    at.switch_page("pages/element_signals.py").run()
    _ok(at)
    res = at.session_state["esm"].base_result
    last = res.num_layers - 1
    modules = sorted({k.module for k in res.lam})
    at.selectbox(key="el_layer").set_value(last).run()
    at.selectbox(key="el_module").set_value(modules[-1]).run()
    at.radio(key="el_ab").set_value("B").run()
    _ok(at)
    link = {k: at.query_params[k] for k in at.query_params}
    assert link["el_layer"] == str(last) and link["el_module"] == modules[-1] and link["el_ab"] == "B"
    assert not any(k.startswith("set.") for k in link)  # nothing changed from the run's settings
    # a second session opened from that link (plus a changed setting and picked probe rows) shows the same view
    n_rows = 10  # at least min_probes (8)
    link.update({"set.tau_elem": "1.0", "rows.molecule": f"0-{n_rows - 1}"})
    b = _app(link)
    b.run()
    _ok(b)
    assert b.session_state["esm"].method.tau_elem == 1.0
    assert len(b.session_state["esm"].samples["molecule"]) == n_rows
    b.switch_page("pages/element_signals.py").run()
    _ok(b)
    if b.session_state["esm"].base_result is None:  # other settings/rows than the cached result: compute them
        b.button(key="run_elem").click().run()
        _ok(b)
    assert b.selectbox(key="el_layer").value == last
    assert b.selectbox(key="el_module").value == modules[-1]
    assert b.radio(key="el_ab").value == "B"
    after = {k: b.query_params[k] for k in b.query_params}
    assert after["set.tau_elem"] == "1.0" and after["rows.molecule"] == f"0-{n_rows - 1}"
    assert after["el_layer"] == str(last)


def test_bad_link_values_are_skipped_with_a_note(app_env, router):
    at = _app({"el_layer": "999", "set.tau_elem": "-3", "set.bogus": "1", "rows.molecule": "0-x",
               "rows.nowhere": "0"})
    at.run()
    _ok(at)
    notes = " ".join(c.value for c in at.caption if c.value.startswith(":orange[link:"))
    assert "set.tau_elem" in notes and "'bogus'" in notes and "rows.molecule" in notes and "nowhere" in notes
    assert at.session_state["esm"].method.tau_elem != -3
