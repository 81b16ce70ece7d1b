"""Raw samples per modality: read them from CSV/TSV files, validate them, report bad rows.

Validators (METHOD.md section 1, issue: "validate raw inputs per modality"):
- ``smiles``: RDKit must parse the SMILES;
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
from typing import Callable

from .errors import ESMError

AA_LETTERS = set("ACDEFGHIKLMNPQRSTVWYXBZUO")
_GENE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/@]*$")


def _smiles(raw: str) -> tuple[str | None, str | None]:
    from rdkit import Chem, RDLogger

    s = raw.strip()
    if not s:
        return None, "empty SMILES"
    if " " in s:
        return None, "SMILES contains a space"
    RDLogger.DisableLog("rdApp.*")
    if Chem.MolFromSmiles(s) is None:
        return None, "RDKit cannot parse this SMILES"
    return s, None


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
    "smiles": _smiles, "protein": _protein, "genes": _genes, "text": _text,
}


@dataclass
class SampleReport:
    """Valid samples (cleaned) with their original row numbers, and the bad rows with reasons."""

    kind: str
    values: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    bad: list[tuple[int, str, str]] = field(default_factory=list)  # (row, raw, reason)

    @property
    def n_total(self) -> int:
        return len(self.values) + len(self.bad)


def validate(raws: list, kind: str) -> SampleReport:
    fn = VALIDATORS.get(kind)
    if fn is None:
        raise ESMError(f"Unknown modality kind {kind!r}.", fix=f"use one of {sorted(VALIDATORS)}.")
    rep = SampleReport(kind)
    for i, r in enumerate(raws):
        if r is None or (isinstance(r, float) and r != r):
            rep.bad.append((i, "", "missing value"))
            continue
        clean, why = fn(str(r))
        if why:
            rep.bad.append((i, str(r), why))
        else:
            rep.values.append(clean)
            rep.rows.append(i)
    return rep


def read_table(path: str | Path, *, required: list[str] | None = None, max_bytes: int | None = None):
    """Read a CSV/TSV (optionally .gz) into a DataFrame of strings; clear errors for wrong columns."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise ESMError(f"Data file {str(p)!r} does not exist.", fix="check the path (relative to the config file).")
    if max_bytes is not None and p.stat().st_size > max_bytes:
        raise ESMError(f"Data file {str(p)!r} is {p.stat().st_size // 1_000_000} MB, over the "
                       f"{max_bytes // 1_000_000} MB limit.", fix="use a smaller file.")
    name = p.name.lower().removesuffix(".gz")
    sep = "\t" if name.endswith((".tsv", ".tab", ".txt")) else ","
    try:
        df = pd.read_csv(p, sep=sep, dtype=str, keep_default_na=False, quoting=3 if sep == "\t" else 0)
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise ESMError(f"Data file {str(p)!r} cannot be read as {'TSV' if sep == chr(9) else 'CSV'}: "
                       f"{str(e).splitlines()[0]}") from None
    check_columns(df, required or [], str(p))
    return df


def check_columns(df, required: list[str], where: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ESMError(f"{where} lacks column(s) {missing}; it has {list(df.columns)[:12]}.",
                       fix=f"provide a file with columns {required} (or name the right column).")


def read_samples(path: str | Path, column: str, kind: str) -> SampleReport:
    df = read_table(path, required=[column])
    return validate(df[column].tolist(), kind)
