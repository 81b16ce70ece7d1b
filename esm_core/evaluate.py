"""Few-shot evaluation: batched answering, Acc / macro-F1 with bootstrap intervals, the CLI.

METHOD.md section 7. Every test row becomes a prompt with k = 5 in-context examples chosen from the
training pool (esm_core.fewshot); the model answers it in two ways, both reported:

- by generation: greedy continuation after "Final answer:", parsed with prompts.parse_answer; an
  answer without a parsable label counts as wrong and is counted separately (``n_unparsed``);
- by label likelihood: the label whose tokens have the highest summed log-probability after the prompt.

Metrics per dataset: accuracy and macro-F1 (over the task's labels; an unparsed answer is a wrong
prediction of no label), each with a seeded percentile bootstrap 95 % interval. Two reference rows
the paper does not report: the majority class of the training pool, and the majority label of the k
selected examples (ties: the training majority) -- what retrieval alone achieves.

Answering is batched (:class:`BatchedAnswerer`): the prompt prefix every prompt shares (system line
and question) is run once per model and its key/value cache reused; prompts are sorted by length and
padded in the middle (shared prefix | padding | own suffix); one forward pass per batch serves both
the label scores (multi-token labels continue from a copy of the cache) and the first generated
token. Results equal the one-prompt-at-a-time :class:`prompts.Answerer` (tested).

    python -m esm_core evaluate --config assets/zoo/run.yaml --model base --task biosnap --n 500
    python -m esm_core compare --config assets/zoo/run.yaml --tasks table1,table2 --out bench/results

Functions for the app's Query and Merge pages: :func:`build_query` (prompt + chosen examples with
their similarities for a task and a query row) and :func:`answer_side_by_side` (base, every
specialist and any merged adapter, with label probabilities).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .cli import COMMANDS, tqdm_progress
from .errors import ESMError
from .prompts import Answerer, Item, Prompt, parse_answer
from .tasks import Record, TaskData, expand_names, load_tasks

ProgressFn = Callable[[str, float], None]
MODES = ("generation", "likelihood")


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


def fit_prompt(task: TaskData, record: Record, answerer: BatchedAnswerer, k: int = 5, exclude=None,
               min_examples: int = 0) -> Prompt | None:
    """The task's prompt for a record with up to k examples, dropping the least similar examples until it
    fits the model's context. None when even ``min_examples`` examples do not fit. ``prompt.meta['dropped']``
    says how many were dropped."""
    chosen = task.select(record, k, exclude)
    for j in range(len(chosen), min(min_examples, len(chosen)) - 1, -1):
        p = task.prompt(record, chosen=chosen[:j])
        if answerer.prompt_length(p) <= answerer.max_length:
            p.meta["dropped"] = len(chosen) - j
            p.meta["selected"] = list(chosen)
            return p
    return None


# ------------------------------------------------------------------------------------ metrics
@dataclass
class Score:
    """Accuracy and macro-F1 with bootstrap 95 % intervals on n rows."""

    acc: float
    acc_lo: float
    acc_hi: float
    f1: float
    f1_lo: float
    f1_hi: float
    n: int
    n_unparsed: int = 0


def _encode(y: Sequence, labels: Sequence[str]) -> np.ndarray:
    pos = {l: i for i, l in enumerate(labels)}
    return np.array([pos.get(v, -1) if v is not None else -1 for v in y], dtype=np.int64)


def _f1_rows(t: np.ndarray, p: np.ndarray, n_labels: int) -> np.ndarray:
    """Macro-F1 per row of [R, n] label-index arrays (prediction -1 = no label; F1 of an absent class = 0)."""
    f1 = np.zeros(t.shape[0])
    for c in range(n_labels):
        tp = ((t == c) & (p == c)).sum(1)
        fp = ((t != c) & (p == c)).sum(1)
        fn = ((t == c) & (p != c)).sum(1)
        den = 2 * tp + fp + fn
        f1 += np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0)
    return f1 / n_labels


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    t, p = list(y_true), list(y_pred)
    return float(np.mean([a == b for a, b in zip(t, p)])) if t else float("nan")


def macro_f1(y_true: Sequence, y_pred: Sequence, labels: Sequence[str]) -> float:
    """Macro-F1 over ``labels`` (predictions outside them, e.g. None = unparsed, are wrong for every class);
    equals sklearn.metrics.f1_score(average='macro', labels=labels, zero_division=0)."""
    t, p = _encode(y_true, labels), _encode(y_pred, labels)
    return float(_f1_rows(t[None], p[None], len(labels))[0]) if len(t) else float("nan")


def bootstrap_scores(y_true: Sequence, y_pred: Sequence, labels: Sequence[str], *, n_boot: int = 1000,
                     seed: int = 0, level: float = 0.95) -> Score:
    """Accuracy and macro-F1 with percentile bootstrap intervals (rows resampled with replacement, seeded)."""
    t, p = _encode(y_true, labels), _encode(y_pred, labels)
    n = len(t)
    n_unparsed = int(sum(v is None for v in y_pred))
    if n == 0:
        nan = float("nan")
        return Score(nan, nan, nan, nan, nan, nan, 0, n_unparsed)
    acc = float((t == p).mean())
    f1 = float(_f1_rows(t[None], p[None], len(labels))[0])
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        accs, f1s = [], []
        for s in range(0, n_boot, 256):  # chunks keep memory at 256 x n
            idx = rng.integers(0, n, size=(min(256, n_boot - s), n))
            tb, pb = t[idx], p[idx]
            accs.append((tb == pb).mean(1))
            f1s.append(_f1_rows(tb, pb, len(labels)))
        a, f = np.concatenate(accs), np.concatenate(f1s)
        q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
        alo, ahi = np.percentile(a, q)
        flo, fhi = np.percentile(f, q)
    else:
        alo = ahi = acc
        flo = fhi = f1
    return Score(acc, float(alo), float(ahi), f1, float(flo), float(fhi), n, n_unparsed)


def retrieval_majority(example_labels: Sequence[str], fallback: str) -> str:
    """Majority label of the chosen examples; a tie (or no examples) gives ``fallback``."""
    c = Counter(example_labels).most_common()
    if not c or (len(c) > 1 and c[0][1] == c[1][1]):
        return fallback
    return c[0][0]


# ------------------------------------------------------------------------------------ evaluation
@dataclass
class TaskPrompts:
    """The evaluated rows of one task and their prompts (shared by every model)."""

    task: TaskData
    rows: list[int]  # indices into task.test
    prompts: list[Prompt]
    n_too_long: int = 0
    n_dropped_examples: int = 0
    k: int = 5  # examples asked per prompt

    @property
    def gold(self) -> list[str]:
        return [p.answer for p in self.prompts]

    @property
    def mean_examples(self) -> float:
        """Mean number of in-context examples the prompts really hold (after any dropped to fit); NaN if none."""
        return float(np.mean([len(p.meta["chosen"]) for p in self.prompts])) if self.prompts else float("nan")


def task_prompts(task: TaskData, answerer: BatchedAnswerer | None, *, n: int | None = 500, seed: int = 0, k: int = 5,
                 min_examples: int = 0) -> TaskPrompts:
    """Sample ``n`` test rows (seeded, without replacement; all when fewer) and build their prompts.

    Prompts longer than the model's context lose their least similar examples; rows that do not fit
    even with ``min_examples`` are left out and counted (``n_too_long``).
    """
    N = len(task.test)
    if n is None or n >= N:
        rows = list(range(N))
    else:
        rows = sorted(np.random.default_rng(seed).choice(N, size=n, replace=False).tolist())
    kept, prompts, too_long, dropped = [], [], 0, 0
    for r in rows:
        rec = task.test[r]
        if answerer is None:
            p = task.prompt(rec, k)
        else:
            p = fit_prompt(task, rec, answerer, k, min_examples=min_examples)
        if p is None:
            too_long += 1
            continue
        dropped += p.meta.get("dropped", 0)
        p.meta["row"] = r
        kept.append(r)
        prompts.append(p)
    return TaskPrompts(task, kept, prompts, too_long, dropped, k)


def training_prompts(task: TaskData, n: int = 64, seed: int = 0, k: int = 5,
                     answerer: BatchedAnswerer | None = None) -> list[Prompt]:
    """Few-shot prompts built from ``n`` training rows (seeded), each with examples from the rest of the
    pool (the row itself excluded) and its answer set: the data for AdaMerging (inputs only) and for
    task fine-tuning (with answers)."""
    N = len(task.train)
    rows = list(range(N)) if n >= N else sorted(np.random.default_rng(seed).choice(N, n, replace=False).tolist())
    out = []
    for r in rows:
        rec = task.train[r]
        p = (task.prompt(rec, k, exclude={r}) if answerer is None
             else fit_prompt(task, rec, answerer, k, exclude={r}))
        if p is not None:
            out.append(p)
    return out


@dataclass
class ModelResult:
    model: str
    task: str
    scores: dict[str, Score]  # mode -> Score
    seconds: float = 0.0
    predictions: list[dict] = field(default_factory=list)


def reference_scores(tp: TaskPrompts, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Score]:
    """The two reference rows: training-majority class and majority label of the k chosen examples."""
    task = tp.task
    maj = task.majority_label()
    gold = tp.gold
    ret = [retrieval_majority(p.meta.get("example_labels", []), maj) for p in tp.prompts]
    return {"majority class": bootstrap_scores(gold, [maj] * len(gold), task.labels, n_boot=n_boot, seed=seed),
            f"majority of the {_k_of(tp)} examples": bootstrap_scores(gold, ret, task.labels, n_boot=n_boot, seed=seed)}


def _k_of(tp: TaskPrompts) -> int:
    return max((len(p.meta.get("selected", p.meta.get("chosen", []))) for p in tp.prompts), default=0)


def evaluate_model(answerer: BatchedAnswerer, tp: TaskPrompts, adapter: str | None, *, model_name: str | None = None,
                   modes: Sequence[str] = MODES, n_boot: int = 1000, seed: int = 0,
                   progress: ProgressFn | None = None, keep_predictions: bool = True) -> ModelResult:
    """Score one model (adapter None = base) on one task's prompts in the requested answer modes."""
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ESMError(f"Unknown answer mode(s) {bad}.", fix=f"use {list(MODES)}.")
    t0 = time.perf_counter()
    ans = answerer.run(tp.prompts, adapter, score="likelihood" in modes, generate="generation" in modes,
                       progress=progress)
    labels = tp.task.labels
    gold = tp.gold
    scores, preds = {}, {}
    if "generation" in modes:
        preds["generation"] = ans.by_generation()
        scores["generation"] = bootstrap_scores(gold, preds["generation"], labels, n_boot=n_boot, seed=seed)
    if "likelihood" in modes:
        preds["likelihood"] = ans.by_likelihood()
        scores["likelihood"] = bootstrap_scores(gold, preds["likelihood"], labels, n_boot=n_boot, seed=seed)
    rows = []
    if keep_predictions:
        probs = ans.probs() if ans.logprobs is not None else None
        for i, p in enumerate(tp.prompts):
            d = {"row": tp.rows[i], "gold": gold[i]}
            if "generation" in preds:
                d.update(generated=ans.texts[i], pred_generation=preds["generation"][i])
            if probs is not None:
                d.update(pred_likelihood=preds["likelihood"][i],
                         probs={l: round(float(probs[i, j]), 6) for j, l in enumerate(p.labels)})
            rows.append(d)
    name = model_name or ("base" if adapter is None else adapter)
    return ModelResult(name, tp.task.name, scores, time.perf_counter() - t0, rows)


