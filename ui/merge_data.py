"""What the Merge page shows and builds, apart from its widgets: where a learned method's training
prompts come from and the prompts themselves, the rows of the session's merge list, and the files of
a merged adapter for download (with the ES result it was made from, when the session still has it).

Learned methods (AdaMerging, fine-tuning) draw their prompts from a benchmark task's TRAINING rows
(``esm_core.benchmark.harness.training_prompts``) or from the demo zoo's skills on the demo data's
train split (``esm_core.zoo.training.skill_training_prompts``).
"""

from __future__ import annotations

from pathlib import Path

from esm_core import paths
from esm_core.answering.batched import BatchedAnswerer
from esm_core.benchmark.harness import training_prompts
from esm_core.benchmark.tasks import list_tasks
from esm_core.config import MethodConfig
from esm_core.errors import ESMError
from esm_core.merging.output import merged_files
from esm_core.paths import default_data_dir
from esm_core.zoo.data import DEMO_FILES
from esm_core.zoo.skills import SKILLS
from esm_core.zoo.training import skill_training_prompts

from . import caches, state
from .session import current


# ------------------------------------------------------------------------------------ training data
def available_tasks():
    """(data directory or None, registered tasks whose files are all there)."""
    d = default_data_dir()
    if d is None:
        return None, []
    return d, [t for t in list_tasks() if all((d / f).is_file() for f in t.files)]


def demo_available() -> bool:
    # paths.DEMO_DIR is read on each call, not bound at import: ui modules load once per process
    return all((Path(paths.DEMO_DIR) / f).is_file() for f in DEMO_FILES)


def default_skills() -> list[str]:
    """The first skill of every modality."""
    return [next(s.name for s in SKILLS if s.modality == m) for m in dict.fromkeys(s.modality for s in SKILLS)]


def learned_work(choice: dict | None, params: dict) -> tuple[int, int] | None:
    """(prompts per evaluation, batches in all) of a learned method with these settings, or None when
    the method takes no steps or there is no usable data choice."""
    if choice is None or not choice.get("ok") or not {"steps", "batch_size"} <= set(params):
        return None
    n = int(choice["n"]) * len(choice["names"])
    return n, int(params["steps"]) + 2 * -(-n // max(1, int(params["batch_size"])))


def build_data(choice: dict, seed: int) -> tuple[list, str]:
    """The prompts of a data choice and a one-line description; ESMError for a mistake."""
    if not choice.get("ok"):
        raise ESMError("This method needs training prompts, but the chosen source has no data.",
                       fix="choose an available source above.")
    if not choice["names"]:
        raise ESMError(f"No {'task' if choice['source'] == 'task' else 'skill'} is chosen for the training prompts.",
                       fix="pick at least one above.")
    ws = state.workspace()
    answerer = BatchedAnswerer(ws.sset, ws.encoders)
    if choice["source"] == "task":
        prompts = []
        for name in choice["names"]:
            prompts += training_prompts(caches.task(name, choice["dir"]), choice["n"], seed=seed, k=choice["k"],
                                        answerer=answerer)
        what = f"{', '.join(choice['names'])}: training rows, k={choice['k']}"
    else:
        prompts = skill_training_prompts(choice["names"], choice["n"], k=choice["k"], seed=seed)
        what = f"skills {', '.join(choice['names'])} (train split), k={choice['k']}"
    kept = [p for p in prompts if answerer.prompt_length(p) <= answerer.max_length]
    if not kept:
        raise ESMError(f"None of the {len(prompts)} training prompts fits the model's context of "
                       f"{answerer.max_length} tokens.", fix="lower k (fewer in-context examples).")
    dropped = len(prompts) - len(kept)
    return kept, f"{len(kept)} prompts from {what}" + (f" ({dropped} too long, left out)" if dropped else "")


# ------------------------------------------------------------------------------------ the merge list
def fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items()) or "—"


def fmt_info(info: dict) -> str:
    parts = []
    for k, v in info.items():
        if k in ("method", "params") or isinstance(v, bool):
            continue
        if isinstance(v, float):
            parts.append(f"{k}={v:.4g}")
        elif isinstance(v, (int, str)) and v != "":
            parts.append(f"{k}={v}")
    return ", ".join(parts)


def merge_rows(merges: dict) -> list[dict]:
    """One row per merge of the session, for the page's table."""
    rows = []
    for n, e in merges.items():
        out = e["output"]
        rows.append(dict(name=n, method=e["pretty"], parameters=fmt_params(e["params"]),
                         space=(f"delta (rank {out.rank})" if out.info.get("space") == "delta" else "factors"),
                         coefficients="per element" if out.coefficients is not None else "none",
                         details=fmt_info(out.info), data=e.get("data") or "—",
                         scaling="folded into B" if e["folded"] else "shared",
                         seconds=round(float(e.get("seconds", float("nan"))), 2)))
    return rows


# ------------------------------------------------------------------------------------ downloads
def es_result_of(entry: dict):
    """The ES result a merge was made from, if the session still has it (same pass, same settings)."""
    d = entry.get("es_config")
    if not d:
        return None
    try:
        cfg = MethodConfig.from_dict(d)
    except ESMError:
        return None
    if state.run_key(cfg) != entry.get("key"):
        return None
    res = state.result(cfg)
    if res is None or entry["output"].info.get("mode", res.config.mode) != res.config.mode:
        return None  # the merge used another ES mode than the estimation: its own lambda is written instead
    return res


def files_getter(name: str, entry: dict):
    """A callable for deferred downloads: writes the merged adapter once and keeps its files."""
    res = es_result_of(entry)
    extra = {"merge_name": name}
    if entry.get("es_config") and res is None:
        extra["es_config_at_merge"] = entry["es_config"]
        extra["note"] = ("the ES signals of this merge are not in coefficients.safetensors (the estimation "
                         "changed since, or the merge used another ES mode); it holds the merge's lambda")
    if entry.get("data"):
        extra["training_data"] = entry["data"]
    memo = current().merge_files.setdefault(f"{name}:{id(entry['output'])}:{res is not None}", {})
    sset, sp = state.workspace().sset, state.spec()

    def get() -> dict[str, bytes]:
        if "files" not in memo:
            memo["files"] = merged_files(entry["output"], sset, spec=sp, es_result=res, folded=entry["folded"],
                                         scalings=entry["scalings"], manifest_extra=extra,
                                         updates=entry.get("updates"))
        return memo["files"]

    return get, res is not None or entry["output"].coefficients is not None or bool(entry["output"].extra_tensors)
