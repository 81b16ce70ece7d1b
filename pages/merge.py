"""Merge: pick a merge method from the engine's registry (ES-Merging and the baselines),
set its parameters, run it, compare two merges' coefficient maps, download the merged adapter.

Every method is Eq. 1 on the LoRA A and B factors (docs/METHOD.md section 0); the page only calls
``ui.merges.run_merge`` (which loads the merged adapter next to the specialists, so the Query and
Embeddings pages can use it), ``ui.merge_data`` (training prompts, the merge list, the files) and the
plain functions of ``esm_core`` (comparison, zip). Learned methods (AdaMerging, fine-tuning) draw their
prompts from a benchmark task's TRAINING rows or from the demo zoo's skills on the demo data's train split.
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

from esm_core.analysis.compare import compare_coefficients
from esm_core.config import MethodConfig
from esm_core.errors import ESMError
from esm_core.io import zip_files
from esm_core.merging.registry import get_method, list_methods
from esm_core.paths import DEMO_DIR
from esm_core.zoo.skills import SKILLS
from ui import figures, links, merge_data, merges, shared, state
from ui.routes import through_app
from ui.widgets import csv_bytes, guard, param_controls, preset_badge, run_button, show_figure, timed_progress

through_app()  # a deep link on a fresh server goes through app.py (ui/routes.py)

EQ1_NOTE = ("**What Eq. 1 on factors does.** Merging A and B separately gives the update "
            "(Σₖ λₖBₖ)(Σₖ λₖAₖ) = Σₖ λₖ² BₖAₖ + Σ_{j≠k} λⱼλₖ BⱼAₖ: a specialist's own update survives with about λ² "
            "(a plain average of three keeps about 1/9 of each, not 1/3), and cross terms BⱼAₖ that no specialist "
            "learned appear. The delta space combines the updates themselves and re-factorises them by truncated "
            "SVD (rank = sum of the input ranks is exact for a linear combination). Section 2b shows both numbers "
            "for every merge.")
NEEDS = {"es": "uses the ES estimation of the current selection", "model": "runs the model",
         "data": "learns from task prompts"}


def data_controls() -> dict:
    """Widgets choosing where a learned method's prompts come from; returns the choice (built on Merge)."""
    st.markdown("**Training data** — the learned methods need prompts")
    source = st.radio("draw prompts from", ["task", "skills"], horizontal=True, key="mg_source",
                      format_func={"task": "a benchmark task's training rows",
                                   "skills": "demo zoo skills (train split)"}.get,
                      help="Task rows come from the data directory ($ESM_DATA_DIR, default ../shared/data); "
                           "skills are the demo zoo's questions, asked about samples of the demo data's train "
                           "split (the held-out split scores the skills, so it is never trained on).")
    c1, c2, c3 = st.columns([3, 1, 1])
    if source == "task":
        d, tasks = merge_data.available_tasks()
        if not tasks:
            st.error("**No task data is available** "
                     + (f"in {str(d)!r}." if d else "(no data directory found).")
                     + "  \nFix: set $ESM_DATA_DIR to a directory with the task files (e.g. "
                       "public/dti/bindingdb_sample_train.csv), or draw prompts from the demo zoo's skills.")
            return {"source": "task", "ok": False}
        by = {t.name: t for t in tasks}
        names = c1.multiselect("tasks", list(by), default=[next(iter(by))], key="mg_tasks",
                               format_func=lambda n: f"{by[n].title} · {by[n].group}",
                               help="Prompts of several tasks are batched per task (AdaMerging's per-task batches).")
        n = int(c2.number_input("rows per task", 2, 5000, 32, key="mg_task_n",
                                help="Training rows drawn (seeded) from each task; each becomes a few-shot prompt."))
        k = int(c3.number_input("examples (k)", 0, 10, 5, key="mg_task_k",
                                help="In-context examples per prompt, selected as docs/METHOD.md section 7 describes."))
        st.caption(f"data directory `{d}` · {len(tasks)} task(s) available")
        return {"source": "task", "ok": True, "names": names, "n": n, "k": k, "dir": str(d)}
    if not merge_data.demo_available():
        st.error(f"**The demo data is missing** (`{DEMO_DIR}`).  \nFix: rebuild it with "
                 "`python -m esm_core zoo demo-data --out assets/demo`, or draw prompts from a task.")
        return {"source": "skills", "ok": False}
    by = {s.name: s for s in SKILLS}
    names = c1.multiselect("skills", list(by), default=merge_data.default_skills(), key="mg_skills",
                           format_func=lambda n: f"{n} · {by[n].question[:60]}",
                           help="Binary questions about a molecule, protein or cell of a mixed-modality prompt.")
    n = int(c2.number_input("questions per skill", 2, 2000, 32, key="mg_skill_n",
                            help="Balanced: half of each label, from the train split (seeded)."))
    k = int(c3.number_input("examples (k)", 0, 10, 2, key="mg_skill_k",
                            help="In-context examples per question (the zoo's skill sets use 2)."))
    return {"source": "skills", "ok": True, "names": names, "n": n, "k": k}