# ------------------------------------------------------------------------------------ app API
@dataclass
class Query:
    """A prompt for one query row and the examples chosen for it (for display)."""

    prompt: Prompt
    examples: list[dict]  # rank, label, similarity, reason, detail, the example's fields

    def table(self):
        import pandas as pd

        return pd.DataFrame(self.examples)


def build_query(task: TaskData, query: Record | dict | int, *, k: int = 5, answerer: BatchedAnswerer | None = None,
                exclude=None) -> Query:
    """Prompt + chosen examples (with similarity scores and reasons) for a task and a query.

    ``query``: a test-row index, a Record, or a dict of raw values keyed like the task's fields
    (smiles, protein, smiles_2, genes). With an ``answerer`` the prompt is fitted to its context.
    """
    if isinstance(query, int):
        if not 0 <= query < len(task.test):
            raise ESMError(f"Row {query} is not in the test split of {task.name!r} ({len(task.test)} rows).")
        rec = task.test[query]
    elif isinstance(query, Record):
        rec = query
    else:
        rec = task.record_from(dict(query))
    if answerer is not None:
        p = fit_prompt(task, rec, answerer, k, exclude)
        if p is None:
            raise ESMError("The query alone is longer than the model's context.", fix="shorten the inputs.")
    else:
        p = task.prompt(rec, k, exclude)
    rows = []
    for r, c in enumerate(p.meta["chosen"], 1):
        ex = task.train[c.index]
        d = {"rank": r, "label": ex.label, "similarity": round(c.score, 4), "reason": c.reason,
             "why": c.describe(), "pool_row": c.index}
        d.update({f.name: ex.values[f.key] for f in task.fields})
        d.update({k_: round(v, 4) if isinstance(v, float) else v for k_, v in c.detail.items()})
        rows.append(d)
    return Query(p, rows)


