"""What every session of this server process shares: the loaded models, the estimation results, the
single-flight estimations and the measured speeds of learned merges.

One base copy with its adapters (``st.cache_resource``) serves every browser session; its gate
(esm_core/gate.py) runs their operations one at a time, in order of arrival. Estimation results are
stored by run key and never mutated; a session asking for a key that another session is computing
joins that run (:class:`Flights`) instead of starting a second one. Nothing here belongs to one
session (that is ``ui.session``); cached re-derivations are in ``ui.caches``.
"""

from __future__ import annotations

import threading
import time

import streamlit as st

from esm_core.config import MethodConfig
from esm_core.errors import ESMError
from esm_core.models import SpecialistSet
from esm_core.pipeline import ESResult, Workspace, estimate
from esm_core.runspec import RunSpec

MAX_RESULTS = 6  # estimation results kept in the store (all sessions together)


# ------------------------------------------------------------------------------------ models
@st.cache_resource(show_spinner="Loading the base model and adapters ...", max_entries=2)
def load_specialists(base: str, adapters: tuple, modalities: tuple, device: str, dtype: str,
                     trust_remote_code: bool) -> SpecialistSet:
    return SpecialistSet.load(base, list(adapters), modalities=list(modalities), device=device, dtype=dtype,
                              trust_remote_code=trust_remote_code)


@st.cache_resource(show_spinner=False, max_entries=4)
def load_workspace(key: str, _spec: RunSpec, _samples: dict, _sset: SpecialistSet) -> Workspace:
    return Workspace.from_spec(_spec, samples=_samples, sset=_sset)


def waiting_text(ahead: int, seconds: float, holder: str) -> str:
    """What a session waiting for the shared model is told (the gate's report, in words)."""
    about = f", about {seconds:.0f} s" if seconds >= 1 else ""
    return (f"waiting for the shared model: {ahead} operation(s) ahead of yours"
            + (f" ({holder} running)" if holder else "") + about)


# ------------------------------------------------------------------------------------ estimations
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


@st.cache_resource(show_spinner=False)
def _store() -> dict:
    """Process-wide store of estimation results by run key (shared by sessions, read-only objects).

    A plain dict rather than a cached function: the estimation reports progress into page elements,
    and Streamlit must not record those calls for replay."""
    return {}


@st.cache_resource(show_spinner=False)
def _flights() -> Flights:
    return Flights()


def estimate_once(key: str, ws: Workspace, cfg: MethodConfig, progress=None) -> tuple[ESResult, str]:
    """The result for key and how it was got: from the store ("cached"), by joining a run in progress
    ("joined"), or computed here, once ("computed")."""

    def compute(report):
        with ws.sset.gate.waiting(lambda ahead, secs, who: report(waiting_text(ahead, secs, who), 0.0)):
            return estimate(ws, cfg, progress=report)

    return once(_store(), _flights(), key, compute, progress, MAX_RESULTS)


def once(store: dict, flights: Flights, key: str, compute, progress=None, keep: int = MAX_RESULTS):
    """Single flight over a shared store: (value, "cached" | "joined" | "computed"). ``compute(report)``
    runs once per key at a time; followers see the leader's progress; the store keeps ``keep`` values."""
    while True:
        if key in store:
            store[key] = store.pop(key)  # most recently used last
            return store[key], "cached"
        flight, lead = flights.join_or_lead(key)
        if lead:
            break
        while not flight.done.wait(0.3):  # follow the run another session started
            if progress:
                progress(f"joined a run another session started: {flight.message}", flight.fraction)
        if flight.error is None:
            return flight.result, "joined"
        if isinstance(flight.error, ESMError):
            raise flight.error
        # the leader was cancelled or failed unexpectedly: try again (maybe as the leader)

    def both(msg, frac):
        flight.report(msg, frac)
        if progress:
            progress(msg, frac)

    try:
        value = compute(both)
        store[key] = value
        while len(store) > keep:
            store.pop(next(iter(store)))
        flight.result = value
        return value, "computed"
    except BaseException as e:
        flight.error = e
        raise
    finally:
        flights.land(key, flight)


# ------------------------------------------------------------------------------------ comparisons
MAX_COMPARISONS = 8  # comparison reports kept (all sessions together)


@st.cache_resource(show_spinner=False)
def comparison_store() -> dict:
    """Process-wide store of merge-method comparisons (benchmark.Report) by key: shared like estimations."""
    return {}


@st.cache_resource(show_spinner=False)
def comparison_flights() -> Flights:
    return Flights()


# ------------------------------------------------------------------------------------ learned merges
@st.cache_resource(show_spinner=False)
def _learned_speeds() -> dict:
    return {}


def learned_speed(method: str) -> float | None:
    """Seconds per batch that a learned merge took last on this server (for the estimate before starting)."""
    return _learned_speeds().get(method)


def record_learned_speed(method: str, seconds_per_batch: float) -> None:
    _learned_speeds()[method] = float(seconds_per_batch)
