"""Embeddings: 2-D maps (UMAP, or PCA instantly) of hidden states at a chosen block for the base,
each specialist and merged models, per modality (paper Figs. 1 and 8). Hover shows the sample
itself; selecting points lists them."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from esm_core.analysis.embed2d import gather_points
from ui import caches, figures, links, merges, sample_pools, state
from ui.routes import through_app
from ui.widgets import guard, need_result, preset_badge, show_figure

through_app()  # a deep link on a fresh server goes through app.py (ui/routes.py)

st.title("Embeddings")
st.caption("Where each model puts the probe samples in its hidden space. All chosen models are projected "
           "together, so a specialist drifting away from the base on its own modality shows as a separate cloud.")


def project(key: str, method: str, seed: int, X):
    n = len(X)
    about = ("instant" if method == "pca" else
             f"UMAP of {n} points: about {max(2, n // 400)} s, plus ~15 s the first time on a server (numba compiles)")
    with st.spinner(f"Projecting {n} points to 2-D ({about}) ..."):
        return caches.projected_2d(key, method, seed, X)


def _label(raw: str, n: int = 70) -> str:
    return raw if len(raw) <= n else raw[: n - 1] + "…"


with guard():
    res = need_result("emb")
    if res is not None:
        preset_badge(res)
        cfg = res.config
        L = res.num_layers
        merged = list(merges.merges())
        c1, c2, c3, c4 = st.columns([1, 1, 1, 1])
        links.seed("emb_mod", res.modalities)
        links.seed("emb_level", ["sample means", "tokens"])
        links.seed("emb_method", ["PCA", "UMAP"])
        modality = c1.selectbox("modality", res.modalities, key="emb_mod")
        level = c2.radio("points", ["sample means", "tokens"], horizontal=True, key="emb_level",
                         help="Per-token rows are kept for the blocks in token_layers (default: the last block).")
        token_layers = sorted({(l if l >= 0 else L + 1 + l) for l in cfg.token_layers})
        blocks = token_layers if level == "tokens" else list(range(L + 1))
        links.seed("emb_layer", blocks)
        layer = c3.selectbox("block", blocks, index=len(blocks) - 1, key="emb_layer",
                             format_func=lambda l: "input embeddings" if l == 0 else f"block {l}")
        method = c4.radio("projection", ["PCA", "UMAP"], horizontal=True, key="emb_method",
                          help="PCA is instant; UMAP compiles itself on first use in a process (~15 s).")
        models = st.multiselect("models", ["base", *res.specialists, *merged],
                                default=["base", *res.specialists, *merged[-1:]], key="emb_models")
        if len(models) < 1:
            st.stop()
        o1, o2, o3, o4 = st.columns([1, 1, 1, 1])
        per_model = int(o1.select_slider("points per model", [100, 250, 500, 1000, 2000], value=2000, key="emb_max",
                                         help="A seeded sample of each model's points: fewer points, less overplotting."))
        density = o2.toggle("density contours", value=False, key="emb_density",
                            help="Contours of point density under the points, for crowded maps.")
        pair = o3.toggle("two models side by side", value=False, key="emb_pair", disabled=len(models) < 2,
                         help="The same projection, one panel per model: the same sample sits at the same place "
                              "only if both models agree on it.")
        query = o4.text_input("search samples", "", key="emb_search",
                              help="Rings every point whose sample contains this text (a SMILES fragment, a motif, "
                                   "a gene).").strip()
        states = [state.states_of(res)]
        for m in models:
            if m in merged:
                states.append(merges.merged_states(m, cfg))
        pts = gather_points(states, layer, modality, models, level="sample" if level == "sample means" else "token",
                            max_points_per_model=per_model, seed=cfg.seed)
        key = f"{state.run_key(cfg)}:{modality}:{layer}:{level}:{','.join(models)}:{len(pts.model)}"
        xy = project(key, method.lower(), cfg.seed, pts.X)
        raws = state.workspace().batcher(cfg).probes.samples[modality]
        df = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "model": pts.model, "modality": modality,
                           "sample": pts.sample, "token": pts.token,
                           "text": [_label(raws[s]) + ("" if t < 0 else f"  [token {t}]")
                                    for s, t in zip(pts.sample, pts.token)]})
        kind = next(m.kind for m in state.spec().modalities if m.name == modality)
        props = caches.sample_properties(kind, tuple(raws))
        extra = sample_pools.data_columns(modality, state.workspace().batcher(cfg).probes.sample_rows[modality])
        if extra is not None and len(extra) == len(raws):
            props = pd.concat([props, extra.reset_index(drop=True)], axis=1)
        for c in props.columns:
            df[c] = props[c].to_numpy()[df["sample"].to_numpy()]
        color = st.selectbox("colour by", ["model", *props.columns], key="emb_color",
                             help="A property of each sample: computed from it (RDKit descriptors, length, ...) or "
                                  "a column of the data file the samples come from.")
        side = None
        if pair and len(models) >= 2:
            p1, p2 = st.columns(2)
            side = [p1.selectbox("left", models, index=0, key="emb_left"),
                    p2.selectbox("right", models, index=1, key="emb_right")]
            if side[0] == side[1]:
                side = None
        hit = df["text"].str.contains(query, case=False, regex=False) if query else None
        if query:
            st.caption(f"{int(hit.sum())} point(s) of {df.loc[hit, 'sample'].nunique() if hit.any() else 0} "
                       f"sample(s) match {query!r}.")
        where = "input embeddings" if layer == 0 else f"block {layer}"
        fig = figures.embedding_map(df, f"{method} of {modality} {level} at {where}", models, axis=method,
                                    color=color, highlight=hit, density=density, side_by_side=side)
        event = show_figure(fig, df, f"embeddings {modality} {where}", key="emb_scatter", on_select="rerun")
        sel = []
        try:
            sel = event.selection.points if event is not None else []
        except AttributeError:
            sel = []
        if sel:
            rows = [dict(model=p["customdata"][0], sample=int(p["customdata"][2]),
                         raw=raws[int(p["customdata"][2])]) for p in sel if p.get("customdata")]
            st.markdown(f"**{len(rows)} selected point(s)**")
            st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
        else:
            st.caption("Select points (box or lasso) to list their samples.")
        spread = df.groupby("model")[["x", "y"]].mean()
        if "base" in spread.index:
            d = ((spread - spread.loc["base"]) ** 2).sum(axis=1) ** 0.5
            st.caption("Distance of each model's centroid from the base's on this map: "
                       + ", ".join(f"{m} {v:.2f}" for m, v in d.items() if m != "base"))
