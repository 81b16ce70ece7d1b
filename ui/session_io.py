"""Save and load a whole workbench session as ONE small safetensors file (no pickle).

The file holds what cannot be re-derived cheaply — the SWD matrix, the raw element scores and,
only when asked, the mean-pooled hidden states — and, in its metadata, the selection (run spec),
the method settings and the probe samples. Every coefficient (alpha, beta, lambda) is re-derived
from the signals on load by the same code that derived it live, so the figures come back exactly.
An instructor can prepare a workshop and students start from the same state:

    data = session_bytes(spec, cfg, samples, result)   # bytes, built only when the user downloads
    spec, cfg, samples, result = read_session(data)    # checks, nothing executed
    restore_session(data)                              # the same, put back into the app's state

The sidebar's download is deferred (built on click, never on a rerun) and shows the size first.
Files of the first format (every tensor, per-token states) still load.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import streamlit as st

from esm_core.config import MethodConfig
from esm_core.errors import ESMError
from esm_core.pipeline import load_result, result_from_signals, signal_metadata, signal_tensors
from esm_core.runspec import run_spec_from_dict, run_spec_to_dict

from . import state
from .roots import ROOT, check_spec_paths
from .session import current
from .widgets import guard

SESSION_FORMAT = "esm_workbench.session/2"
OLD_FORMATS = ("esm_workbench.session/1",)
MAX_SESSION_BYTES = 45 * 2**20  # under the server's upload limit (.streamlit/config.toml: 50 MB)


def _session_parts(spec, cfg, samples: dict, res, include_states: bool):
    if res is None:
        raise ESMError("There is nothing to save yet.", fix="run ES-Merging first.")
    meta = signal_metadata(res)
    sp = run_spec_to_dict(spec)
    sp.pop("source", None)
    meta.update({
        "session_format": SESSION_FORMAT,
        "session_spec": json.dumps(sp, default=str),
        "session_method": json.dumps(cfg.resolved()),
        "session_samples": json.dumps(samples),
    })
    return signal_tensors(res, include_states=include_states), meta


def session_size(spec, cfg, samples: dict, res, include_states: bool = False) -> int:
    """Bytes the session file will have (tensor data plus metadata), without building it."""
    tensors, meta = _session_parts(spec, cfg, samples, res, include_states)
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    return data + len(json.dumps(meta)) + 200 * len(tensors)


def session_bytes(spec, cfg, samples: dict, res, *, include_states: bool = False) -> bytes:
    from safetensors.torch import save

    tensors, meta = _session_parts(spec, cfg, samples, res, include_states)
    return save(tensors, metadata=meta)


def read_session(data: bytes):
    """(spec, method config, samples, result) from session bytes; refuses anything else."""
    from safetensors import safe_open


    if len(data) > MAX_SESSION_BYTES:
        raise ESMError(f"The session file is {len(data) / 2**20:.1f} MiB, over the {MAX_SESSION_BYTES // 2**20} MiB "
                       "limit.", fix="save the session again without hidden states.")
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "session.safetensors"
        p.write_bytes(data)
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception:
            raise ESMError("The uploaded file is not a safetensors session file.",
                           fix="upload a file saved with 'Save session'.") from None
        fmt = meta.get("session_format")
        if fmt not in (SESSION_FORMAT, *OLD_FORMATS):
            raise ESMError("The uploaded file is not a workbench session (no session metadata).",
                           fix="upload a file saved with 'Save session'.")
        if fmt in OLD_FORMATS:
            res = load_result(p)
        else:
            try:
                res = result_from_signals(tensors, meta)
            except ESMError:
                raise
            except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError, RecursionError) as e:
                raise ESMError(f"The session file's signals are damaged or edited ({type(e).__name__}).",
                               fix="upload a file saved with 'Save session', unmodified.") from None
    spec_d, md, samples = (_json(meta, k) for k in ("session_spec", "session_method", "session_samples"))
    spec = run_spec_from_dict(spec_d, base_dir=ROOT)
    check_spec_paths(spec)  # every path a session names obeys the app's roots
    cfg = MethodConfig.from_dict(md, "the session file's method settings")
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


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def session_panel() -> None:
    """The sidebar's Save / Load session controls."""
    st.markdown("### Session")
    with guard():
        res = state.base_result()
        if res is not None:
            sp, cfg, samples = state.spec(), state.method(), state.samples()
            with_states = st.checkbox("include hidden states", value=False, key="save_states",
                                      help="Mean-pooled hidden states: needed to change SWD settings or draw the "
                                           "embedding maps without the models. Without them, the app recomputes "
                                           "them from the models when a page needs them.")
            size = session_size(sp, cfg, samples, res, with_states)
            st.download_button(f"Save session ({_mib(size)})",
                               data=lambda: session_bytes(sp, cfg, samples, res, include_states=with_states),
                               file_name="esm_session.safetensors", mime="application/octet-stream",
                               on_click="ignore", key="save_session",
                               help="Selection, settings and signals in one safetensors file; the coefficients "
                                    "are re-derived from the signals when it is loaded. Built when you click.")
            if size > MAX_SESSION_BYTES:
                st.warning(f"This file would be over the {MAX_SESSION_BYTES // 2**20} MiB that 'Load session' "
                           "accepts: save it without hidden states.")
        up = st.file_uploader("Load session", type=["safetensors"], key="load_session",
                              help=f"A file saved with 'Save session' (up to {MAX_SESSION_BYTES // 2**20} MiB). "
                                   "Parsed without executing anything.")
        if up is not None and current().loaded_file != up.file_id:
            current().loaded_file = up.file_id
            restore_session(up.getvalue())
            st.success("Session loaded.")


def restore_session(data: bytes) -> None:
    spec, cfg, samples, res = read_session(data)  # every check first: nothing changes on a refusal
    state.set_spec(spec)
    state.set_samples(samples)
    state.set_method(cfg)
    state.set_loaded_result(res, key=f"session:{hashlib.sha256(data).hexdigest()[:16]}")