def answer_side_by_side(answerer: BatchedAnswerer, prompts: Prompt | Sequence[Prompt],
                        models: dict[str, str | None] | None = None, *, generate: bool = True) -> list[dict]:
    """Answers of several models to the same prompt(s): one dict per (prompt, model) with label
    probabilities, the likelihood answer, the generated text and its parsed label.

    ``models``: display name -> adapter (None = base); default base + every specialist + every merged
    adapter loaded with ``sset.add_adapter``.
    """
    if isinstance(prompts, Prompt):
        prompts = [prompts]
    sset = answerer.sset
    if models is None:
        models = {"base": None, **{n: n for n in sset.names}, **{n: n for n in sset.extra_adapters}}
    out = []
    for name, adapter in models.items():
        ans = answerer.run(prompts, adapter, generate=generate)
        probs = ans.probs()
        lik = ans.by_likelihood()
        gen = ans.by_generation() if generate else [None] * len(prompts)
        for i, p in enumerate(prompts):
            d = {"prompt": i, "model": name, "answer_likelihood": lik[i],
                 **{f"p({l})": float(probs[i, j]) for j, l in enumerate(p.labels)}}
            if generate:
                d.update(generated=ans.texts[i], answer_generation=gen[i])
            if p.answer:
                d["gold"] = p.answer
            out.append(d)
    return out


