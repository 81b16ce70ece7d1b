"""Answering many prompts fast: the shared prompt prefix computed once, batches by length, KV cache.

    answerer = BatchedAnswerer(sset, encoders, batch_size=16)
    ans = answerer.run(prompts, adapter="molecule")          # label log-probs and generations
    ans.by_likelihood(), ans.by_generation()

Equal to esm_core/answering/answerer.py prompt by prompt (tests/test_evaluate.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from esm_core.answering.answerer import Answerer
from esm_core.answering.prompts import Item, Prompt, parse_answer
from esm_core.errors import ESMError
from esm_core.progress import ProgressFn


# ------------------------------------------------------------------------------------ answering
@dataclass
class Answers:
    """One model's answers to a list of prompts."""

    labels: list[list[str]]
    logprobs: torch.Tensor | None = None  # [n, max_labels] summed log p of each label's tokens (-inf: no label)
    texts: list[str] | None = None  # generated continuations

    def probs(self) -> torch.Tensor:
        """[n, max_labels] probabilities renormalised over each prompt's labels."""
        return torch.softmax(self.logprobs, dim=-1)

    def by_likelihood(self) -> list[str]:
        idx = self.logprobs.argmax(-1).tolist()
        return [labs[i] for labs, i in zip(self.labels, idx)]

    def by_generation(self) -> list[str | None]:
        return [parse_answer(t, labs) for t, labs in zip(self.texts, self.labels)]


