"""The merge methods by name: an explicit list (methods never import this module).

    get_method("ties").run(MergeContext.from_specialists(sset), {"density": 0.2})
    list_methods()              # ES-Merging first, then the baselines alphabetically

``register`` adds a method at run time (a plug-in, or a test's own method) under its name.
"""

from __future__ import annotations

from esm_core.errors import ESMError
from esm_core.merging.base import MergeMethod
from esm_core.merging.methods import (
    adamerging,
    average,
    consensus,
    dare,
    emr,
    es,
    finetune,
    ls_merge,
    pcb,
    task_arithmetic,
    ties,
)

REGISTRY: dict[str, MergeMethod] = {m.name: m for m in (
    es.METHOD, average.METHOD, task_arithmetic.METHOD, ties.METHOD, dare.LINEAR, dare.TIES, emr.METHOD, pcb.METHOD,
    consensus.METHOD, adamerging.METHOD, finetune.METHOD, ls_merge.METHOD)}


def register(method: MergeMethod) -> MergeMethod:
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    if name not in REGISTRY:
        raise ESMError(f"Unknown merge method {name!r}.", fix=f"use one of {sorted(REGISTRY)}.")
    return REGISTRY[name]


def list_methods() -> list[MergeMethod]:
    return [REGISTRY[k] for k in sorted(REGISTRY, key=lambda n: (n != "es", n))]
