"""Progress reporting: the callback type every long operation takes, and a terminal bar for the CLI.

A progress callback is ``progress(message, fraction)`` with fraction in [0, 1]; it may raise
:class:`~esm_core.errors.Cancelled` (or anything else) to stop the work, which then keeps nothing.
The app draws it with ``ui.widgets.timed_progress``; the CLI with :func:`tqdm_progress`.
"""

from __future__ import annotations

import sys
from typing import Callable

ProgressFn = Callable[[str, float], None]


def tqdm_progress(desc: str = "ES-Merging") -> ProgressFn:
    """A progress callback drawing one tqdm bar on stderr."""
    from tqdm import tqdm

    bar = tqdm(total=1000, desc=desc, unit="‰", leave=False, file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")

    def cb(msg: str, frac: float):
        bar.set_postfix_str(msg[:40])
        bar.n = int(1000 * min(max(frac, 0.0), 1.0))
        bar.refresh()
        if frac >= 1.0:
            bar.close()
    return cb