# ------------------------------------------------------------------------------------ models
def load_models(config: str | Path, *, batch_size: int = 16, probes: bool = False):
    """Workspace (base + specialists + encoders) from a run config; probe samples only if ``probes``."""
    from .config import load_run_spec
    from .encoders import build_encoder
    from .pipeline import Workspace
    from .specialists import SpecialistSet

    spec = load_run_spec(config)
    if probes:
        return Workspace.from_spec(spec)
    spec.validate()
    sset = SpecialistSet.load(spec.base, [(s.name, s.adapter) for s in spec.specialists],
                              modalities=[s.modality for s in spec.specialists], device=spec.method.device,
                              dtype=spec.method.dtype, trust_remote_code=spec.trust_remote_code)
    encoders = {m.name: build_encoder(m.encoder, sset) for m in spec.modalities}
    return Workspace(spec, sset, encoders)


def attach_adapter_dir(sset, path: str | Path, name: str | None = None) -> str:
    """Load a PEFT LoRA adapter directory (e.g. a merged model) next to the specialists; returns its name."""
    from .specialists import check_adapters_agree, read_adapter

    p = Path(path)
    name = name or f"dir:{p.name}"
    ad = read_adapter(p, name)
    check_adapters_agree([sset.adapters[sset.names[0]], ad])
    sset.add_adapter(name, ad.tensors, ad.config)
    return name


def resolve_model(ws, model: str) -> tuple[str, str | None]:
    """'base', a specialist name, or an adapter directory -> (display name, adapter name)."""
    if model == "base":
        return "base", None
    if model in ws.sset.names:
        return model, model
    if Path(model).is_dir():
        return Path(model).name, attach_adapter_dir(ws.sset, model)
    raise ESMError(f"Model {model!r} is not 'base', a specialist ({ws.sset.names}) or an adapter directory.")


def default_config() -> Path | None:
    from .tasks import REPO_ROOT

    p = REPO_ROOT / "assets" / "zoo" / "run.yaml"
    return p if p.is_file() else None


# ------------------------------------------------------------------------------------ tables
def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}"


def _cell(s: Score, metric: str, mode: str) -> str:
    v, lo, hi = (s.acc, s.acc_lo, s.acc_hi) if metric == "acc" else (s.f1, s.f1_lo, s.f1_hi)
    u = f", {s.n_unparsed} unparsed" if mode == "generation" and s.n_unparsed else ""
    return f"{_pct(v)} ({_pct(lo)}–{_pct(hi)}) n={s.n}{u}"


