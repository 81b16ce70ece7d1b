"""Training helpers of the zoo: prompts -> model inputs, base pretraining, LoRA specialists.

Sequences are built from the same segment lists as ``esm_core.prompts`` (text pieces and modality
Items, BOS first, each text piece tokenized on its own, text-modality Items tokenized raw), so what
the models learn is exactly what ``Answerer`` later shows them. A soft-token modality (the molecule
encoder) is embedded by its projector WITH gradients, so it trains jointly with the LoRA.

Losses are computed only where needed: the LM head runs on the answer positions (specialists) or
on a random subset of positions plus the answer positions (base), which is most of the speed on a
CPU with an 8k vocabulary.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from esm_core.answering.prompts import Item
from esm_core.zoo.skills import shown_text


class Tokens:
    """Cached text -> ids with the zoo tokenizer (no special tokens added)."""

    def __init__(self, tok):
        self.tok = tok
        self._c: dict[str, list[int]] = {}
        self.bos = tok.bos_token_id
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id

    def __call__(self, text: str) -> list[int]:
        ids = self._c.get(text)
        if ids is None:
            ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
            if len(self._c) < 400_000:
                self._c[text] = ids
        return ids


@dataclass
class Sample:
    """Pieces of one training sequence: ('ids', list[int]) or ('soft', modality, raw); answer targets."""

    pieces: list
    answer: list[int]  # token ids appended after the pieces and always trained (may be empty)
    lm: bool = True  # train the LM loss on (a subset of) the other positions too
    keep: tuple = ()  # modalities whose token states should stay as the base's (see batch_loss)
    distill: bool = False  # the answer is the base's: its first answer token's distribution (see batch_loss)


def sample_from_segments(toks: Tokens, segments: list, answer_text: str | None, soft: set[str] = frozenset(),
                         lm: bool = True, eos: bool = False, keep: tuple = (), distill: bool = False) -> Sample:
    pieces: list = [("ids", [toks.bos])] if toks.bos is not None else []
    for s in segments:
        if isinstance(s, str):
            if s:
                pieces.append(("ids", toks(s)))
        elif isinstance(s, Item) and s.modality in soft:
            pieces.append(("soft", s.modality, s.raw))
        else:
            pieces.append(("ids", toks(shown_text(s.modality, s.raw)), s.modality))
    ans = toks(answer_text) if answer_text else []
    if eos and toks.eos is not None:
        ans = ans + [toks.eos] if ans else ans
        if not ans:
            pieces.append(("ids", [toks.eos]))
    return Sample(pieces, ans, lm, tuple(keep), distill)


def _lengths(s: Sample, soft_len: dict[str, int]) -> int:
    n = sum(len(p[1]) if p[0] == "ids" else soft_len[p[1]] for p in s.pieces)
    return n + len(s.answer)


# ------------------------------------------------------------------------------------ batches
class SoftModality:
    """A trainable soft-token modality: cached features -> projector (gradients flow)."""

    def __init__(self, projector: nn.Module, featurize: Callable[[str], np.ndarray]):
        self.projector = projector
        self.featurize = featurize
        self._f: dict[str, np.ndarray] = {}

    def features(self, raws: list[str]) -> torch.Tensor:
        out = []
        for r in raws:
            f = self._f.get(r)
            if f is None:
                f = self.featurize(r)
                self._f[r] = f
            out.append(f)
        return torch.from_numpy(np.stack(out))

    @property
    def n_tokens(self) -> int:
        return int(self.projector.n_tokens)


def build_embeds(samples: list[Sample], embedding: nn.Embedding, soft: dict[str, SoftModality], pad_id: int):
    """Right-padded inputs_embeds [B,T,d], attention mask, and (row, position, target) of answer tokens.

    Answer tokens are appended to their sequence; the target at position p is the token at p + 1.
    Returns also the flat input ids (soft positions = -1) for LM targets.
    """
    dev = embedding.weight.device
    # soft items of the whole batch in one projector call per modality
    want: dict[str, list[str]] = {}
    for s in samples:
        for p in s.pieces:
            if p[0] == "soft":
                want.setdefault(p[1], []).append(p[2])
    soft_out = {}
    for m, raws in want.items():
        sm = soft[m]
        soft_out[m] = iter(sm.projector(sm.features(raws).to(dev)).unbind(0))
    # token ids of the whole batch laid out first (soft positions = -1), embedded in ONE lookup
    ids_all, soft_at, ans_pos, keep_at = [], [], [], []
    for b, s in enumerate(samples):
        ids = []
        for p in s.pieces:
            mod = p[2] if p[0] == "ids" and len(p) > 2 else (p[1] if p[0] == "soft" else None)
            start_p = len(ids)
            if p[0] == "ids":
                ids.extend(p[1])
            else:
                e = next(soft_out[p[1]])
                soft_at.append((b, len(ids), e))
                ids.extend([-1] * e.shape[0])
            if mod is not None and mod in s.keep:
                keep_at.extend((b, t, s.keep.index(mod)) for t in range(start_p, len(ids)))
        start = len(ids)
        for j, t in enumerate(s.answer):
            ans_pos.append((b, start - 1 + j, t))
        ids.extend(s.answer)
        ids_all.append(ids)
    T = max(len(i) for i in ids_all)
    ids_t = torch.full((len(samples), T), -1, dtype=torch.long)
    for b, ids in enumerate(ids_all):
        ids_t[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    mask = (torch.arange(T).unsqueeze(0) < torch.tensor([len(i) for i in ids_all]).unsqueeze(1)).long().to(dev)
    x = embedding(ids_t.clamp_min(0).to(dev))
    if soft_at:
        x = x * (ids_t >= 0).unsqueeze(-1).to(dev, x.dtype)  # zero the placeholder rows, then add soft tokens
        rows, cols, vals = [], [], []
        for b, p, e in soft_at:
            rows.append(torch.full((e.shape[0],), b, dtype=torch.long))
            cols.append(torch.arange(p, p + e.shape[0]))
            vals.append(e)
        soft_x = torch.zeros_like(x).index_put((torch.cat(rows).to(dev), torch.cat(cols).to(dev)), torch.cat(vals))
        x = x + soft_x
    keep_mask = torch.full((len(samples), T), -1, dtype=torch.long)  # index into Sample.keep, -1 = not kept
    if keep_at:
        kb, kt, km = zip(*keep_at)
        keep_mask[list(kb), list(kt)] = torch.tensor(km, dtype=torch.long)
    return x, mask, ans_pos, ids_t, keep_mask.to(dev)


def batch_loss(lm, samples: list[Sample], soft: dict[str, SoftModality], *, lm_frac: float = 0.0,
               rng: torch.Generator | None = None, keep_weight: float = 0.0, base_off=None,
               keep_pool_weight: float = 0.0, distill_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on answer tokens (+ on a random lm_frac of the other next-token targets).

    keep_weight > 0 adds a term that keeps the block outputs on the tokens of each sample's ``keep``
    modalities where the base has them (base = the same model inside the ``base_off()`` context, e.g.
    PEFT's disable_adapter): a specialist may change how it reads its own modality but should leave
    the others alone, like a specialist that never saw them. The distance is in units of the base
    states' spread, per modality and block: the mean over tokens and dimensions of
    (h - h_base)^2 / var_base, with var_base the per-dimension variance of the batch's base states of
    that modality -- the scale that the standardised SWD (docs/METHOD.md section 2; reference preset) sees. (A
    distance relative to each token's norm let the cell specialist move the residue tokens, whose
    states vary little, further than its own.) ``keep`` entries are matched by position in
    Sample.keep, so all samples of a batch must list the kept modalities in the same order.

    keep_pool_weight > 0 adds the same distance on each sample's MEAN-POOLED kept states, in units of the
    per-dimension variance of the base's pooled states over the batch (at least 4 samples with that
    modality). The layer signal compares exactly these pooled points (docs/METHOD.md section 2), and their
    spread is far smaller than the tokens' spread: a shift shared by every token of a block costs little in
    the token term but moves the pooled points by many of their standard deviations (on the 8-block zoo the
    molecule specialist moved the pooled protein states further than its own molecule states).

    Samples with ``distill`` set are another modality's questions: instead of the gold answer, the loss is
    KL(base || model) of the first answer token's distribution (x distill_weight), so the specialist
    answers them as the base does (a specialist that never saw them would).

    The base runs only on the samples that have kept tokens or a distilled answer, cut after the last
    position needed: with right padding and causal attention, those positions' states do not depend on
    the rest.
    """
    emb = lm.get_input_embeddings()
    x, mask, ans_pos, ids, keep_mask = build_embeds(samples, emb, soft, pad_id=0)
    distill_rows = [b for b, s in enumerate(samples) if s.distill and s.answer]
    use_keep = keep_weight > 0 and bool((keep_mask >= 0).any())
    use_distill = bool(distill_rows) and distill_weight > 0
    out = lm.model(inputs_embeds=x, attention_mask=mask, use_cache=False, output_hidden_states=use_keep)
    hidden = out.last_hidden_state
    head = lm.lm_head
    gold = [(r, p, t) for r, p, t in ans_pos if not samples[r].distill]
    info = {}
    loss = x.new_zeros(())
    if gold:
        rows = torch.tensor([r for r, _, _ in gold], dtype=torch.long)
        pos = torch.tensor([p for _, p, _ in gold], dtype=torch.long)
        tgt = torch.tensor([t for _, _, t in gold], dtype=torch.long, device=x.device)
        logits = head(hidden[rows, pos]).float()
        ans_loss = nn.functional.cross_entropy(logits, tgt)
        loss = loss + ans_loss
        info["answer_loss"] = float(ans_loss.detach())
        info["answer_acc"] = float((logits.argmax(-1) == tgt).float().mean())
    if lm_frac > 0:
        nxt = ids[:, 1:]
        ok = (nxt >= 0) & (ids[:, :-1] != -2)
        lm_rows = torch.tensor([i for i, s in enumerate(samples) if s.lm], dtype=torch.long)
        keep = torch.zeros_like(ok)
        keep[lm_rows] = True
        ok = ok & keep
        sel = ok & (torch.rand(ok.shape, generator=rng) < lm_frac)
        if bool(sel.any()):
            r, p = sel.nonzero(as_tuple=True)
            logits = head(hidden[r, p]).float()
            lm_loss = nn.functional.cross_entropy(logits, nxt[r, p].to(x.device))
            loss = loss + lm_loss
            info["lm_loss"] = float(lm_loss.detach())
    if not (use_keep or use_distill):
        return loss, info
    # the base, on the rows that need it, up to the last position needed
    first_ans = {r: p for r, p, _ in reversed(ans_pos)}  # row -> position predicting its first answer token
    need = (keep_mask >= 0) if use_keep else torch.zeros_like(keep_mask, dtype=torch.bool)
    last = [int(need[b].nonzero().max()) if bool(need[b].any()) else -1 for b in range(len(samples))]
    for b in distill_rows if use_distill else ():
        last[b] = max(last[b], first_ans[b])
    sub = [b for b in range(len(samples)) if last[b] >= 0]
    cut = max(last[b] for b in sub) + 1
    sub_t = torch.tensor(sub, dtype=torch.long, device=x.device)
    with torch.no_grad(), base_off():
        ref_out = lm.model(inputs_embeds=x.detach()[sub_t, :cut], attention_mask=mask[sub_t, :cut], use_cache=False,
                           output_hidden_states=use_keep)
    if use_distill:
        local = {b: i for i, b in enumerate(sub)}
        pos = torch.tensor([first_ans[b] for b in distill_rows], dtype=torch.long)
        mine = nn.functional.log_softmax(head(hidden[torch.tensor(distill_rows), pos]).float(), -1)
        with torch.no_grad():
            base_lp = nn.functional.log_softmax(
                head(ref_out.last_hidden_state[torch.tensor([local[b] for b in distill_rows]), pos]).float(), -1)
        kl = nn.functional.kl_div(mine, base_lp, log_target=True, reduction="batchmean")
        loss = loss + distill_weight * kl
        info["distill_kl"] = float(kl.detach())
    if use_keep:
        km = keep_mask[sub_t, :cut]
        mine_states = [h[sub_t, :cut] for h in out.hidden_states[1:]]  # the base's rows and length, once per block
        terms, pool_terms = [], []
        for j in range(int(km.max()) + 1):
            sel = km == j
            if int(sel.sum()) < 2:
                continue
            w = sel.to(x.dtype)
            cnt = w.sum(1)
            has = cnt > 0
            pool_ok = keep_pool_weight > 0 and int(has.sum()) >= 4
            for h, hb in zip(mine_states, ref_out.hidden_states[1:]):
                hs, hbs = h[sel], hb[sel]
                var = hbs.var(0, unbiased=False).clamp_min(1e-6)
                terms.append(((hs - hbs).pow(2) / var).mean())
                if pool_ok:
                    ph = (w.unsqueeze(-1) * h).sum(1)[has] / cnt[has].unsqueeze(-1)
                    phb = (w.unsqueeze(-1) * hb).sum(1)[has] / cnt[has].unsqueeze(-1)
                    pvar = phb.var(0, unbiased=False).clamp_min(1e-6)
                    pool_terms.append(((ph - phb).pow(2) / pvar).mean())
        if terms:
            keep_loss = torch.stack(terms).mean()
            loss = loss + keep_weight * keep_loss
            info["keep_loss"] = float(keep_loss.detach())
        if pool_terms:
            pool_loss = torch.stack(pool_terms).mean()
            loss = loss + keep_pool_weight * pool_loss
            info["keep_pool_loss"] = float(pool_loss.detach())
    return loss, info


