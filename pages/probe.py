"""Probe: which samples feed the probes, how they look, and the tokenised probe (docs/METHOD.md section 1).

Settings: samples per modality, seed, layout (joint / separate) and the per-block token cap
(MethodConfig). Samples per modality come from the run's data file, from rows the user picks, or
from an uploaded CSV (size-limited, parsed with pandas, nothing executed). Previews: RDKit drawings
of molecules, protein lengths and amino-acid composition, ranked gene lists; bad rows with their
reason; counts used / valid / bad / examined / total (only the seeded draw is validated) and
truncations; the tokenised probe with each modality span highlighted (the paper's Fig. 4).
"""

from __future__ import annotations

from functools import partial

import pandas as pd
import streamlit as st

from esm_core.analysis.preview import (
    KIND_WORDS,
    column_samples,
    gene_frequency,
    gene_table,
    guess_column,
    molecule_grid_svg,
    protein_stats,
    read_upload,
    span_counts,
    token_spans,
)
from esm_core.config import MethodConfig
from esm_core.errors import ESMError
from esm_core.probes import build_probes, sample_modality
from ui import figures, sample_pools, state
from ui.routes import through_app
from ui.widgets import csv_bytes, guard, show_figure

through_app()  # a deep link on a fresh server goes through app.py (ui/routes.py)

st.title("Probe")
st.caption("A probe is a short prefix naming each modality followed by its token block, for every modality "
           "(docs/METHOD.md section 1). The base and every specialist see the same probes; only the adapters differ.")


def _clamp(key: str, hi: int) -> None:
    """Keep a kept widget value inside a range that shrank (fewer probes or samples than before)."""
    if key in st.session_state and st.session_state[key] > hi:
        st.session_state[key] = hi


# ------------------------------------------------------------------------------------ settings
def settings(cfg: MethodConfig) -> None:
    with st.form("pr_settings"):
        c = st.columns(4)
        n = c[0].number_input("samples per modality", min_value=1, max_value=1_000_000,
                              value=int(cfg.probes_per_modality), help=MethodConfig.help("probes_per_modality"),
                              key="pr_n")
        seed = c[1].number_input("seed", min_value=0, max_value=2**31 - 1, value=int(cfg.seed),
                                 help=MethodConfig.help("seed"), key="pr_seed")
        layout = c[2].radio("layout", ["joint", "separate"], index=["joint", "separate"].index(cfg.layout),
                            horizontal=True, help=MethodConfig.help("layout"), key="pr_layout")
        cap = c[3].number_input("max tokens per modality block", min_value=1, max_value=1_000_000,
                                value=int(cfg.max_modality_tokens), help=MethodConfig.help("max_modality_tokens"),
                                key="pr_cap")
        if st.form_submit_button("Apply settings"):
            new = cfg.replace(probes_per_modality=int(n), seed=int(seed), layout=layout,
                              max_modality_tokens=int(cap))
            if new != cfg:
                state.set_method(new)
                st.rerun()


def preview(kind: str, name: str, values: list[str]) -> None:
    if not values:
        st.info("No valid samples to preview.")
        return
    if kind == "smiles":
        _clamp(f"pr_nmol_{name}", min(24, len(values)))
        k = st.slider("molecules to draw", 1, max(2, min(24, len(values))), min(8, len(values)), key=f"pr_nmol_{name}")
        k = min(k, len(values))
        svg = molecule_grid_svg(values[:k], legends=[f"#{i}" for i in range(k)])
        st.image(svg, caption=f"The first {k} {name} samples in use (RDKit)")
        c1, c2, _ = st.columns([1, 1, 4])
        c1.download_button("SVG", svg.encode, file_name=f"{name}_molecules.svg", mime="image/svg+xml",
                           key=f"pr_svg_{name}", on_click="ignore")
        c2.download_button("CSV", partial(csv_bytes, pd.DataFrame({"sample": range(k), "smiles": values[:k]})),
                           file_name=f"{name}_molecules.csv", mime="text/csv", key=f"pr_svgcsv_{name}",
                           on_click="ignore")
    elif kind == "protein":
        lengths, comp = protein_stats(values)
        c1, c2 = st.columns(2)
        with c1:
            fig, df = figures.protein_lengths(lengths, name)
            show_figure(fig, df, f"{name} lengths", key=f"pr_len_{name}")
        with c2:
            fig, df = figures.aa_composition(comp, name)
            show_figure(fig, df, f"{name} composition", key=f"pr_aa_{name}")
    elif kind == "genes":
        top = st.slider("top genes shown", 3, 50, 10, key=f"pr_top_{name}")
        table = gene_table(values, top)
        st.dataframe(table, hide_index=True, width="stretch", key=f"pr_genes_{name}")
        st.download_button("CSV", partial(csv_bytes, table), file_name=f"{name}_top_genes.csv",
                           mime="text/csv", key=f"pr_genes_csv_{name}", on_click="ignore")
        fig, df = figures.gene_frequency(gene_frequency(values, top), top, name)
        show_figure(fig, df, f"{name} frequent genes", key=f"pr_gfreq_{name}")
    else:
        lengths = pd.DataFrame({"sample": range(len(values)), "length": [len(v) for v in values]})
        fig, df = figures.protein_lengths(lengths, name)
        fig.update_layout(xaxis_title="characters")
        show_figure(fig, df, f"{name} lengths", key=f"pr_len_{name}")


