"""Scoring the zoo's skills: accuracy of base, specialists and merged adapters on held-out skill sets.

    rep = measure_skills(sset, encoders, heldout_skill_sets(demo), [None, "molecule", "merged_es_1"])
    print(rep.table("likelihood"))             # accuracy by modality, % ; rep.skill_table(...) per skill
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from esm_core.answering.answerer import Answerer
from esm_core.answering.prompts import parse_answer
from esm_core.errors import ESMError
from esm_core.zoo.skills import MODALITIES, SkillSet


# ------------------------------------------------------------------------------------ scoring
@dataclass
class SkillReport:
    """Accuracies per (model, skill) by label likelihood and by generation + parsing."""

    rows: list[dict]
    seconds: float = 0.0

    def models(self) -> list[str]:
        return list(dict.fromkeys(r["model"] for r in self.rows))

    def accuracy(self, model: str, modality: str | None = None, how: str = "likelihood",
                 skill: str | None = None) -> float:
        """Mean accuracy over the skills of a modality (each skill weighs the same)."""
        key = "acc_likelihood" if how == "likelihood" else "acc_generation"
        vals = [r[key] for r in self.rows if r["model"] == model and r.get(key) is not None
                and (modality is None or r["modality"] == modality) and (skill is None or r["skill"] == skill)]
        if not vals:
            raise KeyError(f"no {how} scores for {model!r} / {modality!r}")
        return sum(vals) / len(vals)

    def table(self, how: str = "likelihood", fmt: str = "text") -> str:
        """Models x modalities (mean accuracy over each modality's skills, in %)."""
        hdr = ["model", *MODALITIES, "mean"]
        lines = []
        for m in self.models():
            acc = [100 * self.accuracy(m, mod, how) for mod in MODALITIES]
            lines.append([m, *[f"{a:.1f}" for a in acc], f"{sum(acc) / len(acc):.1f}"])
        return _render(hdr, lines, fmt)

    def skill_table(self, how: str = "likelihood", fmt: str = "text") -> str:
        """Skills x models accuracy in %, with the number of questions."""
        models = self.models()
        skills = list(dict.fromkeys(r["skill"] for r in self.rows))
        key = "acc_likelihood" if how == "likelihood" else "acc_generation"
        lines = []
        for s in skills:
            rs = {r["model"]: r for r in self.rows if r["skill"] == s}
            n = next(iter(rs.values()))["n"]
            lines.append([s, str(n), *[f"{100 * rs[m][key]:.1f}" if m in rs and rs[m].get(key) is not None else "-"
                                       for m in models]])
        return _render(["skill", "n", *models], lines, fmt)

    def unparsed(self, model: str) -> int:
        return sum(r.get("unparsed", 0) for r in self.rows if r["model"] == model)


def _render(hdr, lines, fmt):
    if fmt == "markdown":
        out = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
        out += ["| " + " | ".join(l) + " |" for l in lines]
        return "\n".join(out)
    w = [max(len(str(x)) for x in col) for col in zip(hdr, *lines)]
    fmt_row = lambda r: "  ".join(str(x).rjust(wi) if i else str(x).ljust(wi) for i, (x, wi) in enumerate(zip(r, w)))  # noqa: E731
    return "\n".join([fmt_row(hdr), *[fmt_row(l) for l in lines]])


def measure_skills(sset, encoders: dict, skill_sets: dict[str, SkillSet], models: list[str | None], *,
                   methods: tuple[str, ...] = ("likelihood", "generation"), limit: int | None = None,
                   batch_size: int = 16, progress: Callable[[str, float], None] | None = None) -> SkillReport:
    """Score each model (None = base, else an adapter name) on every skill set.

    likelihood: the label with the higher log p(label | prompt) (Answerer.label_logprobs);
    generation: greedy continuation parsed by parse_answer (unparsed counts as wrong).
    ``limit`` keeps the first n questions of each set (they are shuffled and balanced up to n).
    """
    bad = [m for m in methods if m not in ("likelihood", "generation")]
    if bad:
        raise ESMError(f"Unknown scoring method(s) {bad}.", fix="use 'likelihood' and/or 'generation'.")
    t0 = time.perf_counter()
    qa = Answerer(sset, encoders)
    rows = []
    total = len(models) * len(skill_sets)
    done = 0
    for model in models:
        name = "base" if model is None else model
        for sname, ss in skill_sets.items():
            prompts = ss.prompts[:limit] if limit else ss.prompts
            gold = [p.answer for p in prompts]
            row = dict(model=name, skill=sname, modality=ss.skill.modality, n=len(prompts))
            if "likelihood" in methods:
                lp = qa.label_logprobs(prompts, model, batch_size=batch_size)
                pred = [p.labels[int(i)] for p, i in zip(prompts, lp.argmax(1).tolist())]
                row["acc_likelihood"] = sum(a == b for a, b in zip(pred, gold)) / len(gold)
            if "generation" in methods:
                texts = qa.generate(prompts, model, max_new_tokens=4, batch_size=batch_size)
                parsed = [parse_answer(t, p.labels) for t, p in zip(texts, prompts)]
                row["acc_generation"] = sum(a == b for a, b in zip(parsed, gold)) / len(gold)
                row["unparsed"] = sum(a is None for a in parsed)
            rows.append(row)
            done += 1
            if progress:
                progress(f"skills: {name} {sname}", done / total)
    return SkillReport(rows, time.perf_counter() - t0)
