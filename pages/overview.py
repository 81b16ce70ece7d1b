"""Overview: what is loaded, the method in one picture, and one button that runs ES-Merging."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from esm_core.coefficients import mean_lambda_per_layer
from esm_core.paths import ZOO_DIR
from ui import figures, state
from ui.roots import ROOT
from ui.routes import through_app
from ui.widgets import guard, preset_badge, run_button, show_figure

through_app()  # a deep link on a fresh server goes through app.py (ui/routes.py)

st.title("ES-Merging workbench")
st.markdown(
    "Merge LoRA specialists (molecule, protein, cell, ...) into one model with **ES-Merging** "
    "(Lee, Kim, Hwang 2026): probe inputs holding every modality go through the base and each specialist; "
    "how far each specialist's hidden states move from the base gives **layer coefficients α** (sliced "
    "Wasserstein distance per layer) and **element coefficients β** (absolute gradients of a hidden-state "
    "distance); the adapters are merged element by element with **λ ∝ α·β**.")
st.image(str(Path(ROOT) / "assets" / "method.svg"), width="stretch")

with guard():
    sp = state.spec()
    m = state.method()
    if Path(sp.base).resolve().parent == ZOO_DIR.resolve():
        st.info(
            "**This is the demo zoo**: an 8-block LLaMA with a BPE tokenizer, pretrained on CPU to answer few-shot "
            "questions from their examples, and three LoRA specialists that each learned a dozen yes/no facts "
            "about molecules, proteins or cells, so that every step of ES-Merging runs live in seconds and "
            "cross-modal questions (Query page) show what a merge keeps. It is a teaching miniature, not a "
            "biology model: its benchmark answers measure the method's mechanics, not drug discovery; load your "
            "own base and specialists for that (README, “Run on the paper's specialists”).")
    samples = state.samples()
    c1, c2 = st.columns(2)
    with c1:
        st.subheader("Specialists")
        st.dataframe(pd.DataFrame([dict(name=s.name, modality=s.modality, adapter=Path(s.adapter).name)
                                   for s in sp.specialists]), hide_index=True, width="stretch")
        st.caption(f"Base: `{sp.base}` · device: {state.device_label()}")
    with c2:
        st.subheader("Modalities and probe samples")
        st.dataframe(pd.DataFrame([dict(modality=mo.name, prefix=mo.prefix.strip(), kind=mo.kind,
                                        encoder=mo.encoder.type, samples=len(samples.get(mo.name, [])))
                                   for mo in sp.modalities]), hide_index=True, width="stretch")
        st.caption(f"Preset **{m.preset}** · layout {m.layout} · {m.probes_per_modality} probes per modality · "
                   f"{m.n_projections} SWD projections · mode {m.mode}")

    st.subheader("Run")
    st.caption("Runs the full estimation on the current selection with a live progress display. "
               "Clicking anything else while it runs cancels it.")
    st.caption("Before you run: " + state.run_cost().summary() + " (a lower bound from the device's peak).")
    run_button()

    res = state.result()
    if res is not None:
        preset_badge(res)
        t = res.timings
        k1, k2, k3, k4 = st.columns(4)
        k1.metric("probes", res.probe_summary.get("n_probes", "?"))
        k2.metric("pass over probes", f"{t.get('signals_total_s', 0):.1f} s")
        k3.metric("SWD", f"{t.get('swd_s', 0):.2f} s")
        k4.metric("LoRA factors", len(res.lam))
        st.caption(f"coefficients digest `{res.digest()}` (equal digests: equal α and λ, bit for bit)")
        L = res.num_layers
        c1, c2 = st.columns(2)
        with c1:
            fig, df = figures.distance_matrix(res.layer.D, L, res.specialists, res.modalities, res.config.preset)
            show_figure(fig, df, "distance matrix last block", key="ov_dist")
        with c2:
            fig, df = figures.alpha_heatmap(res.layer.alpha, res.specialists, res.config.preset)
            show_figure(fig, df, "alpha heatmap", key="ov_alpha")
        ml = mean_lambda_per_layer(res.lam, L)
        mean_lam = pd.DataFrame([dict(specialist=n, **{f"block {l + 1}": float(ml[k, l]) for l in range(L)})
                                 for k, n in enumerate(res.specialists)])
        st.markdown("**Mean merge coefficient λ per block** (what each specialist contributes)")
        st.dataframe(mean_lam.round(3), hide_index=True, width="stretch")
