"""One browser session's state: a typed object under one ``st.session_state`` key.

Everything the workbench remembers for a session (the run, its settings and samples, the last pass,
this session's merges, page memos) lives in :class:`Session`, stored under ``st.session_state["esm"]``.
Widget values stay under their own ``key=`` (Streamlit keeps those). What sessions share (models,
results, caches) is in ``ui.shared``, never here.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import streamlit as st

from esm_core.config import MethodConfig
from esm_core.pipeline import ESResult
from esm_core.runspec import RunSpec

KEY = "esm"


def _new_tag() -> str:
    return uuid.uuid4().hex[:10]


@dataclass
class SampleRecord:
    """Per modality of one run (``spec_key``): the pool rows are picked from (description, rows), where
    the current samples came from, and the indices into the pool of the rows in use."""

    spec_key: str
    pool: dict[str, tuple[str, list]] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)
    picked: dict[str, list[int]] = field(default_factory=dict)


@dataclass(eq=False)
class Session:
    """What one session holds; ``None`` means "not loaded yet" (``ui.state`` fills it on first use)."""

    spec: RunSpec | None = None
    method: MethodConfig | None = None
    samples: dict[str, list] | None = None
    base_result: ESResult | None = None  # the last pass over the probes
    run_key: str | None = None  # the key base_result is stored (or was loaded) under
    run_source: str | None = None  # how the last run got its result: computed, joined or cached
    merges: dict[str, dict] = field(default_factory=dict)  # see ui.merges.merges
    merge_files: dict[str, dict] = field(default_factory=dict)  # written files of a merge, per download
    sample_record: SampleRecord | None = None
    tag: str = field(default_factory=_new_tag)  # makes this session's adapter names its own
    loaded_file: str | None = None  # file id of the last session file loaded (loaded once)
    answers: tuple[str, list[dict]] | None = None  # Query page: (prompt text, rows of answers)
    sweep: tuple | None = None  # Layer page: (run key, counts, sets, projection sweep)
    stability: tuple | None = None  # Layer / Element pages: (run key, analysis.stability.Stability)
    comparison: tuple | None = None  # Compare page: (key, benchmark Report, how it was got)
    form_spec: str | None = None  # Specialists page: the run its form was last built for
    form_version: int = 0
    message: str | None = None  # Specialists page: a note shown once after a rerun

    def set_spec(self, new: RunSpec) -> None:
        """A new run: its settings become current and what was derived from the old run goes."""
        self.spec = new
        self.method = new.method
        self.samples = None
        self.run_key = None
        self.base_result = None
        self.merges = {}

    def set_samples(self, new: dict[str, list]) -> None:
        self.samples = {k: list(v) for k, v in new.items()}
        self.run_key = None
        self.base_result = None

    def set_result(self, res: ESResult, key: str) -> None:
        self.run_key = key
        self.base_result = res

    def sample_record_for(self, spec_key: str) -> SampleRecord:
        """The sample record of run ``spec_key``; a fresh one when the run changed."""
        if self.sample_record is None or self.sample_record.spec_key != spec_key:
            self.sample_record = SampleRecord(spec_key)
        return self.sample_record

    def form_version_for(self, spec_key: str) -> int:
        """A number that changes whenever the run differs from the one the form was built for."""
        if self.form_spec != spec_key:
            if self.form_spec is not None:
                self.form_version += 1
            self.form_spec = spec_key
        return self.form_version

    def take_message(self) -> str | None:
        msg, self.message = self.message, None
        return msg


def current() -> Session:
    """This browser session's state (created on first use)."""
    if KEY not in st.session_state:
        st.session_state[KEY] = Session()
    return st.session_state[KEY]