@dataclass
class Report:
    """Rows (model, kind, task, mode, Score) and per-task facts; renders Markdown, CSV and JSON."""

    rows: list[dict] = field(default_factory=list)  # model, kind, task, title, group, mode, score
    tasks: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    predictions: dict = field(default_factory=dict)  # "model|task" -> rows

    def add(self, model: str, kind: str, task: TaskData, mode: str, score: Score) -> None:
        self.rows.append(dict(model=model, kind=kind, task=task.name, title=task.title, group=task.group, mode=mode,
                              score=score))

    def add_result(self, res: ModelResult, kind: str, task: TaskData, keep_predictions: bool = False) -> None:
        for mode, s in res.scores.items():
            self.add(res.model, kind, task, mode, s)
        if keep_predictions:
            self.predictions[f"{res.model}|{res.task}"] = res.predictions

    def add_references(self, tp: TaskPrompts, *, n_boot: int, seed: int) -> None:
        for name, s in reference_scores(tp, n_boot=n_boot, seed=seed).items():
            self.add(f"reference: {name}", "reference", tp.task, "reference", s)

    def csv_rows(self) -> list[dict]:
        out = []
        for r in self.rows:
            s: Score = r["score"]
            out.append(dict(model=r["model"], kind=r["kind"], task=r["task"], title=r["title"], group=r["group"],
                            mode=r["mode"], n=s.n, n_unparsed=s.n_unparsed, acc=s.acc, acc_lo=s.acc_lo,
                            acc_hi=s.acc_hi, macro_f1=s.f1, f1_lo=s.f1_lo, f1_hi=s.f1_hi))
        return out

    def write_csv(self, path: str | Path) -> None:
        import csv

        rows = self.csv_rows()
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["model"])
            w.writeheader()
            w.writerows(rows)

    def markdown(self, modes: Sequence[str] = MODES) -> str:
        """The paper's Table 1/2 layout: rows = models, columns = datasets grouped by task family, Acc and
        macro-F1 per dataset (%, bootstrap 95 % interval, n); one table per answer mode, reference rows last."""
        task_order = list(dict.fromkeys((r["task"], r["title"], r["group"]) for r in self.rows))
        groups = list(dict.fromkeys(g for _, _, g in task_order))
        lines = []
        for mode in modes:
            if not any(r["mode"] == mode for r in self.rows):
                continue
            lines.append(f"### Answer by {mode}\n")
            for g in groups:
                ts = [(t, title) for t, title, gg in task_order if gg == g]
                head = ["Model"] + [f"{title} {m}" for _, title in ts for m in ("Acc", "F1")] + ["Avg Acc", "Avg F1"]
                lines.append(f"**{g}**\n")
                lines.append("| " + " | ".join(head) + " |")
                lines.append("|" + "---|" * len(head))
                models = list(dict.fromkeys((r["model"], r["kind"]) for r in self.rows if r["mode"] in (mode, "reference")))
                models.sort(key=lambda mk: mk[1] == "reference")
                for model, kind in models:
                    cells, accs, f1s = [model], [], []
                    for t, _ in ts:
                        hit = [r for r in self.rows if r["model"] == model and r["task"] == t
                               and r["mode"] == (mode if kind != "reference" else "reference")]
                        if not hit:
                            cells += ["-", "-"]
                            continue
                        s = hit[0]["score"]
                        cells += [_cell(s, "acc", mode), _cell(s, "f1", mode)]
                        accs.append(s.acc)
                        f1s.append(s.f1)
                    cells += [_pct(float(np.mean(accs))) if accs else "-", _pct(float(np.mean(f1s))) if f1s else "-"]
                    lines.append("| " + " | ".join(cells) + " |")
                lines.append("")
        if self.tasks:
            lines += self._facts_table()
        if self.skipped:
            lines.append("Skipped: " + "; ".join(self.skipped))
        return "\n".join(lines)

    def _facts_table(self) -> list[str]:
        """What each task's numbers rest on: rows skipped while loading, prompts left out, examples really held."""
        lines = ["### Task facts\n", "| Task | rows read | rows skipped | prompts | left out (too long) | "
                 "mean examples per prompt |", "|" + "---|" * 6]
        for f in self.tasks:
            skipped = ", ".join(f"{n} {why}" for why, n in f["skipped_rows"].items()) or "none"
            lines.append(f"| {f['title']} | {f['counts'].get('rows_read', 0)} | {skipped} | {f['evaluated']} | "
                         f"{f['too_long']} | {_examples(f)} |")
        return lines + [""]

    def to_json(self) -> dict:
        return dict(rows=[{**{k: v for k, v in r.items() if k != "score"}, **asdict(r["score"])} for r in self.rows],
                    tasks=self.tasks, skipped=self.skipped, meta=self.meta, predictions=self.predictions)


def task_facts(tp: TaskPrompts) -> dict:
    t = tp.task
    return dict(t.summary(), evaluated=len(tp.prompts), too_long=tp.n_too_long,
                examples_dropped_to_fit=tp.n_dropped_examples, k=tp.k, mean_examples=tp.mean_examples,
                skipped_rows=t.skipped_rows, load_note=t.load_note(), note=t.note,
                majority_label=t.majority_label())


def facts_line(facts: dict) -> str:
    """One line of what a task's numbers rest on: rows skipped, prompts left out, examples really held."""
    return (f"{facts['task']}: {facts['load_note']}; {facts['too_long']} prompt(s) left out as too long; "
            f"mean examples per prompt {_examples(facts)}")


def _examples(facts: dict) -> str:
    m = facts["mean_examples"]
    return (f"{'-' if m != m else f'{m:.2f}'} of k={facts['k']} "
            f"({facts['examples_dropped_to_fit']} dropped to fit the context)")


