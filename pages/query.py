"""Query: ask the base, each specialist and the merged models the same few-shot question, side by side.

Four sources of questions: the demo zoo's held-out skill questions, its cross-modal questions (one fact
of each of two modalities combined by a rule: what no single specialist can answer, with the "oracle" that
combines the two right specialists' own answers), the benchmark tasks of docs/METHOD.md section 7 (examples
chosen by the paper's similarity rules, shown with their scores), or a prompt you write. Answers come by label likelihood (probabilities of each label) and by generation parsed after
"Final answer:" (esm_core.evaluate)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st

from esm_core.answering.prompts import Example, Item, few_shot_prompt
from esm_core.benchmark.harness import answer_side_by_side, build_query
from esm_core.benchmark.tasks import task_table
from esm_core.errors import ESMError
from esm_core.paths import default_data_dir
from esm_core.samples import validate
from ui import caches, merges, roots, state
from ui.figures import color_map
from ui.routes import through_app
from ui.session import current
from ui.widgets import csv_bytes, guard, show_figure

through_app()  # a deep link on a fresh server goes through app.py (ui/routes.py)

st.title("Query the models")
st.caption("The same prompt goes to the base, each specialist and every merged model of this session "
           "(all on one base copy). Label probabilities come from the likelihood of each answer; the "
           "generated text is parsed after “Final answer:” — an answer without a parsable label counts as unparsed.")


def _show_prompt(p) -> None:
    with st.expander("The prompt", expanded=False):
        st.code(p.text(), language=None)


def _demo_sets(load, what: str) -> dict:
    """The demo zoo's question sets, or {} with a warning when the demo data is not here."""
    try:
        return load()
    except ESMError as e:
        st.warning(f"No {what} here: {e.reason}")
        return {}


def _oracle_row(answerer, cs, prompt) -> dict:
    """The two right specialists each answer their own single-fact question on the same query; the rule
    combines their answers (esm_core.zoo.composite.score_composites' oracle, for one question)."""
    from esm_core.zoo.composite import fact_prompt
    from esm_core.zoo.generic import rule_value

    said = []
    for skill, fp in zip((cs.a, cs.b), fact_prompt(cs, prompt)):
        r = answer_side_by_side(answerer, fp, {skill.modality: skill.modality}, generate=False)[0]
        said.append(r["answer_likelihood"] == skill.labels[0])
    ans = "Yes" if rule_value(cs.rule, *said) else "No"
    return {"prompt": 0, "model": (f"oracle ({cs.a.modality} says {'yes' if said[0] else 'no'}, "
                                   f"{cs.b.modality} says {'yes' if said[1] else 'no'})"),
            "answer_likelihood": ans, "gold": prompt.answer}


