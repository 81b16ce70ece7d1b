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
    spec = run_spec_from_dict(json.loads(meta["session_spec"]), base_dir=state.ROOT)
    md = json.loads(meta["session_method"])
    preset = md.pop("preset")
    md.pop("overridden", None)
    cfg = MethodConfig.from_preset(preset, **md)
    spec.method = cfg
    return spec, cfg, json.loads(meta["session_samples"]), res


def restore_session(data: bytes) -> None:
    spec, cfg, samples, res = read_session(data)
    state.set_spec(spec)  # checks allowed roots
    state.set_samples(samples)
    state.set_method(cfg)
    state.set_loaded_result(res, key=f"session:{hashlib.sha256(data).hexdigest()[:16]}")
    st.session_state["merges"] = {}
