"""Running the few-shot benchmark (docs/METHOD.md section 7): prompts, scores per model, the app's queries.

A task's sampled test rows get their few-shot prompts once (:func:`task_prompts`; a prompt longer
than the model's context loses its least similar examples, and is left out when even the minimum
does not fit); every model is then scored on the same prompts by generation and / or label
likelihood (:func:`evaluate_model`), beside the two reference rows (:func:`reference_scores`).
For the app: a query's prompt with its chosen examples (:func:`build_query`), several models'
answers side by side, and a merge run loaded as an adapter (:func:`merged_adapter`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from esm_core.answering.batched import BatchedAnswerer
from esm_core.answering.prompts import Prompt
from esm_core.benchmark.metrics import Score, bootstrap_scores, retrieval_majority
from esm_core.benchmark.taskdata import Record, TaskData
from esm_core.errors import ESMError
from esm_core.merging.base import MergeContext
from esm_core.progress import ProgressFn

MODES = ("generation", "likelihood")


MIN_PROTEIN_WINDOW = 48  # residues: proteins are never windowed below this to make room for examples


def _longest_protein(task: TaskData, record: Record, chosen) -> int:
    recs = [record] + [task.train[c.index] for c in chosen]
    lens = [len(r.values[f.key]) for r in recs for f in task.fields if f.modality == "protein"]
    lens += [len(i.raw) for _, i in task.context if i.modality == "protein"]
    return max(lens, default=0)


def fit_prompt(task: TaskData, record: Record, answerer: BatchedAnswerer, k: int = 5, exclude=None,
               min_examples: int = 0) -> Prompt | None:
    """The task's prompt for a record with up to k examples, fitted to the model's context.

    First every protein of the prompt (the examples', the query's, the context's) is windowed to its first
    N residues, N as large as lets all the chosen examples fit (never below ``MIN_PROTEIN_WINDOW``;
    ``meta['protein_window']``, None when nothing was cut). Only when that is not enough are the least
    similar examples dropped (``meta['dropped']``). None when even ``min_examples`` examples do not fit.
    """
    chosen = task.select(record, k, exclude)
    fits = lambda p: answerer.prompt_length(p) <= answerer.max_length  # noqa: E731
    p = task.prompt(record, chosen=chosen)
    window = None
    if not fits(p) and task.shows_proteins:
        longest = min(_longest_protein(task, record, chosen), task.protein_residues or 10**9)
        lo, hi = MIN_PROTEIN_WINDOW, longest - 1  # the largest window in [lo, hi] that fits, by bisection
        if lo <= hi:
            window, p = lo, task.prompt(record, chosen=chosen, residues=lo)
            if fits(p):
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    q = task.prompt(record, chosen=chosen, residues=mid)
                    if fits(q):
                        lo, p = mid, q
                    else:
                        hi = mid - 1
                window = lo
    for j in range(len(chosen), min(min_examples, len(chosen)) - 1, -1):
        if j < len(chosen):
            p = task.prompt(record, chosen=chosen[:j], residues=window)
        if fits(p):
            p.meta["dropped"] = len(chosen) - j
            p.meta["selected"] = list(chosen)
            return p
    return None


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
    n_windowed: int = 0  # prompts whose proteins were windowed to fit (fit_prompt)

    @property
    def gold(self) -> list[str]:
        return [p.answer for p in self.prompts]

    @property
    def mean_examples(self) -> float:
        """Mean number of in-context examples the prompts really hold (after any dropped to fit); NaN if none."""
        return float(np.mean([len(p.meta["chosen"]) for p in self.prompts])) if self.prompts else float("nan")

    @property
    def mean_window(self) -> float:
        """Mean protein window (residues) of the windowed prompts; NaN if none was windowed."""
        w = [p.meta["protein_window"] for p in self.prompts if p.meta.get("protein_window")]
        return float(np.mean(w)) if w else float("nan")


def task_prompts(task: TaskData, answerer: BatchedAnswerer | None, *, n: int | None = 500, seed: int = 0, k: int = 5,
                 min_examples: int = 0) -> TaskPrompts:
    """Sample ``n`` test rows (seeded, without replacement; all when fewer) and build their prompts.

    Prompts longer than the model's context get their proteins windowed (``n_windowed``), then lose their
    least similar examples; rows that do not fit even with ``min_examples`` are left out and counted
    (``n_too_long``).
    """
    N = len(task.test)
    if n is None or n >= N:
        rows = list(range(N))
    else:
        rows = sorted(np.random.default_rng(seed).choice(N, size=n, replace=False).tolist())
    kept, prompts, too_long, dropped, windowed = [], [], 0, 0, 0
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
        windowed += bool(p.meta.get("protein_window"))
        p.meta["row"] = r
        kept.append(r)
        prompts.append(p)
    return TaskPrompts(task, kept, prompts, too_long, dropped, k, windowed)


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
        import pandas as pd  # lazy: pandas is slow to import and only this table needs it here

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


def merged_adapter(ws, method, params: dict, *, es_result=None, data=None, seed: int = 0, name: str,
                   progress: ProgressFn | None = None, space: str | None = None, config=None) -> tuple[str, dict]:
    """Run a registered merge method on the workspace's specialists and load the result as adapter ``name``
    (``space``: factors or delta; default the merge_space of ``config``, else of the run)."""

    ctx = MergeContext.from_specialists(ws.sset, workspace=ws, es_result=es_result, data=data, seed=seed,
                                        progress=progress, config=config or ws.spec.method,
                                        **({"space": space} if space else {}))
    t0 = time.perf_counter()
    out = method.run(ctx, params)
    cfg = out.adapter_config(ws.sset.adapters[ws.sset.names[0]], ws.sset.base_path, ctx.folded)
    ws.sset.add_adapter(name, out.tensors, cfg)
    info = {k: v for k, v in out.info.items() if isinstance(v, (int, float, str, bool, list, dict))}
    info["merge_s"] = time.perf_counter() - t0
    return name, info
