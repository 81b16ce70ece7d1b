"""Learn ES-Merging in 10 steps: one idea per step, the live figure of the current run, one question the
learner answers by moving one control, and the answer computed from the live numbers
(esm_core/analysis/lesson.py). The step is in the URL (``lesson_step``): one link sends a room to it."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from esm_core.analysis.lesson import answer
from esm_core.benchmark.harness import answer_side_by_side
from esm_core.errors import ESMError
from esm_core.merging.base import MergeContext
from esm_core.merging.output import update_report
from esm_core.merging.registry import get_method
from ui import caches, figures, links, merges, state
from ui.routes import through_app
from ui.widgets import guard, need_result, preset_badge, show_figure

through_app()  # a deep link on a fresh server goes through app.py (ui/routes.py)

STEPS = [
    ("Probes hold every modality", "A probe is one input holding a text prefix and a token block for EVERY modality "
     "(molecule, protein, cell). The same probes go through the base and through each specialist."),
    ("Same input, different models", "The base and the specialists read the same input embeddings: one encoder per "
     "modality serves them all. So where their hidden states differ, only the adapters can be the cause."),
    ("Distance per block (SWD)", "At every block, the mean hidden state of each probe gives one point per probe for the "
     "base and one for the specialist; the sliced Wasserstein distance measures how far apart the two clouds are."),
    ("Where the distance grows", "What matters is where a specialist's distance GROWS: the increment Δ from one block to "
     "the next, z-scored over the blocks and summed over modalities, is the layer score s."),
    ("Layer coefficient α", "A softmax across the specialists of the layer scores, with temperature τ_layer, gives α: "
     "per block, how much of the merge each specialist gets (Eq. 2)."),
    ("Gradient scores per element", "For each adapter element, the absolute gradient of the base-specialist hidden-state "
     "distance says how much that single number moves the specialist away from the base (a per-sample gradient)."),
    ("Element coefficient β", "Scores are z-scored (within a layer or a tensor) and a softmax across specialists with "
     "temperature τ_elem gives β per element (Eq. 3)."),
    ("The merge coefficient λ", "λ = α·β normalised over the specialists (Eq. 4): the coarse block signal times the fine "
     "element signal. The mode picks α only, β only or both (the paper's Table 3)."),
    ("The merged model answers", "The merged adapter is θ = Σ λ·θ_k, element by element. Does it keep each specialist's "
     "skill? Ask it the held-out questions the specialists were trained to answer."),
    ("What the merge keeps", "Merging A and B separately (Eq. 1) multiplies the shares: a specialist's own update B·A "
     "survives with about λ², plus cross terms B_j·A_k. Merging the updates themselves (delta space) avoids both."),
]

st.title("Learn ES-Merging in 10 steps")
st.caption("Each step explains one idea on the current run's live numbers (the demo zoo unless you chose other "
           "specialists). Move the control to answer the question, then reveal the answer. The step is part of the "
           "page's link: share the address bar to send everyone to the same step.")

def _es_merge() -> str | None:
    made = [n for n, m in merges.merges().items() if m["method"] == "es" and m["key"] == state.run_key()]
    return made[-1] if made else None


def _merged_answers(res) -> None:
    try:
        sets = caches.skill_sets()
    except ESMError as e:
        st.warning(f"No held-out skill questions here ({e.reason}); use the Query page with your own questions.")
        return
    name = _es_merge()
    if name is None:
        st.info("Merge the specialists with ES-Merging first (seconds on the demo zoo).")
        if st.button("Merge with ES-Merging", type="primary", key="lesson_merge"):
            name = merges.run_merge("es", {})
        else:
            return
    skills = {n: s for n, s in sets.items()}
    skill = st.selectbox("Pick a skill: will the merged model answer its questions like the specialist that learned "
                         "it?", list(skills), key="lesson_q9",
                         format_func=lambda n: f"{n} ({skills[n].skill.modality}): {skills[n].skill.question}")
    if not st.toggle("Reveal the answer", key="lesson_reveal_9"):
        return
    ss = skills[skill]
    prompts = ss.prompts[:12]
    owner = next((n for n, m in zip(res.specialists, res.own_modalities) if m == ss.skill.modality), None)
    models = {"base": None, **({owner: owner} if owner else {})}
    answerer = caches.answerer(state.spec_key(state.spec()), state.workspace())
    with st.spinner("Answering ..."), merges.merged_adapters([name]) as adapters:
        rows = answer_side_by_side(answerer, prompts, {**models, name: adapters[name]}, generate=False)
    df = pd.DataFrame(rows)
    acc = df.assign(right=df["answer_likelihood"] == df["gold"]).groupby("model")["right"].mean()
    st.dataframe(acc.rename("accuracy").reset_index(), hide_index=True)
    st.success(f"On {len(prompts)} held-out questions of {skill}: " + ", ".join(
        f"{m} {100 * acc[m]:.0f} %" for m in acc.index) + ". The merge keeps the skill where its accuracy stays near "
        "the specialist's, above the base's.")


@st.cache_resource(show_spinner="Merging in both spaces ...", max_entries=8)
def _shares(run_key: str, space: str, _ws, _res) -> dict:
    ctx = MergeContext.from_specialists(_ws.sset, workspace=_ws, es_result=_res, seed=_res.config.seed, space=space)
    out = get_method("es").run(ctx, {})
    return update_report(out, ctx, ctx.folded)["summary"]


def _what_the_merge_keeps(res) -> None:
    space = st.radio("Merge in which space: how much of each specialist's own update survives?",
                     ["factors", "delta"], horizontal=True, key="lesson_q10")
    if not st.toggle("Reveal the answer", key="lesson_reveal_10"):
        return
    s = _shares(state.run_key(), space, state.workspace(), res)
    shares = ", ".join(f"{n} {s[f'share {n}']:.3f}" for n in res.specialists)
    st.success(f"ES-Merging in the {space} space keeps of each specialist's own update (least-squares share, 1 = "
               f"whole): {shares}; {100 * s['cross energy']:.1f} % of the merged update's energy lies outside the "
               "specialists' updates (cross terms). The Merge page shows this per module for any method.")


def main() -> None:
    links.seed("lesson_step", range(1, len(STEPS) + 1))
    step = st.select_slider("step", options=list(range(1, len(STEPS) + 1)), key="lesson_step",
                            format_func=lambda i: f"{i}. {STEPS[i - 1][0]}")
    title, idea = STEPS[step - 1]
    st.subheader(f"Step {step}: {title}")
    st.markdown(idea)
    res = need_result("learn")
    if res is not None:
        preset_badge(res)
        names, mods, L = res.specialists, res.modalities, res.num_layers
        pre = res.config.preset
        reveal = None
        if step == 1:
            batcher = state.workspace().batcher(res.config)
            st.html(figures.probe_legend(figures.color_map(mods)) + figures.probe_html(
                [(m, [t]) for t, m in batcher.tokens(0)], figures.color_map(mods)))
            guess = st.radio("Which modality has the longest token block in the probes?", mods, horizontal=True,
                             key="lesson_q1")
            reveal = lambda: answer(res, "probes", guess, batcher=batcher)  # noqa: E731
        elif step == 2:
            fig, df = figures.distance_matrix(res.layer.D, 0, names, mods, pre)
            show_figure(fig, df, "distance at block 0", key="lesson_f2")
            guess = st.radio("What is the distance between base and specialist at block 0 (the input embeddings)?",
                             ["0", "> 0"], horizontal=True, key="lesson_q2")
            reveal = lambda: answer(res, "d0", guess)  # noqa: E731
        elif step == 3:
            fig, df = figures.swd_curves(res.layer.D, names, mods, pre)
            show_figure(fig, df, "swd per layer", key="lesson_f3")
            who = names[0]
            guess = st.radio(f"On which modality is **{who}** farthest from the base at the last block?", mods,
                             horizontal=True, key="lesson_q3")
            reveal = lambda: answer(res, "farthest", guess, specialist=who)  # noqa: E731
        elif step == 4:
            fig, df = figures.layer_steps(res.layer, names, mods, pre)
            show_figure(fig, df, "layer steps", key="lesson_f4")
            who = names[-1]
            guess = st.slider(f"In which block does **{who}**'s distance on its own modality grow most?", 1, L,
                              1, key="lesson_q4")
            reveal = lambda: answer(res, "increment", guess, specialist=who)  # noqa: E731
        elif step == 5:
            fig, df = figures.alpha_heatmap(res.layer.alpha, names, pre)
            show_figure(fig, df, "alpha", key="lesson_f5")
            guess = st.select_slider("Set τ_layer: what happens to α?", [0.1, 0.25, 0.5, 1.0, 2.0, 5.0],
                                     value=5.0, key="lesson_q5")
            reveal = lambda: answer(res, "tau_layer", guess)  # noqa: E731
        elif res.element is None:
            st.warning("This result was computed in 'layer' mode: steps 6-8 need element signals. Set mode to "
                       "combined and run again.")
        elif step == 6:
            block = st.slider("Pick a block: whose parameters have the largest gradient scores there?", 1, L, L,
                              key="lesson_q6")
            keys = [k for k in sorted(res.element.g) if k.layer == block - 1]
            vals = {n: pd.concat([pd.Series(res.element.g[k][i].flatten().numpy()) for k in keys]).to_numpy()
                    for i, n in enumerate(names)}
            fig, df = figures.histograms(vals, f"raw gradient scores g, block {block}")
            show_figure(fig, df, "g histogram", key="lesson_f6")
            reveal = lambda: answer(res, "g", block - 1)  # noqa: E731
        elif step == 7:
            key = sorted(res.element.beta)[0]
            mats = {n: res.element.beta[key][i].numpy() for i, n in enumerate(names)}
            fig, _ = figures.element_heatmaps(mats, f"β of {key.module} {key.ab}, block {key.layer + 1}", zmin=0,
                                              zmax=1)
            show_figure(fig, figures.matrix_frame(mats, "beta"), "beta heatmap", key="lesson_f7")
            guess = st.select_slider("Set τ_elem to 1.0 (or another value): what happens to β and λ?",
                                     [0.05, 0.1, 0.25, 0.5, 1.0, 2.0], value=1.0, key="lesson_q7")
            reveal = lambda: answer(res, "tau_elem", guess)  # noqa: E731
        elif step == 8:
            key = sorted(res.lam)[0]
            mats = {n: res.lam[key][i].numpy() for i, n in enumerate(names)}
            fig, _ = figures.element_heatmaps(mats, f"λ of {key.module} {key.ab}, block {key.layer + 1}", zmin=0,
                                              zmax=1)
            show_figure(fig, figures.matrix_frame(mats, "lambda"), "lambda heatmap", key="lesson_f8")
            guess = st.radio("Switch the mode: how many elements change their top specialist?",
                             ["layer", "element", "combined"], horizontal=True, key="lesson_q8")
            reveal = lambda: answer(res, "mode", guess)  # noqa: E731
        elif step == 9:
            _merged_answers(res)
        elif step == 10:
            _what_the_merge_keeps(res)
        if reveal is not None and st.toggle("Reveal the answer", key=f"lesson_reveal_{step}"):
            st.success(reveal().text)


with guard():
    main()
