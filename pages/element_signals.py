"""Element signals: raw gradient scores, beta and lambda per specialist for one LoRA factor
(Figs. 6, 9, 10), histograms, and the elements where the specialists disagree most.

Large factors (LLaMA-8B: 4096 x 8 or 8 x 14336) are block-averaged for the overview; pick a crop to
see it at full resolution."""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import streamlit as st

from esm_core.coefficients import disagreements
from ui import figures, links, state
from ui.routes import through_app
from ui.widgets import csv_bytes, guard, method_controls, need_result, preset_badge, show_figure

through_app()  # a deep link on a fresh server goes through app.py (ui/routes.py)

st.title("Element signals")
st.caption("Per parameter element: the absolute gradients of the hidden-state distance (raw score g), "
           "their z-score, β = softmax across specialists, and the merge coefficient λ (docs/METHOD.md sections 3-4).")

with guard():
    method_controls("elem", ("preset", "tau_elem", "zscore_scope", "mode"))
    res = need_result("elem")
    if res is not None:
        preset_badge(res)
        if res.element is None:
            st.warning("This result was computed in 'layer' mode: there are no element signals. "
                       "Set mode to combined or element and run again.")
            st.stop()
        keys = sorted(res.element.g)
        L = res.num_layers
        modules = sorted({k.module for k in keys})
        c1, c2, c3, c4 = st.columns([1, 2, 1, 1])
        links.seed("el_layer", range(L))
        links.seed("el_module", modules)
        links.seed("el_ab", ["A", "B"])
        links.seed("el_what", ["λ (merge)", "β (element)", "raw score g", "z-scored g"])
        layer = c1.selectbox("block", list(range(L)), format_func=lambda l: f"{l + 1} (layers.{l})", key="el_layer",
                             help="Blocks are numbered from 1 as in the paper's figures; the tensor names "
                                  "count from 0 (block 1 = layers.0).")
        module = c2.selectbox("module", modules, key="el_module")
        ab = c3.radio("factor", ["A", "B"], horizontal=True, key="el_ab")
        what = c4.selectbox("show", ["λ (merge)", "β (element)", "raw score g", "z-scored g"], key="el_what")
        key = next(k for k in keys if k.layer == layer and k.module == module and k.ab == ab)
        data = {"λ (merge)": res.lam[key], "β (element)": res.element.beta[key], "raw score g": res.element.g[key],
                "z-scored g": res.element.gz[key]}[what]
        arr = data.detach().float().numpy()
        R, C = arr.shape[1:]
        st.caption(f"`{key}` · shape {R} × {C} "
                   f"({'rank × in-features' if ab == 'A' else 'out-features × rank'}) · "
                   f"α at this block: " + ", ".join(f"{n}={float(res.layer.alpha[k, layer]):.3f}"
                                                    for k, n in enumerate(res.specialists)))
        # crop for full resolution on large factors
        full = st.toggle("full resolution crop", value=False, key="el_crop",
                         help="Matrices above 256 cells per side are shown as block means; a crop shows every cell.")
        r0, c0, r1, c1_ = 0, 0, R, C
        if full:
            cc1, cc2 = st.columns(2)
            r0 = int(cc1.number_input("first row", 0, max(0, R - 1), 0, key="el_r0"))
            c0 = int(cc2.number_input("first column", 0, max(0, C - 1), 0, key="el_c0"))
            r1, c1_ = min(R, r0 + 256), min(C, c0 + 256)
        mats = {n: arr[k, r0:r1, c0:c1_] for k, n in enumerate(res.specialists)}
        prob = what in ("λ (merge)", "β (element)")
        fig, _ = figures.element_heatmaps(mats, f"{what} — {key} (block {layer + 1})", zmin=0 if prob else None,
                                          zmax=1 if prob else None,
                                          colorscale="Viridis" if prob else ("RdBu_r" if "z" in what else "Magma"),
                                          symmetric="z" in what, offset=(r0, c0),
                                          row_title="rank" if ab == "A" else "out-feature",
                                          col_title="in-feature" if ab == "A" else "rank")
        show_figure(fig, figures.matrix_frame(mats, what.split()[0]), f"{what} {key}", key="el_heat")
        stab = state.stability_result()
        if stab is not None and key in stab.stable_mask:
            mask = stab.stable_mask[key].numpy()[r0:r1, c0:c1_].astype(float)
            top = arr.argmax(0)[r0:r1, c0:c1_] if prob else None
            stable = {"stable top specialist": mask}
            if top is not None:
                stable["top specialist where stable (index + 1; 0 = unstable)"] = (top + 1) * mask
            fig, _ = figures.element_heatmaps(stable, f"Stable top specialist (≥ 90 % of {stab.draws} probe draws) — {key}",
                                              zmin=0, colorscale="Cividis", offset=(r0, c0))
            show_figure(fig, figures.matrix_frame(stable, "stable"), f"stable top {key}", key="el_stable")
            st.caption(f"{float(mask.mean()):.1%} of this factor's elements keep their top specialist in ≥ 90 % of "
                       "the probe bootstrap draws (Layer signals page, 'How solid is α?').")
        else:
            st.caption("Estimate the spread on the Layer signals page to mask the elements whose top specialist is "
                       "not stable.")

        fig, df = figures.histograms({n: arr[k] for k, n in enumerate(res.specialists)},
                                     f"Distribution of {what} over this factor")
        show_figure(fig, df, f"histogram {what} {key}", key="el_hist")

        st.subheader("Where the specialists disagree most")
        st.caption("Elements with the largest spread of z-scored scores across specialists, with each "
                   "specialist's raw score, β and λ.")
        top = st.slider("elements", 5, 100, 15, key="el_top")
        rows = []
        for idx, spread in disagreements(res.element.gz[key], top):
            row = {"row": idx[0], "col": idx[1], "spread of z": round(spread, 3)}
            for k, n in enumerate(res.specialists):
                row[f"g·{n}"] = float(res.element.g[key][(k, *idx)])
                row[f"β·{n}"] = round(float(res.element.beta[key][(k, *idx)]), 4)
                row[f"λ·{n}"] = round(float(res.lam[key][(k, *idx)]), 4)
            rows.append(row)
        df = pd.DataFrame(rows)
        st.dataframe(df, hide_index=True, width="stretch")
        st.download_button("CSV", partial(csv_bytes, df), file_name="disagreements.csv", mime="text/csv",
                           key="el_dis_csv", on_click="ignore")
        winner = np.argmax(res.lam[key].numpy(), axis=0)
        share = {n: float((winner == k).mean()) for k, n in enumerate(res.specialists)}
        st.caption("Share of elements where each specialist has the largest λ: "
                   + ", ".join(f"{n} {v:.0%}" for n, v in share.items()))
