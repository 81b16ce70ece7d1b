"""The workbench's state as the pages see it: the run, its settings and samples, the models, the result.

Pages call these functions and never compute the method themselves. What a session chose lives in
its ``ui.session.Session``; what it computes comes from the process-wide models, result store and
caches (``ui.shared``, ``ui.caches``), keyed by inputs: an estimation by the inputs that need a pass
over the probes, and every cheap re-derivation (temperatures, scope, mode, layer score, SWD settings)
by the full config, so switching pages never recomputes and changing a temperature recomputes only
what depends on it. Every path a run names is checked against the allowed roots (``ui.roots``).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import replace
from pathlib import Path

import streamlit as st
import torch

from esm_core.config import MethodConfig, pass_key
from esm_core.errors import ESMError
from esm_core.pipeline import ESResult, required_stage
from esm_core.runspec import RunSpec, load_run_spec, run_spec_to_dict

from . import caches, shared
from .roots import ROOT, check_spec_paths
from .session import current

ZOO_SPEC = ROOT / "assets" / "zoo" / "run.yaml"


# ------------------------------------------------------------------------------------ spec and settings
def demo_spec() -> RunSpec:
    path = Path(os.environ.get("ESM_DEMO_SPEC", ZOO_SPEC))
    if not path.is_file():
        raise ESMError(f"The demo zoo's run config {str(path)!r} is missing.",
                       fix="rebuild it with `python -m esm_core zoo build --out assets/zoo`.")
    return load_run_spec(path)


def spec() -> RunSpec:
    s = current()
    if s.spec is None:
        s.spec = demo_spec()
    return s.spec


def set_spec(new: RunSpec) -> None:
    check_spec_paths(new)
    new.validate()
    current().set_spec(new)


def method() -> MethodConfig:
    s = current()
    if s.method is None:
        s.method = spec().method
    return s.method


def set_method(cfg: MethodConfig) -> None:
    current().method = cfg


def method_seed() -> int:
    return int(method().seed)


def spec_key(sp: RunSpec) -> str:
    d = run_spec_to_dict(sp)
    d.pop("method", None)
    d.pop("source", None)
    return caches.digest(d)


# ------------------------------------------------------------------------------------ samples
def spec_samples() -> dict[str, list]:
    """Raw samples of the current spec's data files (what samples() holds until a user changes it)."""
    d = run_spec_to_dict(spec())
    d.pop("source", None)
    d["method"] = {}
    return caches.read_samples(json.dumps(d, default=str))


def samples() -> dict[str, list]:
    """Raw probe samples per modality: uploaded/edited ones, else the spec's data files."""
    s = current()
    if s.samples is None:
        s.samples = spec_samples()
    return s.samples


def set_samples(new: dict[str, list]) -> None:
    current().set_samples(new)


def samples_key() -> str:
    return caches.digest(samples())


# ------------------------------------------------------------------------------------ models
def specialists():
    sp = spec()
    check_spec_paths(sp)
    m = method()
    return shared.load_specialists(sp.base, tuple((s.name, s.adapter) for s in sp.specialists),
                                   tuple(s.modality for s in sp.specialists), m.device, m.dtype,
                                   sp.trust_remote_code)


def workspace():
    """The loaded workspace (models, encoders, probes) for the current spec and samples."""
    sp = spec()
    sset = specialists()
    key = f"{spec_key(sp)}:{samples_key()}:{method().fingerprint('device', 'dtype')}"
    return shared.load_workspace(key, replace(sp, method=method()), samples(), sset)


def run_cost():
    """What running the current selection will cost (esm_core.cost): FLOPs, memory, lower-bound time.

    Cached by the run key for every session: only the first asker builds the probes. Building them needs no
    turn on the shared model, so a session with a selection of its own sees this line (and its Run button)
    while other sessions' estimations run."""
    cfg = method()
    return caches.run_cost(f"{run_key(cfg)}:{caches.digest(cfg.resolved())}", workspace(), cfg)


@contextlib.contextmanager
def shared_model_turn(where=None):
    """Show where this session stands while it waits for the shared model (one line, then gone)."""
    sset = specialists()
    slot = (where or st).empty()
    with sset.gate.waiting(lambda ahead, secs, who: slot.info(shared.waiting_text(ahead, secs, who).capitalize()
                                                              + ".")):
        yield sset
    slot.empty()


def device_label() -> str:
    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}"
    return f"CPU ({torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------------ results
def run_key(cfg: MethodConfig | None = None) -> str:
    cfg = cfg or method()
    need_element = cfg.mode != "layer"
    return f"{spec_key(spec())}:{samples_key()}:{pass_key(cfg)}:{int(need_element)}"


def run(progress=None) -> ESResult:
    """Run (or fetch from cache) the estimation for the current selection and config."""
    cfg = method()
    key = run_key(cfg)
    res, source = shared.estimate_once(key, workspace(), cfg, progress)
    s = current()
    s.run_source = source
    s.set_result(res, key)
    return res


def set_loaded_result(res: ESResult, key: str) -> None:
    """A result read from a saved session file."""
    current().set_result(res, key)


def base_result() -> ESResult | None:
    """The result of the last pass over the probes (its config may differ from the current one)."""
    return current().base_result


def has_result() -> bool:
    return base_result() is not None


def result(cfg: MethodConfig | None = None) -> ESResult | None:
    """The current result, re-derived for cfg (default: the current config) without a new pass when
    only cheap settings differ; None when nothing was run yet or the change needs a new pass."""
    cfg = cfg or method()
    base = base_result()
    if base is None:
        return None
    stage = required_stage(base, cfg)
    if stage == "none":
        return base
    if stage == "pass":
        return None
    return caches.derived(current().run_key or "loaded", cfg.fingerprint(), base, cfg)


def needs_rerun() -> bool:
    return has_result() and result() is None


def states_of(res: ESResult):
    """The result's hidden states; for a result loaded without them, recomputed from the models (cached)."""
    if res.states is not None:
        return res.states
    ws = workspace()
    with shared_model_turn():
        hs = caches.hidden_states(f"{run_key(res.config)}:states", ws, res.config, (None, *res.specialists))
    return replace(hs, models=["base", *res.specialists])


def run_stability(draws: int, groups: int = 20, progress=None):
    """Bootstrap of the probes and sweep of the projection seeds for the current selection (one grouped
    pass on the shared model, then draws from the cached signals); kept in this session."""
    from esm_core.analysis.stability import stability

    ws = workspace()
    cfg = method()
    with shared_model_turn():
        res = stability(ws, cfg, draws=draws, groups=groups, seed=cfg.seed, progress=progress)
    current().stability = (run_key(cfg), res)
    return res


def stability_result():
    """This session's stability result for the current selection, or None."""
    s = current().stability
    return s[1] if s is not None and s[0] == run_key() else None


def projection_sweep(res: ESResult, counts: tuple, n_sets: int, progress=None):
    """alpha per projection count over n_sets independent projection sets (cached)."""
    return caches.projection_sweep(f"{current().run_key}:{res.config.fingerprint()}", tuple(counts), int(n_sets),
                                   res, states_of(res), progress)
