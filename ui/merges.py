"""This session's merged adapters: made with a registered method, loaded on the shared model under
names no other session can take, reloaded when the shared model evicted them.

A merge is shown as ``merged_ties_1`` but loaded as ``merged_ties_1__<session tag>``; the shared model
keeps the most recently used :data:`MAX_SHARED_MERGES` merged adapters (all sessions together), and
:func:`merged_adapters` reloads an evicted one from this session's copy of its factors, inside the
same hold of the model's gate.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

from esm_core.config import MethodConfig
from esm_core.errors import ESMError
from esm_core.merging.base import MergeContext
from esm_core.merging.output import update_report
from esm_core.merging.registry import get_method

from . import caches, shared, state
from .session import current

MAX_SHARED_MERGES = 16  # merged adapters kept on the shared model (all sessions together)


def merges() -> dict:
    """Merged adapters made in this session: display name -> {method, pretty, params, output, folded,
    scalings, key, adapter, es_config} (the Merge page adds seconds and data).

    Each is loaded on the shared base copy under ``adapter``, a name no other session can take (the
    display name plus this session's tag); the shared model keeps the most recently used ones and
    reloads an evicted one from ``output`` when it is needed again (see :func:`merged_adapters`).
    """
    return current().merges


def merge_name(method: str) -> str:
    n = 1 + sum(1 for v in merges().values() if v["method"] == method)
    return f"merged_{method}_{n}"


@contextlib.contextmanager
def merged_adapters(names, where=None):
    """Hold the shared model with this session's merges ``names`` loaded; yields display -> adapter name."""
    with state.shared_model_turn(where) as sset, sset.exclusive("answering"):
        out = {}
        template = sset.adapters[sset.names[0]]
        for n in names:
            m = merges().get(n)
            if m is None:
                raise ESMError(f"No merged model named {n!r} in this session.", fix="merge on the Merge page first.")
            cfg = m["output"].adapter_config(template, sset.base_path, m["folded"])
            out[n] = sset.ensure_adapter(m["adapter"], lambda m=m: m["output"].tensors, cfg, keep=MAX_SHARED_MERGES)
        yield out


def run_merge(method_name: str, params: dict, *, data=None, progress=None) -> str:
    """Merge with a registered method (ES uses the current result); returns the merge's display name."""
    method = get_method(method_name)
    ws = state.workspace()
    res = state.result() if "es" in method.needs else None
    if "es" in method.needs and res is None:
        raise ESMError("ES-Merging needs the coefficients of the current selection.",
                       fix="run ES-Merging on the Overview page first.")
    ctx = MergeContext.from_specialists(ws.sset, workspace=ws, es_result=res, data=data, seed=state.method_seed(),
                                        progress=progress, config=state.method())
    with ws.sset.gate.waiting(lambda ahead, secs, who: progress and progress(shared.waiting_text(ahead, secs, who),
                                                                               0.0)):
        out = method.run(ctx, params)
    name = merge_name(method_name)
    merges()[name] = dict(method=method_name, pretty=method.pretty, params=out.info.get("params", params),
                          output=out, folded=ctx.folded, scalings=ctx.scalings, key=state.run_key(),
                          adapter=f"{name}__{current().tag}", updates=update_report(out, ctx, ctx.folded),
                          es_config=res.config.resolved() if res is not None else None)
    return name


def merged_states(name: str, cfg: MethodConfig):
    """Hidden states of a session merge on the current probes (cached; computed holding the model)."""
    ws = state.workspace()
    with merged_adapters([name]) as adapters:
        hs = caches.merged_hidden_states(f"{state.run_key(cfg)}:{adapters[name]}", adapters[name], ws, cfg)
    return replace(hs, models=[name])  # this session's name for it, not the shared adapter's
