"""Benchmark reports (docs/METHOD.md section 7): the paper's Table 1/2 layout, CSV and JSON, and task facts.

A :class:`Report` collects one score per (model, task, answer mode) and the reference rows, and
renders them as Markdown tables (rows = models, columns = datasets grouped by task family, Acc and
macro-F1 with their bootstrap intervals), CSV rows or JSON; the task facts say what each task's
numbers rest on (rows skipped while loading, prompts left out as too long, examples really held).
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from esm_core.benchmark.harness import MODES, ModelResult, TaskPrompts, reference_scores
from esm_core.benchmark.metrics import Score
from esm_core.benchmark.taskdata import TaskData


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
    prompts: dict = field(default_factory=dict, repr=False)  # task -> TaskPrompts (in memory only)

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
                windowed=tp.n_windowed, mean_window=tp.mean_window,
                skipped_rows=t.skipped_rows, load_note=t.load_note(), note=t.note,
                majority_label=t.majority_label())


def facts_line(facts: dict) -> str:
    """One line of what a task's numbers rest on: rows skipped, prompts left out, examples really held."""
    return (f"{facts['task']}: {facts['load_note']}; {facts['too_long']} prompt(s) left out as too long; "
            f"mean examples per prompt {_examples(facts)}")


def _examples(facts: dict) -> str:
    m = facts["mean_examples"]
    w = facts.get("windowed", 0)
    win = (f"; proteins of {w} prompt(s) windowed to a mean {facts['mean_window']:.0f} residues" if w else "")
    return (f"{'-' if m != m else f'{m:.2f}'} of k={facts['k']} "
            f"({facts['examples_dropped_to_fit']} dropped to fit the context{win})")