class BatchedAnswerer:
    """Batched label scoring and greedy generation on the one base copy (see the module docstring)."""

    def __init__(self, sset, encoders: dict, *, batch_size: int = 16, max_length: int | None = None,
                 prefix_cache: bool = True):
        self.qa = Answerer(sset, encoders, max_length=max_length)
        self.sset = sset
        self.batch_size = int(batch_size)
        self.prefix_cache = prefix_cache
        self._item_len: dict[tuple[str, str], int] = {}

    @property
    def max_length(self) -> int:
        return self.qa.max_length

    # ---------------------------------------------------------------- lengths
    def item_tokens(self, item: Item) -> int:
        ids = self.qa.text_item_ids(item)
        if ids is not None:
            return len(ids)
        enc = self.qa.encoders[item.modality]
        n = getattr(enc, "n_tokens", None)
        if isinstance(n, int):
            return n  # soft-token encoders: a fixed count
        key = (item.modality, item.raw)
        got = self._item_len.get(key)
        if got is None:
            got = self._item_len[key] = int(enc.encode(item.raw).shape[0])
        return got

    def prompt_length(self, p: Prompt) -> int:
        """Tokens the prompt occupies (BOS included), without embedding it."""
        n = 1 if self.qa.tok.bos_token_id is not None else 0
        for s in p.segments:
            n += len(self.qa._ids(s)) if isinstance(s, str) else self.item_tokens(s)
        return n

    def label_ids(self, label: str) -> list[int]:
        return self.qa._ids(" " + label)

    # ---------------------------------------------------------------- core
    def _prefix(self, prompts: Sequence[Prompt]) -> tuple[int, list]:
        """(P, segments): the leading tokens every prompt shares -- whole equal segments (text, or the same
        modality item, e.g. the CYP enzyme), then the common leading token ids of the first text segment
        that differs -- with BOS, and the reference segments that cover them."""
        if not self.prefix_cache or not prompts:
            return 0, []
        ref = prompts[0].segments
        n = 1 if self.qa.tok.bos_token_id is not None else 0
        for i, seg in enumerate(ref):
            if all(len(p.segments) > i and p.segments[i] == seg for p in prompts[1:]):
                n += len(self.qa._ids(seg)) if isinstance(seg, str) else self.item_tokens(seg)
                continue
            if isinstance(seg, str) and all(isinstance(p.segments[i], str) for p in prompts[1:] if len(p.segments) > i):
                head = self.qa._ids(seg)
                m = len(head)
                for p in prompts[1:]:
                    if len(p.segments) <= i:
                        m = 0
                        break
                    other = self.qa._ids(p.segments[i])
                    m = min(m, len(other))
                    m = next((j for j in range(m) if other[j] != head[j]), m)
                    if m == 0:
                        break
                return n + m, ref[:i + 1]
            return n, ref[:i]
        return n, list(ref)

    def _prefix_len(self, prompts: Sequence[Prompt]) -> int:
        return self._prefix(prompts)[0]

    @torch.no_grad()
    def run(self, prompts: Sequence[Prompt], adapter: str | None, *, score: bool = True, generate: bool = True,
            max_new_tokens: int | None = None, stop_at_newline: bool = True,
            progress: ProgressFn | None = None) -> Answers:
        """Answer every prompt with one model (adapter None = the base): label log-probs and/or generations."""
        prompts = list(prompts)
        n = len(prompts)
        labels = [list(p.labels) for p in prompts]
        n_lab = max((len(l) for l in labels), default=0)
        logp = torch.full((n, n_lab), float("-inf")) if score else None
        texts: list[str] | None = [""] * n if generate else None
        if n == 0:
            return Answers(labels, logp, texts)
        if max_new_tokens is None:
            longest = max(len(self.label_ids(l)) for labs in labels for l in labs)
            max_new_tokens = longest + 3
        lengths = [self.prompt_length(p) for p in prompts]
        too_long = [i for i, L in enumerate(lengths) if L > self.max_length]
        if too_long:
            raise ESMError(f"{len(too_long)} prompt(s) are longer than the model's {self.max_length} tokens "
                           f"(longest {max(lengths)}).", fix="fit them first (evaluate.fit_prompt) or use fewer examples.")
        P, prefix_segs = self._prefix(prompts)
        P = min(P, min(lengths) - 1)
        order = sorted(range(n), key=lambda i: lengths[i])
        done_n = 0
        with self.sset.use(adapter):
            prefix_kv = self._prefix_kv(prefix_segs, P) if P > 0 else None
            for s in range(0, n, self.batch_size):
                idx = order[s:s + self.batch_size]
                lp, tx = self._batch([prompts[i] for i in idx], prefix_kv, P, score, generate, max_new_tokens,
                                     stop_at_newline)
                for r, i in enumerate(idx):
                    if score:
                        logp[i, :lp.shape[1]] = lp[r]
                    if generate:
                        texts[i] = tx[r]
                done_n += len(idx)
                if progress:
                    progress(f"{done_n}/{n} prompts", done_n / n)
        return Answers(labels, logp, texts)

    def _prefix_kv(self, segments: list, P: int):
        e = self.qa.segment_embeds(segments)[:P]
        out = self.sset.lm(inputs_embeds=e.unsqueeze(0), use_cache=True, logits_to_keep=1)
        return [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    @staticmethod
    def _cache(kv, rows: torch.Tensor | int):
        from transformers import DynamicCache

        if isinstance(rows, int):  # expand a batch-1 prefix to `rows`
            data = [(k.expand(rows, -1, -1, -1).contiguous(), v.expand(rows, -1, -1, -1).contiguous()) for k, v in kv]
        else:
            data = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in kv]
        return DynamicCache(ddp_cache_data=data)

    def _batch(self, prompts, prefix_kv, P, score, generate, max_new_tokens, stop_at_newline):
        lm = self.sset.lm
        dev = self.qa.embed.weight.device
        B = len(prompts)
        suffix = [self.qa.segment_embeds(p.segments)[P:] for p in prompts]
        x, smask = Answerer.pad(suffix, left=True)
        pos = P + (smask.cumsum(1) - 1).clamp_min(0)
        if P > 0:
            mask = torch.cat([torch.ones(B, P, dtype=smask.dtype, device=dev), smask], 1)
            cache = self._cache(prefix_kv, B)
        else:
            mask, cache = smask, None
        out = lm(inputs_embeds=x, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                 logits_to_keep=1)
        cache = out.past_key_values
        last = out.logits[:, -1].float()
        last_pos = pos[:, -1]
        lp = self._score(prompts, last, cache, mask, last_pos) if score else None
        texts = self._generate(B, last, cache, mask, last_pos, max_new_tokens, stop_at_newline) if generate else None
        return lp, texts

    def _score(self, prompts, last, cache, mask, last_pos) -> torch.Tensor:
        """[B, max_labels] summed log p of each label's tokens after its prompt."""
        B = len(prompts)
        n_lab = max(len(p.labels) for p in prompts)
        res = torch.full((B, n_lab), float("-inf"))
        first = torch.log_softmax(last, -1)
        rows, cont = [], []
        for i, p in enumerate(prompts):
            for j, lab in enumerate(p.labels):
                ids = self.label_ids(lab)
                res[i, j] = first[i, ids[0]].cpu()
                if len(ids) > 1:
                    rows.append((i, j))
                    cont.append(ids)
        if not rows:
            return res
        dev = last.device
        sel = torch.tensor([i for i, _ in rows], device=dev)
        T = max(len(c) for c in cont) - 1
        inp = torch.full((len(rows), T), self.qa.tok.pad_token_id or 0, dtype=torch.long, device=dev)
        lmask = torch.zeros(len(rows), T, dtype=mask.dtype, device=dev)
        for r, c in enumerate(cont):
            inp[r, :len(c) - 1] = torch.tensor(c[:-1], device=dev)
            lmask[r, :len(c) - 1] = 1
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        pos = last_pos.index_select(0, sel).unsqueeze(1) + 1 + torch.arange(T, device=dev).unsqueeze(0)
        out = self.sset.lm(inputs_embeds=self.qa.embed(inp), attention_mask=torch.cat([mask.index_select(0, sel), lmask], 1),
                           position_ids=pos, past_key_values=self._cache(kv, sel), use_cache=False)
        lsm = torch.log_softmax(out.logits.float(), -1)
        for r, ((i, j), c) in enumerate(zip(rows, cont)):
            tgt = torch.tensor(c[1:], device=dev)
            res[i, j] += lsm[r, torch.arange(len(c) - 1, device=dev), tgt].sum().cpu()
        return res

    def _generate(self, B, last, cache, mask, last_pos, max_new_tokens, stop_at_newline) -> list[str]:
        """Greedy decoding, the same stopping rules as prompts.Answerer.generate."""
        tok = self.qa.tok
        eos = tok.eos_token_id
        nxt = last.argmax(-1)
        gen: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        newline = {}
        for step in range(max_new_tokens):
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if t == eos:
                    done[i] = True
                    continue
                gen[i].append(t)
                if stop_at_newline:
                    nl = newline.get(t)
                    if nl is None:
                        nl = newline[t] = "\n" in tok.decode([t])
                    if nl:
                        done[i] = True
            if all(done) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], 1)
            last_pos = last_pos + 1
            out = self.sset.lm(inputs_embeds=self.qa.embed(nxt.unsqueeze(1)), attention_mask=mask,
                               position_ids=last_pos.unsqueeze(1), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1)
        return [tok.decode(g) for g in gen]
