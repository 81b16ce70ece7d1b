"""Shared widgets: figures with downloads, user-error display, method controls, the run button."""

from __future__ import annotations

import contextlib
import re

import pandas as pd
import streamlit as st

from esm_core.config import PRESETS, MethodConfig
from esm_core.errors import Cancelled, ESMError

from . import state


@contextlib.contextmanager
def guard():
    """Show a user mistake as st.error (cause and fix) and keep the app running."""
    try:
        yield
    except ESMError as e:
        st.error(f"**{e.reason}**" + (f"  \nFix: {e.fix}" if e.fix else ""))
    except Cancelled:
        st.warning("Cancelled; nothing was kept.")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "figure"


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
    c1, c2, _ = st.columns([1, 1, 10])
    c1.download_button("HTML", fig.to_html(include_plotlyjs="cdn", full_html=True).encode(),
                       file_name=f"{slug(name)}.html", mime="text/html", key=f"html_{key}",
                       help="Interactive figure (PNG: camera icon in the figure's toolbar).")
    if data is not None:
        c2.download_button("CSV", data.to_csv(index=False).encode(), file_name=f"{slug(name)}.csv",
                           mime="text/csv", key=f"csv_{key}", help="The data shown in this figure.")
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


def run_button(label: str = "Run ES-Merging", key: str = "run") -> bool:
    """Run the estimation with a live progress display; clicking anything else cancels it."""
    if not st.button(label, type="primary", key=key):
        return False
    with guard():
        status = st.status("Running ES-Merging ...", expanded=True)
        bar = status.progress(0.0)
        note = status.empty()

        def progress(msg, frac):
            bar.progress(min(max(float(frac), 0.0), 1.0))
            note.write(msg)

        res = state.run(progress)
        t = res.timings
        status.update(label=f"Done in {t.get('estimate_total_s', 0):.1f} s "
                            f"(forward {t.get('forward_s', 0):.1f} s, gradients {t.get('backward_s', 0):.1f} s, "
                            f"SWD {t.get('swd_s', 0):.1f} s)", state="complete", expanded=False)
        return True
    return False


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
