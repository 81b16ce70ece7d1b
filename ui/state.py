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

import contextlib
import hashlib
import json
import os
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import streamlit as st

from esm_core.config import MethodConfig, RunSpec, changed_fields, run_spec_to_dict
from esm_core.pipeline import PASS_FIELDS, SWD_FIELDS
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


def run_key(cfg: MethodConfig | None = None) -> str:
    cfg = cfg or method()
    need_element = cfg.mode != "layer"
    return f"{spec_key(spec())}:{samples_key()}:{cfg.fingerprint(*sorted(PASS_FIELDS))}:{int(need_element)}"


@st.cache_resource(show_spinner=False)
def _store() -> dict:
    """Process-wide store of estimation results by run key (shared by sessions, read-only objects).

    A plain dict rather than a cached function: the estimation reports progress into page elements,
    and Streamlit must not record those calls for replay."""
    return {}


@st.cache_resource(show_spinner=False)
def _flights() -> "Flights":
    return Flights()


class Flight:
    """One estimation in progress: others asking for the same run key wait for it and see its progress."""

    def __init__(self):
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None
        self.message, self.fraction = "starting", 0.0
        self.started = time.monotonic()

    def report(self, msg: str, frac: float) -> None:
        self.message, self.fraction = msg, float(frac)


class Flights:
    """Identical requests are computed once: the first caller leads, the others follow its flight."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_key: dict[str, Flight] = {}

    def join_or_lead(self, key: str) -> tuple[Flight, bool]:
        with self._lock:
            f = self._by_key.get(key)
            if f is not None:
                return f, False
            f = self._by_key[key] = Flight()
            return f, True

    def land(self, key: str, f: Flight) -> None:
        with self._lock:
            if self._by_key.get(key) is f:
                del self._by_key[key]
        f.done.set()


_MAX_RESULTS = 6


def _estimate(key: str, ws, cfg: MethodConfig, progress=None):
    """The result for key: from the store, by joining a run in progress, or computed here (once)."""
    from esm_core.pipeline import estimate

    store = _store()
    while True:
        if key in store:
            store[key] = store.pop(key)  # most recently used last
            st.session_state["run_source"] = "cached"
            return store[key]
        flight, lead = _flights().join_or_lead(key)
        if lead:
            break
        while not flight.done.wait(0.3):  # follow the run another session started
            if progress:
                progress(f"joined a run another session started: {flight.message}", flight.fraction)
        if flight.error is None:
            st.session_state["run_source"] = "joined"
            return flight.result
        if isinstance(flight.error, ESMError):
            raise flight.error
        # the leader was cancelled or failed unexpectedly: try again (maybe as the leader)

    def both(msg, frac):
        flight.report(msg, frac)
        if progress:
            progress(msg, frac)

    try:
        with ws.sset.gate.waiting(lambda ahead, secs, who: both(waiting_text(ahead, secs, who), 0.0)):
            res = estimate(ws, cfg, progress=both)
        store[key] = res
        while len(store) > _MAX_RESULTS:
            store.pop(next(iter(store)))
        flight.result = res
        st.session_state["run_source"] = "computed"
        return res
    except BaseException as e:
        flight.error = e
        raise
    finally:
        _flights().land(key, flight)


def waiting_text(ahead: int, seconds: float, holder: str) -> str:
    about = f", about {seconds:.0f} s" if seconds >= 1 else ""
    return (f"waiting for the shared model: {ahead} operation(s) ahead of yours"
            + (f" ({holder} running)" if holder else "") + about)


@contextlib.contextmanager
def shared_model_turn(where=None):
    """Show where this session stands while it waits for the shared model (one line, then gone)."""
    sset = specialists()
    slot = (where or st).empty()
    with sset.gate.waiting(lambda ahead, secs, who: slot.info(waiting_text(ahead, secs, who).capitalize() + ".")):
        yield sset
    slot.empty()


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
    cfg = cfg or method()
    base = st.session_state.get("base_result")
    if base is None:
        return None
    ch = changed_fields(base.config, cfg)
    if not ch:
        return base
    if ch & PASS_FIELDS or (cfg.mode != "layer" and base.scores is None):
        return None
    if base.states is None and ch & SWD_FIELDS:
        return None
    return _derived(st.session_state.get("run_key", "loaded"), cfg.fingerprint(), base, cfg)


def base_result():
    """The result of the last pass over the probes (its config may differ from the current one)."""
    return st.session_state.get("base_result")


@st.cache_resource(show_spinner="Computing the hidden states from the models ...", max_entries=4)
def _states(key: str, _ws, _cfg, _models: tuple):
    from esm_core.probe import collect_hidden_states

    return collect_hidden_states(_ws.sset, _ws.batcher(_cfg), list(_models), batch_size=_cfg.batch_size,
                                 token_layers=_cfg.token_layers)


def states_of(res):
    """The result's hidden states; for a result loaded without them, recomputed from the models (cached)."""
    if res.states is not None:
        return res.states
    ws = workspace()
    with shared_model_turn():
        hs = _states(f"{run_key(res.config)}:states", ws, res.config, (None, *res.specialists))
    return replace(hs, models=["base", *res.specialists])