def updates_view(made: dict) -> None:
    """Section 2b: what a merge keeps of each specialist's own update, and the cross-term energy, per module."""
    st.markdown("**2b · What each merge keeps of the specialists' updates** — per module, the merged update "
                "written as Σₖ cₖ·(sₖBₖAₖ) + rest: cₖ is specialist k's surviving share (1 = whole), the rest's "
                "share of the energy is the cross terms no specialist made.")
    pick = st.selectbox("merge", list(made), index=len(made) - 1, key="mg_upd")
    rep = made[pick].get("updates")
    if not rep:
        st.info("This merge has no update report.")
        return
    names = state.workspace().sset.names
    cols = st.columns(len(names) + 1)
    for c, n in zip(cols, names):
        c.metric(f"mean share · {n}", f"{rep['summary'][f'share {n}']:.3f}")
    cols[-1].metric("mean cross energy", f"{rep['summary']['cross energy']:.1%}")
    df = pd.DataFrame(rep["modules"])
    df.insert(0, "block", df.pop("layer") + 1)
    qty = [c for c in df.columns if c.startswith(("share", "cross"))]
    per_block = df.groupby("block", as_index=False)[qty].mean().melt(id_vars=["block"], var_name="quantity",
                                                                     value_name="mean over the block's modules")
    fig = px.line(per_block, x="block", y="mean over the block's modules", color="quantity", markers=True,
                  title=f"{pick}: surviving share of each update and cross-term energy ({rep['space']} space)",
                  color_discrete_sequence=list(figures.color_map(qty).values()))
    fig.update_layout(height=340)
    show_figure(fig, df, f"update shares {pick}", key="mg_upd_fig")


# ------------------------------------------------------------------------------------ page
st.title("Merge")
st.caption("Merge the specialists' LoRA adapters with ES-Merging or a baseline (all element-wise on the A and B "
           "factors, Eq. 1), compare two merges' coefficients λ, and download the merged adapter. Each merge is "
           "loaded next to the specialists on the one base copy, so the Query and Embeddings pages can use it.")

