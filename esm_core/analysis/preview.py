"""Previews of probe samples and uploaded sample tables (docs/METHOD.md section 1; the Probe page).

Plain functions, no Streamlit: molecule drawings (RDKit rdMolDraw2D, SVG), protein lengths and
amino-acid composition, ranked gene lists, the tokenised probe grouped into modality spans (the
paper's Fig. 4), and reading a user's CSV upload safely (size limit, pandas parser, nothing
executed; a column that does not hold the modality's kind of sample is refused with the reason).

    svg = molecule_grid_svg(["CCO", "c1ccccc1"])
    lengths, comp = protein_stats(["MKTAYIAK", "ACDEFGHIK"])
    spans = token_spans(batcher.tokens(0))        # [(modality or None, [token, ...]), ...]
    df = read_upload(data, "mine.csv", max_bytes=5 << 20)
    raws = column_samples(df, "smiles", "smiles", where="mine.csv", min_valid=8)
"""

from __future__ import annotations

import io
import re
from collections import Counter

import pandas as pd

from esm_core import chem
from esm_core.errors import ESMError
from esm_core.samples import check_columns, validate

KIND_WORDS = {"smiles": "SMILES strings", "protein": "amino-acid sequences", "genes": "ranked gene lists",
              "text": "non-empty text"}
AMINO_ACIDS = list("ACDEFGHIKLMNPQRSTVWY")


