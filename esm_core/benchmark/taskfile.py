"""A task of a known family from a user's own data file (``--task-file PATH --family F``).

The registered tasks read fixed files under the data directory (``tasks``); this reads any one file
of a known family by path, so a user with their own split (a BindingDB subset, a lab's CYP assay,
their cell lines) need not rename files into ``public/``. The rules are the registered tasks' rules:
invalid rows skipped and counted, repeated inputs removed and counted (``loaders.dedupe``), a seeded
split when the file has no ``split`` column, and that split stated in the task's note.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from esm_core.answering.prompts import Item
from esm_core.benchmark.loaders import CYP_ENZYMES, _binary, _read, _split, _usable, enzyme_sequence
from esm_core.benchmark.taskdata import MissingData, Record, TaskData
from esm_core.errors import ESMError
from esm_core.paths import resolve_data_dir
from esm_core.samples import VALIDATORS

FAMILIES = {
    # family: (TaskData family, columns in the file (record key <- column), labels for Y = 1 / Y = 0, group)
    "dti": ("molecule_protein", {"smiles": "SMILES", "protein": "Protein"}, ("Yes", "No"),
            "Molecule-protein interaction"),
    "cyp": ("cyp_inhibition", {"smiles": "Drug"}, ("Yes", "No"), "CYP inhibition"),
    "cyp_substrate": ("cyp_substrate", {"smiles": "Drug"}, ("Yes", "No"), "CYP substrate"),
    "gdsc": ("molecule_cell", {"smiles": "SMILES", "genes": "genes"}, ("Sensitive", "Resistant"), "Molecule-cell"),
    "drugcomb": ("drug_pair", {"smiles": "SMILES", "smiles_2": "SMILES_2", "genes": "genes"},
                 ("Synergistic", "Antagonistic"), "Molecule-cell"),
}
FAMILY_HELP = ("dti: SMILES, Protein, Y; cyp / cyp_substrate: Drug, Y (with --enzyme); gdsc: SMILES, genes (ranked "
               "gene symbols), Y (1 = Sensitive); drugcomb: SMILES, SMILES_2, genes, Y (1 = Synergistic). Optional "
               "column split (train / test); without it a seeded split is made and reported.")


def task_from_file(path: str | Path, family: str, *, name: str | None = None, seed: int = 0,
                   test_fraction: float = 0.2, enzyme: str | None = None, data_dir: str | Path | None = None,
                   top_n: int = 50) -> TaskData:
    """A task of a known family from one data file given by path (``FAMILY_HELP`` names the columns).

    A ``split`` column (train / test) is used as given; without one, a seeded split is made and stated in
    the task's note. Invalid rows are skipped and counted, repeated inputs removed and counted (:func:`dedupe`),
    as for the registered tasks. CYP families take the enzyme's sequence from the data directory's
    ``public/cyp/cyp_enzymes.tsv``.
    """
    if family not in FAMILIES:
        raise ESMError(f"--family {family!r} is not a known task family.", fix=f"use one of {sorted(FAMILIES)}.")
    kind, cols, (yes, no), group = FAMILIES[family]
    path = Path(path).expanduser()
    name = name or path.name.split(".")[0].lower().replace(" ", "_")
    if not path.is_file():
        raise ESMError(f"Task file {str(path)!r} does not exist.", fix="give the path of a CSV/TSV data file.")
    context = []
    if kind.startswith("cyp"):
        if not enzyme:
            raise ESMError(f"Task file {path.name!r} of family {family!r} needs the enzyme.",
                           fix="add --enzyme CYP2D6 (or another of " + ", ".join(CYP_ENZYMES) + ").")
        ep = resolve_data_dir(data_dir) / "public" / "cyp" / "cyp_enzymes.tsv"
        if not ep.is_file():
            raise MissingData(name, ep)
        context = [(f"Enzyme ({enzyme.upper()})", Item("protein", enzyme_sequence(enzyme, ep)))]
    df = _read(name, path, [*cols.values(), "Y"])  # refuses a file without the family's columns
    try:  # only the named columns are read: ask again with the optional split column
        df, has_split = _read(name, path, [*cols.values(), "Y", "split"]), True
    except ESMError:
        has_split = False
    counts: Counter = Counter()
    splits: dict[str, list[Record]] = {"train": [], "test": []}
    modality = {"smiles": "smiles", "smiles_2": "smiles", "protein": "protein", "genes": "genes"}
    for i in range(len(df)):
        counts["rows_read"] += 1
        values, why = {}, None
        for key, col in cols.items():
            v, bad = VALIDATORS[modality[key]](df[col].iloc[i])
            if bad:
                why = {"smiles": "invalid_smiles", "protein": "invalid_protein"}.get(modality[key], "bad_genes")
                break
            values[key] = " ".join(v.split()[:top_n]) if key == "genes" else v
        if why:
            counts[why] += 1
            continue
        lab = _binary(df["Y"].iloc[i])
        if lab is None:
            counts["bad_label"] += 1
            continue
        split = str(df["split"].iloc[i]).strip().lower() if has_split else "train"
        if split not in splits:
            raise ESMError(f"Task file {path.name!r} row {i}: split {df['split'].iloc[i]!r} is not train or test.",
                           fix="write train or test in the split column, or drop the column for a seeded split.")
        splits[split].append(Record(values, yes if lab else no, {"file": path.name, "row": i}))
    if has_split:
        train, test, note = splits["train"], splits["test"], "split as given in the file's split column"
    else:
        train, test = _split(splits["train"], test_fraction, seed)
        note = f"seeded split (seed {seed}, test fraction {test_fraction})"
    return _usable(TaskData(name, name, group, kind, train, test, context=context, files=[str(path)],
                            counts=dict(counts), note=note))
