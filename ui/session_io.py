"""Save and load a whole workbench session as ONE safetensors file (no pickle).

The file holds the computed signals and coefficients (tensors) and, in its metadata, the selection
(run spec), the method config and the probe samples, so an instructor can prepare a workshop and
students start from the same state:

    data = session_bytes(spec, cfg, samples, result)   # -> bytes for st.download_button
    spec, cfg, samples, result = read_session(data)    # checks, nothing executed
    restore_session(data)                              # the same, put back into the app's state
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import streamlit as st

from esm_core.config import run_spec_from_dict, run_spec_to_dict
from esm_core.errors import ESMError

from . import state

SESSION_FORMAT = "esm_workbench.session/1"
MAX_SESSION_BYTES = 200 * 2**20


def session_bytes(spec, cfg, samples: dict, res) -> bytes:
    from safetensors.torch import save

    from esm_core.pipeline import result_metadata, result_tensors

    if res is None:
        raise ESMError("There is nothing to save yet.", fix="run ES-Merging first.")
    meta = result_metadata(res)
    sp = run_spec_to_dict(spec)
    sp.pop("source", None)
    meta.update({
        "session_format": SESSION_FORMAT,
        "session_spec": json.dumps(sp, default=str),
        "session_method": json.dumps(cfg.resolved()),
        "session_samples": json.dumps(samples),
    })
    return save(result_tensors(res, include_states=True), metadata=meta)


def read_session(data: bytes):
    """(spec, method config, samples, result) from session bytes; refuses anything else."""
    from safetensors import safe_open

    from esm_core.config import MethodConfig
    from esm_core.pipeline import load_result

    if len(data) > MAX_SESSION_BYTES:
        raise ESMError(f"The session file is {len(data) // 2**20} MB, over the {MAX_SESSION_BYTES // 2**20} MB limit.")
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "session.safetensors"
        p.write_bytes(data)
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:
            raise ESMError("The uploaded file is not a safetensors session file.",
                           fix="upload a file saved with 'Save session'.") from None
        if meta.get("session_format") != SESSION_FORMAT:
            raise ESMError("The uploaded file is not a workbench session (no session metadata).",
                           fix="upload a file saved with 'Save session'.")
        res = load_result(p)
    spec_d, md, samples = (_json(meta, k) for k in ("session_spec", "session_method", "session_samples"))
    spec = run_spec_from_dict(spec_d, base_dir=state.ROOT)
    state.check_spec_paths(spec)  # every path a session names obeys the app's roots
    if not isinstance(md, dict):
        raise ESMError("The session file's method settings are not a mapping.", fix="save the session again.")
    md = dict(md)
    md.pop("overridden", None)
    cfg = MethodConfig.from_preset(md.pop("preset", "reference"), **md)
    spec.method = cfg
    mods = [m.name for m in spec.modalities]
    if not isinstance(samples, dict) or sorted(samples) != sorted(mods) or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in samples.values()):
        raise ESMError(f"The session file's probe samples are not lists of text for the modalities {mods}.",
                       fix="save the session again.")
    if res.specialists != [s.name for s in spec.specialists] or res.modalities != mods:
        raise ESMError("The session file's signals do not belong to its run (specialists or modalities differ).",
                       fix="save the session again.")
    return spec, cfg, samples, res


def _json(meta: dict, key: str):
    try:
        return json.loads(meta[key])
    except (KeyError, TypeError, ValueError, RecursionError):
        raise ESMError(f"The session file's {key.removeprefix('session_')} record is missing or not JSON.",
                       fix="upload a file saved with 'Save session'.") from None


def session_panel() -> None:
    """The sidebar's Save / Load session controls."""
    from .widgets import guard

    st.markdown("### Session")
    with guard():
        if state.base_result() is not None:
            data = session_bytes(state.spec(), state.method(), state.samples(), state.base_result())
            st.download_button("Save session", data=data, file_name="esm_session.safetensors",
                               mime="application/octet-stream", help="Selection, settings, signals and "
                               "coefficients in one file (safetensors).", key="save_session")
        up = st.file_uploader("Load session", type=["safetensors"], key="load_session",
                              help="A file saved with 'Save session'. Parsed without executing anything.")
        if up is not None and st.session_state.get("_loaded_session") != up.file_id:
            st.session_state["_loaded_session"] = up.file_id
            restore_session(up.getvalue())
            st.success("Session loaded.")


def restore_session(data: bytes) -> None:
    spec, cfg, samples, res = read_session(data)  # every check first: nothing changes on a refusal
    state.set_spec(spec)
    state.set_samples(samples)
    state.set_method(cfg)
    state.set_loaded_result(res, key=f"session:{hashlib.sha256(data).hexdigest()[:16]}")
    st.session_state["merges"] = {}