with guard():
    methods = {m.name: m for m in list_methods()}
    with st.expander("All merge methods in the registry"):
        st.dataframe(pd.DataFrame([dict(method=m.pretty, name=m.name, needs=", ".join(sorted(m.needs)) or "—",
                                        summary=m.summary, paper=m.paper, link=m.url) for m in methods.values()]),
                     hide_index=True, width="stretch",
                     column_config={"link": st.column_config.LinkColumn("link")})

    st.subheader("1 · Method and parameters")
    name = st.selectbox("merge method", list(methods), format_func=lambda n: methods[n].pretty, key="mg_method",
                        help="The engine's registry (esm_core.merge): ES-Merging first, then the baselines.")
    m = get_method(name)
    st.markdown(f"**{m.pretty}** — {m.summary}")
    cfg = state.method()
    s1, s2 = st.columns([2, 1])
    space = s1.radio("merge space", ["factors", "delta"], index=["factors", "delta"].index(cfg.merge_space),
                     horizontal=True, key="mg_space", help=MethodConfig.help("merge_space"),
                     format_func={"factors": "factors A, B (Eq. 1)", "delta": "updates s·B·A, re-factorised (SVD)"}.get)
    rank = int(s2.number_input("rank of a delta merge (0 = sum of ranks)", 0, 100_000, int(cfg.delta_rank),
                               key="mg_delta_rank", disabled=space != "delta", help=MethodConfig.help("delta_rank")))
    if (space, rank) != (cfg.merge_space, cfg.delta_rank):
        state.set_method(cfg.replace(merge_space=space, delta_rank=rank))
    st.caption(EQ1_NOTE)
    st.caption(f"Paper: [{m.paper}]({m.url})" + (" · " + "; ".join(NEEDS[n] for n in sorted(m.needs) if n in NEEDS)
                                                   if m.needs else " · closed form, instant"))
    params = param_controls(m, "mg")

    if "es" in m.needs:
        res = state.result()
        if res is not None:
            preset_badge(res)
        else:
            st.info("ES-Merging merges with the coefficients λ of the current selection, and none are computed"
                    + (" for the current settings." if state.needs_rerun() else " yet.")
                    + " Run the estimation here or on the Overview page.")
            if run_button(key="run_merge_es"):
                st.rerun()

    choice = data_controls() if "data" in m.needs else None
    work = merge_data.learned_work(choice, params)
    batches = None
    if work is not None:
        n, batches = work
        speed = shared.learned_speed(m.name)
        st.caption(f"Work: {params['steps']} optimisation steps of {params['batch_size']} prompts and two "
                   f"evaluations of about {n} prompts = {batches} batches"
                   + (f"; at the {speed:.2f} s per batch measured on this server, about {batches * speed:.0f} s."
                      if speed else "; the time left is shown while it runs, from the first batches."))

    if st.button(f"Merge with {m.pretty}", type="primary", key="mg_run"):
        seed = state.method_seed()
        state.workspace()  # loaded (cached) before the clock starts
        data, data_note = merge_data.build_data(choice, seed) if choice is not None else (None, "")
        status = st.status(f"Merging with {m.pretty} ...", expanded=True)
        progress = timed_progress(status)
        t0 = time.perf_counter()
        new = merges.run_merge(m.name, params, data=data, progress=progress)
        secs = time.perf_counter() - t0
        merges.merges()[new].update(seconds=secs, data=data_note)
        if batches:
            shared.record_learned_speed(m.name, secs / batches)
        st.session_state["mg_dl"] = new  # the download section offers the newest merge
        st.session_state["mg_upd"] = new  # and section 2b shows it
        status.update(label=f"{new}: done in {secs:.1f} s", state="complete", expanded=False)
        st.success(f"**{new}** is loaded next to the specialists." + (f" Trained on {data_note}." if data_note else ""))

    # ------------------------------------------------------------------ session list
    st.subheader("2 · Merges of this session")
    made = merges.merges()
    if not made:
        st.info("No merges yet: choose a method above and press Merge.")
    else:
        st.dataframe(pd.DataFrame(merge_data.merge_rows(made)), hide_index=True, width="stretch", key="mg_list")
        updates_view(made)

