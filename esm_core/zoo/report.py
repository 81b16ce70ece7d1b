"""Markdown reports of the zoo: the skills table (SKILLS.md) and own/other summaries."""

from __future__ import annotations

from esm_core.zoo.scoring import SkillReport, _render
from esm_core.zoo.skills import MODALITIES


def own_other(rep: SkillReport, how: str = "likelihood", base: str = "base") -> list[dict]:
    """Per specialist: own-modality and other-modality accuracy next to the base's on the same sets."""
    out = []
    for m in MODALITIES:
        if m not in rep.models():
            continue
        others = [o for o in MODALITIES if o != m]
        row = dict(specialist=m,
                   own=rep.accuracy(m, m, how), base_own=rep.accuracy(base, m, how),
                   other=sum(rep.accuracy(m, o, how) for o in others) / len(others),
                   base_other=sum(rep.accuracy(base, o, how) for o in others) / len(others),
                   other_max_gain=max(rep.accuracy(m, o, how) - rep.accuracy(base, o, how) for o in others))
        row["own_gain"] = row["own"] - row["base_own"]
        out.append(row)
    return out


OWN_GAIN_MIN = 0.20  # a specialist beats the base on its own modality's held-out skills by at least this
OTHER_GAIN_MAX = 0.05  # ... and on no other modality by more than this


def failed_checks(rep: SkillReport, how: str = "likelihood") -> list[str]:
    """The zoo's specialist checks that these measurements fail, one sentence each (empty: all pass).

    The same thresholds as tests/test_zoo.py. The build is deterministic on one machine, but a rebuild on
    another CPU trains on different round-off and can land elsewhere (docs: README, "The demo zoo")."""
    out = []
    for r in own_other(rep, how):  # compared in points as SKILLS.md prints them (0.1), not in float round-off
        if round(100 * r["own_gain"], 1) < round(100 * OWN_GAIN_MIN, 1):
            out.append(f"{r['specialist']} specialist: {100 * r['own_gain']:+.1f} points over the base on its own "
                       f"skills (needs {100 * OWN_GAIN_MIN:+.0f})")
        if round(100 * r["other_max_gain"], 1) > round(100 * OTHER_GAIN_MAX, 1):
            out.append(f"{r['specialist']} specialist: {100 * r['other_max_gain']:+.1f} points over the base on "
                       f"another modality's skills (at most {100 * OTHER_GAIN_MAX:+.0f})")
    return out


def own_other_table(rep: SkillReport, how: str = "likelihood", fmt: str = "text") -> str:
    hdr = ["specialist", "own", "base on own", "gain", "other (mean)", "base on other", "max gain on other"]
    lines = [[r["specialist"], f"{100 * r['own']:.1f}", f"{100 * r['base_own']:.1f}", f"{100 * r['own_gain']:+.1f}",
              f"{100 * r['other']:.1f}", f"{100 * r['base_other']:.1f}", f"{100 * r['other_max_gain']:+.1f}"]
             for r in own_other(rep, how)]
    return _render(hdr, lines, fmt)


def methods_of(rep: SkillReport) -> list[str]:
    out = []
    if any(r.get("acc_likelihood") is not None for r in rep.rows):
        out.append("likelihood")
    if any(r.get("acc_generation") is not None for r in rep.rows):
        out.append("generation")
    return out


HOW = {"likelihood": "label likelihood", "generation": "generation + parsing; unparsed answers count as wrong"}


def skills_markdown(rep: SkillReport, cfg=None) -> str:
    n_q = sum(r["n"] for r in rep.rows if r["model"] == rep.models()[0])
    parts = [
        "# Demo zoo: held-out skill accuracies",
        "",
        "Measured by `python -m esm_core zoo build` on the files it wrote (the ordinary loaders), on the",
        f"held-out skill sets ({n_q} questions, balanced Yes/No, mixed-modality prompts with "
        f"{getattr(cfg, 'eval_k', 2)} in-context examples from the train split). Accuracy in %.",
        "Re-measure with `python -m esm_core zoo skills`.",
        "",
    ]
    methods = methods_of(rep)
    for how in methods:
        parts += [f"## Own vs other modalities ({HOW[how]})", "", own_other_table(rep, how, "markdown"), ""]
    if "likelihood" in methods:
        failed = failed_checks(rep)
        parts += ["## Checks", "",
                  f"Each specialist {100 * OWN_GAIN_MIN:+.0f} points or more over the base on its own modality, at most "
                  f"{100 * OTHER_GAIN_MAX:+.0f} on any other (label likelihood): "
                  + ("**all pass**." if not failed else "**failed**: " + "; ".join(failed) + "."), ""]
    for how in methods:
        parts += [f"## By modality ({HOW[how]})", "", rep.table(how, "markdown"), ""]
    for how in methods:
        parts += [f"## Every skill ({HOW[how]})", "", rep.skill_table(how, "markdown"), ""]
    if "generation" in methods:
        parts += ["Unparsed generations: " + ", ".join(f"{m} {rep.unparsed(m)}" for m in rep.models()) + ".", ""]
    return "\n".join(parts)
