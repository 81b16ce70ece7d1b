"""Process-wide caches of what the pages compute, each keyed by the inputs it depends on.

Thin ``st.cache_resource`` / ``st.cache_data`` wrappers around engine calls, shared by every session:
an argument whose name starts with ``_`` is not hashed (the ``key`` before it stands for it), so
switching pages never recomputes and changing a cheap setting recomputes only what depends on it.
The rest of ``ui/`` and the pages call them; nothing here knows about sessions.
"""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import streamlit as st

from esm_core.analysis import properties as props
from esm_core.analysis.describe import check_specialists
from esm_core.analysis.embed2d import project_2d
from esm_core.answering.batched import BatchedAnswerer
from esm_core.benchmark.tasks import load_task
from esm_core.coefficients import alpha_projection_sweep, modality_weights
from esm_core.config import MethodConfig
from esm_core.pipeline import ESResult, cost_of, read_probe_samples, recompute
from esm_core.runspec import run_spec_from_dict
from esm_core.samples import validate
from esm_core.states import collect_hidden_states
from esm_core.zoo.load import load_skill_sets

from .roots import ROOT


def digest(obj) -> str:
    """A short stable hash of a JSON-able object, for cache keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ probes and results
@st.cache_data(show_spinner=False, max_entries=8)
def read_samples(spec_json: str) -> dict[str, list]:
    sp = run_spec_from_dict(json.loads(spec_json), base_dir=ROOT)
    return read_probe_samples(sp)


@st.cache_resource(show_spinner=False, max_entries=8)
def sample_reports(key: str, _kinds: tuple, _samples: dict) -> dict:
    return {name: validate(list(_samples.get(name, [])), kind) for name, kind in _kinds}


@st.cache_resource(show_spinner=False, max_entries=64)
def derived(key: str, full: str, _base: ESResult, _cfg: MethodConfig) -> ESResult:
    return recompute(_base, _cfg)


@st.cache_resource(show_spinner="Computing the hidden states from the models ...", max_entries=4)
def hidden_states(key: str, _ws, _cfg: MethodConfig, _models: tuple):
    return collect_hidden_states(_ws.sset, _ws.batcher(_cfg), list(_models), batch_size=_cfg.batch_size,
                                 token_layers=_cfg.token_layers)


@st.cache_resource(show_spinner="Forwarding the probes through the merged model ...", max_entries=16)
def merged_hidden_states(key: str, adapter: str, _ws, _cfg: MethodConfig):
    return collect_hidden_states(_ws.sset, _ws.batcher(_cfg), [adapter], batch_size=_cfg.batch_size,
                                 token_layers=_cfg.token_layers)


@st.cache_resource(show_spinner=False, max_entries=16)
def projection_sweep(key: str, counts: tuple, n_sets: int, _res: ESResult, _states, _progress):
    w = modality_weights(_res.modalities, _res.own_modalities, _res.config.other_modality_weight)
    return alpha_projection_sweep(_states, len(_res.specialists), _res.config, w, counts=counts,
                                  seeds=range(n_sets), progress=_progress)


@st.cache_resource(show_spinner=False, max_entries=32)
def projected_2d(key: str, method: str, seed: int, _X):
    return project_2d(_X, method, seed=seed)


# ------------------------------------------------------------------------------------ checks
@st.cache_resource(show_spinner="Checking the adapters ...", max_entries=8)
def specialists_verdict(key: str, _specialists: tuple, _base: str, _trust: bool, _encoders: tuple):
    return check_specialists(list(_specialists), _base, trust_remote_code=_trust, encoders=list(_encoders))


# ------------------------------------------------------------------------------------ questions
@st.cache_resource(show_spinner=False, max_entries=2)
def answerer(key: str, _ws) -> BatchedAnswerer:
    return BatchedAnswerer(_ws.sset, _ws.encoders, batch_size=8)


@st.cache_resource(show_spinner="Loading the task ...", max_entries=8)
def task(name: str, data_dir: str | None):
    """A benchmark task (the Merge page's training rows, the Query page's questions)."""
    return load_task(name, data_dir or None)


@st.cache_resource(show_spinner="Building the skill questions ...", max_entries=2)
def skill_sets():
    return load_skill_sets()


@st.cache_resource(show_spinner=False)
def composite_sets():
    """The demo zoo's held-out cross-modal composite questions (esm_core/zoo/composite.py)."""
    from esm_core.paths import DEMO_DIR
    from esm_core.zoo.composite import composite_sets as build
    from esm_core.zoo.data import load_demo

    return build(load_demo(DEMO_DIR))


@st.cache_data(show_spinner=False, max_entries=32)
def sample_properties(kind: str, raws: tuple) -> pd.DataFrame:
    """Properties of probe samples for the maps' colours (esm_core/analysis/properties.py)."""
    return props.sample_properties(kind, list(raws))


@st.cache_data(show_spinner=False, max_entries=8)
def data_table(path: str, mtime: float) -> pd.DataFrame:
    """A probe data file with all its columns (the maps colour by them); keyed by its modification time."""
    from esm_core.samples import read_table

    return read_table(path)


@st.cache_resource(show_spinner=False, max_entries=32)
def run_cost(key: str, _ws, _cfg: MethodConfig):
    """The cost estimate of a selection (esm_core.cost), built once per run key for every session. Building the
    probes needs no turn on the shared model (Workspace.batcher), so it is not held behind an estimation."""
    return cost_of(_ws, _cfg)
