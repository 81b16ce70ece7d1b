"""Bad input in the app: session files, run configs and the own-models form (AppTest + the functions).

A session file is data from elsewhere: every value in it goes through the same typed config as a
YAML run, and every path it names must lie under the app's allowed roots. A refusal is one st.error
with the fix, nothing of the current session changes, and nothing is executed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import SAMPLES, make_spec, write_run_yaml
from safetensors import safe_open
from safetensors.torch import save
from streamlit.testing.v1 import AppTest

from esm_core.errors import ESMError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def session(world):
    """A real session file of the tiny world (a small estimation) and its parts."""
    from esm_core.pipeline import Workspace, estimate
    from ui.session_io import session_bytes

    spec = make_spec(world, probes_per_modality=8, n_projections=16)
    res = estimate(Workspace.from_spec(spec, samples=SAMPLES))
    return session_bytes(spec, spec.method, {k: list(v) for k, v in SAMPLES.items()}, res)


def tamper(data: bytes, **changes) -> bytes:
    """The same session with some metadata records changed (each change: record -> function of its JSON)."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(data)
        f.flush()
        with safe_open(f.name, framework="pt") as r:
            meta = dict(r.metadata())
            tensors = {k: r.get_tensor(k) for k in r.keys()}
    for key, fn in changes.items():
        meta[key] = json.dumps(fn(json.loads(meta[key])))
    return save(tensors, metadata=meta)


def _set(d, path, value):
    *head, last = path
    for p in head:
        d = d[p]
    d[last] = value
    return d


def edit(*path, value):
    def fn(d):
        _set(d, path, value)
        return d
    return fn


# (id, changes to the session's records, fragment of the refusal)
SESSION_CASES = [
    ("trust-remote-code-text", dict(session_spec=edit("trust_remote_code", value="false")), "trust_remote_code='false'"),
    ("base-outside-roots", dict(session_spec=edit("base", value="/etc")), "is outside the directories"),
    ("adapter-outside-roots", dict(session_spec=edit("specialists", 0, "adapter", value="/tmp")),
     "is outside the directories"),
    ("probe-data-outside-roots", dict(session_spec=edit("modalities", 0, "data", value={"path": "/etc/passwd",
                                                                                       "column": "x"})),
     "Probe data of 'molecule' '/etc/passwd' is outside"),
    ("modality-name-with-path", dict(session_spec=edit("modalities", 0, "name", value="../../x")),
     "modalities[0].name='../../x'"),
    ("specialist-name-absolute", dict(session_spec=edit("specialists", 1, "name", value="/abs")),
     "specialists[1].name='/abs'"),
    ("setting-wrong-type", dict(session_method=edit("seed", value="abc")), "seed='abc'"),
    ("setting-unknown", dict(session_method=edit("colour", value="red")), "Unknown method setting"),
    ("samples-not-lists", dict(session_samples=lambda d: {"molecule": 3}), "not lists of text"),
    ("samples-not-json", dict(session_samples=lambda d: "{" * 10), "not lists of text"),
    ("signals-of-another-run", dict(specialists=lambda d: ["a", "b", "c"]), "do not belong to its run"),
]


@pytest.fixture
def roots(monkeypatch, world, app_run_yaml):
    monkeypatch.setenv("ESM_ALLOWED_ROOTS", os.pathsep.join([str(app_run_yaml.parent), str(world["dir"])]))


@pytest.mark.parametrize("case", SESSION_CASES, ids=[c[0] for c in SESSION_CASES])
def test_a_tampered_session_file_is_refused(case, session, roots):
    from ui.session_io import read_session

    _, changes, fragment = case
    with pytest.raises(ESMError) as ei:
        read_session(tamper(session, **changes))
    assert fragment in str(ei.value) and ei.value.fix


def test_the_untampered_session_reads_back(session, roots):
    from ui.session_io import read_session

    spec, cfg, samples, res = read_session(session)
    assert [s.name for s in spec.specialists] == res.specialists and samples["molecule"] == SAMPLES["molecule"]


# ------------------------------------------------------------------------------------ in the app
@pytest.fixture
def at(monkeypatch, world, app_env):
    monkeypatch.setenv("ESM_ALLOWED_ROOTS", os.pathsep.join([str(app_env.parent), str(world["dir"]),
                                                             str(world["dir"].parent)]))
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def _errors(at) -> str:
    return "\n".join(e.value for e in at.error)


def _panel(root: str):
    import sys

    sys.path.insert(0, root)
    from ui import session_io, state

    state.spec()
    session_io.session_panel()


def test_a_bad_session_upload_shows_one_error_and_changes_nothing(monkeypatch, world, app_env, session):
    monkeypatch.setenv("ESM_ALLOWED_ROOTS", os.pathsep.join([str(app_env.parent), str(world["dir"])]))
    at = AppTest.from_function(_panel, args=(str(ROOT),), default_timeout=60)
    at.run()
    before = at.session_state["esm"].spec
    bad = tamper(session, session_spec=edit("trust_remote_code", value="no"))
    at.file_uploader(key="load_session").set_value(("s.safetensors", bad, "application/octet-stream")).run()
    assert not at.exception, [e.value for e in at.exception]
    assert "trust_remote_code='no'" in _errors(at) and "Fix:" in _errors(at)
    assert at.session_state["esm"].spec == before
    at.file_uploader(key="load_session").set_value(("junk.safetensors", b"junk" * 100, "application/octet-stream"))
    at.run()
    assert not at.exception and "not a safetensors session file" in _errors(at)
    at.file_uploader(key="load_session").set_value(("good.safetensors", session, "application/octet-stream")).run()
    assert not at.exception and not at.error and at.success[0].value == "Session loaded."
    assert [s.name for s in at.session_state["esm"].spec.specialists] == ["mol", "prot", "cell"]


def test_the_run_config_and_form_refuse_what_the_cli_refuses(at, world, tmp_path_factory):
    d = tmp_path_factory.mktemp("app_bad_cfg")  # inside the allowed roots (world["dir"].parent)
    good = yaml.safe_load(write_run_yaml(d, world).read_text())
    at.switch_page("pages/specialists.py").run()
    before = at.session_state["esm"].spec
    cases = [("trust.yaml", dict(good, trust_remote_code="false"), "trust_remote_code='false'"),
             ("outside.yaml", dict(good, base="/usr"), "Base model '/usr' is outside"),
             ("name.yaml", dict(good, specialists=[dict(good["specialists"][0], name="../up")] + good["specialists"][1:]),
              "specialists[0].name='../up'")]
    for fname, cfg, fragment in cases:
        (d / fname).write_text(yaml.safe_dump(cfg))
        at.text_input(key="sp_yaml").set_value(str(d / fname))
        next(b for b in at.button if b.label == "Load and apply").click()
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        assert fragment in _errors(at), (fname, _errors(at))
        assert at.session_state["esm"].spec == before
    # the own-models form: a modality name that is a path
    at.text_input(key="spf0_m0_name").set_value("../../etc")
    next(b for b in at.button if b.label == "Check and apply").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "modalities[0].name='../../etc'" in _errors(at)
    assert at.session_state["esm"].spec == before
