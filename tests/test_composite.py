"""Cross-modal composite questions (esm_core/zoo/composite.py) and the base's in-context / composite
pretraining tasks (esm_core/zoo/generic.py): labels follow the rule from the facts, recomputed here from the
held-out rows; the designs are balanced; bad requests are refused."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from esm_core.answering.prompts import Item
from esm_core.errors import ESMError
from esm_core.zoo.composite import CONDITION, PAIRS, composite_prompt, composite_sets, fact_prompts
from esm_core.zoo.data import load_demo
from esm_core.zoo.generic import RULES, balanced_facts, generic_composite, icl_prompt_fields, rule_value
from esm_core.zoo.skills import MODALITIES, SKILL_BY_NAME, demo_pools, raw_of


@pytest.fixture(scope="module")
def demo():
    return load_demo()


@pytest.fixture(scope="module")
def sets(demo):
    return composite_sets(demo, per_label=6)


TRUTH = {  # the rules' truth tables, written out
    "and": {(True, True): True, (True, False): False, (False, True): False, (False, False): False},
    "or": {(True, True): True, (True, False): True, (False, True): True, (False, False): False},
    "xor": {(True, True): False, (True, False): True, (False, True): True, (False, False): False},
}


def test_rule_value_is_the_truth_table():
    for rule, table in TRUTH.items():
        for (a, b), v in table.items():
            assert rule_value(rule, a, b) is v


def test_labels_follow_the_rule_from_the_facts_of_the_rows(demo, sets):
    held = demo_pools(demo, "heldout")
    assert len(sets) == len(PAIRS) * len(RULES)
    for cs in sets.values():
        for p in cs.prompts:
            q = p.meta["query"]
            # the facts, recomputed from the query's own samples (not from the stored meta)
            facts = []
            for skill in (cs.a, cs.b):
                row = next(r for r in held.rows[skill.modality] if raw_of(skill.modality, r) == q[skill.modality])
                facts.append(bool(skill.fact(row)))
            assert tuple(facts) == p.meta["facts"]
            assert p.answer == ("Yes" if TRUTH[cs.rule][tuple(facts)] else "No")
            items = [s for s in p.segments if isinstance(s, Item)]
            assert [i.modality for i in items] == list(MODALITIES)  # the query holds all three modalities
            assert [i.raw for i in items] == [q[m] for m in MODALITIES]
            text = p.text()
            assert CONDITION[cs.a.name] in text and CONDITION[cs.b.name] in text
            assert "Example 1" not in text  # no in-context examples: the question says what to combine


def test_sets_are_balanced_and_xor_halves_say_nothing(sets):
    for cs in sets.values():
        assert Counter(p.answer for p in cs.prompts) == {"Yes": 6, "No": 6}
        if cs.rule == "xor":
            for j in (0, 1):  # each fact alone: the label is Yes for both of its values
                c = Counter((p.meta["facts"][j], p.answer) for p in cs.prompts)
                assert c[(True, "Yes")] > 0 and c[(False, "Yes")] > 0
                assert c[(True, "No")] > 0 and c[(False, "No")] > 0
    # deterministic
    again = composite_sets(load_demo(), per_label=6)
    assert [p.text() for cs in again.values() for p in cs.prompts] == [p.text() for cs in sets.values()
                                                                       for p in cs.prompts]


def test_balanced_facts_draws_every_combination_of_the_wanted_answer():
    rng = random.Random(0)
    for rule, table in TRUTH.items():
        for want in (True, False):
            seen = Counter(balanced_facts(rule, want, rng) for _ in range(600))
            combos = {ab for ab, v in table.items() if v == want}
            assert set(seen) == combos
            assert min(seen.values()) > 600 / len(combos) * 0.8


def test_oracle_questions_are_the_single_fact_questions_on_the_same_query(sets):
    cs = next(iter(sets.values()))
    pa, pb = fact_prompts(cs)
    for p, a, b in zip(cs.prompts, pa, pb):
        assert a.meta["skill"] == cs.a.name and b.meta["skill"] == cs.b.name
        assert a.answer == cs.a.labels[0 if p.meta["facts"][0] else 1]
        assert b.answer == cs.b.labels[0 if p.meta["facts"][1] else 1]
        assert [s.raw for s in a.segments if isinstance(s, Item)] == [p.meta["query"][m] for m in MODALITIES]


@pytest.mark.parametrize("a, b, rule, match", [
    ("mol_aromatic", "mol_halogen", "and", "two modalities"),
    ("mol_aromatic", "prot_trp", "nand", "Unknown rule"),
])
def test_bad_composite_requests_are_refused(a, b, rule, match):
    q = {"molecule": "CCO", "protein": "MKT", "cell": "CD3E"}
    with pytest.raises(ESMError, match=match):
        composite_prompt(SKILL_BY_NAME[a], SKILL_BY_NAME[b], rule, q)


def test_generic_composite_questions_name_a_rule_and_two_fields():
    rng = random.Random(3)
    for _ in range(200):
        q, labels, exs, fields, ans = generic_composite(rng)
        assert labels == ["Yes", "No"] and ans in labels
        names = [n for n, _ in fields]
        assert len(names) >= 2 and len(set(names)) == len(names)  # two facts' fields, told apart
        assert q.startswith(("Is it true that", "Is exactly one of these true"))
        assert all([n for n, _ in f] == names and lab in labels for f, lab in exs)


def _overlap(a: str, b: str) -> int:
    xa, xb = (a.split() if " " in a else list(a)), (b.split() if " " in b else list(b))
    return sum(x == y for x, y in zip(xa, xb))


def test_icl_answer_is_the_label_of_the_examples_the_query_resembles():
    r = random.Random(1)
    rows = {"protein": ["".join(r.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(120)) for _ in range(20)],
            "cell": [" ".join(r.sample([f"G{i}" for i in range(400)], 40)) for _ in range(20)]}
    rng = random.Random(7)
    checked = 0
    for _ in range(300):
        q, labels, exs, query, ans = icl_prompt_fields(rng, rows)
        assert ans in labels and all(lab in labels for _, lab in exs)
        shown = {lab for _, lab in exs}
        if ans not in shown:
            continue
        best = max(exs, key=lambda e: _overlap(e[0][0][1], query[0][1]))
        assert best[1] == ans
        checked += 1
    assert checked > 200
