"""The workbench's state: what is loaded, what was computed, cached by inputs.

Pages call these functions and never compute the method themselves. Models are cached with
``st.cache_resource`` (one base copy, shared); an estimation is cached by the inputs that need a
pass over the probes, and every cheap re-derivation (temperatures, scope, mode, layer score, SWD
settings) by the full config, so switching pages never recomputes and changing a temperature
recomputes only what depends on it.

Model and adapter paths must lie under the allowed roots: the repository's ``assets/`` (the demo
zoo) plus directories named in the environment variable ``ESM_ALLOWED_ROOTS`` (os.pathsep-separated).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import streamlit as st

from esm_core.config import MethodConfig, RunSpec, run_spec_to_dict
from esm_core.errors import ESMError

ROOT = Path(__file__).resolve().parents[1]
ZOO_SPEC = ROOT / "assets" / "zoo" / "run.yaml"
UPLOAD_LIMIT = 5 * 2**20  # bytes per uploaded CSV


# ------------------------------------------------------------------------------------ roots
def allowed_roots() -> list[Path]:
    roots = [ROOT / "assets"]
    extra = os.environ.get("ESM_ALLOWED_ROOTS", "")
    roots += [Path(p).expanduser() for p in extra.split(os.pathsep) if p.strip()]
    return [r.resolve() for r in roots]


def check_allowed(path: str | Path, what: str) -> Path:
    """Refuse a model/adapter/data path outside the allowed roots."""
    p = Path(str(path)).expanduser().resolve()
    for r in allowed_roots():
        if p == r or r in p.parents:
            return p
    raise ESMError(f"{what} {str(p)!r} is outside the directories this workbench may read "
                   f"({', '.join(str(r) for r in allowed_roots())}).",
                   fix="ask the operator to add its parent directory to ESM_ALLOWED_ROOTS.")


def check_spec_paths(spec: RunSpec) -> None:
    check_allowed(spec.base, "Base model")
    for s in spec.specialists:
        check_allowed(s.adapter, f"Adapter of {s.name!r}")
    for m in spec.modalities:
        if m.encoder.path:
            check_allowed(m.encoder.path, f"Encoder of {m.name!r}")
        if m.data is not None and m.data.path:
            check_allowed(m.data.path, f"Probe data of {m.name!r}")


# ------------------------------------------------------------------------------------ spec
def demo_spec() -> RunSpec:
    from esm_core.config import load_run_spec

    path = Path(os.environ.get("ESM_DEMO_SPEC", ZOO_SPEC))
    if not path.is_file():
        raise ESMError(f"The demo zoo's run config {str(path)!r} is missing.",
                       fix="rebuild it with `python -m esm_core zoo build --out assets/zoo`.")
    return load_run_spec(path)


def spec() -> RunSpec:
    if "spec" not in st.session_state:
        st.session_state["spec"] = demo_spec()
    return st.session_state["spec"]


def set_spec(new: RunSpec) -> None:
    check_spec_paths(new)
    new.validate()
    st.session_state["spec"] = new
    st.session_state.pop("samples", None)
    st.session_state.pop("run_key", None)
    st.session_state.pop("base_result", None)
    st.session_state.pop("merges", None)
    st.session_state["method"] = new.method


def method() -> MethodConfig:
    if "method" not in st.session_state:
        st.session_state["method"] = spec().method
    return st.session_state["method"]


def set_method(cfg: MethodConfig) -> None:
    st.session_state["method"] = cfg


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def spec_key(sp: RunSpec) -> str:
    d = run_spec_to_dict(sp)
    d.pop("method", None)
    d.pop("source", None)
    return _digest(d)


# ------------------------------------------------------------------------------------ samples
@st.cache_data(show_spinner=False, max_entries=8)
def _read_samples(spec_json: str) -> dict[str, list]:
    from esm_core.config import run_spec_from_dict
    from esm_core.pipeline import read_probe_samples

    sp = run_spec_from_dict(json.loads(spec_json), base_dir=ROOT)
    return read_probe_samples(sp)


def samples() -> dict[str, list]:
    """Raw probe samples per modality: uploaded/edited ones, else the spec's data files."""
    if "samples" not in st.session_state:
        d = run_spec_to_dict(spec())
        d.pop("source", None)
        d["method"] = {}
        st.session_state["samples"] = _read_samples(json.dumps(d, default=str))
    return st.session_state["samples"]


def set_samples(new: dict[str, list]) -> None:
    st.session_state["samples"] = {k: list(v) for k, v in new.items()}
    st.session_state.pop("run_key", None)
    st.session_state.pop("base_result", None)


def samples_key() -> str:
    return _digest(samples())


