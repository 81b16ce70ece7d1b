"""Shared machinery of the merge methods that learn from task data (AdaMerging, Average + fine-tuning).

Data contract: ``ctx.data`` is a list of :class:`esm_core.prompts.Prompt` (the task harness builds
them from a task's rows); ``ctx.workspace.encoders`` embeds their modality items; ``ctx.sset`` is
the model. Prompts may carry ``meta["task"]``: batches are then drawn from every task at each step
(AdaMerging's per-task batches); otherwise from the pooled list.

Differentiable merged weights: a temporary adapter with the merged adapter's config (so its scaling
is exactly the one the merged adapter will be served with) is added to the one base copy, and each
forward runs ``torch.func.functional_call`` on the model with that adapter's LoRA weights replaced
by tensors computed from the learned quantities; gradients flow to them, the stored weights are
never touched. The temporary adapter is removed afterwards, also on errors and cancellation.
The model stays in eval mode (no LoRA dropout), so a seed fixes the whole run.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

import torch

from esm_core.adapters import LoraKey, merged_config
from esm_core.answering.answerer import Answerer
from esm_core.answering.prompts import Item, Prompt
from esm_core.errors import ESMError

DATA_FIX = ("build prompts from a task's training rows with the task harness and pass them as the merge "
            "context's data (MergeContext(..., data=[Prompt, ...])), or choose a task for this method in the "
            "app / CLI.")


@dataclass
class Prepared:
    """One prompt ready for scoring: its embeddings and the token ids of each continuation to score."""

    embeds: torch.Tensor  # [T, d], no grad
    targets: list[list[int]]  # one id list per label (entropy) or [answer ids] (LM loss)
    group: object  # meta["task"] or None


def require_prompts(ctx, method: str, *, answers: bool) -> list:
    data = ctx.data
    if data is None:
        raise ESMError(f"Merge method {method!r} needs task data (prompts built from a task's rows), but none "
                       "was given.", fix=DATA_FIX)
    if not isinstance(data, (list, tuple)) or not data:
        raise ESMError(f"Merge method {method!r} needs a non-empty list of prompts as task data, got "
                       f"{type(data).__name__}{'' if data else ' (empty)'}.", fix=DATA_FIX)
    for i, p in enumerate(data):
        if not isinstance(p, Prompt):
            raise ESMError(f"Task data item {i} for {method!r} is a {type(p).__name__}, not an "
                           "esm_core.prompts.Prompt.", fix=DATA_FIX)
        if answers and not (isinstance(p.answer, str) and p.answer.strip()):
            raise ESMError(f"Task data item {i} for {method!r} has no answer; fine-tuning needs labelled rows.",
                           fix="pass training prompts with .answer set.")
        if not answers and len(p.labels) < 2:
            raise ESMError(f"Task data item {i} for {method!r} has {len(p.labels)} label(s); the prediction "
                           "entropy needs at least 2.", fix="give each prompt its task's label set.")
    if ctx.sset is None:
        raise ESMError(f"Merge method {method!r} needs the loaded models.")
    return list(data)


def encoders_for(ctx, prompts) -> dict:
    ws = ctx.workspace
    encoders = dict(ws.encoders) if ws is not None and getattr(ws, "encoders", None) else {}
    missing = sorted({s.modality for p in prompts for s in p.segments
                      if isinstance(s, Item) and s.modality not in encoders})
    if missing and ws is None:
        raise ESMError(f"The task prompts hold {missing} items but no workspace with modality encoders was given.",
                       fix="pass the workspace (MergeContext(workspace=ws)) so items are embedded by their encoders.")
    return encoders


def prepare(ctx, prompts, *, answers: bool) -> list[Prepared]:
    """Embed every prompt once (the adapters never touch the input embeddings) and tokenize its targets."""

    qa = Answerer(ctx.sset, encoders_for(ctx, prompts))
    tok = ctx.sset.tokenizer
    out = []
    with torch.no_grad():
        for p in prompts:
            e = qa.segment_embeds(p.segments).detach()
            texts = [p.answer] if answers else list(p.labels)
            ids = [list(tok(" " + t, add_special_tokens=False)["input_ids"]) for t in texts]
            if any(not x for x in ids):
                raise ESMError(f"A label/answer of prompt {p.text()[:40]!r}... tokenizes to nothing.",
                               fix="use non-empty labels.")
            out.append(Prepared(e, ids, p.meta.get("task") if isinstance(p.meta, dict) else None))
    return out


class Batches:
    """Seeded batches: batch_size prompts from every group per step, each group cycled in shuffled epochs."""

    def __init__(self, items: list[Prepared], batch_size: int, seed: int):
        self.g = torch.Generator().manual_seed(int(seed))
        groups: dict = {}
        for i, it in enumerate(items):
            groups.setdefault(it.group, []).append(i)
        self.groups = [groups[k] for k in sorted(groups, key=lambda x: (x is None, str(x)))]
        self.queues: list[list[int]] = [[] for _ in self.groups]
        self.bs = int(batch_size)

    def next(self) -> list[int]:
        out = []
        for gi, idx in enumerate(self.groups):
            take = min(self.bs, len(idx))
            while len(self.queues[gi]) < take:
                self.queues[gi].extend(idx[j] for j in torch.randperm(len(idx), generator=self.g).tolist())
            out.extend(self.queues[gi][:take])
            del self.queues[gi][:take]
        return out


class LoraOverride:
    """Forward passes of the model with one adapter's LoRA weights replaced by given tensors."""

    def __init__(self, sset, adapter: str):
        self.sset = sset
        ids = {id(p): n for n, p in sset.lm.named_parameters()}
        self.names: dict[LoraKey, str] = {}
        for k in sset.lora_keys:
            a, b, _ = sset.lora_layer(adapter, k)
            self.names[k] = ids[id((a if k.ab == "A" else b).weight)]
        self.embed = sset.model.get_input_embeddings()

    def logits(self, factors: dict[LoraKey, torch.Tensor], x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dev, dt = self.embed.weight.device, self.sset.dtype
        params = {self.names[k]: v.to(device=dev, dtype=dt) for k, v in factors.items()}
        out = torch.func.functional_call(self.sset.lm, params, args=(),
                                         kwargs=dict(inputs_embeds=x, attention_mask=mask, use_cache=False))
        return out.logits

    def target_logprobs(self, factors, pairs: list[tuple[torch.Tensor, list[int]]]) -> torch.Tensor:
        """[N] sum of log p(target tokens | prompt) for (prompt embeds, target ids) pairs, one batched forward."""

        dev = self.embed.weight.device
        with torch.no_grad():
            seqs = [torch.cat([e.to(dev), self.embed(torch.tensor(ids, device=dev))]) for e, ids in pairs]
        x, mask = Answerer.pad(seqs, left=False)
        logits = self.logits(factors, x, mask)
        rows, pos, tgt, owner = [], [], [], []
        for r, (e, ids) in enumerate(pairs):
            start = e.shape[0]
            for t, tid in enumerate(ids):
                rows.append(r)
                pos.append(start - 1 + t)
                tgt.append(tid)
                owner.append(r)
        sel = logits[torch.tensor(rows, device=logits.device), torch.tensor(pos, device=logits.device)].float()
        lp = torch.log_softmax(sel, dim=-1).gather(1, torch.tensor(tgt, device=sel.device).unsqueeze(1)).squeeze(1)
        return torch.zeros(len(pairs), device=lp.device).index_add(0, torch.tensor(owner, device=lp.device), lp).cpu()


@contextlib.contextmanager
def temporary_adapter(ctx, tensors: dict[LoraKey, torch.Tensor], tag: str) -> Iterator[LoraOverride]:
    """Add a scratch adapter (merged-adapter config) holding `tensors`, make it active, always remove it."""
    sset = ctx.sset
    name = f"tmp_{tag}_{uuid.uuid4().hex[:8]}"
    cfg = merged_config(sset.adapters[sset.names[0]], None, ctx.folded)
    sset.add_adapter(name, {k: v.detach() for k, v in tensors.items()}, cfg)
    try:
        with sset.use(name):
            yield LoraOverride(sset, name)
    finally:
        sset.remove_adapter(name)


def label_entropy(ov: LoraOverride, factors, items: list[Prepared]) -> torch.Tensor:
    """[n] Shannon entropy of p(label | prompt), normalised over each prompt's label set."""
    pairs, owner = [], []
    for i, it in enumerate(items):
        for ids in it.targets:
            pairs.append((it.embeds, ids))
            owner.append(i)
    s = ov.target_logprobs(factors, pairs)
    n_lab = max(len(it.targets) for it in items)
    scores = torch.full((len(items), n_lab), float("-inf"))
    col = [0] * len(items)
    rows, cols = [], []
    for r, i in enumerate(owner):
        rows.append(i)
        cols.append(col[i])
        col[i] += 1
    scores = scores.index_put((torch.tensor(rows), torch.tensor(cols)), s)
    lp = torch.log_softmax(scores, dim=1)
    p = lp.exp()
    return -torch.where(p > 0, p * lp, torch.zeros_like(lp)).sum(1)


def answer_nll(ov: LoraOverride, factors, items: list[Prepared]) -> tuple[torch.Tensor, int]:
    """(summed negative log-likelihood of the answer tokens, number of answer tokens)."""
    pairs = [(it.embeds, it.targets[0]) for it in items]
    s = ov.target_logprobs(factors, pairs)
    return -s.sum(), sum(len(it.targets[0]) for it in items)


def report(ctx, msg: str, frac: float) -> None:
    if ctx.progress is not None:
        ctx.progress(msg, float(frac))


class Work:
    """Progress of a learned merge over all its passes (an evaluation of every prompt before and after,
    the optimisation steps between), with the time left estimated from the passes done so far."""

    def __init__(self, ctx, what: str, steps: int, n_prompts: int, batch_size: int):
        self.ctx, self.what, self.steps = ctx, what, int(steps)
        self.eval_batches = -(-int(n_prompts) // max(1, int(batch_size)))
        self.total = self.steps + 2 * self.eval_batches
        self.done, self.step_no = 0, 0
        self.t0 = time.perf_counter()
        report(ctx, f"{what}: {self.steps} steps + 2 evaluations of {n_prompts} prompts "
                    f"({self.total} batches in all)", 0.0)

    def _left(self) -> str:
        el = time.perf_counter() - self.t0
        left = el / self.done * (self.total - self.done)
        return f"{el:.0f} s elapsed, about {left:.0f} s left"

    def eval_tick(self) -> None:
        self.done += 1
        report(self.ctx, f"{self.what}: evaluating all prompts · {self._left()}", self.done / self.total)

    def step(self, note: str) -> None:
        self.done += 1
        self.step_no += 1
        report(self.ctx, f"{self.what} step {self.step_no}/{self.steps}: {note} · {self._left()}",
               self.done / self.total)
