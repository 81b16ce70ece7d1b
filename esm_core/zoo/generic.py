"""Generic (non-biological) text and binary tasks for pretraining the zoo's base model.

The base must learn the few-shot prompt format of docs/METHOD.md section 7 (system line, question with
the allowed answers, k examples, query, "Final answer: <label>") without learning any biology, so
that querying it few-shot is meaningful and every biological skill has to come from a specialist.
The tasks below are about numbers, words, lists and short sentences; several mirror the shape of
the biological skills (membership in a list, counting, a sign of a sum, a length threshold) and
their queries carry extra fields, some of them raw modality strings, that the question does not
ask about.

    task = GENERIC_TASKS[0]
    fields, label = task.sample(random.Random(0))
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

WORDS = (
    "apple river stone cloud window garden bottle pencil candle mirror ladder basket jacket bridge forest "
    "island castle rocket button carpet violin tunnel planet needle hammer pillow helmet anchor blanket "
    "cotton marble copper silver lemon orange grape melon peach cherry tomato onion carrot pepper garlic "
    "butter cheese bread honey sugar coffee water paper glass metal wood table chair door wall floor roof "
    "house school market street city village valley mountain ocean desert meadow canyon harbor station "
    "engine wheel motor cable screen camera phone radio clock watch lamp stove oven knife spoon plate "
    "shirt shoe glove scarf coat dress ring chain rope net box bag cup jar pot pan bowl fork key lock "
    "road path gate fence field farm barn tower temple palace museum library theater stadium airport "
    "summer winter autumn spring morning evening night storm thunder rain snow wind fog frost sunshine"
).split()
ANIMALS = ("tiger horse rabbit eagle salmon spider camel zebra donkey parrot dolphin turtle beaver badger "
           "falcon lizard monkey penguin giraffe hamster squirrel leopard panther otter walrus sparrow pigeon "
           "raven goose duck sheep goat cow pig mouse wolf fox bear deer moose owl frog snake whale shark").split()
COLORS = "red blue green yellow black white purple orange brown grey pink".split()
POSITIVE = "wonderful lovely great pleasant excellent delightful superb fine charming brilliant cheerful".split()
NEGATIVE = "awful terrible poor dreadful horrible nasty gloomy boring broken dirty disappointing".split()
NOUNS_REVIEW = "meal film hotel book concert trip service room song garden lesson game".split()
LETTERS = "abcdefgh"

SYSTEMS = (
    "You are a careful assistant who answers short questions about the query.",
    "You are an expert puzzle solver. Read the examples, then answer for the query.",
    "You answer questions about numbers, words and lists precisely.",
)


@dataclass(frozen=True)
class GenericTask:
    """A binary task: a question, two labels, and a sampler of (fields, label) for a wanted label."""

    name: str
    question: str  # may contain {param}
    labels: tuple[str, str]
    make: Callable  # (rng, want_first_label: bool, param) -> fields
    param: Callable | None = None  # rng -> parameter of this prompt (e.g. the letter to count)

    def sample(self, rng: random.Random, param=None, want: bool | None = None):
        want = rng.random() < 0.5 if want is None else want
        return self.make(rng, want, param), self.labels[0 if want else 1]


def _number(rng, want, _):
    n = rng.randrange(0, 500) * 2 + (0 if want else 1)
    return [("Number", str(n))]


def _greater(rng, want, _):
    a, b = rng.sample(range(0, 1000), 2)
    if (a > b) != want:
        a, b = b, a
    return [("A", str(a)), ("B", str(b))]


def _word_long(rng, want, _):
    pool = [w for w in WORDS + ANIMALS if (len(w) > 6) == want]
    return [("Word", rng.choice(pool))]


def _animal(rng, want, _):
    return [("Item", rng.choice(ANIMALS if want else WORDS))]


def _sentiment(rng, want, _):
    adj = rng.choice(POSITIVE if want else NEGATIVE)
    noun = rng.choice(NOUNS_REVIEW)
    tmpl = rng.choice(["The {n} was {a}.", "What a {a} {n}.", "I found the {n} {a} today.",
                       "Our {n} felt {a} from start to end."])
    return [("Review", tmpl.format(n=noun, a=adj))]


def _list_contains(rng, want, target):
    k = rng.randint(4, 12)
    items = rng.sample([w for w in WORDS if w != target], k)
    if want:
        items[rng.randrange(k)] = target
    return [("List", " ".join(items))]


def _count_letter(rng, want, letter):
    n = rng.randint(6, 16)
    others = [c for c in LETTERS if c != letter]
    k = rng.randint(3, min(n, 7)) if want else rng.randint(0, 2)
    seq = [letter] * k + [rng.choice(others) for _ in range(n - k)]
    rng.shuffle(seq)
    return [("Letters", " ".join(seq))]


def _sum_positive(rng, want, _):
    while True:
        vals = [rng.randint(-9, 9) for _ in range(rng.randint(3, 8))]
        if sum(vals) != 0 and (sum(vals) > 0) == want:
            return [("Values", " ".join(f"{v:+d}" for v in vals))]


def _list_long(rng, want, _):
    k = rng.randint(6, 12) if want else rng.randint(2, 5)
    return [("List", " ".join(rng.sample(WORDS, k)))]


def _color(rng, want, color):
    noun = rng.choice(WORDS)
    c = color if want else rng.choice([x for x in COLORS if x != color])
    return [("Sentence", f"The {noun} is {c}.")]


def _first_item(rng, want, target):
    items = rng.sample([w for w in WORDS if w != target], rng.randint(3, 8))
    if want:
        items[0] = target
    elif rng.random() < 0.5:
        items[rng.randrange(1, len(items))] = target
    return [("List", " ".join(items))]


GENERIC_TASKS: tuple[GenericTask, ...] = (
    GenericTask("even", "Is the number even?", ("Yes", "No"), _number),
    GenericTask("parity", "Is the number even or odd?", ("Even", "Odd"), _number),
    GenericTask("greater", "Is A greater than B?", ("Yes", "No"), _greater),
    GenericTask("long_word", "Does the word have more than six letters?", ("Yes", "No"), _word_long),
    GenericTask("animal", "Is the item an animal?", ("Yes", "No"), _animal),
    GenericTask("animal_object", "Is the item an animal or an object?", ("Animal", "Object"), _animal),
    GenericTask("sentiment", "Is the review positive or negative?", ("Positive", "Negative"), _sentiment),
    GenericTask("contains", "Does the list contain the word {p}?", ("Yes", "No"), _list_contains,
                lambda rng: rng.choice(WORDS)),
    GenericTask("count", "Does the letter {p} appear at least three times?", ("Yes", "No"), _count_letter,
                lambda rng: rng.choice(LETTERS)),
    GenericTask("sum", "Is the sum of the values positive?", ("Yes", "No"), _sum_positive),
    GenericTask("sum_sign", "Is the sum of the values above or below zero?", ("Above", "Below"), _sum_positive),
    GenericTask("list_long", "Does the list have more than five items?", ("Yes", "No"), _list_long),
    GenericTask("color", "Is the thing in the sentence {p}?", ("Yes", "No"), _color, lambda rng: rng.choice(COLORS)),
    GenericTask("first", "Is {p} the first item of the list?", ("Yes", "No"), _first_item,
                lambda rng: rng.choice(WORDS)),
)


def generic_sentence(rng: random.Random) -> str:
    """A line of generic text (templated English about everyday things, numbers and lists)."""
    w = lambda: rng.choice(WORDS)  # noqa: E731
    forms = [
        lambda: f"The {w()} near the {w()} is {rng.choice(COLORS)}.",
        lambda: f"A {rng.choice(ANIMALS)} sat beside the {w()} in the {rng.choice(['morning', 'evening', 'night'])}.",
        lambda: f"We counted {rng.randint(2, 99)} {w()}s and {rng.randint(2, 99)} {w()}s.",
        lambda: f"The {rng.choice(NOUNS_REVIEW)} was {rng.choice(POSITIVE + NEGATIVE)}, said the {rng.choice(ANIMALS)}.",
        lambda: f"List: {' '.join(rng.sample(WORDS, rng.randint(3, 9)))}",
        lambda: f"{rng.randint(1, 500)} plus {rng.randint(1, 500)} is a number.",
        lambda: f"Bring the {w()}, the {w()} and the {w()} to the {w()}.",
    ]
    return rng.choice(forms)()


# ------------------------------------------------------------------------------------ in-context learning
# Tasks whose answer can only be inferred from the in-context examples, so that the base learns to use
# them as an instruct LLM does: a made-up property (no question wording tells the answer) and items that
# come in two clusters, one per label; the query is a variant of one cluster's prototype. The items are
# generic (word lists, digit codes) or raw modality strings with RANDOM labels: the base learns to match
# a query to its examples, never a biological fact.
MADE_UP = ("blicket", "dax", "wug", "fep", "zorb", "toma", "kiki", "glorp", "snib", "vonk", "plim", "tarp")
ICL_QUESTIONS = (
    "Is the query a {w}?",
    "Does the query belong to the {w} group?",
    "Would a {w} accept the query?",
    "Is the query {w}-like?",
    "Does the query match the {w} pattern?",
)
ICL_LABELS = (("Yes", "No"),) * 6 + (("A", "B"), ("Left", "Right"), ("Sensitive", "Resistant"),
                                     ("Active", "Inactive"))
RESIDUES = "ACDEFGHIKLMNPQRSTVWY"


def _perturb(items: list[str], rng: random.Random, alphabet: list[str], share: float) -> list[str]:
    out = list(items)
    for _ in range(max(1, round(share * len(out)))):
        out[rng.randrange(len(out))] = rng.choice(alphabet)
    return out


def icl_item_maker(rng: random.Random, rows: dict[str, list[str]] | None = None):
    """(field name, prototype sampler, variant maker) of one kind of item."""
    kinds = ["words", "digits"] + (["protein", "cell"] if rows else [])
    kind = rng.choice(kinds)
    if kind == "words":
        return "List", lambda: rng.sample(WORDS, rng.randint(4, 9)), (lambda x: _perturb(x, rng, list(WORDS), 0.25)), " "
    if kind == "digits":
        return "Code", lambda: [str(rng.randint(0, 9)) for _ in range(rng.randint(5, 10))], \
            (lambda x: _perturb(x, rng, list("0123456789"), 0.2)), " "
    if kind == "protein":
        def proto():
            s = rng.choice(rows["protein"])
            a = rng.randrange(max(1, len(s) - 40))
            return list(s[a:a + rng.randint(24, 60)])
        return "Protein", proto, (lambda x: _perturb(x, rng, list(RESIDUES), 0.12)), ""
    genes = [g for r in rows["cell"][:200] for g in r.split()]

    def proto_c():
        g = rng.choice(rows["cell"]).split()
        return g[: rng.randint(12, 30)]
    return "Cell", proto_c, (lambda x: _perturb(x, rng, genes, 0.15)), " "


def icl_prompt_fields(rng: random.Random, rows: dict[str, list[str]] | None = None, k: int | None = None):
    """(question, labels, [(fields, label)] examples, query fields, answer) of one in-context task."""
    name, proto, variant, sep = icl_item_maker(rng, rows)
    labels = rng.choice(ICL_LABELS)
    if rng.random() < 0.5:
        labels = labels[::-1]
    protos = [proto(), proto()]  # one prototype per label, told apart: at most a third of positions shared
    for _ in range(50):
        if sum(a == b for a, b in zip(*protos)) <= min(map(len, protos)) / 3:
            break
        protos[1] = proto()
    k = rng.randint(1, 6) if k is None else k
    which = [rng.randrange(2) for _ in range(k)]
    if k >= 2 and len(set(which)) == 1 and rng.random() < 0.7:
        which[rng.randrange(k)] = 1 - which[0]  # usually both clusters are shown
    examples = [([(name, sep.join(variant(protos[w])))], labels[w]) for w in which]
    q = rng.choice(which) if rng.random() < 0.85 else rng.randrange(2)
    query = [(name, sep.join(variant(protos[q])))]
    question = rng.choice(ICL_QUESTIONS).format(w=rng.choice(MADE_UP))
    return question, list(labels), examples, query, labels[q]


# ------------------------------------------------------------------------------------ composite questions
# Conditions stated as clauses, for questions that combine two facts ("Is it true that A and B?"). The
# base learns the FORM of such questions on these generic facts; esm_core.zoo.composite asks the same
# forms about two modalities' facts (the merge's test).
CONDITIONS = {
    "even": "the number is even",
    "greater": "A is greater than B",
    "long_word": "the word has more than six letters",
    "animal": "the item is an animal",
    "sentiment": "the review is positive",
    "contains": "the list contains the word {p}",
    "count": "the letter {p} appears at least three times",
    "sum": "the sum of the values is positive",
    "color": "the thing in the sentence is {p}",
}
RULES = ("and", "or", "xor")


def rule_value(rule: str, a: bool, b: bool) -> bool:
    return {"and": a and b, "or": a or b, "xor": a != b}[rule]


def composite_question(rule: str, a: str, b: str) -> str:
    if rule == "and":
        return f"Is it true that {a} and {b}?"
    if rule == "or":
        return f"Is it true that {a} or {b} (or both)?"
    return f"Is exactly one of these true: {a}; {b}?"


def balanced_facts(rule: str, want: bool, rng: random.Random) -> tuple[bool, bool]:
    """Two facts giving the wanted answer under the rule, each combination that gives it equally likely."""
    combos = [(a, b) for a in (True, False) for b in (True, False) if rule_value(rule, a, b) == want]
    return rng.choice(combos)


def generic_composite(rng: random.Random):
    """(question, labels, [(fields, label)] examples, query fields, answer) of a two-fact generic question."""
    names = rng.sample(sorted(CONDITIONS), 2)
    tasks = {t.name: t for t in GENERIC_TASKS}
    t1, t2 = tasks[names[0]], tasks[names[1]]
    p1 = t1.param(rng) if t1.param else None
    p2 = t2.param(rng) if t2.param else None
    rule = rng.choice(RULES)
    q = composite_question(rule, CONDITIONS[t1.name].format(p=p1), CONDITIONS[t2.name].format(p=p2))

    def one(want: bool):
        a, b = balanced_facts(rule, want, rng)
        f1 = t1.make(rng, a, p1)
        f2 = t2.make(rng, b, p2)
        if f1[0][0] == f2[0][0]:  # both "List": tell them apart
            f2 = [(f"{n} 2", v) for n, v in f2]
        return f1 + f2, ("Yes" if want else "No")

    exs = [one(rng.random() < 0.5) for _ in range(rng.choice((0, 0, 1, 2)))]
    fields, ans = one(rng.random() < 0.5)
    return q, ["Yes", "No"], exs, fields, ans
