"""Prompts that mix text and modality blocks; answering by label likelihood and by generation.

METHOD.md section 7: a system instruction, k in-context examples, the query, and the answer after
"Final answer:". A modality sample inside a prompt is an :class:`Item`; it is embedded by that
modality's encoder (soft tokens for a molecule encoder, the LLM's own tokens for text encoders), so
the same prompt works for the base, every specialist and any merged adapter on the one base copy.

    p = few_shot_prompt(system, question, ["Yes", "No"], examples, query)
    qa = Answerer(sset, encoders)
    logp = qa.label_logprobs([p], adapter="molecule")        # [1, 2] log p(label | prompt)
    text = qa.generate([p], adapter=None)                    # base model's continuation
    parse_answer(text[0], p.labels)                          # "Yes" / "No" / None (unparsed)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .encoders import TextEncoder, separated

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


class Answerer:
    """Embeds prompts and answers them with the base (adapter=None) or any loaded adapter."""

    def __init__(self, sset, encoders: dict, max_length: int | None = None):
        self.sset = sset
        self.encoders = encoders
        self.tok = sset.tokenizer
        self.embed = sset.model.get_input_embeddings()
        self.max_length = max_length or int(getattr(sset.lm.config, "max_position_embeddings", 2048))
        self._text_cache: dict[str, list[int]] = {}

    # ---------------------------------------------------------------- embedding
    def _ids(self, text: str) -> list[int]:
        ids = self._text_cache.get(text)
        if ids is None:
            ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
            if len(self._text_cache) < 50_000:
                self._text_cache[text] = ids
        return ids

    def text_item_ids(self, item: Item) -> list[int] | None:
        """Token ids of an Item of a text modality (no encoder, or a TextEncoder): the LLM's own tokens of
        the text the encoder shows (its separator applied), untruncated (probe truncation does not apply);
        None for other encoders."""
        enc = self.encoders.get(item.modality)
        if enc is None or isinstance(enc, TextEncoder):
            return self._ids(separated(item.raw, getattr(enc, "separator", None)))
        return None

    def segment_embeds(self, segments: list, bos: bool = True) -> torch.Tensor:
        """[T, d] embeddings of a segment list (text tokenized, Items via their encoders)."""
        dev = self.embed.weight.device
        parts = []
        if bos and self.tok.bos_token_id is not None:
            parts.append(self._embed_ids([self.tok.bos_token_id]))
        for s in segments:
            if isinstance(s, str):
                if s:
                    parts.append(self._embed_ids(self._ids(s)))
            else:
                ids = self.text_item_ids(s)
                if ids is not None:
                    parts.append(self._embed_ids(ids))
                else:
                    parts.append(self.encoders[s.modality].encode(s.raw).to(dev, self.embed.weight.dtype))
        x = torch.cat(parts, dim=0)
        if x.shape[0] > self.max_length:
            from .errors import ESMError

            raise ESMError(f"A prompt is {x.shape[0]} tokens long, over the model's limit of {self.max_length}.",
                           fix="use fewer in-context examples or shorter inputs.")
        return x

    def _embed_ids(self, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.embed(torch.tensor(ids, dtype=torch.long, device=self.embed.weight.device))

    @staticmethod
    def pad(seqs: list[torch.Tensor], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        T = max(s.shape[0] for s in seqs)
        d = seqs[0].shape[1]
        x = seqs[0].new_zeros(len(seqs), T, d)
        mask = torch.zeros(len(seqs), T, dtype=torch.long, device=x.device)
        for i, s in enumerate(seqs):
            n = s.shape[0]
            if left:
                x[i, T - n:] = s
                mask[i, T - n:] = 1
            else:
                x[i, :n] = s
                mask[i, :n] = 1
        return x, mask

    # ---------------------------------------------------------------- scoring
    @torch.no_grad()
    def label_logprobs(self, prompts: list[Prompt], adapter: str | None, batch_size: int = 16) -> torch.Tensor:
        """[n, n_labels] sum of log-probabilities of each label's tokens (" " + label) after the prompt.

        Every (prompt, label) pair is one right-padded sequence of a batched forward.
        """
        out = []
        with self.sset.use(adapter):
            for s in range(0, len(prompts), batch_size):
                out.append(self._label_batch(prompts[s:s + batch_size]))
        return torch.cat(out) if out else torch.zeros(0, 0)

    def _label_batch(self, prompts: list[Prompt]) -> torch.Tensor:
        lm = self.sset.lm
        n_lab = max(len(p.labels) for p in prompts)
        res = torch.full((len(prompts), n_lab), float("-inf"))
        embeds = [self.segment_embeds(p.segments) for p in prompts]
        # all (prompt, label) pairs as right-padded sequences; label tokens scored
        seqs, spans, owner = [], [], []
        for i, (p, e) in enumerate(zip(prompts, embeds)):
            for j, lab in enumerate(p.labels):
                ids = self._ids(" " + lab)
                seqs.append(torch.cat([e, self._embed_ids(ids)]))
                spans.append((e.shape[0], ids))
                owner.append((i, j))
        x, mask = self.pad(seqs, left=False)
        logits = lm(inputs_embeds=x, attention_mask=mask, use_cache=False).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        for r, ((start, ids), (i, j)) in enumerate(zip(spans, owner)):
            pos = torch.arange(start - 1, start - 1 + len(ids), device=logp.device)
            res[i, j] = logp[r, pos, torch.tensor(ids, device=logp.device)].sum().cpu()
        return res

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, prompts: list[Prompt], adapter: str | None, max_new_tokens: int = 12,
                 batch_size: int = 16, stop_at_newline: bool = True) -> list[str]:
        """Greedy continuation of each prompt (left-padded batches, KV cache)."""
        texts: list[str] = []
        with self.sset.use(adapter):
            for s in range(0, len(prompts), batch_size):
                texts.extend(self._generate_batch(prompts[s:s + batch_size], max_new_tokens, stop_at_newline))
        return texts

    def _generate_batch(self, prompts, max_new_tokens, stop_at_newline) -> list[str]:
        lm = self.sset.lm
        x, mask = self.pad([self.segment_embeds(p.segments) for p in prompts], left=True)
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        out = lm(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1)
        eos = self.tok.eos_token_id
        gen = [[] for _ in prompts]
        done = torch.zeros(len(prompts), dtype=torch.bool)
        last = pos[:, -1]
        for _ in range(max_new_tokens):
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if t == eos:
                        done[i] = True
                    else:
                        gen[i].append(t)
                        if stop_at_newline and "\n" in self.tok.decode([t]):
                            done[i] = True
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype, device=mask.device)], 1)
            last = last + 1
            out = lm(inputs_embeds=self.embed(nxt.unsqueeze(1)), attention_mask=mask, position_ids=last.unsqueeze(1),
                     past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1)
        return [self.tok.decode(g) for g in gen]
