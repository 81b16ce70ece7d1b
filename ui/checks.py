"""Checks a run must pass before it becomes current: the allowed roots, its structure, and every
compatibility check of its specialists, base and encoders (esm_core.analysis.describe), without loading
model weights. The verdict is cached by the paths and the modification times of their files, so an
edited adapter is checked again.
"""

from __future__ import annotations

from pathlib import Path

from esm_core.pipeline import read_probe_samples
from esm_core.runspec import RunSpec

from . import caches, state
from .roots import check_spec_paths


def _stamp(path: str | None) -> str:
    """Path plus modification times of the files in it, so an edited adapter is checked again."""
    if not path:
        return ""
    p = Path(path)
    files = sorted(p.iterdir()) if p.is_dir() else [p]
    return path + ":" + ",".join(f"{f.name}@{f.stat().st_mtime_ns}" for f in files if f.is_file())


def verdict(sp: RunSpec | None = None):
    """The compatibility verdict (esm_core.analysis.describe.Verdict) of a spec's specialists, base and encoders,
    without loading model weights; paths are checked against the allowed roots first."""
    sp = sp or state.spec()
    check_spec_paths(sp)
    specs = tuple((s.name, s.adapter) for s in sp.specialists)
    encs = tuple((m.name, m.encoder) for m in sp.modalities)
    key = caches.digest([[(n, _stamp(a)) for n, a in specs], _stamp(sp.base) if Path(sp.base).is_dir() else sp.base,
                         sp.trust_remote_code, [(n, e.type, _stamp(e.path), e.options) for n, e in encs]])
    return caches.specialists_verdict(key, specs, sp.base, sp.trust_remote_code, encs)


def apply_spec(new: RunSpec):
    """Check a user's run (allowed roots, structure, every adapter/base/encoder check, probe data files)
    and make it current when it passes. Returns the verdict; raises ESMError for a refusal that stops
    the checks (a path outside the roots, an invalid structure, an unreadable data file)."""
    check_spec_paths(new)
    new.validate()
    v = verdict(new)
    if v.ok:
        read_probe_samples(new)
        state.set_spec(new)
    return v
