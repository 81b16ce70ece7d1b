"""Where each modality's probe samples come from: the run's data file, rows a user picked from a pool,
or an uploaded table (the Probe page).

The session's ``SampleRecord`` remembers, per modality of the current run, the pool rows are picked
from (the last upload, else the data file), where the samples in use came from, and which rows were
picked; a new run starts a new record.
"""

from __future__ import annotations

from pathlib import Path

from . import caches, state
from .session import SampleRecord, current

UPLOAD_LIMIT = 5 * 2**20  # bytes per uploaded CSV


def _record() -> SampleRecord:
    return current().sample_record_for(state.spec_key(state.spec()))


def sample_pool(modality: str) -> tuple[str, list]:
    """(description, raw rows) that a user picks rows from: the last upload, else the spec's data file."""
    rec = _record()
    if modality in rec.pool:
        return rec.pool[modality]
    m = next(x for x in state.spec().modalities if x.name == modality)
    where = f"data file {Path(m.data.path).name} · column {m.data.column}" if m.data else "the run config"
    return where, state.spec_samples()[modality]


def pool_is_data_file(modality: str) -> bool:
    """Whether rows of this modality are picked from the run's data file (not from an upload)."""
    return modality not in _record().pool


def picked_rows(modality: str) -> list[int] | None:
    """Indices into the pool of the rows in use, or None when all of them are."""
    return _record().picked.get(modality)


def sample_sources() -> dict[str, str]:
    """Where each modality's current samples came from."""
    rec = _record()
    cur, out = state.samples(), {}
    for m in state.spec().modalities:
        if m.name in rec.source:
            out[m.name] = rec.source[m.name]
        else:
            where, pool = sample_pool(m.name)
            out[m.name] = where if list(cur.get(m.name, [])) == list(pool) else "custom (a loaded session)"
    return out


def set_modality_samples(modality: str, raws: list, source: str, *, pool: tuple[str, list] | None = None,
                         picked: list[int] | None = None) -> None:
    """Replace one modality's samples (others unchanged), remembering where they came from."""
    new = dict(state.samples())
    new[modality] = list(raws)
    state.set_samples(new)
    rec = _record()
    if pool is not None:
        rec.pool[modality] = pool
    rec.source[modality] = source
    if picked is None:
        rec.picked.pop(modality, None)
    else:
        rec.picked[modality] = list(picked)


def reset_modality_samples(modality: str) -> None:
    """Back to the spec's data file for one modality."""
    rec = _record()
    rec.pool.pop(modality, None)
    rec.source.pop(modality, None)
    rec.picked.pop(modality, None)
    new = dict(state.samples())
    new[modality] = list(state.spec_samples()[modality])
    state.set_samples(new)


def sample_reports() -> dict:
    """Validation report (valid values, bad rows with reasons) of every modality's current samples,
    cached by the samples and the modality kinds."""
    kinds = tuple((m.name, m.kind) for m in state.spec().modalities)
    return caches.sample_reports(f"{state.samples_key()}:{caches.digest(kinds)}", kinds, state.samples())


def data_columns(modality: str, rows: list[int]):
    """The data file's other columns (a cell type, a source, ...) for the samples at ``rows`` of the current
    samples, when those samples are the data file's own rows (whole or picked); None otherwise."""
    import os

    m = next((x for x in state.spec().modalities if x.name == modality), None)
    if m is None or m.data is None or not m.data.path or not pool_is_data_file(modality):
        return None
    cur, pool = state.samples().get(modality, []), state.spec_samples()[modality]
    picked = picked_rows(modality)
    where = picked if picked is not None else (list(range(len(pool))) if list(cur) == list(pool) else None)
    if where is None:
        return None
    try:
        df = caches.data_table(m.data.path, os.path.getmtime(m.data.path))
    except Exception:  # noqa: BLE001 - colouring is optional; the map still shows
        return None
    import pandas as pd

    sub = df.iloc[[where[r] for r in rows]].reset_index(drop=True)
    out = {}
    for c in sub.columns:
        if c == m.data.column:
            continue
        num = pd.to_numeric(sub[c], errors="coerce")
        if num.notna().all():
            out[c] = num  # a measured value: a colour scale
        elif df[c].nunique() <= 50:
            out[c] = sub[c].astype(str)  # a few categories (cell type, source): colours
    return pd.DataFrame(out) if out else None