with guard():
    ws = state.workspace()
    answerer = caches.answerer(state.spec_key(state.spec()), ws)
    prompt = None
    composite = None
    source = st.radio("question from", ["Demo zoo skills", "Cross-modal questions", "Benchmark tasks", "Write a prompt"],
                      horizontal=True, key="q_source")

    if source == "Demo zoo skills":
        sets = _demo_sets(caches.skill_sets, "demo skill questions")
        if sets:
            names = sorted(sets)
            skill = st.selectbox("skill", names, key="q_skill",
                                 format_func=lambda n: f"{n} ({sets[n].skill.modality}): {sets[n].skill.question}")
            ss = sets[skill]
            i = int(st.number_input(f"question (0..{ss.n - 1})", 0, ss.n - 1, 0, key="q_skill_i"))
            prompt = ss.prompts[i]
            st.caption(f"Held-out question with {sum(1 for s in prompt.segments if isinstance(s, str) and 'Example' in s)} "
                       f"in-context examples from the training pool · gold answer: **{prompt.answer}** · "
                       f"label source: {ss.skill.source}")

    elif source == "Cross-modal questions":
        csets = _demo_sets(caches.composite_sets, "cross-modal questions")
        if csets:
            cname = st.selectbox("question set", list(csets), key="q_comp",
                                 format_func=lambda n: f"{csets[n].pair}: {n}")
            composite = csets[cname]
            i = int(st.number_input(f"question (0..{len(composite.prompts) - 1})", 0, len(composite.prompts) - 1, 0,
                                    key="q_comp_i"))
            prompt = composite.prompts[i]
            fa, fb = prompt.meta["facts"]
            st.markdown(
                f"Gold answer: **{prompt.answer}** = ({composite.a.name}: **{'yes' if fa else 'no'}**) "
                f"**{composite.rule}** ({composite.b.name}: **{'yes' if fb else 'no'}**)  \n"
                f"The facts it combines: {composite.a.modality} · {composite.a.question} ({composite.a.source}); "
                f"{composite.b.modality} · {composite.b.question} ({composite.b.source}). Each specialist learned "
                "only its own modality's facts; the base learned the form of such questions on generic facts.")

    elif source == "Benchmark tasks":

        dd = st.text_input("data directory", value=str(default_data_dir() or ""), key="q_data",
                           help="Where the benchmark files live (default: ../shared/data next to the repository).")
        default = default_data_dir()
        if dd and (default is None or Path(dd).expanduser().resolve() != default.resolve()):
            roots.check_allowed(dd, "Data directory")  # the default data directory is always readable
        rows = task_table(dd or None)
        avail = [r for r in rows if r["available"]]
        missing = [r for r in rows if not r["available"]]
        if missing:
            st.caption("Not available here (missing files): " + ", ".join(f"{r['name']} ({r['missing'][0]})" for r in missing))
        if not avail:
            st.warning("No benchmark task has its data files in this directory.")
        else:
            name = st.selectbox("task", [r["name"] for r in avail], key="q_task",
                                format_func=lambda n: next(f"{r['title']} [{r['group']}]" for r in avail if r["name"] == n))
            task = caches.task(name, dd)
            st.caption(f"{task.title}: pool {len(task.train)} rows, test split {len(task.test)} rows · "
                       f"{task.load_note()}")
            c1, c2 = st.columns(2)
            row = int(c1.number_input(f"test row (0..{len(task.test) - 1})", 0, len(task.test) - 1, 0, key="q_row"))
            k = int(c2.slider("in-context examples k", 0, 8, 5, key="q_k"))
            q = build_query(task, row, k=k, answerer=answerer)
            prompt = q.prompt
            st.markdown(f"**{task.title}** — {task.question}  \nGold answer of test row {row}: **{prompt.answer}**"
                        f" · the prompt holds {len(prompt.meta['chosen'])} of k={k} examples"
                        f" ({prompt.meta.get('dropped', 0)} dropped to fit the context)"
                        + (f"; every protein shown as its first {prompt.meta['protein_window']} residues so that the "
                           "examples fit" if prompt.meta.get("protein_window") else ""))
            if q.examples:
                st.markdown("**Chosen examples** (similarity to the query and why they were chosen)")
                df = q.table()
                st.dataframe(df, hide_index=True, width="stretch")
                st.download_button("CSV", partial(csv_bytes, df), file_name=f"{name}_examples.csv",
                                   mime="text/csv", key="q_ex_csv", on_click="ignore")

    else:
        sp = state.spec()
        mods = {m.name: m for m in sp.modalities}
        system = st.text_input("system", "You are an expert in drug discovery and molecular biology.", key="q_sys")
        question = st.text_input("question", "Does the molecule interact with the protein?", key="q_question")
        labels = [x.strip() for x in st.text_input("answers (comma-separated)", "Yes, No", key="q_labels").split(",")
                  if x.strip()]
        fields = []
        for name, m in mods.items():
            label = m.prefix.strip().rstrip(":") or name
            raw = st.text_input(f"{label} ({m.kind}; leave empty to omit)", "", key=f"q_f_{name}")
            if raw.strip():
                rep = validate([raw], m.kind)
                if rep.bad:
                    raise ESMError(f"The {name} input is not valid: {rep.bad[0][2]}.", fix=f"enter a valid {m.kind} value.")
                fields.append(((m.prefix.strip().rstrip(":") or name.capitalize()), Item(name, rep.values[0])))
        if len(labels) < 2:
            st.warning("Give at least two answers.")
        elif not fields:
            st.info("Enter at least one input (molecule, protein or cell).")
        else:
            prompt = few_shot_prompt(system, question, labels, [], Example(fields))

    if prompt is not None:
        _show_prompt(prompt)
        choices = ["base", *ws.sset.names, *merges.merges()]
        models = st.multiselect("models", choices, default=choices, key="q_models")
        gen = st.toggle("also generate and parse", value=True, key="q_gen")
        if st.button("Answer", type="primary", key="q_go") and models:

            merged = [m for m in models if m in merges.merges()]
            with st.spinner("Answering ..."), merges.merged_adapters(merged) as adapters:
                rows = answer_side_by_side(answerer, prompt, {m: adapters.get(m, None if m == "base" else m)
                                                              for m in models}, generate=gen)
            if composite is not None and all(s in ws.sset.names for s in (composite.a.modality, composite.b.modality)):
                rows.append(_oracle_row(answerer, composite, prompt))
            current().answers = (prompt.text(), rows)
        ans = current().answers
        if ans is not None and ans[0] == prompt.text():
            df = pd.DataFrame(ans[1]).drop(columns=["prompt"])
            if "gold" in df:
                df["correct (likelihood)"] = df["answer_likelihood"] == df["gold"]
                if "answer_generation" in df:
                    df["correct (generation)"] = df["answer_generation"] == df["gold"]
            st.dataframe(df, hide_index=True, width="stretch")
            probs = df.melt(id_vars=["model"], value_vars=[c for c in df.columns if c.startswith("p(")],
                            var_name="label", value_name="probability")
            fig = px.bar(probs, x="model", y="probability", color="label", barmode="group",
                         title="Label probabilities (normalised over the answers)",
                         color_discrete_sequence=list(color_map(list(probs["label"].unique())).values()))
            fig.update_layout(height=320, yaxis_range=[0, 1])
            show_figure(fig, df, "answers side by side", key="q_fig")