def sources(m, cfg: MethodConfig, current: str) -> None:
    """Controls that change where this modality's samples come from."""
    where, pool = sample_pools.sample_pool(m.name)
    st.caption(f"In use: **{current}**")
    if st.button("Back to the run's data file", key=f"pr_reset_{m.name}"):
        sample_pools.reset_modality_samples(m.name)
        st.rerun()
    with st.expander(f"Pick rows ({len(pool)} in {where})"):
        picked = sample_pools.picked_rows(m.name)
        use = [True] * len(pool) if picked is None else [i in set(picked) for i in range(len(pool))]
        table = pd.DataFrame({"use": use, "row": range(len(pool)), "sample": [str(x) for x in pool]})
        edited = st.data_editor(table, hide_index=True, width="stretch", disabled=["row", "sample"],
                                key=f"pr_pick_{m.name}", height=min(400, 38 + 35 * len(pool)))
        if st.button("Use the ticked rows", key=f"pr_pick_go_{m.name}"):
            idx = [int(r) for r, u in zip(edited["row"], edited["use"]) if u]
            chosen = [pool[i] for i in idx]
            sample_modality(chosen, m.kind, cfg.probes_per_modality, cfg.seed, cfg.min_probes, m.name)
            sample_pools.set_modality_samples(m.name, chosen, f"{len(idx)} rows picked from {where}", picked=idx)
            st.rerun()
    with st.expander("Upload a CSV"):
        up = st.file_uploader(f"table with a column of {KIND_WORDS.get(m.kind, m.kind)}",
                              type=["csv", "tsv", "txt", "gz"], key=f"pr_up_{m.name}",
                              help=f"At most {sample_pools.UPLOAD_LIMIT // 2**20} MiB; read as plain text with pandas, "
                                   "nothing in it is executed.")
        if up is not None:
            if up.size > sample_pools.UPLOAD_LIMIT:
                raise ESMError(f"Upload {up.name!r} is {up.size / 2**20:.1f} MiB, over the "
                               f"{sample_pools.UPLOAD_LIMIT / 2**20:.0f} MiB limit.", fix="upload a smaller table.")
            df = read_upload(up.getvalue(), up.name, max_bytes=sample_pools.UPLOAD_LIMIT)
            cols = list(df.columns)
            guess = guess_column(df, m.kind, m.data.column if m.data else None)
            col = st.selectbox("column", cols, index=cols.index(guess), key=f"pr_upcol_{m.name}")
            st.dataframe(df.head(5), hide_index=True, width="stretch", key=f"pr_uphead_{m.name}")
            if st.button("Use this column", key=f"pr_up_go_{m.name}"):
                raws = column_samples(df, col, m.kind, where=f"upload {up.name!r}", min_valid=cfg.min_probes,
                                      modality=m.name)
                label = f"upload {up.name} · column {col}"
                sample_pools.set_modality_samples(m.name, raws, label, pool=(label, raws))
                st.rerun()


def _probe_set(raw: dict, modalities, cfg: MethodConfig):
    """build_probes with a progress bar while the drawn samples are checked."""
    bar = st.empty()
    try:
        return build_probes(raw, modalities, cfg,
                            progress=lambda msg, frac: bar.progress(min(max(frac, 0.0), 1.0), text=msg))
    finally:
        bar.empty()


# ------------------------------------------------------------------------------------ page
with guard():
    settings(state.method())