# ------------------------------------------------------------------------------------ molecules
def molecule_grid_svg(smiles: list[str], legends: list[str] | None = None, *, per_row: int = 4,
                      size: tuple[int, int] = (180, 150)) -> str:
    """2-D drawings of molecules in a grid, one SVG (RDKit rdMolDraw2D); unparsable ones are skipped."""
    from rdkit.Chem.Draw import rdMolDraw2D  # lazy: RDKit's drawing code is heavy and needed only here

    mols, labels = [], []
    for i, s in enumerate(smiles):
        m = chem.parse(s)
        if m is not None:
            mols.append(m)
            labels.append(legends[i] if legends else s[:28])
    if not mols:
        raise ESMError("No molecule to draw: none of the SMILES parses.", fix="check the molecule samples.")
    cols = max(1, min(per_row, len(mols)))
    rows = -(-len(mols) // cols)
    w, h = size
    d = rdMolDraw2D.MolDraw2DSVG(w * cols, h * rows, w, h)
    d.drawOptions().legendFontSize = 14
    d.DrawMolecules(mols, legends=labels)
    d.FinishDrawing()
    svg = d.GetDrawingText()
    return svg[svg.index("<svg"):]  # drop the XML header so the SVG can be inlined


# ------------------------------------------------------------------------------------ proteins
def protein_stats(seqs: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-sequence lengths, amino-acid composition over all sequences).

    Composition: one row per letter (the 20 standard first, then any other letter present) with its
    count and its fraction of all residues.
    """
    clean = [re.sub(r"\s+", "", s).upper() for s in seqs]
    lengths = pd.DataFrame({"sample": range(len(clean)), "length": [len(s) for s in clean]})
    c = Counter("".join(clean))
    letters = AMINO_ACIDS + sorted(set(c) - set(AMINO_ACIDS))
    total = sum(c.values()) or 1
    comp = pd.DataFrame({"amino_acid": letters, "count": [c.get(a, 0) for a in letters]})
    comp["fraction"] = comp["count"] / total
    return lengths, comp


# ------------------------------------------------------------------------------------ gene lists
def split_genes(raw: str) -> list[str]:
    return [g for g in re.split(r"[\s,;]+", str(raw).strip()) if g]


def gene_table(gene_lists: list[str], top: int = 10) -> pd.DataFrame:
    """One row per sample: its number of genes and its top genes in rank order (columns 1..top)."""
    rows = []
    for i, raw in enumerate(gene_lists):
        genes = split_genes(raw)
        row = {"sample": i, "genes": len(genes)}
        row.update({str(r + 1): (genes[r] if r < len(genes) else "") for r in range(top)})
        rows.append(row)
    return pd.DataFrame(rows, columns=["sample", "genes", *[str(r + 1) for r in range(top)]])


def gene_frequency(gene_lists: list[str], top: int = 10, n: int = 25) -> pd.DataFrame:
    """Genes most often among the top `top` of a sample: gene, samples, share of samples."""
    c = Counter(g for raw in gene_lists for g in dict.fromkeys(split_genes(raw)[:top]))
    df = pd.DataFrame(c.most_common(n), columns=["gene", "samples"])
    df["share"] = df["samples"] / max(1, len(gene_lists))
    return df


# ------------------------------------------------------------------------------------ probe view
def token_spans(tokens: list[tuple[str, str | None]]) -> list[tuple[str | None, list[str]]]:
    """Group consecutive tokens of the same modality (None = prefix/BOS text) into spans."""
    spans: list[tuple[str | None, list[str]]] = []
    for tok, mod in tokens:
        if spans and spans[-1][0] == mod:
            spans[-1][1].append(tok)
        else:
            spans.append((mod, [tok]))
    return spans


def span_counts(tokens: list[tuple[str, str | None]]) -> dict[str, int]:
    """Tokens per modality in one probe (key '' = prefix/BOS text)."""
    c = Counter(m or "" for _, m in tokens)
    return dict(c)


# ------------------------------------------------------------------------------------ uploads
def read_upload(data: bytes, filename: str, *, max_bytes: int) -> pd.DataFrame:
    """Parse an uploaded CSV/TSV with pandas (strings only, nothing executed); refuse it over max_bytes."""
    if len(data) > max_bytes:
        raise ESMError(f"Upload {filename!r} is {len(data) / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB "
                       "limit.", fix="upload a smaller table (only the column of raw samples is needed).")
    name = filename.lower().removesuffix(".gz")
    sep = "\t" if name.endswith((".tsv", ".tab", ".txt")) else ","
    try:
        df = pd.read_csv(io.BytesIO(data), sep=sep, dtype=str, keep_default_na=False,
                         compression="gzip" if filename.lower().endswith(".gz") else None,
                         quoting=3 if sep == "\t" else 0)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ESMError(f"Upload {filename!r} cannot be read as {'TSV' if sep == chr(9) else 'CSV'}: {msg}",
                       fix="upload a comma-separated (.csv) or tab-separated (.tsv) table with a header row.") from None
    if df.empty or not len(df.columns):
        raise ESMError(f"Upload {filename!r} holds no rows.", fix="upload a table with a header row and samples.")
    df.columns = [str(c) for c in df.columns]
    return df


def guess_column(df: pd.DataFrame, kind: str, preferred: str | None = None, probe_rows: int = 20) -> str:
    """The preferred column when present, else the column whose first rows validate best as `kind`."""
    if preferred and preferred in df.columns:
        return preferred
    best, score = df.columns[0], -1
    for c in df.columns:
        n = len(validate(df[c].head(probe_rows).tolist(), kind).values)
        if n > score:
            best, score = c, n
    return best


def column_samples(df: pd.DataFrame, column: str, kind: str, *, where: str, min_valid: int,
                   modality: str = "") -> list[str]:
    """The raw samples of one column; refuse a missing column or one that does not hold `kind` samples."""
    check_columns(df, [column], where)
    raws = df[column].tolist()
    rep = validate(raws, kind)
    if len(rep.values) < min_valid and not rep.bad:
        raise ESMError(f"Column {column!r} of {where} holds only {len(raws)} samples, fewer than the {min_valid} "
                       "needed (min_probes).", fix="upload more samples or lower min_probes.")
    if len(rep.values) < min_valid:
        reasons = "; ".join(f"row {r}: {why}" for r, _, why in rep.bad[:3])
        what = KIND_WORDS.get(kind, kind)
        raise ESMError(f"Column {column!r} of {where} does not hold {what}: only {len(rep.values)} of "
                       f"{len(raws)} values are valid ({reasons}), fewer than the {min_valid} needed.",
                       fix=f"choose the column that holds the {modality or kind} samples ({what}), or fix "
                           "the file.")
    return raws
