"""Cross-modal composite questions: one fact of each of two modalities, combined by a rule.

"Is it true that the molecule contains an aromatic ring and the cell is a primary blood cell?" needs
what the molecule specialist knows AND what the cell specialist knows: no single specialist can answer
it, a merged model can if it keeps both. The facts are the zoo's skills (skills.py, the same facts the
specialists learn); the question forms ("Is it true that A and B?", "... A or B (or both)?", "Is
exactly one of these true: A; B?") are the ones the base learns on generic facts (generic.py). The
query holds a molecule, a protein and a cell, as in the held-out skill questions.

Labels are balanced per rule, and within a label every combination of the two facts that gives it is
equally likely (generic.balanced_facts). Under ``xor`` each fact alone says nothing about the label, so
a model that knows one half is at chance; under ``and`` / ``or`` one half already tells part of it.

    sets = composite_sets(load_demo())                 # {name: CompositeSet}
    table = score_composites(sset, encoders, sets, [None, "molecule", "es-reference-combined"])
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from esm_core.answering.prompts import Example, Item, Prompt, few_shot_prompt
from esm_core.errors import ESMError
from esm_core.zoo.generic import RULES, balanced_facts, composite_question, rule_value
from esm_core.zoo.skills import FIELD, MODALITIES, SKILL_BY_NAME, Pools, Skill, demo_pools, raw_of, skill_prompt

# the skills' facts as clauses
CONDITION = {
    "mol_aromatic": "the molecule contains an aromatic ring",
    "mol_carboxylic_acid": "the molecule contains a carboxylic acid group",
    "mol_halogen": "the molecule contains a halogen atom",
    "mol_three_rings": "the molecule has at least three rings",
    "mol_logp": "the molecule's logP is above 3",
    "mol_weight": "the molecular weight is above 350 Da",
    "mol_hydration": "the measured hydration free energy is below -4 kcal/mol",
    "prot_trp": "the sequence contains tryptophan (W)",
    "prot_cys": "the sequence contains cysteine (C)",
    "prot_his": "the sequence contains histidine (H)",
    "cell_t": "the cell is a T cell",
    "cell_monocyte": "the cell is a CD14+ monocyte",
    "cell_primary": "the cell is a primary blood cell rather than a cancer cell line",
}

# the pairs asked (two per pair of modalities; the strongest skills of each specialist)
PAIRS: tuple[tuple[str, str], ...] = (
    ("mol_aromatic", "prot_trp"), ("mol_halogen", "prot_cys"),
    ("mol_aromatic", "cell_primary"), ("mol_halogen", "cell_t"),
    ("prot_trp", "cell_primary"), ("prot_cys", "cell_t"),
)

SYSTEM = ("You are an expert in medicinal chemistry, protein biochemistry and cell biology. Answer the question "
          "about the query.")


@dataclass
class CompositeSet:
    """The held-out questions of one (skill pair, rule), balanced Yes / No."""

    a: Skill
    b: Skill
    rule: str
    prompts: list[Prompt]

    @property
    def name(self) -> str:
        return f"{self.a.name} {self.rule} {self.b.name}"

    @property
    def pair(self) -> str:
        return f"{self.a.modality}-{self.b.modality}"


def composite_prompt(a: Skill, b: Skill, rule: str, query: dict[str, str], answer: str | None = None,
                     examples: list[tuple[dict[str, str], str]] = ()) -> Prompt:
    """The prompt of one composite question (query: raw sample per modality, molecule, protein, cell order)."""
    if a.modality == b.modality:
        raise ESMError(f"A composite question needs two modalities; {a.name} and {b.name} are both {a.modality}.")
    if rule not in RULES:
        raise ESMError(f"Unknown rule {rule!r}.", fix=f"use one of {', '.join(RULES)}.")
    fields = lambda q: [(FIELD[m], Item(m, q[m])) for m in MODALITIES if m in q]  # noqa: E731
    exs = [Example(fields(q), lab) for q, lab in examples]
    p = few_shot_prompt(SYSTEM, composite_question(rule, CONDITION[a.name], CONDITION[b.name]), ["Yes", "No"], exs,
                        Example(fields(query)), answer=answer)
    p.meta.update(composite=(a.name, b.name, rule))
    return p


def _pick(pools: Pools, skill: Skill, value: bool, rng: random.Random) -> int:
    pos, neg = pools.labelled(skill)
    return rng.choice(pos if value else neg)


def composite_sets(demo, *, per_label: int = 10, seed: int = 0, pairs=PAIRS, rules=RULES) -> dict[str, CompositeSet]:
    """Balanced held-out composite questions: per (pair, rule) ``per_label`` questions per label, every sample
    from the held-out split (no examples: the question itself says what to combine)."""
    held = demo_pools(demo, "heldout")
    out = {}
    for an, bn in pairs:
        a, b = SKILL_BY_NAME[an], SKILL_BY_NAME[bn]
        for rule in rules:
            rng = random.Random(f"{seed}:{an}:{bn}:{rule}")
            prompts = []
            for want in [True] * per_label + [False] * per_label:
                fa, fb = balanced_facts(rule, want, rng)
                query = {m: raw_of(m, rng.choice(held.rows[m])) for m in MODALITIES}
                ia, ib = _pick(held, a, fa, rng), _pick(held, b, fb, rng)
                query[a.modality] = raw_of(a.modality, held.rows[a.modality][ia])
                query[b.modality] = raw_of(b.modality, held.rows[b.modality][ib])
                p = composite_prompt(a, b, rule, query, "Yes" if rule_value(rule, fa, fb) else "No")
                p.meta.update(facts=(fa, fb), rows=(ia, ib), query=query)
                prompts.append(p)
            rng.shuffle(prompts)
            cs = CompositeSet(a, b, rule, prompts)
            out[cs.name] = cs
    return out


def fact_prompt(cs: CompositeSet, p: Prompt) -> tuple[Prompt, Prompt]:
    """For the oracle: one composite question's two single-fact questions (the skills' own questions on the
    same query, no examples), with the facts' labels as answers."""
    a, b = cs.a, cs.b
    fa, fb = p.meta["facts"]
    return (skill_prompt(a, p.meta["query"], a.labels[0 if fa else 1], []),
            skill_prompt(b, p.meta["query"], b.labels[0 if fb else 1], []))


