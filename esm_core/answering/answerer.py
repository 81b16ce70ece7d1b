"""Answering prompts one model at a time: label log-likelihoods and greedy generation.

    qa = Answerer(sset, encoders)
    logp = qa.label_logprobs([p], adapter="molecule")        # [1, 2] log p(label | prompt)
    text = qa.generate([p], adapter=None)                    # the base model's continuation

esm_core/answering/batched.py answers many prompts faster (shared prefix, one KV cache); this
one is the plain reference it is tested against, and what the zoo's skill sets use.
"""

from __future__ import annotations

import torch

from esm_core.answering.prompts import Item, Prompt
from esm_core.encoders import TextEncoder, separated
from esm_core.errors import ESMError


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
