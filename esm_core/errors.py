"""The one exception type for mistakes a user can make.

Anything a user can cause (a bad SMILES, a wrong CSV column, mismatched adapters, an output
directory that already exists) raises :class:`ESMError` with a message that names the input and
says how to fix it. The app shows the message with ``st.error``; the CLI prints it on one line and
exits non-zero. Programming errors stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations


class ESMError(Exception):
    """A user-caused error: the message names the offending input and the fix."""

    def __init__(self, message: str, *, fix: str | None = None):
        self.reason = message
        self.fix = fix
        super().__init__(message if not fix else f"{message} Fix: {fix}")


class Cancelled(Exception):
    """Raised from a progress callback to stop long work; nothing half-written is kept."""
