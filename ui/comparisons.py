"""The app's merge-method comparison (the Compare page): methods x tasks scored on the shared model, with
the CLI's loop (esm_core/benchmark/comparison.py), so the page and ``python -m esm_core compare`` give the
same numbers for the same settings. A comparison is computed once per key for every session (a store and
single flights like the estimations', ui.shared) and holds every model's answer to every question.
"""

from __future__ import annotations

from esm_core.benchmark.comparison import CompareSettings, run_comparison
from esm_core.benchmark.reports import Report
from esm_core.errors import ESMError
from esm_core.merging.registry import get_method

from . import caches, shared, state
from .session import current


def comparison_key(methods: list[str], tasks: list[str], data_dir: str | None, s: CompareSettings) -> str:
    """Everything the numbers depend on: the run, its probe samples and settings (ES uses them), the choice."""
    needs_es = any("es" in get_method(m).needs for m in methods)
    return caches.digest(dict(spec=state.spec_key(state.spec()), es=state.run_key() if needs_es else None,
                              method=state.method().resolved(), methods=methods, tasks=tasks,
                              data=str(data_dir or ""), settings=repr(s)))


def compare(methods: list[str], tasks: list[str], data_dir: str | None, s: CompareSettings,
            progress=None) -> tuple[Report, str]:
    """The comparison report for this choice, and how it was got (cached, joined, computed)."""
    if not tasks:
        raise ESMError("No task chosen.", fix="choose at least one task with data.")
    resolved = {m: get_method(m) for m in methods}
    for m, meth in resolved.items():
        meth.resolve_params(s.params.get(m))
    es_result = None
    if any("es" in meth.needs for meth in resolved.values()):
        es_result = state.result()
        if es_result is None:
            raise ESMError("ES-Merging needs the coefficients of the current selection.",
                           fix="run ES-Merging on the Overview page first, or leave ES out of the methods.")
    loaded = [caches.task(t, data_dir) for t in tasks]
    key = comparison_key(methods, tasks, data_dir, s)
    ws = state.workspace()
    cfg = state.method()
    prefix = f"cmp_{current().tag}_"

    def compute(report):
        answerer = caches.answerer(state.spec_key(state.spec()), ws)
        steps = {"n": 0}
        total = max(1, len(loaded) * ((1 if s.base else 0) + (len(ws.sset.names) if s.specialists else 0)
                                      + len(resolved) * len(s.spaces)))

        def prog(desc):
            def p(msg, frac):
                report(f"{desc}: {msg}", min(1.0, (steps["n"] + frac) / total))
            return p

        def log(_msg):
            steps["n"] += 1

        with ws.sset.gate.waiting(lambda ahead, secs, who: report(shared.waiting_text(ahead, secs, who), 0.0)), \
                ws.sset.exclusive("comparing merge methods"):
            return run_comparison(ws, answerer, loaded, resolved, s, es_result=es_result, config=cfg,
                                  adapter_prefix=prefix, keep_predictions=True, progress_for=prog, log=log)

    return shared.once(shared.comparison_store(), shared.comparison_flights(), key, compute, progress,
                       shared.MAX_COMPARISONS)


def cell_rows(rep: Report, model: str, task: str) -> list[dict]:
    """The questions behind one cell: each prompt's query, its examples with similarities, gold and answer."""
    preds = rep.predictions.get(f"{model}|{task}")
    tp = rep.prompts.get(task)
    if preds is None or tp is None:
        return []
    out = []
    for i, (p, d) in enumerate(zip(tp.prompts, preds)):
        chosen = p.meta.get("chosen", [])
        row = {"#": i, "test row": d["row"], "gold": d["gold"]}
        for f in tp.task.fields:
            v = tp.task.test[d["row"]].values.get(f.key, "") if isinstance(d["row"], int) else ""
            row[f.name] = v if len(v) <= 60 else v[:57] + "..."
        if "pred_likelihood" in d:
            row["answer (likelihood)"] = d["pred_likelihood"]
            row.update({f"p({k})": v for k, v in d.get("probs", {}).items()})
        if "pred_generation" in d:
            row["answer (generation)"] = d["pred_generation"]
            row["generated"] = d.get("generated", "")
        row["examples (label, similarity)"] = "; ".join(
            f"{tp.task.train[c.index].label} ({c.score:.2f})" for c in chosen)
        out.append(row)
    return out