def needs_rerun() -> bool:
    return has_result() and result() is None


@st.cache_resource(show_spinner=False, max_entries=16)
def _sweep(key: str, counts: tuple, n_sets: int, _res, _states, _progress):
    from esm_core.coefficients import alpha_projection_sweep, modality_weights

    w = modality_weights(_res.modalities, _res.own_modalities, _res.config.other_modality_weight)
    return alpha_projection_sweep(_states, len(_res.specialists), _res.config, w, counts=counts,
                                  seeds=range(n_sets), progress=_progress)


def projection_sweep(res, counts: tuple, n_sets: int, progress=None):
    """alpha per projection count over n_sets independent projection sets (cached)."""
    return _sweep(f"{st.session_state.get('run_key')}:{res.config.fingerprint()}", tuple(counts), int(n_sets), res,
                  states_of(res), progress)


# ------------------------------------------------------------------------------------ merges
def merges() -> dict:
    """Merged adapters made in this session: display name -> {method, pretty, params, output, folded,
    adapter, key}.

    Each is loaded on the shared base copy under ``adapter``, a name no other session can take (the
    display name plus this session's tag); the shared model keeps the most recently used ones and
    reloads an evicted one from ``output`` when it is needed again (see :func:`merged_adapters`).
    """
    return st.session_state.setdefault("merges", {})


def session_tag() -> str:
    return st.session_state.setdefault("_session_tag", uuid.uuid4().hex[:10])


def merge_name(method: str) -> str:
    n = 1 + sum(1 for v in merges().values() if v["method"] == method)
    return f"merged_{method}_{n}"


MAX_SHARED_MERGES = 16  # merged adapters kept on the shared model (all sessions together)


@contextlib.contextmanager
def merged_adapters(names, where=None):
    """Hold the shared model with this session's merges ``names`` loaded; yields display -> adapter name."""
    from esm_core.merge import merged_config

    with shared_model_turn(where) as sset, sset.exclusive("answering"):
        out = {}
        template = sset.adapters[sset.names[0]]
        for n in names:
            m = merges().get(n)
            if m is None:
                raise ESMError(f"No merged model named {n!r} in this session.", fix="merge on the Merge page first.")
            cfg = merged_config(template, sset.base_path, m["folded"])
            out[n] = sset.ensure_adapter(m["adapter"], lambda m=m: m["output"].tensors, cfg, keep=MAX_SHARED_MERGES)
        yield out


def run_merge(method_name: str, params: dict, *, data=None, progress=None) -> str:
    """Merge with a registered method (ES uses the current result); returns the merge's display name."""
    from esm_core.merge import MergeContext, get_method

    method = get_method(method_name)
    ws = workspace()
    res = result() if "es" in method.needs else None
    if "es" in method.needs and res is None:
        raise ESMError("ES-Merging needs the coefficients of the current selection.",
                       fix="run ES-Merging on the Overview page first.")
    ctx = MergeContext.from_specialists(ws.sset, workspace=ws, es_result=res, data=data, seed=method_seed(),
                                        progress=progress)
    with ws.sset.gate.waiting(lambda ahead, secs, who: progress and progress(waiting_text(ahead, secs, who), 0.0)):
        out = method.run(ctx, params)
    name = merge_name(method_name)
    merges()[name] = dict(method=method_name, pretty=method.pretty, params=out.info.get("params", params),
                          output=out, folded=ctx.folded, scalings=ctx.scalings, key=run_key(),
                          adapter=f"{name}__{session_tag()}",
                          es_config=res.config.resolved() if res is not None else None)
    return name


@st.cache_resource(show_spinner=False)
def _learned_speeds() -> dict:
    return {}


def learned_speed(method: str) -> float | None:
    """Seconds per batch that a learned merge took last on this server (for the estimate before starting)."""
    return _learned_speeds().get(method)


def record_learned_speed(method: str, seconds_per_batch: float) -> None:
    _learned_speeds()[method] = float(seconds_per_batch)


def method_seed() -> int:
    return int(method().seed)


@st.cache_resource(show_spinner="Forwarding the probes through the merged model ...", max_entries=16)
def _merged_states(key: str, adapter: str, _ws, _cfg):
    from esm_core.probe import collect_hidden_states

    return collect_hidden_states(_ws.sset, _ws.batcher(_cfg), [adapter], batch_size=_cfg.batch_size,
                                 token_layers=_cfg.token_layers)


def merged_states(name: str, cfg: MethodConfig):
    """Hidden states of a session merge on the current probes (cached; computed holding the model)."""
    ws = workspace()
    with merged_adapters([name]) as adapters:
        hs = _merged_states(f"{run_key(cfg)}:{adapters[name]}", adapters[name], ws, cfg)
    return replace(hs, models=[name])  # this session's name for it, not the shared adapter's


def device_label() -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}"
    return f"CPU ({torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------------ specialists page