with guard():
    # ------------------------------------------------------------------ comparison
    st.subheader("3 · Compare two merges' coefficient maps")
    made = merges.merges()
    withc = [n for n, e in made.items() if e["output"].coefficients is not None]
    if len(withc) < 2:
        st.info(f"Needs two merges with per-element coefficients λ [K, ...] (ES-Merging and most baselines; "
                f"Average and fine-tuning have none); this session has {len(withc)}.")
    else:
        names = state.workspace().sset.names
        c1, c2 = st.columns(2)
        a = c1.selectbox("first merge", withc, index=0, key="mg_cmp_a")
        b = c2.selectbox("second merge", withc, index=1, key="mg_cmp_b")
        if a == b:
            raise ESMError("The same merge is chosen twice.", fix="choose two different merges to compare.")
        ca, cb = made[a]["output"].coefficients, made[b]["output"].coefficients
        keys = sorted(ca)
        if sorted(cb) != keys:
            raise ESMError(f"{a} and {b} cover different LoRA factors.", fix="compare merges of the same specialists.")
        L = sorted({k.layer for k in keys})
        k1, k2, k3 = st.columns([1, 2, 1])
        links.seed("mg_cmp_layer", L)
        links.seed("mg_cmp_ab", ["A", "B"])
        layer = k1.selectbox("block", L, format_func=lambda l: str(l + 1), key="mg_cmp_layer")
        links.seed("mg_cmp_module", sorted({k.module for k in keys if k.layer == layer}))
        module = k2.selectbox("module", sorted({k.module for k in keys if k.layer == layer}), key="mg_cmp_module")
        ab = k3.radio("factor", ["A", "B"], horizontal=True, key="mg_cmp_ab")
        key = next(k for k in keys if k.layer == layer and k.module == module and k.ab == ab)
        la, lb = ca[key].detach().float().numpy(), cb[key].detach().float().numpy()
        R, C = la.shape[1:]
        st.caption(f"`{key}` · shape {R} × {C} · {made[a]['pretty']} vs {made[b]['pretty']}. Baselines' λ "
                   "need not sum to 1 over specialists (e.g. Task Arithmetic's scaling, TIES' trimming).")

        rows, overall = compare_coefficients(ca[key], cb[key], names)
        rows_all, overall_all = compare_coefficients([ca[k] for k in keys], [cb[k] for k in keys], names)
        t1, t2, t3 = st.columns(3)
        t1.metric("top specialist differs (this factor)", f"{overall['top_differs']:.1%}")
        t2.metric("top specialist differs (whole adapter)", f"{overall_all['top_differs']:.1%}")
        t3.metric("mean |λ₁−λ₂| (this factor)", f"{overall['mean_abs_diff']:.4f}")
        table = pd.DataFrame([{"specialist": r["specialist"], f"mean λ · {a}": r["mean_1"], f"mean λ · {b}": r["mean_2"],
                               "mean |λ1−λ2|": r["mean_abs_diff"], "max |λ1−λ2|": r["max_abs_diff"],
                               "mean |λ1−λ2| (whole adapter)": ra["mean_abs_diff"]}
                              for r, ra in zip(rows, rows_all)])
        st.dataframe(table, hide_index=True, width="stretch", key="mg_cmp_table",
                     column_config={c: st.column_config.NumberColumn(format="%.4f") for c in table.columns[1:]})
        st.caption(f"Top specialist = the one with the largest λ of an element; ties (e.g. an entry trimmed to 0 "
                   f"for everyone) count as their own label — tied elements: {overall['ties_1']:.1%} in {a}, "
                   f"{overall['ties_2']:.1%} in {b} (this factor).")
        st.download_button("CSV", partial(csv_bytes, table), file_name=f"compare_{a}_{b}_{key}.csv",
                           mime="text/csv", key="mg_cmp_csv", on_click="ignore")

        zmax = float(max(np.nanmax(la), np.nanmax(lb)))
        zmin = float(min(0.0, np.nanmin(la), np.nanmin(lb)))
        for tag, arr in ((a, la), (b, lb)):
            mats = {n: arr[i] for i, n in enumerate(names)}
            fig, _ = figures.element_heatmaps(mats, f"λ of {tag} — {key}", zmin=zmin, zmax=zmax)
            show_figure(fig, figures.matrix_frame(mats, "lambda"), f"lambda {tag} {key}", key=f"mg_heat_{tag}")
        diff = {n: np.abs(la[i] - lb[i]) for i, n in enumerate(names)}
        fig, _ = figures.element_heatmaps(diff, f"|λ({a}) − λ({b})| — {key}", zmin=0, colorscale="Magma")
        show_figure(fig, figures.matrix_frame(diff, "abs_diff"), f"abs diff {a} {b} {key}", key="mg_heat_diff")

with guard():
    # ------------------------------------------------------------------ downloads
    st.subheader("4 · Download")
    made = merges.merges()
    if not made:
        st.info("Nothing to download yet.")
    else:
        if st.session_state.get("mg_dl") not in made:
            st.session_state["mg_dl"] = list(made)[-1]
        pick = st.selectbox("merge", list(made), key="mg_dl")
        get, has_coef = merge_data.files_getter(pick, made[pick])
        st.caption("The zip holds a PEFT adapter folder (adapter_config.json, adapter_model.safetensors) with "
                   "coefficients.safetensors, the encoders and manifest.json; unzipped, "
                   f"`PeftModel.from_pretrained(base, '{pick}')` loads it. Files are written when you click.")
        d1, d2, d3 = st.columns(3)
        d1.download_button("Merged adapter (zip)", lambda: zip_files(get(), pick), file_name=f"{pick}.zip",
                           mime="application/zip", key="mg_dl_zip", on_click="ignore", type="primary")
        if has_coef:
            d2.download_button("Coefficients (safetensors)", lambda: get()["coefficients.safetensors"],
                               file_name=f"{pick}_coefficients.safetensors", mime="application/octet-stream",
                               key="mg_dl_coef", on_click="ignore")
        else:
            d2.caption(f"{made[pick]['pretty']} has no coefficients to download.")
        d3.download_button("Manifest (JSON)", lambda: get()["manifest.json"], file_name=f"{pick}_manifest.json",
                           mime="application/json", key="mg_dl_manifest", on_click="ignore")
