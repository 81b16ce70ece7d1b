"""Keep Python's cyclic garbage collector off the libraries' objects in the server process.

With torch, transformers, peft, POT, plotly and the app loaded, the heap holds ~560,000 objects that live as
long as the process (modules, classes, functions, their dicts). Every collection of the oldest generation walks
all of them while holding the GIL: 0.25-0.4 s measured here, on whatever thread triggered it, the server's event
loop included (a room of 8 sessions at N = 8 logged full collections of 0.33-0.41 s on script threads and on the
event loop; health answers waited behind them). ``freeze_long_lived`` imports what the pages end up loading and
moves every object alive at that moment into the collector's permanent generation (``gc.freeze``): later full
collections walk only what was made afterwards (0.30 s -> 0.00 s measured on those imports alone).

It runs once per process, at the end of the first script run (the instructor's first visit). Objects alive then
are never collected as cycles; they are the libraries plus one session's state, freed by reference counting as
usual. Streamlit's own full collection after every script run is off (.streamlit/config.toml).
"""

from __future__ import annotations

import gc
import importlib
import threading
import time

# modules the pages load on their first use (estimation, merges, answers, figures); imported before the freeze
WARM_MODULES = ("esm_core.pipeline", "esm_core.models", "esm_core.merging.registry", "peft", "ot",
                "transformers.models.llama.modeling_llama", "plotly.graph_objects", "pandas")

_lock = threading.Lock()
_done: dict = {}


def freeze_long_lived(modules: tuple[str, ...] = WARM_MODULES) -> dict | None:
    """Once per process: import modules, collect once, then gc.freeze(). Returns what it did the first time
    ({"objects", "seconds"}), None on every later call."""
    with _lock:
        if _done:
            return None
        t0 = time.perf_counter()
        for name in modules:
            importlib.import_module(name)
        gc.collect()  # what is garbage now is not frozen
        gc.freeze()
        _done.update(objects=gc.get_freeze_count(), seconds=time.perf_counter() - t0)
        return dict(_done)


def frozen() -> dict:
    """What the freeze did in this process ({} before it ran)."""
    return dict(_done)