def fact_prompts(cs: CompositeSet) -> tuple[list[Prompt], list[Prompt]]:
    """fact_prompt for every question of a set: (first facts' prompts, second facts' prompts)."""
    pairs = [fact_prompt(cs, p) for p in cs.prompts]
    return [a for a, _ in pairs], [b for _, b in pairs]


@dataclass
class CompositeReport:
    """Accuracy (label likelihood) of each model on each composite set; rows as dicts."""

    rows: list[dict]
    seconds: float

    def models(self) -> list[str]:
        return list(dict.fromkeys(r["model"] for r in self.rows))

    def accuracy(self, model: str, *, rule: str | None = None, pair: str | None = None) -> float:
        rs = [r for r in self.rows if r["model"] == model and (rule is None or r["rule"] == rule)
              and (pair is None or r["pair"] == pair)]
        n = sum(r["n"] for r in rs)
        return sum(r["correct"] for r in rs) / n if n else float("nan")

    def table(self, fmt: str = "markdown") -> str:
        from esm_core.zoo.scoring import _render

        rules = list(dict.fromkeys(r["rule"] for r in self.rows))
        pairs = list(dict.fromkeys(r["pair"] for r in self.rows))
        hdr = ["model", *rules, *pairs, "all"]
        lines = [[m, *[f"{100 * self.accuracy(m, rule=x):.1f}" for x in rules],
                  *[f"{100 * self.accuracy(m, pair=x):.1f}" for x in pairs], f"{100 * self.accuracy(m):.1f}"]
                 for m in self.models()]
        return _render(hdr, lines, fmt)


def score_composites(sset, encoders: dict, sets: dict[str, CompositeSet], models: list[str | None], *,
                     oracle: bool = True, batch_size: int = 16, progress=None) -> CompositeReport:
    """Score each model (None = base, else an adapter) on every composite set by label likelihood; with
    ``oracle`` also the "oracle": the specialist of each fact's modality answers its own single-fact question
    (same query) and the two answers are combined by the rule."""
    from esm_core.answering.answerer import Answerer

    t0 = time.perf_counter()
    qa = Answerer(sset, encoders)

    def answers(prompts, model):
        lp = qa.label_logprobs(prompts, model, batch_size=batch_size)
        return [p.labels[int(i)] for p, i in zip(prompts, lp.argmax(1).tolist())]

    rows = []
    total = (len(models) + (2 if oracle else 0)) * len(sets)
    done = 0
    for model in models:
        for cs in sets.values():
            pred = answers(cs.prompts, model)
            rows.append(_row_of("base" if model is None else model, cs, pred))
            done += 1
            if progress:
                progress(f"composite: {model or 'base'} {cs.name}", done / total)
    if oracle:
        for cs in sets.values():
            if cs.a.modality not in sset.names or cs.b.modality not in sset.names:
                continue
            pa, pb = fact_prompts(cs)
            ya = [x == cs.a.labels[0] for x in answers(pa, cs.a.modality)]
            yb = [x == cs.b.labels[0] for x in answers(pb, cs.b.modality)]
            pred = ["Yes" if rule_value(cs.rule, u, v) else "No" for u, v in zip(ya, yb)]
            rows.append(_row_of("oracle", cs, pred))
            done += 2
            if progress:
                progress(f"composite: oracle {cs.name}", done / total)
    return CompositeReport(rows, time.perf_counter() - t0)


def _row_of(model: str, cs: CompositeSet, pred: list[str]) -> dict:
    gold = [p.answer for p in cs.prompts]
    return dict(model=model, set=cs.name, rule=cs.rule, pair=cs.pair, n=len(gold),
                correct=sum(a == b for a, b in zip(pred, gold)))
