"""One turn at a time on a shared model: a fair, reentrant gate with queue places and expected waits.

A loaded :class:`~esm_core.specialists.SpecialistSet` is one PEFT model whose active adapter, hooks
and gradient flags are global state. When several threads use it (the app serves every browser
session from one cached model), each whole operation that touches that state — an estimation, a
forward pass over the probes, answering prompts, loading or removing an adapter, a learned merge —
runs inside ``gate.hold(label)``: first come, first served; a thread that already holds the gate
may enter again (operations nest).

A waiting thread can be told where it stands: ``on_wait(ahead, expected_s, holder)`` is called about
twice a second while it waits (``ahead``: operations before it, the running one included), with an
expected wait from the typical duration
of each queued operation's label (a running mean of past holds). A callback may raise (a cancelled
app script does) and the waiter leaves the queue cleanly.

    with sset.gate.hold("estimation", on_wait=lambda ahead, s, who: print(ahead, s, who)):
        ...

``waiting(callback)`` sets a default ``on_wait`` for every hold the current thread makes inside it,
so an app can show the queue for work started deep inside the engine.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

WaitFn = Callable[[int, float, str], None]


@dataclass(eq=False)
class _Ticket:
    label: str
    thread: int
    since: float = field(default_factory=time.monotonic)


class ModelGate:
    """A FIFO, reentrant lock for one shared model (see the module doc)."""

    def __init__(self, poll_s: float = 0.5):
        self._cv = threading.Condition()
        self._queue: deque[_Ticket] = deque()
        self._owner: int | None = None
        self._depth = 0
        self._holder: _Ticket | None = None
        self._typical: dict[str, float] = {}
        self._local = threading.local()
        self.poll_s = poll_s

    # ---------------------------------------------------------------- state, for display and tests
    @property
    def busy(self) -> bool:
        return self._owner is not None

    def held_by_me(self) -> bool:
        return self._owner == threading.get_ident()

    def queue_length(self) -> int:
        with self._cv:
            return len(self._queue)

    def typical_seconds(self, label: str) -> float | None:
        return self._typical.get(label)

    # ---------------------------------------------------------------- waiting
    @contextlib.contextmanager
    def waiting(self, on_wait: WaitFn) -> Iterator[None]:
        """Default on_wait for the holds this thread makes inside the block."""
        old = getattr(self._local, "on_wait", None)
        self._local.on_wait = on_wait
        try:
            yield
        finally:
            self._local.on_wait = old

    def _expected(self, ticket: _Ticket) -> float:
        """Seconds until ticket's turn: the holder's remaining typical time plus each one ahead."""
        now = time.monotonic()
        total = 0.0
        if self._holder is not None:
            typ = self._typical.get(self._holder.label, 0.0)
            total += max(0.0, typ - (now - self._holder.since))
        for t in self._queue:
            if t is ticket:
                break
            total += self._typical.get(t.label, 0.0)
        return total

    # ---------------------------------------------------------------- the gate
    @contextlib.contextmanager
    def hold(self, label: str = "model work", on_wait: WaitFn | None = None) -> Iterator[None]:
        me = threading.get_ident()
        on_wait = on_wait or getattr(self._local, "on_wait", None)
        with self._cv:
            if self._owner == me:
                self._depth += 1
                reentered = True
            else:
                reentered = False
                ticket = _Ticket(label, me)
                self._queue.append(ticket)
        if not reentered:
            self._wait_for_turn(ticket, on_wait)
        try:
            yield
        finally:
            with self._cv:
                self._depth -= 1
                if self._depth == 0:
                    held = self._holder
                    self._owner, self._holder = None, None
                    if held is not None:
                        took = time.monotonic() - held.since
                        old = self._typical.get(held.label)
                        self._typical[held.label] = took if old is None else 0.7 * old + 0.3 * took
                    self._cv.notify_all()

    def _wait_for_turn(self, ticket: _Ticket, on_wait: WaitFn | None) -> None:
        try:
            while True:
                with self._cv:
                    if self._owner is None and self._queue[0] is ticket:
                        self._queue.popleft()
                        self._owner, self._depth = ticket.thread, 1
                        ticket.since = time.monotonic()
                        self._holder = ticket
                        return
                    ahead = list(self._queue).index(ticket) + (1 if self._owner is not None else 0)
                    expected = self._expected(ticket)
                    holder = self._holder.label if self._holder is not None else ""
                    if on_wait is None:
                        self._cv.wait(self.poll_s)
                        continue
                on_wait(ahead, expected, holder)  # outside the lock: it may draw, or raise to cancel
                with self._cv:
                    if not (self._owner is None and self._queue[0] is ticket):
                        self._cv.wait(self.poll_s)
        except BaseException:
            with self._cv:
                if ticket in self._queue:
                    self._queue.remove(ticket)
                    self._cv.notify_all()
            raise
