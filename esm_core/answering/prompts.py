"""Few-shot prompts that mix text and modality blocks, and reading the answer (docs/METHOD.md section 7).

A system instruction, k in-context examples, the query, and the answer after "Final answer:". A
modality sample inside a prompt is an :class:`Item`; the modality's encoder embeds it (soft
tokens for a molecule encoder, the LLM's own tokens for text encoders), so the same prompt works
for the base, every specialist and any merged adapter on the one base copy.

    p = few_shot_prompt(system, question, ["Yes", "No"], examples, query)
    parse_answer("... Final answer: Yes", p.labels)          # "Yes" (None: unparsed)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

ANSWER_MARK = "Final answer:"


@dataclass(frozen=True)
class Item:
    """A modality sample placed in a prompt (embedded by the modality's encoder)."""

    modality: str
    raw: str
Segment = "str | Item"


@dataclass
class Example:
    """One example or query: named fields (text or Items) and, for examples, the label."""

    fields: list[tuple[str, "str | Item"]]
    label: str | None = None
    meta: dict = field(default_factory=dict)  # e.g. similarity scores, row ids


@dataclass
class Prompt:
    segments: list  # str | Item, in order
    labels: list[str]  # allowed answers
    answer: str | None = None  # gold label, when known
    meta: dict = field(default_factory=dict)

    def text(self) -> str:
        """Human-readable form (modality items shown raw)."""
        return "".join(s if isinstance(s, str) else s.raw for s in self.segments)


def _fields(ex: Example) -> list:
    segs: list = []
    for name, value in ex.fields:
        segs.append(f"{name}: ")
        segs.append(value)
        segs.append("\n")
    return segs


def few_shot_prompt(system: str, question: str, labels: list[str], examples: list[Example], query: Example,
                    answer: str | None = None, context: list[tuple[str, "str | Item"]] | None = None) -> Prompt:
    """System line, question with the allowed answers, k examples with their labels, the query.

    ``context``: fields shared by the examples and the query (e.g. the fixed CYP enzyme), placed once
    after the question as ``name: value`` lines.
    """
    segs: list = [f"System: {system}\n", f"Question: {question} Answer with one of: {', '.join(labels)}.\n"]
    if context:
        segs.extend(_fields(Example(list(context))))
    for i, ex in enumerate(examples, 1):
        segs.append(f"Example {i}:\n")
        segs.extend(_fields(ex))
        segs.append(f"{ANSWER_MARK} {ex.label}\n")
    segs.append("Query:\n")
    segs.extend(_fields(query))
    segs.append(ANSWER_MARK)
    merged: list = []
    for s in segs:  # join adjacent text pieces
        if isinstance(s, str) and merged and isinstance(merged[-1], str):
            merged[-1] += s
        else:
            merged.append(s)
    return Prompt(merged, list(labels), answer)
_LEAD = re.compile(r"^[\s:*_`'\"\-\u2013\u2014>\[\(]+")


def parse_answer(response: str, labels: list[str], *, marked: bool = True) -> str | None:
    """The label after 'Final answer:' in a response, or None when there is no parsable label.

    The prompt itself ends with 'Final answer:', so with ``marked=True`` the response is read as if
    it followed that mark. If the response repeats the mark, the text after its last occurrence is
    used. Case, markdown emphasis, brackets, quotes and trailing punctuation are ignored; a label must
    be followed by a non-letter (so 'Yesterday' is not 'Yes').
    """
    text = response or ""
    idx = [m.end() for m in re.finditer(r"final\s+answer\s*[:\-\u2013]?", text, flags=re.I)]
    if idx:
        text = text[idx[-1]:]
    elif not marked:
        return None
    text = _LEAD.sub("", text)
    low = text.lower()
    for lab in sorted(labels, key=len, reverse=True):
        l = lab.lower()
        if low.startswith(l) and (len(low) == len(l) or not low[len(l)].isalnum()):
            return lab
    return None