# ------------------------------------------------------------------------------------ CLI: evaluate
def _common_args(p) -> None:
    p.add_argument("--config", default=None, help="YAML run config (default: assets/zoo/run.yaml when present).")
    p.add_argument("--task", "--tasks", dest="tasks", action="append", default=[],
                   help="Task name or suite (table1, table2, all); repeatable or comma-separated. Default: all.")
    p.add_argument("--data-dir", default=None, help="Folder holding public/ and registry/ (default ../shared/data).")
    p.add_argument("--n", type=int, default=500, help="Test rows per task (seeded sample; all if fewer).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the row sample and the bootstrap.")
    p.add_argument("--split-seed", type=int, default=0, help="Seed of the train/test split of unsplit datasets.")
    p.add_argument("--k", type=int, default=5, help="In-context examples per prompt.")
    p.add_argument("--modes", default="generation,likelihood", help="Answer modes: generation, likelihood or both.")
    p.add_argument("--n-boot", type=int, default=1000, help="Bootstrap resamples for the 95 %% intervals.")
    p.add_argument("--batch-size", type=int, default=16, help="Prompts per forward pass.")
    p.add_argument("--protein-residues", type=int, default=None,
                   help="Show only the first N residues of each protein in prompts (the demo zoo was trained on "
                        "300); selection still compares whole sequences. Default: whole sequences.")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    p.add_argument("--min-test-rows", type=int, default=0,
                   help="Skip (with a message) tasks whose test split has fewer rows than this.")
    p.add_argument("--no-progress", action="store_true", help="No progress bars.")