# ------------------------------------------------------------------------------------ models
@st.cache_resource(show_spinner="Loading the base model and adapters ...", max_entries=2)
def _specialists(base: str, adapters: tuple, modalities: tuple, device: str, dtype: str, trust_remote_code: bool):
    from esm_core.specialists import SpecialistSet

    return SpecialistSet.load(base, list(adapters), modalities=list(modalities), device=device, dtype=dtype,
                              trust_remote_code=trust_remote_code)


@st.cache_resource(show_spinner=False, max_entries=4)
def _workspace(key: str, _spec: RunSpec, _samples: dict, _sset):
    from esm_core.pipeline import Workspace

    return Workspace.from_spec(_spec, samples=_samples, sset=_sset)


def specialists():
    sp = spec()
    check_spec_paths(sp)
    m = method()
    return _specialists(sp.base, tuple((s.name, s.adapter) for s in sp.specialists),
                        tuple(s.modality for s in sp.specialists), m.device, m.dtype, sp.trust_remote_code)


def workspace():
    """The loaded workspace (models, encoders, probes) for the current spec and samples."""
    sp = spec()
    sset = specialists()
    key = f"{spec_key(sp)}:{samples_key()}:{method().fingerprint('device', 'dtype')}"
    return _workspace(key, replace(sp, method=method()), samples(), sset)


# ------------------------------------------------------------------------------------ results
_PASS = ("layout", "probes_per_modality", "min_probes", "max_modality_tokens", "max_probe_tokens",
         "element_signal", "element_modalities", "element_group", "seed", "device", "dtype", "token_layers",
         "batch_size")


def run_key(cfg: MethodConfig | None = None) -> str:
    cfg = cfg or method()
    need_element = cfg.mode != "layer"
    return f"{spec_key(spec())}:{samples_key()}:{cfg.fingerprint(*_PASS)}:{int(need_element)}"


@st.cache_resource(show_spinner=False, max_entries=6)
def _estimate(key: str, _ws, _cfg: MethodConfig, _progress=None):
    from esm_core.pipeline import estimate

    return estimate(_ws, _cfg, progress=_progress)


@st.cache_resource(show_spinner=False, max_entries=64)
def _derived(key: str, full: str, _base, _cfg: MethodConfig):
    from esm_core.pipeline import recompute

    return recompute(_base, _cfg)


def run(progress=None):
    """Run (or fetch from cache) the estimation for the current selection and config."""
    cfg = method()
    key = run_key(cfg)
    res = _estimate(key, workspace(), cfg, progress)
    st.session_state["run_key"] = key
    st.session_state["base_result"] = res
    return res


def set_loaded_result(res, key: str) -> None:
    """A result read from a saved session file."""
    st.session_state["run_key"] = key
    st.session_state["base_result"] = res


def has_result() -> bool:
    return st.session_state.get("base_result") is not None


def result(cfg: MethodConfig | None = None):
    """The current result, re-derived for cfg (default: the current config) without a new pass when
    only cheap settings differ; None when nothing was run yet or the change needs a new pass."""
    from esm_core.pipeline import PASS_FIELDS, changed_fields

    cfg = cfg or method()
    base = st.session_state.get("base_result")
    if base is None:
        return None
    ch = changed_fields(base.config, cfg)
    if not ch:
        return base
    if ch & PASS_FIELDS or (cfg.mode != "layer" and base.scores is None):
        return None
    if base.states is None and ch & {"n_projections", "swd_p", "standardize"}:
        return None
    return _derived(st.session_state.get("run_key", "loaded"), cfg.fingerprint(), base, cfg)


def base_result():
    """The result of the last pass over the probes (its config may differ from the current one)."""
    return st.session_state.get("base_result")


def needs_rerun() -> bool:
    return has_result() and result() is None


@st.cache_resource(show_spinner=False, max_entries=16)
def _sweep(key: str, counts: tuple, n_sets: int, _res):
    from esm_core.coefficients import alpha_projection_sweep, modality_weights

    w = modality_weights(_res.modalities, _res.own_modalities, _res.config.other_modality_weight)
    return alpha_projection_sweep(_res.states, len(_res.specialists), _res.config, w, counts=counts,
                                  seeds=range(n_sets))


def projection_sweep(res, counts: tuple, n_sets: int):
    """alpha per projection count over n_sets independent projection sets (cached)."""
    return _sweep(f"{st.session_state.get('run_key')}:{res.config.fingerprint()}", tuple(counts), int(n_sets), res)


# ------------------------------------------------------------------------------------ merges
def merges() -> dict:
    """Merged adapters made in this session: name -> {method, params, output}."""
    return st.session_state.setdefault("merges", {})


def device_label() -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}"
    return f"CPU ({torch.get_num_threads()} threads)"
