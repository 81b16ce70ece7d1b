"""Script threads give way to the server's event loop.

Every browser session's script run is an OS thread of the server process; the event loop (health checks,
websockets: every session's page updates) is one more. On a small machine with a room of sessions the runnable
threads outnumber the cores, and at equal priority the event loop waits for a core behind estimations and page
runs. ``lower_this_thread`` raises the calling script thread's nice value (Linux: per thread) to
``ESM_SCRIPT_NICE`` (default 5; 0 turns it off), so the kernel runs the event loop first whenever both are
ready. Threads the script thread starts afterwards inherit the value: torch's intra-op worker, which the OpenMP
runtime creates for each thread that runs a parallel operation, runs at the script thread's nice too.

It only ever lowers priority, so it needs no privileges, and a thread that already runs lower is left alone.
A server alone on its machine loses nothing by it (nice orders threads only while they compete for a core);
a server that shares its cores with other programs gives them a larger share of the CPU than before.

Measured with bench/bench_workshop.py --sessions 8 --rooms 10 (2 cores, the room's browsers at nice 10): the
slowest health answer per room was 0.27-0.78 s with it, 10 rooms of 10 within the 1 s target; 0.27-1.87 s
without it, 7 of 10.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

DEFAULT_NICE = 5
_log = logging.getLogger(__name__)
_warned: set[str] = set()


def script_nice() -> int:
    """The nice value script threads take: ESM_SCRIPT_NICE (0-19), DEFAULT_NICE when unset. A value that is
    not an integer is logged once and the default used: a server setting must not stop every page."""
    raw = os.environ.get("ESM_SCRIPT_NICE")
    if raw is None or raw.strip() == "":
        return DEFAULT_NICE
    try:
        return max(0, min(19, int(raw)))
    except ValueError:
        if raw not in _warned:
            _warned.add(raw)
            _log.warning("ESM_SCRIPT_NICE=%r is not an integer; using %d. Set it to 0-19 (0: script threads "
                         "keep the server's priority).", raw, DEFAULT_NICE)
        return DEFAULT_NICE


def lower_this_thread(nice: int | None = None) -> int | None:
    """Set this thread's nice value to at least ``nice`` (default script_nice()). Returns the value it now has,
    or None where nice is 0 or the platform has no per-thread priority."""
    nice = script_nice() if nice is None else nice
    if nice <= 0 or not hasattr(os, "setpriority") or not sys.platform.startswith("linux"):
        return None
    tid = threading.get_native_id()  # Linux: PRIO_PROCESS with a thread id sets that thread alone
    try:
        now = os.getpriority(os.PRIO_PROCESS, tid)
        if now < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        return None