def _setup(args, *, probes: bool = False):
    cfg = _config_path(args)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ESMError(f"--modes {args.modes!r} is not a list of {list(MODES)}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = expand_names(args.tasks or ["all"])
    tasks, skipped = load_tasks(names, args.data_dir, seed=args.split_seed,
                                log=lambda m: print(f"skipped: {m}", flush=True))
    for t in list(tasks):
        t.protein_residues = args.protein_residues
        if len(t.test) < args.min_test_rows:
            msg = f"Task {t.name!r} skipped: {len(t.test)} test rows, fewer than --min-test-rows {args.min_test_rows}."
            print(f"skipped: {msg}", flush=True)
            skipped.append(msg)
            tasks.remove(t)
    if not tasks:  # before the models load
        raise ESMError("No task could be evaluated: every task was skipped (" + "; ".join(skipped)[:400] + ").",
                       fix="check --task and --data-dir (the data directory must hold the task files).")
    ws = load_models(cfg, probes=probes)
    answerer = BatchedAnswerer(ws.sset, ws.encoders, batch_size=args.batch_size)
    return cfg, modes, tasks, skipped, ws, answerer


def _settings(args) -> dict:
    return {k: v for k, v in sorted(vars(args).items()) if isinstance(v, (str, int, float, bool, list, type(None)))}


def _prog(args, desc):
    return None if args.no_progress else tqdm_progress(desc)


def _evaluate_add(p) -> None:
    _common_args(p)
    p.add_argument("--model", default="base", help="'base', a specialist name, or a PEFT adapter directory.")
    p.add_argument("--out", default=None, help="JSON file for scores, task facts and per-row predictions "
                   "(refused if it exists, unless --overwrite; never an input).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing --out file.")


def _config_path(args) -> Path:
    cfg = args.config or default_config()
    if cfg is None:
        raise ESMError("No run config given and assets/zoo/run.yaml does not exist.", fix="pass --config run.yaml.")
    return Path(cfg)


def _inputs(args) -> list:
    """Every path evaluate/compare read: the run's inputs, the task data directory, an adapter --model."""
    from .cli import spec_inputs
    from .config import load_run_spec
    from .io import Input
    from .tasks import default_data_dir

    out = spec_inputs(load_run_spec(_config_path(args)))
    data = Path(args.data_dir) if args.data_dir else default_data_dir()
    if data is not None:
        out.append(Input(str(data), "task data directory"))
    model = getattr(args, "model", None)
    if model and model != "base" and Path(model).exists():
        out.append(Input(model, "adapter directory given as --model"))
    return out


def _evaluate_run(args) -> int:
    import contextlib

    from .io import reserve_output

    with contextlib.ExitStack() as stack:
        target = None
        if args.out:
            target = stack.enter_context(reserve_output(args.out, kind="file", overwrite=args.overwrite,
                                                        inputs=_inputs(args), command="evaluate"))
        return _evaluate(args, target)


def _evaluate(args, target) -> int:
    cfg, modes, tasks, skipped, ws, answerer = _setup(args)
    name, adapter = resolve_model(ws, args.model)
    rep = Report(skipped=skipped, meta=dict(command="evaluate", settings=_settings(args), config=str(cfg),
                                            model=args.model, n=args.n,
                                            seed=args.seed, split_seed=args.split_seed, k=args.k, modes=modes))
    for task in tasks:
        tp = task_prompts(task, answerer, n=args.n, seed=args.seed, k=args.k)
        rep.tasks.append(task_facts(tp))
        res = evaluate_model(answerer, tp, adapter, model_name=name, modes=modes, n_boot=args.n_boot,
                             seed=args.seed, progress=_prog(args, f"{name} / {task.name}"))
        rep.add_result(res, "model", task, keep_predictions=True)
        rep.add_references(tp, n_boot=args.n_boot, seed=args.seed)
        print(f"{task.name}: {len(tp.prompts)} prompts in {res.seconds:.1f}s", flush=True)
        print(facts_line(rep.tasks[-1]), flush=True)
    print(rep.markdown(modes))
    if target is not None:
        target.write_file(json.dumps(rep.to_json(), indent=1, default=str))
        print(f"written {target.path}")
    return 0


# ------------------------------------------------------------------------------------ CLI: compare
def _compare_add(p) -> None:
    _common_args(p)
    p.add_argument("--methods", default="all", help="Merge methods from the registry, comma-separated (default all).")
    p.add_argument("--no-base", action="store_true", help="Leave out the base model row.")
    p.add_argument("--no-specialists", action="store_true", help="Leave out the specialists' rows.")
    p.add_argument("--param", action="append", default=[], metavar="METHOD.NAME=VALUE",
                   help="A merge-method parameter, e.g. ties.density=0.3 (repeatable).")
    p.add_argument("--train-prompts", type=int, default=64,
                   help="Training-row prompts given to methods that learn from data (AdaMerging, fine-tuning).")
    p.add_argument("--data-scope", choices=("task", "suite"), default="task",
                   help="Methods that learn from data: one merge per task on its training prompts (task), or one "
                        "merge on the training prompts of every task together (suite, AdaMerging's multi-task setting).")
    p.add_argument("--out", required=True, help="Output folder: table.md, table.csv, results.json (refused if it "
                   "exists, unless --overwrite replaces a folder this tool wrote; never an input).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing --out folder written by esm_core.")


def _method_params(items: list[str]) -> dict[str, dict]:
    from .cli import _parse_value

    out: dict[str, dict] = {}
    for it in items:
        if "=" not in it or "." not in it.split("=", 1)[0]:
            raise ESMError(f"--param {it!r} is not METHOD.NAME=VALUE.", fix="write e.g. --param ties.density=0.3.")
        k, v = it.split("=", 1)
        m, n = k.split(".", 1)
        out.setdefault(m.strip(), {})[n.strip()] = _parse_value(v, f"--param {k.strip()}")
    return out


def merged_adapter(ws, method, params: dict, *, es_result=None, data=None, seed: int = 0, name: str,
                   progress: ProgressFn | None = None) -> tuple[str, dict]:
    """Run a registered merge method on the workspace's specialists and load the result as adapter ``name``."""
    from .merge import MergeContext, merged_config

    ctx = MergeContext.from_specialists(ws.sset, workspace=ws, es_result=es_result, data=data, seed=seed,
                                        progress=progress)
    t0 = time.perf_counter()
    out = method.run(ctx, params)
    cfg = merged_config(ws.sset.adapters[ws.sset.names[0]], ws.sset.base_path, ctx.folded)
    ws.sset.add_adapter(name, out.tensors, cfg)
    info = {k: v for k, v in out.info.items() if isinstance(v, (int, float, str, bool, list, dict))}
    info["merge_s"] = time.perf_counter() - t0
    return name, info


def _compare_run(args) -> int:
    from .io import reserve_output
    from .merge import get_method, list_methods

    # argument mistakes first (before the output is reserved and before any heavy work)
    params = _method_params(args.param)
    methods = ([m.name for m in list_methods()] if args.methods.strip().lower() == "all"
               else [m.strip() for m in args.methods.split(",") if m.strip()])
    resolved = {m: get_method(m) for m in methods}
    for m, meth in resolved.items():
        meth.resolve_params(params.get(m))
    for m in sorted(set(params) - set(resolved)):
        get_method(m)  # a typo is an error; a known method that is not compared is only noted
        print(f"note: --param for {m!r} ignored: it is not among the compared methods.", flush=True)
    with reserve_output(args.out, kind="dir", overwrite=args.overwrite, inputs=_inputs(args),
                        command="compare") as target:
        return _compare(args, target, params, methods, resolved)


def _compare(args, target, params: dict, methods: list[str], resolved: dict) -> int:
    from .pipeline import estimate

    needs_es = any("es" in m.needs for m in resolved.values())
    cfg, modes, tasks, skipped, ws, answerer = _setup(args, probes=needs_es)
    t_all = time.perf_counter()
    rep = Report(skipped=skipped, meta=dict(command="compare", settings=_settings(args), config=str(cfg),
                                            methods=methods, n=args.n,
                                            seed=args.seed, split_seed=args.split_seed, k=args.k, modes=modes,
                                            params=params, train_prompts=args.train_prompts,
                                            data_scope=args.data_scope, merges={}))
    tps = []
    for task in tasks:
        tp = task_prompts(task, answerer, n=args.n, seed=args.seed, k=args.k)
        tps.append(tp)
        rep.tasks.append(task_facts(tp))
        print(facts_line(rep.tasks[-1]), flush=True)
        rep.add_references(tp, n_boot=args.n_boot, seed=args.seed)

    def run_model(display, adapter, kind, only=None):
        for tp in tps if only is None else [only]:
            res = evaluate_model(answerer, tp, adapter, model_name=display, modes=modes, n_boot=args.n_boot,
                                 seed=args.seed, progress=_prog(args, f"{display} / {tp.task.name}"),
                                 keep_predictions=False)
            rep.add_result(res, kind, tp.task)
            print(f"{display} / {tp.task.name}: " + ", ".join(
                f"{m} acc {100 * s.acc:.1f} f1 {100 * s.f1:.1f}" for m, s in res.scores.items())
                + f" ({res.seconds:.1f}s)", flush=True)

    if not args.no_base:
        run_model("base", None, "base")
    if not args.no_specialists:
        for n in ws.sset.names:
            run_model(f"specialist: {n}", n, "specialist")
    es_result = None
    if needs_es:
        t0 = time.perf_counter()
        es_result = estimate(ws, progress=_prog(args, "ES coefficients"))
        rep.meta["es_estimate_s"] = time.perf_counter() - t0
    for m, meth in resolved.items():
        if "data" in meth.needs and args.data_scope == "suite":  # one merge on every task's training prompts
            data = [p for tp in tps for p in training_prompts(tp.task, args.train_prompts, seed=args.seed, k=args.k,
                                                               answerer=answerer)]
            name, info = merged_adapter(ws, meth, params.get(m, {}), es_result=es_result, data=data, seed=args.seed,
                                        name=f"merged_{m}", progress=_prog(args, meth.pretty))
            rep.meta["merges"][m] = info
            run_model(meth.pretty, name, "merge")
            ws.sset.remove_adapter(name)
        elif "data" in meth.needs:  # learns from the task: one merge per task, on its training prompts
            for tp in tps:
                data = training_prompts(tp.task, args.train_prompts, seed=args.seed, k=args.k, answerer=answerer)
                name, info = merged_adapter(ws, meth, params.get(m, {}), es_result=es_result, data=data,
                                            seed=args.seed, name=f"merged_{m}", progress=_prog(args, meth.pretty))
                rep.meta["merges"][f"{m}|{tp.task.name}"] = info
                run_model(meth.pretty, name, "merge", only=tp)
                ws.sset.remove_adapter(name)
        else:
            name, info = merged_adapter(ws, meth, params.get(m, {}), es_result=es_result, seed=args.seed,
                                        name=f"merged_{m}", progress=_prog(args, meth.pretty))
            rep.meta["merges"][m] = info
            run_model(meth.pretty, name, "merge")
            ws.sset.remove_adapter(name)
    rep.meta["total_s"] = time.perf_counter() - t_all
    rep.meta["device"] = str(ws.sset.device)
    md = rep.markdown(modes)

    def write(tmp: Path) -> None:
        (tmp / "table.md").write_text(md + "\n")
        rep.write_csv(tmp / "table.csv")
        (tmp / "results.json").write_text(json.dumps(rep.to_json(), indent=1, default=str))

    out_dir = target.write_dir(write)
    print(md)
    print(f"written {out_dir}/table.md, table.csv, results.json")
    return 0


COMMANDS["evaluate"] = (_evaluate_add, _evaluate_run,
                        "Few-shot evaluation of one model (base, specialist or adapter dir) on tasks; table + JSON.")
COMMANDS["compare"] = (_compare_add, _compare_run,
                       "Merge methods x task suite -> the paper's Table 1/2 layout (Markdown, CSV, JSON).")
