"""Compare merge methods on their answers: methods x tasks in the paper's Table 1/2 layout, with the
questions behind every cell (ui.comparisons; the same loop as ``python -m esm_core compare``)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from esm_core.benchmark.comparison import CompareSettings
from esm_core.benchmark.tasks import task_table
from esm_core.merging.registry import list_methods
from esm_core.paths import default_data_dir
from ui import comparisons, roots, state
from ui.routes import through_app
from ui.session import current
from ui.widgets import csv_bytes, guard, timed_progress

through_app()  # a deep link on a fresh server goes through app.py (ui/routes.py)

st.title("Compare merge methods on answers")
st.caption("Every chosen method merges the specialists; the base, the specialists and each merge answer the same "
           "few-shot questions of each task (k examples chosen by similarity, as in the paper's protocol). Cells: "
           "value (95 % bootstrap interval) n=…; the reference rows are the training-majority class and the "
           "majority label of the k examples. A comparison is computed once for everyone on this server.")

with guard():
    methods = {m.name: m for m in list_methods()}
    c1, c2 = st.columns([2, 3])
    chosen = c1.multiselect("methods", list(methods), default=[m for m in ("es", "average", "ties") if m in methods],
                            format_func=lambda n: methods[n].pretty, key="cmp_methods")
    dd = c2.text_input("data directory", value=str(default_data_dir() or ""), key="cmp_data",
                       help="Where the benchmark files live (default: ../shared/data next to the repository).")
    default = default_data_dir()
    if dd and (default is None or Path(dd).expanduser().resolve() != default.resolve()):
        roots.check_allowed(dd, "Data directory")
    rows = task_table(dd or None)
    avail = [r["name"] for r in rows if r["available"]]
    titles = {r["name"]: f"{r['title']} ({r['group']})" for r in rows}
    tasks = st.multiselect("tasks", avail, default=avail[:1], format_func=lambda n: titles[n], key="cmp_tasks",
                           help="Tasks whose files are present in the data directory.")
    d1, d2, d3, d4, d5 = st.columns(5)
    n = int(d1.number_input("questions per task", 2, 5000, 40, key="cmp_n"))
    k = int(d2.number_input("examples (k)", 0, 10, 5, key="cmp_k"))
    mode = d3.radio("answer by", ["likelihood", "generation", "both"], key="cmp_mode",
                    help="likelihood: the label the model finds most likely; generation: the label parsed after "
                         "'Final answer:' in a generated reply (slower).")
    spaces = d4.multiselect("merge spaces", ["factors", "delta"], default=["factors"], key="cmp_spaces",
                            help="factors: A and B merged separately (Eq. 1); delta: the updates s·B·A merged and "
                                 "re-factorised. Two spaces give two rows per method.")
    seed = int(d5.number_input("seed", 0, 2**31 - 1, 0, key="cmp_seed"))
    e1, e2 = st.columns(2)
    with_base = e1.checkbox("base row", value=True, key="cmp_base")
    with_spec = e2.checkbox("specialist rows", value=True, key="cmp_spec")
    modes = ("likelihood", "generation") if mode == "both" else (mode,)
    # one space that is the run's own: rows unlabelled, as the CLI without --spaces
    plain = not spaces or spaces == [state.method().merge_space]
    settings = CompareSettings(n=n, seed=seed, k=k, modes=modes, n_boot=1000,
                               spaces=(None,) if plain else tuple(spaces), base=with_base, specialists=with_spec)
    s = current()
    if st.button("Compare", type="primary", key="cmp_run", disabled=not (chosen and tasks)):
        bar = st.empty()
        rep, how = comparisons.compare(chosen, tasks, dd or None, settings, progress=timed_progress(bar))
        bar.empty()
        s.comparison = (comparisons.comparison_key(chosen, tasks, dd or None, settings), rep, how)

    if s.comparison is not None:
        key, rep, how = s.comparison
        if key != comparisons.comparison_key(chosen, tasks, dd or None, settings):
            st.info("The table below is for an earlier choice; press Compare for the current one.")
        st.caption(f"{len(rep.tasks)} task(s), {rep.meta.get('total_s', 0):.0f} s to compute ({how}).")
        md = rep.markdown([m for m in ("generation", "likelihood") if any(r["mode"] == m for r in rep.rows)])
        st.markdown(md)
        f1, f2, f3 = st.columns(3)
        f1.download_button("table.md", md.encode(), file_name="table.md", mime="text/markdown", key="cmp_md",
                           on_click="ignore")
        f2.download_button("table.csv", csv_bytes(pd.DataFrame(rep.csv_rows())), file_name="table.csv",
                           mime="text/csv", key="cmp_csv", on_click="ignore")
        f3.download_button("results.json", json.dumps(rep.to_json(), indent=1, default=str).encode(),
                           file_name="results.json", mime="application/json", key="cmp_json", on_click="ignore")

        st.subheader("The questions behind a cell")
        models = list(dict.fromkeys(r["model"] for r in rep.rows if r["kind"] != "reference"))
        g1, g2 = st.columns(2)
        model = g1.selectbox("model", models, key="cmp_cell_model")
        task = g2.selectbox("task", [t["task"] for t in rep.tasks], key="cmp_cell_task")
        cell = comparisons.cell_rows(rep, model, task)
        if cell:
            df = pd.DataFrame(cell)
            ans = "answer (likelihood)" if "answer (likelihood)" in df else "answer (generation)"
            st.caption(f"{model} on {task}: {int((df[ans] == df['gold']).sum())} of {len(df)} answered right "
                       f"({ans.split('(')[1][:-1]}).")
            st.dataframe(df, hide_index=True, width="stretch", key="cmp_cell_table")
            i = int(st.number_input("show the whole prompt of question #", 0, len(df) - 1, 0, key="cmp_cell_q"))
            st.code(rep.prompts[task].prompts[i].text(), language=None)
