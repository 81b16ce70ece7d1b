"""Script threads yield the CPU to the server's event loop.

Every browser session's script run is an OS thread of the server process; the event loop (health checks,
websockets, static files) is one more. On a small machine with a room of sessions the runnable threads outnumber
the cores, and the event loop waits for a core as often as any script thread. ``lower_this_thread`` raises the
calling script thread's nice value (Linux: per thread) by ``ESM_SCRIPT_NICE`` (default 5; 0 turns it off), so the
kernel runs the event loop first whenever both are ready. Threads the script thread starts afterwards (torch's
worker pool is created once per process) inherit it. Only ever lowers priority: it needs no privileges, and a
thread that already runs lower is left alone.
"""

from __future__ import annotations

import os
import threading

_seen: set[int] = set()


def script_nice() -> int:
    try:
        return max(0, min(19, int(os.environ.get("ESM_SCRIPT_NICE", "5"))))
    except ValueError:
        return 5


def lower_this_thread(nice: int | None = None) -> int | None:
    """Set this thread's nice value to at least ``nice`` (default script_nice()); returns the value it now has,
    or None where the platform has no per-thread priority or nice is 0."""
    nice = script_nice() if nice is None else nice
    if nice <= 0 or not hasattr(os, "setpriority"):
        return None
    tid = threading.get_native_id()
    try:
        now = os.getpriority(os.PRIO_PROCESS, tid)
        if now < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        return None