@st.cache_resource(show_spinner="Checking the adapters ...", max_entries=8)
def _verdict(key: str, _specialists: tuple, _base: str, _trust: bool, _encoders: tuple):
    from esm_core.describe import check_specialists

    return check_specialists(list(_specialists), _base, trust_remote_code=_trust, encoders=list(_encoders))


def _stamp(path: str | None) -> str:
    """Path plus modification times of the files in it, so an edited adapter is checked again."""
    if not path:
        return ""
    p = Path(path)
    files = sorted(p.iterdir()) if p.is_dir() else [p]
    return path + ":" + ",".join(f"{f.name}@{f.stat().st_mtime_ns}" for f in files if f.is_file())


def verdict(sp: RunSpec | None = None):
    """The compatibility verdict (esm_core.describe.Verdict) of a spec's specialists, base and encoders,
    without loading model weights; paths are checked against the allowed roots first."""
    sp = sp or spec()
    check_spec_paths(sp)
    specs = tuple((s.name, s.adapter) for s in sp.specialists)
    encs = tuple((m.name, m.encoder) for m in sp.modalities)
    key = _digest([[(n, _stamp(a)) for n, a in specs], _stamp(sp.base) if Path(sp.base).is_dir() else sp.base,
                   sp.trust_remote_code, [(n, e.type, _stamp(e.path), e.options) for n, e in encs]])
    return _verdict(key, specs, sp.base, sp.trust_remote_code, encs)


# ------------------------------------------------------------------------------------ probe page
def spec_samples() -> dict[str, list]:
    """Raw samples of the current spec's data files (what samples() holds until a user changes it)."""
    d = run_spec_to_dict(spec())
    d.pop("source", None)
    d["method"] = {}
    return _read_samples(json.dumps(d, default=str))


def _sample_record() -> dict:
    """Per modality: the pool rows are picked from and where the current samples came from."""
    key = spec_key(spec())
    rec = st.session_state.get("sample_record")
    if not rec or rec.get("_spec") != key:
        rec = {"_spec": key, "pool": {}, "source": {}, "picked": {}}
        st.session_state["sample_record"] = rec
    return rec


def sample_pool(modality: str) -> tuple[str, list]:
    """(description, raw rows) that a user picks rows from: the last upload, else the spec's data file."""
    rec = _sample_record()
    if modality in rec["pool"]:
        return rec["pool"][modality]
    m = next(x for x in spec().modalities if x.name == modality)
    where = f"data file {Path(m.data.path).name} · column {m.data.column}" if m.data else "the run config"
    return where, spec_samples()[modality]


def picked_rows(modality: str) -> list[int] | None:
    """Indices into the pool of the rows in use, or None when all of them are."""
    return _sample_record()["picked"].get(modality)


def sample_sources() -> dict[str, str]:
    """Where each modality's current samples came from."""
    rec = _sample_record()
    cur, out = samples(), {}
    for m in spec().modalities:
        if m.name in rec["source"]:
            out[m.name] = rec["source"][m.name]
        else:
            where, pool = sample_pool(m.name)
            out[m.name] = where if list(cur.get(m.name, [])) == list(pool) else "custom (a loaded session)"
    return out


def set_modality_samples(modality: str, raws: list, source: str, *, pool: tuple[str, list] | None = None,
                         picked: list[int] | None = None) -> None:
    """Replace one modality's samples (others unchanged), remembering where they came from."""
    new = dict(samples())
    new[modality] = list(raws)
    set_samples(new)
    rec = _sample_record()
    if pool is not None:
        rec["pool"][modality] = pool
    rec["source"][modality] = source
    if picked is None:
        rec["picked"].pop(modality, None)
    else:
        rec["picked"][modality] = list(picked)


def reset_modality_samples(modality: str) -> None:
    """Back to the spec's data file for one modality."""
    rec = _sample_record()
    rec["pool"].pop(modality, None)
    rec["source"].pop(modality, None)
    rec["picked"].pop(modality, None)
    new = dict(samples())
    new[modality] = list(spec_samples()[modality])
    set_samples(new)


def apply_spec(new: RunSpec):
    """Check a user's run (allowed roots, structure, every adapter/base/encoder check, probe data files)
    and make it current when it passes. Returns the verdict; raises ESMError for a refusal that stops
    the checks (a path outside the roots, an invalid structure, an unreadable data file)."""
    from esm_core.pipeline import read_probe_samples

    check_spec_paths(new)
    new.validate()
    v = verdict(new)
    if v.ok:
        read_probe_samples(new)
        set_spec(new)
    return v


@st.cache_resource(show_spinner=False, max_entries=8)
def _reports(key: str, _kinds: tuple, _samples: dict):
    from esm_core.samples import validate

    return {name: validate(list(_samples.get(name, [])), kind) for name, kind in _kinds}


def sample_reports() -> dict:
    """Validation report (valid values, bad rows with reasons) of every modality's current samples,
    cached by the samples and the modality kinds."""
    kinds = tuple((m.name, m.kind) for m in spec().modalities)
    return _reports(f"{samples_key()}:{_digest(kinds)}", kinds, samples())
