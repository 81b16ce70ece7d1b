"""Layer signals: SWD per layer, increments, z-scores, scores and alpha (Fig. 5), the distance matrix
(Fig. 2) and the projection-count sweep (Table 7). Controls re-derive from cached signals."""

from __future__ import annotations

import streamlit as st

from ui import figures, links, state
from ui.routes import through_app
from ui.session import current
from ui.widgets import guard, method_controls, need_result, preset_badge, show_figure

through_app()  # a deep link on a fresh server goes through app.py (ui/routes.py)

st.title("Layer signals")
st.caption("How far each specialist's mean-pooled hidden states move from the base, block by block "
           "(docs/METHOD.md section 2). Changing these settings re-derives everything from the cached hidden states.")

with guard():
    method_controls("layer", ("preset", "tau_layer", "first_delta", "other_modality_weight"))
    method_controls("layer_swd", ("n_projections", "standardize"))
    res = need_result("layer")
    if res is not None:
        preset_badge(res)
        sp, mods, pre = res.specialists, res.modalities, res.config.preset
        fig, df = figures.swd_curves(res.layer.D, sp, mods, pre)
        show_figure(fig, df, "swd per layer", key="ls_swd")

        fig, df = figures.layer_steps(res.layer, sp, mods, pre)
        show_figure(fig, df, "layer steps delta z s alpha", key="ls_steps")

        c1, c2 = st.columns([1, 1])
        with c1:
            fig, df = figures.alpha_heatmap(res.layer.alpha, sp, pre)
            show_figure(fig, df, "alpha heatmap", key="ls_alpha")
        with c2:
            L = res.num_layers
            links.seed("ls_layer", range(L + 1))
            layer = st.slider("block for the distance matrix (0 = input embeddings)", 0, L, L, key="ls_layer")
            fig, df = figures.distance_matrix(res.layer.D, layer, sp, mods, pre)
            show_figure(fig, df, f"distance matrix block {layer}", key="ls_dist")
            own = [o for o in res.own_modalities]
            if all(o in mods for o in own):
                diag = [int(res.layer.D[k, :, layer].argmax()) == mods.index(o) for k, o in enumerate(own)]
                st.caption(("Every specialist moves furthest on its own modality at this block."
                            if all(diag) else
                            "Not diagonal-dominant at this block: " + ", ".join(
                                n for n, ok in zip(sp, diag) if not ok) + " move(s) further on another modality."))

        st.subheader("How solid is α? (probe bootstrap, projection seeds)")
        st.caption("One more pass keeps the element scores per group of probes; then B draws resample the groups "
                   "(α from the drawn probes' cached states, β from their scores) and B other projection seeds, "
                   "with no further pass. `python -m esm_core stability` gives the same with a per-module table.")
        b1, b2 = st.columns([3, 1])
        draws = int(b1.slider("draws (B)", 2, 50, 20, key="ls_stab_draws"))
        if b2.button("Estimate the spread", key="ls_stab_btn"):
            bar = st.progress(0.0, text="Grouped pass over the probes ...")
            state.run_stability(draws, progress=lambda msg, f: bar.progress(min(max(f, 0.0), 1.0), text=msg))
            bar.empty()
        stab = state.stability_result()
        if stab is not None:
            fig, df = figures.alpha_errorbars(stab.alpha, stab.alpha_boot.std(0), stab.alpha_seed.std(0), sp)
            show_figure(fig, df, "alpha with error bars", key="ls_stab_fig")
            s = stab.summary()
            st.caption(f"{stab.draws} draws over {stab.groups} groups of units, {stab.seconds['total_s']:.0f} s · "
                       f"elements whose top specialist is stable in ≥ 90 % of draws: {s['stable top (probes)']:.1%} "
                       f"(probes), {s['stable top (seeds)']:.1%} (seeds) · mean std of α by samples per modality: "
                       + ", ".join(f"{n}: {v:.4f}" for n, v in s["alpha std by probes"].items())
                       + " · the Element signals page masks the unstable elements.")

        st.subheader("How α settles with more projections (Table 7)")
        st.caption("α recomputed with several independent sets of random projections per count; the spread "
                   "across sets shrinks as the number of projections grows.")
        counts = st.multiselect("projection counts", [8, 32, 64, 256, 1024, 2048], default=[32, 256, 1024],
                                key="ls_counts")
        n_sets = st.slider("projection sets per count", 2, 10, 5, key="ls_sets")
        if st.button("Compute the sweep", key="ls_sweep_btn"):
            bar = st.progress(0.0, text="Recomputing SWD for every projection set ...")
            sweep = state.projection_sweep(res, tuple(sorted(counts)), n_sets,
                                           progress=lambda msg, f: bar.progress(min(f, 1.0), text=msg))
            bar.empty()
            current().sweep = (state.run_key(), tuple(counts), n_sets, sweep)
        sw = current().sweep
        if sw is not None and sw[0] == state.run_key():
            fig, df = figures.projection_sweep(sw[3], sp)
            show_figure(fig, df, "projection sweep", key="ls_sweep_fig")
