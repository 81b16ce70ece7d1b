"""Shared widgets: figures with downloads, user-error display, method controls, the run button."""

from __future__ import annotations

import contextlib
import logging
import re

import pandas as pd
import streamlit as st

from esm_core.config import PRESETS, MethodConfig
from esm_core.errors import Cancelled, ESMError

from . import state
from .session import current

log = logging.getLogger("esm_workbench")


@contextlib.contextmanager
def guard():
    """Show a user mistake as st.error (cause and fix) and keep the app running. Anything else is a bug:
    one message for the user, the traceback for the operator in the server log (never on the page)."""
    try:
        yield
    except ESMError as e:
        st.error(f"**{e.reason}**" + (f"  \nFix: {e.fix}" if e.fix else ""))
    except Cancelled:
        st.warning("Cancelled; nothing was kept.")
    except Exception as e:  # noqa: BLE001 - the last line of defence of a page
        log.exception("unexpected error on a page")
        st.error(f"**Something went wrong ({type(e).__name__}).** The details are in the server log.  \n"
                 "Fix: try again; if it happens again, send the server log to the operator.")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "figure"


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _defused(v):
    return "'" + v if isinstance(v, str) and v.startswith(FORMULA_STARTS) else v


def csv_bytes(df: pd.DataFrame) -> bytes:
    """The table as CSV for a download: text cells (and headers) that a spreadsheet would run as a formula
    get a leading ' (OWASP CSV injection); numeric columns, negative numbers included, stay numbers.
    CRLF line ends (RFC 4180) make the writer quote a cell holding a lone CR, so no row is split."""
    out = df.rename(columns=_defused)
    for c in out.columns[[pd.api.types.is_string_dtype(t) for t in out.dtypes]]:
        out[c] = out[c].map(_defused)
    return out.to_csv(index=False, lineterminator="\r\n").encode()


def show_figure(fig, data: pd.DataFrame | None, name: str, *, key: str | None = None, on_select=None,
                selection_mode=None):
    """Render a plotly figure; PNG from its toolbar, interactive HTML and the data as CSV below it."""
    key = key or slug(name)
    cfg = {"toImageButtonOptions": {"format": "png", "filename": slug(name), "scale": 2},
           "displaylogo": False}
    kw = {}
    if on_select is not None:
        kw = dict(on_select=on_select, selection_mode=selection_mode or ("points", "box", "lasso"))
    event = st.plotly_chart(fig, width="stretch", config=cfg, key=f"fig_{key}", **kw)
    with st.container(horizontal=True):
        # deferred: built when clicked, so no rerun starts a download the browser must hold open
        st.download_button("HTML", lambda: fig.to_html(include_plotlyjs="cdn", full_html=True).encode(),
                           file_name=f"{slug(name)}.html", mime="text/html", key=f"html_{key}", on_click="ignore",
                           icon=":material/download:", help="Interactive figure (PNG: camera icon in the figure's "
                           "toolbar).")
        if data is not None:
            st.download_button("CSV", lambda: csv_bytes(data), file_name=f"{slug(name)}.csv", mime="text/csv",
                               key=f"csv_{key}", on_click="ignore", icon=":material/download:",
                               help="The data shown in this figure.")
    return event


def method_controls(where: str, fields: tuple[str, ...] = ("preset", "tau_layer", "tau_elem", "mode")) -> MethodConfig:
    """Preset and cheap settings; changing them re-derives from cached signals, no new pass."""
    cfg = state.method()
    cols = st.columns(len(fields))
    new = {}
    for col, f in zip(cols, fields):
        help_ = MethodConfig.help(f)
        cur = getattr(cfg, f)
        k = f"{where}_{f}"
        if f == "preset":
            new[f] = col.selectbox("preset", list(PRESETS), index=list(PRESETS).index(cur), help=help_, key=k)
        elif f in ("mode", "zscore_scope", "first_delta"):
            choices = {"mode": ["combined", "layer", "element"], "zscore_scope": ["layer", "tensor"],
                       "first_delta": ["raw", "diff"]}[f]
            new[f] = col.selectbox(f, choices, index=choices.index(cur), help=help_, key=k)
        elif f == "standardize":
            new[f] = col.checkbox(f, value=bool(cur), help=help_, key=k)
        elif f == "n_projections":
            new[f] = int(col.number_input(f, min_value=1, max_value=8192, value=int(cur), step=32, help=help_, key=k))
        else:
            new[f] = float(col.number_input(f, min_value=0.01, max_value=20.0, value=float(cur), step=0.05,
                                            format="%.2f", help=help_, key=k))
    changed = {f: v for f, v in new.items() if v != getattr(cfg, f)}
    if changed:
        with guard():
            if "preset" in changed:
                cfg = cfg.replace(preset=changed.pop("preset"))
            if changed:
                cfg = cfg.replace(**changed)
            state.set_method(cfg)
            for f in fields:  # widgets follow the resolved config on the next run
                st.session_state.pop(f"{where}_{f}", None)
            st.rerun()
    return cfg