def length_sorted_batches(samples: list[Sample], batch_size: int, soft_len: dict[str, int]) -> Iterator[list[Sample]]:
    """Split a chunk of samples into batches of similar length (less padding)."""
    order = sorted(range(len(samples)), key=lambda i: _lengths(samples[i], soft_len))
    for s in range(0, len(order), batch_size):
        yield [samples[i] for i in order[s:s + batch_size]]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def bucketed(sample_fn: Callable[[random.Random], Sample], rng: random.Random, batch_size: int,
             soft_len: dict[str, int], bucket: int = 8) -> Iterator[list[Sample]]:
    """Endless batches: draw bucket * batch_size samples, sort by length, cut into batches, shuffle them.

    Sequences of similar length share a batch, so padding wastes little compute.
    """
    while True:
        chunk = [sample_fn(rng) for _ in range(batch_size * bucket)]
        batches = list(length_sorted_batches(chunk, batch_size, soft_len))
        rng.shuffle(batches)
        yield from batches


def train_loop(lm, params: list, sample_fn: Callable[[random.Random], Sample], *, steps: int, lr: float,
               batch_size: int, soft: dict[str, SoftModality], lm_frac: float, seed: int, desc: str, warmup: int = 50,
               weight_decay: float = 0.0, extra_groups: list[dict] | None = None, log_every: int = 50,
               progress: bool = True, log: Callable[[str], None] | None = None, keep_weight: float = 0.0,
               base_off=None, bucket: int = 1, keep_pool_weight: float = 0.0, distill_weight: float = 1.0) -> list[dict]:
    """AdamW over params with warmup + cosine decay; returns the logged history (means every log_every steps).

    bucket > 1 draws bucket * batch_size samples and cuts them into length-sorted batches (less padding).
    Keep it at 1 for question answering: where a label correlates with prompt length (a cell line's gene
    list tokenizes longer than a blood cell's), sorted batches are nearly single-label and the model
    learns a per-batch bias instead of the skill (measured: answer loss stuck at ln 2).
    """
    from tqdm import tqdm

    groups = [{"params": params, "lr": lr, "weight_decay": weight_decay}]
    for g in extra_groups or []:
        groups.append(g)
    peaks = [g["lr"] for g in groups]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-8)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    batches = bucketed(sample_fn, rng, batch_size, {m: sm.n_tokens for m, sm in soft.items()}, bucket=bucket)
    lm.train()
    hist, acc = [], {}
    bar = tqdm(range(steps), desc=desc, leave=False, disable=not progress, mininterval=2.0)
    for step in bar:
        for g, pk in zip(opt.param_groups, peaks):
            g["lr"] = lr_at(step, steps, pk, min(warmup, max(1, steps // 10)))
        batch = next(batches)
        loss, info = batch_loss(lm, batch, soft, lm_frac=lm_frac, rng=gen, keep_weight=keep_weight, base_off=base_off,
                                keep_pool_weight=keep_pool_weight, distill_weight=distill_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        for k, v in info.items():
            acc.setdefault(k, []).append(v)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            row = {"step": step + 1, **{k: float(np.mean(v)) for k, v in acc.items()}}
            hist.append(row)
            acc = {}
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k != "step"})
            if log:
                log(f"{desc} " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    lm.eval()
    return hist
