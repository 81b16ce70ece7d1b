"""Raw samples per modality: read them from CSV/TSV files, validate them, report bad rows.

Validators (docs/METHOD.md section 1, issue: "validate raw inputs per modality"):
- ``smiles``: RDKit must parse the SMILES (:func:`esm_core.chem.check_smiles`);
- ``protein``: letters of the amino-acid alphabet only (20 standard + X, B, Z, U, O);
- ``genes``: a non-empty list of gene symbols (space, comma or semicolon separated), ranked;
- ``text``: any non-empty string.

Bad samples are skipped and reported with their row and reason; a caller refuses when too few
remain (see probe.sample_modality).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from esm_core.chem import check_smiles
from esm_core.errors import ESMError

AA_LETTERS = set("ACDEFGHIKLMNPQRSTVWYXBZUO")
_GENE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/@]*$")


def _protein(raw: str) -> tuple[str | None, str | None]:
    s = re.sub(r"\s+", "", raw).upper()
    if not s:
        return None, "empty sequence"
    for i, c in enumerate(s):
        if c not in AA_LETTERS:
            return None, f"{c!r} at position {i + 1} is not an amino-acid letter"
    return s, None


def _genes(raw: str) -> tuple[str | None, str | None]:
    genes = [g for g in re.split(r"[\s,;]+", raw.strip()) if g]
    if not genes:
        return None, "empty gene list"
    for g in genes:
        if not _GENE_RE.match(g):
            return None, f"{g[:20]!r} is not a gene symbol"
    return " ".join(genes), None


def _text(raw: str) -> tuple[str | None, str | None]:
    s = raw.strip()
    return (s, None) if s else (None, "empty text")


VALIDATORS: dict[str, Callable[[str], tuple[str | None, str | None]]] = {
    "smiles": check_smiles, "protein": _protein, "genes": _genes, "text": _text,
}


@dataclass
class SampleReport:
    """Examined samples: the valid ones (cleaned) with their original row numbers, the bad rows with reasons.

    ``n_total`` rows were given; a seeded draw (probe.sample_modality) may examine only some of them
    (``n_examined``), the rest were not checked. Examined rows are listed in file order.
    """

    kind: str
    values: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    bad: list[tuple[int, str, str]] = field(default_factory=list)  # (row, raw, reason)
    n_total: int = 0

    @property
    def n_examined(self) -> int:
        return len(self.values) + len(self.bad)


PROGRESS_EVERY = 256  # examined rows between two progress calls of validate


def _check(fn, raw) -> tuple[str | None, str, str | None]:
    """(clean value, raw text, reason it is bad)."""
    if raw is None or (isinstance(raw, float) and raw != raw):
        return None, "", "missing value"
    clean, why = fn(str(raw))
    return clean, str(raw), why


def validate(raws: list, kind: str, *, order: Iterable[int] | None = None, want: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> SampleReport:
    """Validate the rows of ``raws`` in ``order`` (default: every row, in file order), stopping once
    ``want`` are valid; ``progress(n_valid, n_examined)`` is called every PROGRESS_EVERY rows."""
    fn = VALIDATORS.get(kind)
    if fn is None:
        raise ESMError(f"Unknown modality kind {kind!r}.", fix=f"use one of {sorted(VALIDATORS)}.")
    valid: list[tuple[int, str]] = []
    bad: list[tuple[int, str, str]] = []
    for i in range(len(raws)) if order is None else order:
        if want is not None and len(valid) >= want:
            break
        clean, raw, why = _check(fn, raws[i])
        if why:
            bad.append((i, raw, why))
        else:
            valid.append((i, clean))
        if progress and (len(valid) + len(bad)) % PROGRESS_EVERY == 0:
            progress(len(valid), len(valid) + len(bad))
    valid.sort()
    bad.sort()
    return SampleReport(kind, [v for _, v in valid], [i for i, _ in valid], bad, len(raws))


class EmptyTable(ESMError):
    """A data file without data rows (0 bytes, or a header only)."""

    def __init__(self, path: Path, required: list[str] | None):
        self.path = str(path)
        cols = f" (columns {required})" if required else ""
        super().__init__(f"Data file {str(path)!r} holds no rows: it is empty or has only a header.",
                         fix=f"give it a header row{cols} and at least one data row.")


def read_table(path: str | Path, *, required: list[str] | None = None, max_bytes: int | None = None):
    """Read a CSV/TSV (optionally .gz) into a DataFrame of strings; clear errors for a missing file, wrong
    columns and a file without rows. Only the ``required`` columns are read when some are named."""
    p = Path(path)
    if not p.is_file():
        raise ESMError(f"Data file {str(p)!r} does not exist.", fix="check the path (relative to the config file).")
    if max_bytes is not None and p.stat().st_size > max_bytes:
        raise ESMError(f"Data file {str(p)!r} is {p.stat().st_size // 1_000_000} MB, over the "
                       f"{max_bytes // 1_000_000} MB limit.", fix="use a smaller file.")
    name = p.name.lower().removesuffix(".gz")
    sep = "\t" if name.endswith((".tsv", ".tab", ".txt")) else ","
    opts = dict(sep=sep, dtype=str, keep_default_na=False, quoting=3 if sep == "\t" else 0)
    check_columns(_read_csv(p, required, nrows=0, **opts), required or [], str(p))
    df = _read_csv(p, required, usecols=required or None, **opts)
    if df.empty:
        raise EmptyTable(p, required)
    return df


def _read_csv(p: Path, required: list[str] | None, **opts):
    import pandas as pd  # lazy: pandas is slow to import and only file reading needs it

    try:
        return pd.read_csv(p, **opts)
    except pd.errors.EmptyDataError:
        raise EmptyTable(p, required) from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as e:
        raise ESMError(f"Data file {str(p)!r} cannot be read as {'TSV' if opts['sep'] == chr(9) else 'CSV'}: "
                       f"{str(e).splitlines()[0]}") from None


def check_columns(df, required: list[str], where: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ESMError(f"{where} lacks column(s) {missing}; it has {list(df.columns)[:12]}.",
                       fix=f"provide a file with columns {required} (or name the right column).")
