"""Dataset loaders of the few-shot benchmark (docs/METHOD.md section 7): files -> :class:`TaskData`.

Five task families: molecule-protein interaction (:func:`molecule_protein_task`, any CSV/TSV with
columns SMILES, Protein, Y), CYP inhibition and substrate (:func:`cyp_task`, any file with columns
Drug_ID, Drug, Y), molecule-cell (:func:`gdsc2_task`) and drug pairs (:func:`drugcomb_task`). The
registry (``tasks``) names the files; :func:`dti_loader` and :func:`cyp_loader` make its loaders.

Label rules:
- Molecule-protein and CYP: Y = 1 -> Yes, 0 -> No (Y read as a float).
- GDSC2 (registry): ``ln_ic50_drug_z`` is ln(IC50) standardised per drug across cell lines. A row is
  Sensitive when z <= -t, Resistant when z >= +t, and dropped in between (default t = 1.0: at least one
  standard deviation more / less sensitive than the drug's average cell line; ~28k rows each side).
- GDSC2 Iorio: ``label_iorio_sensitive`` 1 -> Sensitive, 0 -> Resistant (8 % sensitive).
- O'Neil: replicates of one (unordered drug pair, cell line) are averaged first; mean Loewe > 30 ->
  Synergistic, < 0 -> Antagonistic, in between dropped; rows whose cell line has no GDSC gene
  ranking are dropped.

Every loader skips and counts rows whose SMILES RDKit cannot parse, whose protein is not an
amino-acid sequence, or whose Y is not 0/1 (``TaskData.counts``). A missing file raises
:class:`MissingData` (an ESMError naming the file); a file without rows, or a training pool or test
split left empty once invalid rows are skipped, raises :class:`EmptyData` (with the skipped rows by
reason). A file with wrong columns raises ESMError. Splits are seeded (:func:`split_indices`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from esm_core.answering.prompts import Item
from esm_core.benchmark.taskdata import EmptyData, MissingData, Record, TaskData
from esm_core.chem import valid_smiles
from esm_core.errors import ESMError
from esm_core.paths import resolve_data_dir
from esm_core.samples import VALIDATORS, EmptyTable, read_table


# ------------------------------------------------------------------------------------ helpers
def _need(task: str, path: Path) -> Path:
    if not path.is_file():
        raise MissingData(task, path)
    return path


def _read(task: str, path: Path, required: list[str]):
    try:
        return read_table(_need(task, path), required=required)
    except EmptyTable as e:
        raise EmptyData(task, f"data file {e.path!r} holds no rows (it is empty or has only a header).",
                        fix=e.fix) from None


def _key(r: Record) -> tuple:
    return tuple(sorted(r.values.items()))


def dedupe(td: TaskData) -> TaskData:
    """Remove repeated inputs, counted in ``td.counts``: a test row repeating an earlier test row, a pool row
    repeating an earlier pool row, and every pool row whose inputs are a test row's (it would hand the model
    the answer as an example, and make "majority of the examples" look perfect)."""
    seen: set = set()
    test = []
    for r in td.test:
        k = _key(r)
        if k in seen:
            td.counts["test_duplicates"] = td.counts.get("test_duplicates", 0) + 1
            continue
        seen.add(k)
        test.append(r)
    pool, in_pool = [], set()
    for r in td.train:
        k = _key(r)
        if k in seen:
            td.counts["pool_rows_in_test"] = td.counts.get("pool_rows_in_test", 0) + 1
        elif k in in_pool:
            td.counts["pool_duplicates"] = td.counts.get("pool_duplicates", 0) + 1
        else:
            in_pool.add(k)
            pool.append(r)
    td.train, td.test = pool, test
    return td


def _usable(td: TaskData) -> TaskData:
    """The task with repeated inputs removed (:func:`dedupe`), or EmptyData when its pool or test split holds no
    row after invalid and repeated rows were skipped."""
    dedupe(td)
    for split, recs in (("training pool", td.train), ("test split", td.test)):
        if not recs:
            files = ", ".join(Path(f).name for f in td.files)
            raise EmptyData(td.name, f"its {split} is empty once invalid rows are skipped ({files}: {td.load_note()}).",
                            fix="check the rows of the data file(s): the counts name why rows were skipped.")
    return td


def _binary(y: str) -> int | None:
    try:
        v = float(y)
    except (TypeError, ValueError):
        return None
    return int(v) if v in (0.0, 1.0) else None


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of range(n) -> (train, test) index arrays, each sorted."""
    if not 0.0 < test_fraction < 1.0:
        raise ESMError(f"test_fraction={test_fraction} must lie strictly between 0 and 1.")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _split(records: list[Record], test_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    tr, te = split_indices(len(records), test_fraction, seed)
    return [records[i] for i in tr], [records[i] for i in te]


# ------------------------------------------------------------------------------------ molecule-protein
def _dti_records(task: str, path: Path, counts: Counter) -> list[Record]:
    df = _read(task, path, ["SMILES", "Protein", "Y"])
    out = []
    for i, (s, p, y) in enumerate(zip(df["SMILES"], df["Protein"], df["Y"])):
        counts["rows_read"] += 1
        s = s.strip()
        if not valid_smiles(s):
            counts["invalid_smiles"] += 1
            continue
        prot, why = VALIDATORS["protein"](p)
        if why:
            counts["invalid_protein"] += 1
            continue
        lab = _binary(y)
        if lab is None:
            counts["bad_label"] += 1
            continue
        out.append(Record({"smiles": s, "protein": prot}, "Yes" if lab else "No", {"file": path.name, "row": i}))
    return out


def molecule_protein_task(train_path: str | Path, test_path: str | Path | None = None, *, name: str = "dti",
                          title: str | None = None, test_fraction: float = 0.2, seed: int = 0,
                          protein_similarity=None) -> TaskData:
    """Molecule-protein interaction from any CSV/TSV with columns SMILES, Protein, Y (0/1, read as float).

    With one file, a seeded split makes the test set; with two, the first is the example pool.
    """
    counts: Counter = Counter()
    train_path = Path(train_path)
    train = _dti_records(name, train_path, counts)
    files = [str(train_path)]
    if test_path is None:
        train, test = _split(train, test_fraction, seed)
    else:
        test = _dti_records(name, Path(test_path), counts)
        files.append(str(test_path))
    return _usable(TaskData(name, title or name, "Molecule-protein interaction", "molecule_protein", train, test,
                            files=files, counts=dict(counts), protein_similarity=protein_similarity))


def dti_loader(name: str, stem: str, title: str, pool: tuple[str, ...]):
    """Registry loader of a molecule-protein task: ``public/dti/<stem>_<pool>.csv`` (the first present) and
    ``<stem>_test.csv``."""
    def load(data_dir: Path, *, seed: int = 0, test_fraction: float = 0.2, protein_similarity=None, **_):
        d = data_dir / "public" / "dti"
        pools = [d / f"{stem}_{p}.csv" for p in pool]
        pool_path = next((p for p in pools if p.is_file()), pools[0])
        test_path = _need(name, d / f"{stem}_test.csv")
        td = molecule_protein_task(pool_path, test_path, name=name, title=title,
                                   protein_similarity=protein_similarity)
        if pool_path.name.endswith("_val.csv"):
            td.note = "no training file: the validation file is the example pool"
        return td
    return load


# ------------------------------------------------------------------------------------ CYP
CYP_ENZYMES = ("CYP1A2", "CYP2C19", "CYP2C9", "CYP2D6", "CYP3A4")


def enzyme_sequence(enzyme: str, path: str | Path) -> str:
    df = _read(enzyme.lower(), Path(path), ["enzyme", "sequence"])
    hit = df[df["enzyme"].str.upper() == enzyme.upper()]
    if hit.empty:
        raise ESMError(f"Enzyme {enzyme!r} is not listed in {str(path)!r} (it has {df['enzyme'].tolist()}).")
    return hit["sequence"].iloc[0].strip().upper()


def cyp_task(path: str | Path, enzyme: str, *, kind: str = "inhibition", enzymes_path: str | Path | None = None,
             sequence: str | None = None, name: str | None = None, title: str | None = None,
             test_fraction: float = 0.2, seed: int = 0) -> TaskData:
    """CYP inhibition / substrate from any file with columns Drug_ID, Drug (SMILES), Y; seeded split.

    The enzyme's sequence (``sequence``, or looked up in ``enzymes_path`` = cyp_enzymes.tsv) joins the
    prompt once, as a shared "Enzyme" field.
    """
    if kind not in ("inhibition", "substrate"):
        raise ESMError(f"CYP task kind {kind!r} is not 'inhibition' or 'substrate'.")
    name = name or f"{enzyme.lower()}{'' if kind == 'inhibition' else '_substrate'}"
    path = Path(path)
    df = _read(name, path, ["Drug_ID", "Drug", "Y"])
    if sequence is None:
        if enzymes_path is None:
            raise ESMError(f"No sequence for {enzyme}.", fix="pass sequence= or enzymes_path= (cyp_enzymes.tsv).")
        ep = Path(enzymes_path)
        if not ep.is_file():
            raise MissingData(name, ep)
        sequence = enzyme_sequence(enzyme, ep)
    counts: Counter = Counter()
    recs = []
    for i, (did, s, y) in enumerate(zip(df["Drug_ID"], df["Drug"], df["Y"])):
        counts["rows_read"] += 1
        s = s.strip()
        if not valid_smiles(s):
            counts["invalid_smiles"] += 1
            continue
        lab = _binary(y)
        if lab is None:
            counts["bad_label"] += 1
            continue
        recs.append(Record({"smiles": s}, "Yes" if lab else "No", {"file": path.name, "row": i, "drug_id": did}))
    train, test = _split(recs, test_fraction, seed)
    files = [str(path)] + ([str(enzymes_path)] if enzymes_path else [])
    return _usable(TaskData(name, title or f"{enzyme.upper()}", f"CYP {kind}", f"cyp_{kind}", train, test,
                            context=[(f"Enzyme ({enzyme.upper()})", Item("protein", sequence))], files=files,
                            counts=dict(counts), note=f"seeded split (seed {seed}, test fraction {test_fraction})"))


def cyp_loader(enzyme: str, kind: str):
    """Registry loader of a CYP task: ``public/cyp/<enzyme>_veith.tab`` (inhibition) or
    ``<enzyme>_substrate_carbonmangels.tab`` (substrate), with ``cyp_enzymes.tsv``."""
    def load(data_dir: Path, *, seed: int = 0, test_fraction: float = 0.2, **_):
        d = data_dir / "public" / "cyp"
        fname = f"{enzyme.lower()}_veith.tab" if kind == "inhibition" else f"{enzyme.lower()}_substrate_carbonmangels.tab"
        name = enzyme.lower() if kind == "inhibition" else f"{enzyme.lower()}_substrate"
        return cyp_task(_need(name, d / fname), enzyme, kind=kind, enzymes_path=_need(name, d / "cyp_enzymes.tsv"),
                        name=name, title=enzyme.upper(), seed=seed, test_fraction=test_fraction)
    return load


# ------------------------------------------------------------------------------------ molecule-cell
def _cell_genes(task: str, data_dir: Path, top_n: int = 50) -> dict[str, str]:
    df = _read(task, data_dir / "registry" / "gdsc2" / "cell_line_top100_genes.tsv", ["cell_key", "top_genes_desc"])
    return {k: " ".join(g.split()[:top_n]) for k, g in zip(df["cell_key"], df["top_genes_desc"])}


def _drug_smiles(task: str, path: Path, counts: Counter) -> dict[str, str]:
    col = "smiles"
    df = _read(task, path, ["drug", col])
    out = {}
    for d, s in zip(df["drug"], df[col]):
        s = s.strip()
        if valid_smiles(s):
            out[d] = s
        else:
            counts["drugs_invalid_smiles"] += 1
    return out


def gdsc2_task(data_dir: str | Path | None = None, *, labels: str = "z", z_threshold: float = 1.0, seed: int = 0,
               test_fraction: float = 0.2, top_n: int = 50, **_) -> TaskData:
    """GDSC2 sensitive / resistant: drug SMILES + the cell line's top-50 genes (see the label rules above)."""
    data_dir = resolve_data_dir(data_dir)
    name = "gdsc2" if labels == "z" else "gdsc2_iorio"
    counts: Counter = Counter()
    reg = data_dir / "registry" / "gdsc2"
    if labels == "z":
        if z_threshold < 0:
            raise ESMError(f"z_threshold={z_threshold} must be >= 0.")
        path = reg / "gdsc2_ln_ic50.csv.gz"
        df = _read(name, path, ["cell_key", "drug", "ln_ic50_drug_z"])
    elif labels == "iorio":
        path = data_dir / "public" / "gdsc2" / "gdsc2_iorio_labels.csv.gz"
        df = _read(name, path, ["cell_key", "drug", "label_iorio_sensitive"])
    else:
        raise ESMError(f"GDSC2 labels {labels!r} is not 'z' or 'iorio'.")
    smiles = _drug_smiles(name, reg / "gdsc2_drug_smiles.tsv", counts)
    genes = _cell_genes(name, data_dir, top_n)
    recs = []
    lab_col = "ln_ic50_drug_z" if labels == "z" else "label_iorio_sensitive"
    for i, (ck, drug, v) in enumerate(zip(df["cell_key"], df["drug"], df[lab_col])):
        counts["rows_read"] += 1
        try:
            x = float(v)
        except ValueError:
            counts["bad_label"] += 1
            continue
        if labels == "z":
            lab = "Sensitive" if x <= -z_threshold else "Resistant" if x >= z_threshold else None
            if lab is None:
                counts["between_thresholds"] += 1
                continue
        else:
            if x not in (0.0, 1.0):
                counts["bad_label"] += 1
                continue
            lab = "Sensitive" if x == 1.0 else "Resistant"
        s, g = smiles.get(drug), genes.get(ck)
        if s is None:
            counts["drug_without_smiles"] += 1
            continue
        if g is None:
            counts["cell_without_genes"] += 1
            continue
        recs.append(Record({"smiles": s, "genes": g}, lab, {"row": i, "drug": drug, "cell": ck, "value": x}))
    train, test = _split(recs, test_fraction, seed)
    rule = (f"Sensitive if ln_ic50_drug_z <= -{z_threshold}, Resistant if >= {z_threshold}" if labels == "z"
            else "Iorio 2016 per-drug ln(IC50) thresholds")
    return _usable(TaskData(name, "GDSC2" if labels == "z" else "GDSC2 (Iorio)", "Molecule-cell", "molecule_cell",
                            train, test, files=[str(path), str(reg / "gdsc2_drug_smiles.tsv"),
                                                str(reg / "cell_line_top100_genes.tsv")],
                            counts=dict(counts), note=f"{rule}; seeded split (seed {seed})"))


def drugcomb_task(data_dir: str | Path | None = None, *, synergy: float = 30.0, antagonism: float = 0.0,
                  seed: int = 0, test_fraction: float = 0.2, top_n: int = 50, **_) -> TaskData:
    """Drug pairs Synergistic / Antagonistic on O'Neil 2016 (DrugComb stand-in); see the label rules above."""
    data_dir = resolve_data_dir(data_dir)
    name = "drugcomb"
    d = data_dir / "public" / "drugcomb"
    path = d / "oneil_loewe_triples.csv"
    df = _read(name, path, ["drug_1", "drug_2", "cell_line", "synergy_loewe", "gdsc_cell_key"])
    counts: Counter = Counter()
    smiles = _drug_smiles(name, _need(name, d / "oneil_drug_smiles.tsv"), counts)
    genes = _cell_genes(name, data_dir, top_n)
    groups: dict[tuple, list] = {}
    for i, (a, b, cl, v, ck) in enumerate(zip(df["drug_1"], df["drug_2"], df["cell_line"], df["synergy_loewe"],
                                              df["gdsc_cell_key"])):
        counts["rows_read"] += 1
        try:
            x = float(v)
        except ValueError:
            counts["bad_label"] += 1
            continue
        if not ck or ck not in genes:
            counts["cell_without_genes"] += 1
            continue
        if a not in smiles or b not in smiles:
            counts["drug_without_smiles"] += 1
            continue
        key = (*sorted((a, b)), cl)
        groups.setdefault(key, [ck, []])[1].append(x)
    recs = []
    for (a, b, cl), (ck, xs) in groups.items():
        x = float(np.mean(xs))
        if len(xs) > 1:
            counts["replicates_averaged"] += len(xs) - 1
        lab = "Synergistic" if x > synergy else "Antagonistic" if x < antagonism else None
        if lab is None:
            counts["between_thresholds"] += 1
            continue
        recs.append(Record({"smiles": smiles[a], "smiles_2": smiles[b], "genes": genes[ck]}, lab,
                           {"drug_1": a, "drug_2": b, "cell": cl, "loewe": x}))
    train, test = _split(recs, test_fraction, seed)
    return _usable(TaskData(name, "DrugComb (O'Neil)", "Molecule-cell", "drug_pair", train, test,
                            files=[str(path), str(d / "oneil_drug_smiles.tsv")], counts=dict(counts),
                            note=f"mean Loewe > {synergy} Synergistic, < {antagonism} Antagonistic; "
                                 f"seeded split (seed {seed})"))

