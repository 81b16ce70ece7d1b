"""Links that open the same view: the page, its selections, the settings and the probe rows in the URL.

The page is the URL's path (st.navigation). Everything else is a query parameter:

- a linked widget's value under its key (``el_layer=2&el_module=self_attn.q_proj&el_ab=B``): the block,
  module, factor, specialist, map and row/column a page shows;
- a method setting that differs from the run's own under ``set.<field>`` (``set.tau_elem=1.0``);
- the probe rows picked from a modality's data file under ``rows.<modality>`` (``rows.cell=0-9,15``).

``publish`` (end of every run, app.py) writes the current view into the address bar, so the link to
share is always the one shown there. A session opened from a link applies the settings and rows once,
when it starts (``restore``), and each page seeds its linked widgets from the link just before it
creates them (``seed``), only with a value among the widget's options. The result for those settings
and rows is the shared cached one when any session computed it (ui.shared): a room following an
instructor's link computes it once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import streamlit as st

from esm_core.config import MethodConfig
from esm_core.errors import ESMError
from esm_core.schema import parse_yaml_text

from . import sample_pools, state

# widget key -> how its URL text becomes its value
LINKED: dict[str, Callable[[str], object]] = {
    "el_layer": int, "el_module": str, "el_ab": str, "el_what": str,
    "ex_spec": str, "ex_layer": int, "ex_module": str, "ex_ab": str, "ex_row": int, "ex_col": int,
    "emb_mod": str, "emb_level": str, "emb_layer": int, "emb_method": str,
    "ls_layer": int, "lesson_step": int,
    "mg_cmp_layer": int, "mg_cmp_module": str, "mg_cmp_ab": str,
}
SET, ROWS = "set.", "rows."
_PENDING = "_link_pending"  # the link's widget values not yet given to their widgets
_NOTES = "_link_notes"  # what a link asked for and could not have


# ------------------------------------------------------------------------------------ rows text
def rows_text(rows: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    out, rows = [], sorted(set(int(r) for r in rows))
    i = 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
            j += 1
        out.append(str(rows[i]) if i == j else f"{rows[i]}-{rows[j]}")
        i = j + 1
    return ",".join(out)


def parse_rows(text: str, n: int) -> list[int]:
    """'0-2,5' -> [0, 1, 2, 5]; ESMError when a part is not a row of a pool of n."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        a, dash, b = part.partition("-")
        if not a.isdigit() or (dash and not b.isdigit()):
            raise ESMError(f"rows {text!r}: {part!r} is not a row number or a range a-b.")
        lo, hi = int(a), int(b or a)
        if lo > hi or hi >= n:
            raise ESMError(f"rows {text!r}: {part!r} is outside the data file's rows 0-{n - 1}.")
        out.extend(range(lo, hi + 1))
    return sorted(set(out))


# ------------------------------------------------------------------------------------ restore and seed
def restore() -> None:
    """Apply a link's settings and probe rows once per session (at its first run); keep its widget values
    for ``seed``. A value that cannot be applied is skipped with a note (``notes``), never an error page."""
    ss = st.session_state
    if _PENDING in ss:
        return
    qp = {k: st.query_params.get(k) for k in st.query_params}
    ss[_PENDING] = {k: v for k, v in qp.items() if k in LINKED}
    notes: list[str] = []
    changes = {}
    fields = set(MethodConfig.__dataclass_fields__) - {"overridden"}
    for k, v in qp.items():
        if k.startswith(SET):
            name = k[len(SET):]
            if name not in fields:
                notes.append(f"setting {name!r} in the link is not a setting (skipped)")
                continue
            try:
                value = parse_yaml_text(v, f"link parameter {k}")
                if isinstance(value, list):
                    value = tuple(value)
                elif isinstance(getattr(MethodConfig.from_preset(), name), tuple):
                    value = (value,)
                changes[name] = value
            except ESMError as e:
                notes.append(f"{k}: {e}")
    if changes:
        cfg = state.method()
        for name, value in changes.items():
            try:
                cfg = cfg.replace(**{name: value})
            except (ESMError, ValueError, TypeError) as e:
                notes.append(f"set.{name}={value!r} was refused: {str(e).splitlines()[0][:160]}")
        state.set_method(cfg)
    for k, v in qp.items():
        if k.startswith(ROWS):
            m = k[len(ROWS):]
            try:
                where, pool = sample_pools.sample_pool(m)
                picked = parse_rows(v, len(pool))
                sample_pools.set_modality_samples(m, [pool[i] for i in picked], f"{where} · rows {rows_text(picked)} "
                                                  "(from a link)", picked=picked)
            except StopIteration:
                notes.append(f"rows.{m}: the run has no modality {m!r}")
            except ESMError as e:
                notes.append(f"rows.{m}: {e}")
    ss[_NOTES] = notes


def notes() -> list[str]:
    """What the link that opened this session asked for and could not have."""
    return list(st.session_state.get(_NOTES, []))


def seed(key: str, options: Sequence | None = None) -> None:
    """Give a linked widget the link's value (once), if it is among ``options``; call before creating it."""
    pending = st.session_state.get(_PENDING) or {}
    if key not in pending:
        return
    text = pending.pop(key)
    try:
        value = LINKED[key](text)
    except (TypeError, ValueError):
        st.session_state.setdefault(_NOTES, []).append(f"{key}={text!r} is not a valid value (skipped)")
        return
    if options is not None and value not in list(options):
        st.session_state.setdefault(_NOTES, []).append(f"{key}={text!r} is not one of this view's choices (skipped)")
        return
    st.session_state[key] = value


# ------------------------------------------------------------------------------------ publish
def current_params() -> dict[str, str]:
    """The query parameters of the view on screen: linked widgets, changed settings, picked rows."""
    ss = st.session_state
    out: dict[str, str] = {}
    for k in LINKED:
        if k in ss and ss[k] is not None:
            out[k] = str(ss[k])
    with_spec = state.spec().method
    cfg = state.method()
    for name in MethodConfig.__dataclass_fields__:
        if name == "overridden":
            continue
        v = getattr(cfg, name)
        if v != getattr(with_spec, name):
            out[SET + name] = "[" + ", ".join(map(str, v)) + "]" if isinstance(v, tuple) else str(v)
    for m in state.spec().modalities:
        picked = sample_pools.picked_rows(m.name)
        if picked is not None and sample_pools.pool_is_data_file(m.name):  # an upload cannot travel in a link
            out[ROWS + m.name] = rows_text(picked)
    return out


def publish() -> None:
    """Write the current view into the address bar (no rerun); a link copied from there reopens it."""
    want = current_params()
    have = {k: st.query_params.get(k) for k in st.query_params}
    if want != have:
        st.query_params.from_dict(want)