def timed_progress(where):
    """A progress callback (message, fraction) drawing a bar and the message in ``where``, with the
    elapsed time and, once a few percent are done, the time left."""
    import time

    bar, note, t0 = where.progress(0.0), where.empty(), time.perf_counter()

    def progress(msg: str, frac: float) -> None:
        frac = min(max(float(frac), 0.0), 1.0)
        bar.progress(frac)
        el = time.perf_counter() - t0
        left = f", about {el / frac * (1 - frac):.0f} s left" if 0.03 < frac < 1 and "left" not in msg else ""
        note.write(f"{msg} · {el:.0f} s elapsed{left}" if "elapsed" not in msg else msg)
    return progress


def run_button(label: str = "Run ES-Merging", key: str = "run") -> bool:
    """Run the estimation with a live progress display; clicking anything else cancels it."""
    if not st.button(label, type="primary", key=key):
        return False
    status = st.status("Running ES-Merging ...", expanded=True)
    ok = False
    with guard():
        progress = timed_progress(status)
        res = state.run(progress)
        t = res.timings
        how = {"cached": "Loaded the result computed earlier", "joined": "Joined a run another session started",
               }.get(current().run_source, "Done")
        status.update(label=f"{how}: computed in {t.get('estimate_total_s', 0):.1f} s "
                            f"(forward {t.get('forward_s', 0):.1f} s, gradients {t.get('backward_s', 0):.1f} s, "
                            f"SWD {t.get('swd_s', 0):.1f} s)", state="complete", expanded=False)
        ok = True
    if not ok:
        status.update(label="ES-Merging did not finish (see the message below)", state="error", expanded=False)
    return ok


def need_result(page: str):
    """The current result, or a note (and a run button) when there is none yet."""
    res = state.result()
    if res is not None:
        return res
    if state.needs_rerun():
        st.info("The settings changed in a way that needs a new pass over the probes.")
    else:
        st.info("Nothing computed yet for this selection.")
    if run_button(key=f"run_{page}"):
        return state.result()
    return None


def preset_badge(res) -> None:
    st.caption(f"preset **{res.config.preset}** · mode **{res.config.mode}** · τ_layer={res.config.tau_layer} · "
               f"τ_elem={res.config.tau_elem} · z-score scope **{res.config.zscore_scope}** · "
               f"{res.probe_summary.get('n_probes', '?')} probes · {res.config.n_projections} projections"
               + (f" · overridden: {', '.join(res.config.overridden)}" if res.config.overridden else ""))


def _float_step(default: float) -> float:
    """A step one decimal below the default's magnitude (0.4 -> 0.01, 1e-3 -> 1e-4, 1.0 -> 0.1)."""
    import math

    if not default:
        return 0.01
    return 10.0 ** (math.floor(math.log10(abs(float(default)))) - 1)


def param_controls(method, key_prefix: str) -> dict:
    """Widgets generated from a merge method's Param metadata (esm_core.merge.Param), with its help
    strings; returns {name: value}. Keys are per method, so switching methods keeps each one's values."""
    params = list(method.params)
    if not params:
        st.caption(f"{method.pretty} has no parameters.")
        return {}
    out = {}
    cols = st.columns(min(3, len(params)))
    for i, p in enumerate(params):
        col = cols[i % len(cols)]
        k = f"{key_prefix}_{method.name}_{p.name}"
        lo = None if p.min is None else p.min
        hi = None if p.max is None else p.max
        if p.kind == "bool":
            out[p.name] = col.checkbox(p.name, value=bool(p.default), help=p.help, key=k)
        elif p.kind == "choice":
            choices = list(p.choices)
            out[p.name] = col.selectbox(p.name, choices, index=choices.index(p.default) if p.default in choices else 0,
                                        format_func=lambda c: "(empty)" if c == "" else str(c), help=p.help, key=k)
        elif p.kind == "int":
            out[p.name] = int(col.number_input(p.name, min_value=None if lo is None else int(lo),
                                               max_value=None if hi is None else int(hi), value=int(p.default),
                                               step=1, help=p.help, key=k))
        elif p.kind == "float":
            out[p.name] = float(col.number_input(p.name, min_value=None if lo is None else float(lo),
                                                 max_value=None if hi is None else float(hi), value=float(p.default),
                                                 step=_float_step(p.default), format="%g", help=p.help, key=k))
        else:
            out[p.name] = col.text_input(p.name, value=str(p.default), help=p.help, key=k)
    return out