with guard():
    sp = state.spec()
    cfg = state.method()
    raw = state.samples()
    mods = [m.name for m in sp.modalities]
    src = sample_pools.sample_sources()

    probes = batcher = None
    problems = []
    try:
        probes = _probe_set(raw, sp.modalities, cfg)
    except ESMError as e:
        problems.append(e)
    if probes is not None:
        try:
            batcher = state.workspace().batcher(cfg)
            probes = batcher.probes
        except ESMError as e:
            problems.append(e)
    for e in problems:
        st.error(f"**{e.reason}**" + (f"  \nFix: {e.fix}" if e.fix else ""))
    # without a probe set (a refusal) every row is checked, to show all that is wrong
    reports = probes.reports if probes is not None else sample_pools.sample_reports()

    st.subheader("Samples per modality")
    counts = pd.DataFrame([dict(modality=m.name, kind=m.kind, source=src.get(m.name, ""),
                                total=reports[m.name].n_total, examined=reports[m.name].n_examined,
                                valid=len(reports[m.name].values), bad=len(reports[m.name].bad),
                                used=len(probes.samples[m.name]) if probes is not None else 0,
                                truncated=batcher.truncated.get(m.name, 0) if batcher is not None else None)
                           for m in sp.modalities])
    st.dataframe(counts, hide_index=True, width="stretch", key="pr_counts")
    st.caption("examined = rows checked: only the seeded draw is validated (more are drawn when some are bad), "
               "so valid and bad count the examined rows; the other rows were not checked.")
    if probes is not None:
        used = ", ".join(f"{m} {probes.n_samples(m)}" for m in probes.modalities)
        asked = cfg.probes_per_modality
        short = any(probes.n_samples(m) < asked for m in probes.modalities)
        st.caption(f"{probes.n_probes} probes · layout **{probes.layout}** · samples used: {used} "
                   f"(asked for {asked} per modality, seed {cfg.seed}"
                   + ("; a modality with fewer valid samples sets the count of joint probes" if short
                      and probes.layout == "joint" else "") + ")"
                   + (f" · longest probe {max(batcher.lengths)} tokens" if batcher is not None and batcher.lengths
                      else "")
                   + f" · truncated = samples cut at {cfg.max_modality_tokens} tokens.")

    tabs = st.tabs(mods)
    for tab, m in zip(tabs, sp.modalities):
        with tab:
            rep = reports[m.name]
            with guard():
                sources(m, cfg, src.get(m.name, ""))
            used = probes.samples[m.name] if probes is not None else rep.values
            st.markdown(f"**Preview** ({len(used)} samples in use)")
            with guard():
                preview(m.kind, m.name, list(used))
            st.markdown(f"**Bad rows** ({len(rep.bad)} of {rep.n_examined} examined, skipped; "
                        f"{rep.n_total - rep.n_examined} of {rep.n_total} rows not examined)")
            if rep.bad:
                bad = pd.DataFrame(rep.bad, columns=["row", "raw", "reason"])
                st.dataframe(bad, hide_index=True, width="stretch", key=f"pr_bad_{m.name}")
                st.download_button("CSV", partial(csv_bytes, bad), file_name=f"{m.name}_bad_rows.csv",
                                   mime="text/csv", key=f"pr_bad_csv_{m.name}", on_click="ignore")
                st.caption("row = position in the sample list (0 = the first data row of the file).")
            else:
                st.caption("Every examined row is valid.")

    st.subheader("Tokenised probe (Fig. 4)")
    if batcher is None:
        st.info("The tokenised probe appears once the samples above give a valid probe set.")
    else:
        _clamp("pr_index", probes.n_probes - 1)
        i = int(st.number_input("probe", min_value=0, max_value=probes.n_probes - 1, value=0, key="pr_index",
                                help=f"0 .. {probes.n_probes - 1}"))
        toks = batcher.tokens(i)
        colors = figures.color_map(mods)
        body = figures.probe_html(token_spans(toks), colors)
        st.html(f"<div>{figures.probe_legend(colors)}</div>{body}")
        nt = span_counts(toks)
        parts = ", ".join(f"{m} #{probes.sample_rows[m][s]}" for m, s in probes.probes[i])
        per = ", ".join(f"{k or 'text'} {v}" for k, v in nt.items())
        st.caption(f"Probe {i}: {len(toks)} tokens ({per}); "
                   f"holds {parts} (rows of each modality's sample list).")
        tdf = pd.DataFrame([dict(position=j, token=t, modality=mm or "") for j, (t, mm) in enumerate(toks)])
        c1, c2, _ = st.columns([1, 1, 4])
        c1.download_button("HTML", f"<html><meta charset='utf-8'><body>{body}</body></html>".encode,
                           file_name=f"probe_{i}.html", mime="text/html", key="pr_probe_html", on_click="ignore")
        c2.download_button("CSV", partial(csv_bytes, tdf), file_name=f"probe_{i}_tokens.csv",
                           mime="text/csv", key="pr_probe_csv", on_click="ignore")
