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
