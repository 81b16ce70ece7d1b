"""Merge methods x tasks -> a :class:`Report` in the paper's Table 1/2 layout (docs/METHOD.md section 7).

One loop shared by ``python -m esm_core compare`` and the app's Compare page, so both give the same
numbers for the same settings:

    rep = run_comparison(ws, answerer, tasks, {"es": get_method("es"), ...}, settings, es_result=res)

Per task: the test prompts (k examples each, fitted to the context), the two reference rows, then the
base, each specialist and every method (in every requested merge space). A method that learns from data
merges once per task on that task's training prompts (``data_scope="task"``) or once on every task's
(``"suite"``). Each merged adapter is loaded under a name of the caller's choosing and removed after it
was scored; ``keep_predictions`` keeps every model's answer to every prompt (the rows behind a cell).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from esm_core.benchmark.harness import evaluate_model, merged_adapter, task_prompts, training_prompts
from esm_core.benchmark.reports import Report, task_facts
from esm_core.progress import ProgressFn


@dataclass(frozen=True)
class CompareSettings:
    n: int | None = 500
    seed: int = 0
    k: int = 5
    modes: tuple[str, ...] = ("generation", "likelihood")
    n_boot: int = 1000
    spaces: tuple[str | None, ...] = (None,)  # None: the run's merge_space, unlabelled
    params: dict = field(default_factory=dict)  # method -> {param: value}
    train_prompts: int = 64
    data_scope: str = "task"
    base: bool = True
    specialists: bool = True


def run_comparison(ws, answerer, tasks: list, methods: dict, s: CompareSettings, *, es_result=None, config=None,
                   adapter_prefix: str = "merged_", keep_predictions: bool = False,
                   progress_for: Callable[[str], ProgressFn | None] | None = None,
                   log: Callable[[str], None] | None = None, report: Report | None = None,
                   on_task: Callable[[dict], None] | None = None) -> Report:
    """Score base, specialists and merges on every task; returns the filled Report (``report`` if given)."""
    prog = progress_for or (lambda desc: None)
    say = log or (lambda msg: None)
    rep = report or Report()
    rep.prompts = {}
    rep.meta.setdefault("merges", {})
    t_all = time.perf_counter()
    tps = []
    for task in tasks:
        tp = task_prompts(task, answerer, n=s.n, seed=s.seed, k=s.k)
        tps.append(tp)
        rep.prompts[task.name] = tp  # what the rows behind a cell show (not written to JSON)
        rep.tasks.append(task_facts(tp))
        if on_task:
            on_task(rep.tasks[-1])
        rep.add_references(tp, n_boot=s.n_boot, seed=s.seed)

    def run_model(display, adapter, kind, only=None):
        for tp in tps if only is None else [only]:
            res = evaluate_model(answerer, tp, adapter, model_name=display, modes=s.modes, n_boot=s.n_boot,
                                 seed=s.seed, progress=prog(f"{display} / {tp.task.name}"),
                                 keep_predictions=keep_predictions)
            rep.add_result(res, kind, tp.task, keep_predictions=keep_predictions)
            say(f"{display} / {tp.task.name}: " + ", ".join(
                f"{m} acc {100 * sc.acc:.1f} f1 {100 * sc.f1:.1f}" for m, sc in res.scores.items())
                + f" ({res.seconds:.1f}s)")

    if s.base:
        run_model("base", None, "base")
    if s.specialists:
        for n in ws.sset.names:
            run_model(f"specialist: {n}", n, "specialist")
    for (m, meth), space in ((mm, sp) for mm in methods.items() for sp in s.spaces):
        pretty = meth.pretty + (f" [{space}]" if space else "")
        key = m + (f"|{space}" if space else "")
        common = dict(es_result=es_result, seed=s.seed, name=f"{adapter_prefix}{m}", space=space,
                      progress=prog(pretty), config=config)
        if "data" in meth.needs and s.data_scope == "suite":  # one merge on every task's training prompts
            data = [p for tp in tps for p in training_prompts(tp.task, s.train_prompts, seed=s.seed, k=s.k,
                                                               answerer=answerer)]
            name, info = merged_adapter(ws, meth, s.params.get(m, {}), data=data, **common)
            rep.meta["merges"][key] = info
            try:
                run_model(pretty, name, "merge")
            finally:
                ws.sset.remove_adapter(name)
        elif "data" in meth.needs:  # learns from the task: one merge per task, on its training prompts
            for tp in tps:
                data = training_prompts(tp.task, s.train_prompts, seed=s.seed, k=s.k, answerer=answerer)
                name, info = merged_adapter(ws, meth, s.params.get(m, {}), data=data, **common)
                rep.meta["merges"][f"{key}|{tp.task.name}"] = info
                try:
                    run_model(pretty, name, "merge", only=tp)
                finally:
                    ws.sset.remove_adapter(name)
        else:
            name, info = merged_adapter(ws, meth, s.params.get(m, {}), **common)
            rep.meta["merges"][key] = info
            try:
                run_model(pretty, name, "merge")
            finally:
                ws.sset.remove_adapter(name)
    rep.meta["total_s"] = time.perf_counter() - t_all
    rep.meta["device"] = str(ws.sset.device)
    return rep
