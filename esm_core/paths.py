"""Where things are: the repository, the bundled demo zoo and its data, the shared data directory.

One place for every default location (the CLI, the app and the tests read these):

- ``REPO_ROOT``: the repository (the folder holding ``esm_core/``);
- ``ZOO_DIR`` / ``DEMO_DIR``: ``assets/zoo`` (the demo zoo: base, specialists, run.yaml) and
  ``assets/demo`` (its data, with provenance);
- the data directory of the benchmark and the zoo builder: ``--data-dir``, else ``$ESM_DATA_DIR``,
  else ``../shared/data`` next to the repository when it exists.
"""

from __future__ import annotations

import os
from pathlib import Path

from esm_core.errors import ESMError

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = REPO_ROOT / "assets"
ZOO_DIR = ASSETS / "zoo"
DEMO_DIR = ASSETS / "demo"
DATA_ENV = "ESM_DATA_DIR"


def default_data_dir() -> Path | None:
    """``$ESM_DATA_DIR``, else ``<repo>/../shared/data`` when it exists, else None."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser().resolve()
    cand = (REPO_ROOT.parent / "shared" / "data").resolve()
    return cand if cand.is_dir() else None


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The data directory to use: the given one, else the default; an error when there is none."""
    d = Path(data_dir).expanduser().resolve() if data_dir else default_data_dir()
    if d is None:
        raise ESMError("No data directory is set and ../shared/data does not exist.",
                       fix=f"pass --data-dir (or set ${DATA_ENV}) to the folder holding public/ and registry/.")
    return d


def default_config() -> Path | None:
    """The demo zoo's run config, when the zoo is there."""
    p = ZOO_DIR / "run.yaml"
    return p if p.is_file() else None
