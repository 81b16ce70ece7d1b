"""The app's path policy: which directories the workbench may read.

Model, adapter, encoder and data paths must lie under the allowed roots: the repository's ``assets/``
(the demo zoo) plus directories named in the environment variable ``ESM_ALLOWED_ROOTS``
(os.pathsep-separated). Every path a user, a run config or a session file names is checked here.
"""

from __future__ import annotations

import os
from pathlib import Path

from esm_core.errors import ESMError
from esm_core.runspec import RunSpec

ROOT = Path(__file__).resolve().parents[1]


def allowed_roots() -> list[Path]:
    roots = [ROOT / "assets"]
    extra = os.environ.get("ESM_ALLOWED_ROOTS", "")
    roots += [Path(p).expanduser() for p in extra.split(os.pathsep) if p.strip()]
    return [r.resolve() for r in roots]


def check_allowed(path: str | Path, what: str) -> Path:
    """Refuse a model/adapter/data path outside the allowed roots."""
    p = Path(str(path)).expanduser().resolve()
    for r in allowed_roots():
        if p == r or r in p.parents:
            return p
    raise ESMError(f"{what} {str(p)!r} is outside the directories this workbench may read "
                   f"({', '.join(str(r) for r in allowed_roots())}).",
                   fix="ask the operator to add its parent directory to ESM_ALLOWED_ROOTS.")


def check_spec_paths(spec: RunSpec) -> None:
    check_allowed(spec.base, "Base model")
    for s in spec.specialists:
        check_allowed(s.adapter, f"Adapter of {s.name!r}")
    for m in spec.modalities:
        if m.encoder.path:
            check_allowed(m.encoder.path, f"Encoder of {m.name!r}")
        for path, role in spec.encoder_files(m):
            check_allowed(path, role[0].upper() + role[1:])
        if m.data is not None and m.data.path:
            check_allowed(m.data.path, f"Probe data of {m.name!r}")
