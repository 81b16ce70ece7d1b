"""Task definitions and dataset loaders for the few-shot benchmark (METHOD.md section 7).

A task is a binary question about a molecule and a protein, a molecule (or drug pair) and a cell,
or a molecule and a fixed CYP enzyme: a system prompt (paraphrased from the paper's appendix), a
question, two labels, the fields that make up one example, and a loader that returns a training
pool (for the in-context examples) and a test split.

    td = load_task("biosnap")                       # data directory: see default_data_dir()
    prompt = td.prompt(td.test[0], k=5)             # few-shot prompt; prompt.meta["chosen"]: examples
    tasks, skipped = load_tasks(["table1"])         # missing files are skipped with a message

Registered tasks (files relative to the data directory; suites ``table1``, ``table2``, ``all``):

| task | pool / test | labels |
|---|---|---|
| bindingdb, biosnap, human | ``public/dti/<name>_*_{train,test}.csv`` (BioSNAP has no train file here: its val file is the pool) | Y = 1 -> Yes, 0 -> No |
| gdsc2 | ``registry/gdsc2/``, seeded split | per-drug z-score rule below |
| gdsc2_iorio | ``public/gdsc2/gdsc2_iorio_labels.csv.gz``, seeded split | Iorio 2016 thresholds |
| drugcomb | ``public/drugcomb/`` (O'Neil, the DrugComb stand-in), seeded split | Loewe > 30 Synergistic, < 0 Antagonistic |
| cyp1a2 ... cyp3a4 | ``public/cyp/cyp*_veith.tab``, seeded split | Y = 1 -> Yes (inhibitor) |
| cyp2c9_substrate, cyp2d6_substrate, cyp3a4_substrate | ``public/cyp/cyp*_substrate_carbonmangels.tab`` (not shipped here: skipped) | Y = 1 -> Yes |

Label rules:
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
reason). Both are :class:`SkippedTask`, which :func:`load_tasks` turns into a skip message; a file
with wrong columns raises ESMError. Molecule-protein and CYP loaders take any file
with the same columns (:func:`molecule_protein_task`, :func:`cyp_task`).

The data directory is a setting: the ``data_dir`` argument, else the ``ESM_DATA_DIR`` environment
variable, else ``../shared/data`` next to the repository root when it exists. Files under
``public/`` are read in place and never copied into the project.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import ESMError
from .prompts import Example, Item, Prompt, few_shot_prompt

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ENV = "ESM_DATA_DIR"


class SkippedTask(ESMError):
    """A task these files cannot give; :func:`load_tasks` skips it with this message."""

    def __init__(self, task: str, why: str, *, fix: str):
        self.task = task
        super().__init__(f"Task {task!r} skipped: {why}", fix=fix)


class MissingData(SkippedTask):
    """A dataset file is not there."""

    def __init__(self, task: str, path: Path | str):
        self.path = str(path)
        super().__init__(task, f"data file {str(path)!r} not found.",
                         fix=f"put the file there or set the data directory (--data-dir or ${DATA_ENV}).")


class EmptyData(SkippedTask):
    """No usable row: a data file without rows, or a split left empty once invalid rows were skipped."""


# TaskData.counts keys that count rows skipped while loading, and how they read
SKIP_REASONS = {"invalid_smiles": "invalid SMILES", "invalid_protein": "invalid protein", "bad_label": "bad label",
                "between_thresholds": "label between the thresholds", "drug_without_smiles": "drug without SMILES",
                "cell_without_genes": "cell line without genes"}


def default_data_dir() -> Path | None:
    """``$ESM_DATA_DIR``, else ``<repo>/../shared/data`` when it exists, else None."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser().resolve()
    cand = (REPO_ROOT.parent / "shared" / "data").resolve()
    return cand if cand.is_dir() else None


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    d = Path(data_dir).expanduser().resolve() if data_dir else default_data_dir()
    if d is None:
        raise ESMError("No data directory is set and ../shared/data does not exist.",
                       fix=f"pass --data-dir (or set ${DATA_ENV}) to the folder holding public/ and registry/.")
    return d


# ------------------------------------------------------------------------------------ definitions
@dataclass(frozen=True)
class FieldDef:
    name: str  # shown in the prompt, e.g. "Molecule"
    key: str  # key in Record.values, e.g. "smiles"
    modality: str  # modality of the Item (its encoder embeds it): molecule | protein | cell


MOL = FieldDef("Molecule", "smiles", "molecule")
PROT = FieldDef("Protein", "protein", "protein")
DRUG = FieldDef("Drug", "smiles", "molecule")
DRUG1 = FieldDef("Drug 1", "smiles", "molecule")
DRUG2 = FieldDef("Drug 2", "smiles_2", "molecule")
CELL = FieldDef("Cell", "genes", "cell")

SYSTEM = {
    "molecule_protein": "You are an expert in drug discovery and molecular biology. Given a molecule as SMILES and "
                        "a protein as its amino-acid sequence, decide whether the molecule interacts with the protein.",
    "cyp_inhibition": "You are an expert in drug discovery and drug metabolism. Given a molecule as SMILES and a "
                      "cytochrome P450 enzyme as its amino-acid sequence, decide whether the molecule inhibits "
                      "the enzyme.",
    "cyp_substrate": "You are an expert in drug discovery and drug metabolism. Given a molecule as SMILES and a "
                     "cytochrome P450 enzyme as its amino-acid sequence, decide whether the molecule is a "
                     "substrate of the enzyme.",
    "molecule_cell": "You are an expert in cancer pharmacogenomics. Given a drug as SMILES and a cancer cell line "
                     "as its 50 most highly expressed genes in ranked order, decide whether the cell line is "
                     "Sensitive or Resistant to the drug.",
    "drug_pair": "You are an expert in cancer pharmacogenomics. Given two drugs as SMILES and a cancer cell line "
                 "as its 50 most highly expressed genes in ranked order, decide whether the drug combination is "
                 "Synergistic or Antagonistic in the cell line.",
}
QUESTION = {
    "molecule_protein": "Does the molecule interact with the protein?",
    "cyp_inhibition": "Does the molecule inhibit the enzyme?",
    "cyp_substrate": "Is the molecule a substrate of the enzyme?",
    "molecule_cell": "Is the cell line sensitive or resistant to the drug?",
    "drug_pair": "Is the drug combination synergistic or antagonistic in the cell line?",
}
LABELS = {
    "molecule_protein": ("Yes", "No"), "cyp_inhibition": ("Yes", "No"), "cyp_substrate": ("Yes", "No"),
    "molecule_cell": ("Sensitive", "Resistant"), "drug_pair": ("Synergistic", "Antagonistic"),
}
FIELDS = {
    "molecule_protein": (MOL, PROT), "cyp_inhibition": (MOL,), "cyp_substrate": (MOL,),
    "molecule_cell": (DRUG, CELL), "drug_pair": (DRUG1, DRUG2, CELL),
}


@dataclass
class Record:
    """One labelled row: raw field values (keys of FieldDef.key), the label text, provenance."""

    values: dict[str, str]
    label: str | None  # None for a user's unlabelled query
    meta: dict = field(default_factory=dict)


@dataclass
class TaskData:
    """A loaded task: definition, training pool, test split, shared context, load counts."""

    name: str
    title: str
    group: str  # column group of the comparison table
    family: str  # molecule_protein | cyp_inhibition | cyp_substrate | molecule_cell | drug_pair
    train: list[Record]
    test: list[Record]
    context: list[tuple[str, Item]] = field(default_factory=list)  # e.g. [("Enzyme", Item("protein", seq))]
    files: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    note: str = ""
    protein_similarity: object | None = None  # for molecule_protein: e.g. EmbeddingProteinSimilarity(esm2)
    protein_residues: int | None = None  # show only the first N residues of proteins in prompts (None: all)
    _selector: object | None = field(default=None, repr=False)

    @property
    def system(self) -> str:
        return SYSTEM[self.family]

    @property
    def question(self) -> str:
        return QUESTION[self.family]

    @property
    def labels(self) -> list[str]:
        return list(LABELS[self.family])

    @property
    def fields(self) -> tuple[FieldDef, ...]:
        return FIELDS[self.family]

    def majority_label(self) -> str:
        """Most frequent training label (ties: the first label of the task)."""
        c = Counter(r.label for r in self.train)
        return max(self.labels, key=lambda lab: (c[lab], -self.labels.index(lab)))

    # ---------------------------------------------------------------- example selection
    @property
    def selector(self):
        if self._selector is None:
            from . import fewshot

            tr = self.train
            if self.family == "molecule_protein":
                self._selector = fewshot.MoleculeProteinSelector([r.values["smiles"] for r in tr],
                                                                 [r.values["protein"] for r in tr],
                                                                 self.protein_similarity)
            elif self.family in ("cyp_inhibition", "cyp_substrate"):
                self._selector = fewshot.MoleculeSelector([r.values["smiles"] for r in tr])
            elif self.family == "molecule_cell":
                self._selector = fewshot.MoleculeCellSelector([r.values["smiles"] for r in tr],
                                                              [r.values["genes"].split() for r in tr])
            elif self.family == "drug_pair":
                self._selector = fewshot.MoleculeCellSelector([(r.values["smiles"], r.values["smiles_2"]) for r in tr],
                                                              [r.values["genes"].split() for r in tr])
            else:  # pragma: no cover - families are fixed above
                raise ValueError(self.family)
        return self._selector

    def select(self, record: Record, k: int = 5, exclude=None):
        """The chosen training examples for a query record (METHOD.md section 7), best first."""
        v = record.values
        if k <= 0 or not self.train:
            return []
        if self.family == "molecule_protein":
            return self.selector.select(v["smiles"], v["protein"], k, exclude)
        if self.family in ("cyp_inhibition", "cyp_substrate"):
            return self.selector.select(v["smiles"], k, exclude)
        if self.family == "molecule_cell":
            return self.selector.select(v["smiles"], v["genes"].split(), k, exclude)
        return self.selector.select((v["smiles"], v["smiles_2"]), v["genes"].split(), k, exclude)

    def _shown(self, modality: str, raw: str) -> str:
        if modality == "protein" and self.protein_residues:
            return raw[:self.protein_residues]
        return raw

    def example(self, record: Record, with_label: bool = True) -> Example:
        """The record as prompt fields (proteins cut to ``protein_residues`` when set; selection uses them whole)."""
        return Example([(f.name, Item(f.modality, self._shown(f.modality, record.values[f.key]))) for f in self.fields],
                       record.label if with_label else None, dict(record.meta))

    def prompt(self, record: Record, k: int = 5, exclude=None, chosen=None) -> Prompt:
        """Few-shot prompt for one query record; ``prompt.meta`` holds the chosen examples and their labels.

        ``chosen`` (a list of fewshot.Chosen) skips the selection, e.g. to drop examples that do not fit.
        """
        if chosen is None:
            chosen = self.select(record, k, exclude)
        examples = [self.example(self.train[c.index]) for c in chosen]
        p = few_shot_prompt(self.system, self.question, self.labels, examples, self.example(record, False),
                            answer=record.label,
                            context=[(n, Item(i.modality, self._shown(i.modality, i.raw))) for n, i in self.context] or None)
        p.meta.update(task=self.name, chosen=list(chosen), example_labels=[e.label for e in examples],
                      query=dict(record.meta))
        return p

    def record_from(self, values: dict[str, str], label: str | None = None) -> Record:
        """A query record from user input (validated: SMILES parse, protein letters, genes)."""
        from .samples import VALIDATORS

        kinds = {"smiles": "smiles", "smiles_2": "smiles", "protein": "protein", "genes": "genes"}
        clean = {}
        for f in self.fields:
            raw = values.get(f.key)
            if raw is None or str(raw).strip() == "":
                raise ESMError(f"The query lacks {f.name!r} ({f.key}).", fix=f"fill in {f.name}.")
            val, why = VALIDATORS[kinds[f.key]](str(raw))
            if why:
                raise ESMError(f"{f.name} {str(raw)[:40]!r}: {why}.", fix=f"correct the {f.name.lower()}.")
            clean[f.key] = val
        if label is not None and label not in self.labels:
            raise ESMError(f"Label {label!r} is not one of {self.labels}.")
        return Record(clean, label, {"source": "user"})

    @property
    def skipped_rows(self) -> dict[str, int]:
        """Rows skipped while loading, by reason (see SKIP_REASONS)."""
        return {why: self.counts[k] for k, why in SKIP_REASONS.items() if self.counts.get(k)}

    def load_note(self) -> str:
        """'1200 rows read; skipped: 3 invalid SMILES, 1 bad label' for messages and tables."""
        skipped = ", ".join(f"{n} {why}" for why, n in self.skipped_rows.items())
        return f"{self.counts.get('rows_read', 0)} rows read; skipped: {skipped or 'none'}"

    def summary(self) -> dict:
        c = Counter(r.label for r in self.test)
        return dict(task=self.name, title=self.title, family=self.family, n_train=len(self.train),
                    n_test=len(self.test), test_labels=dict(c), files=self.files, counts=self.counts)


# ------------------------------------------------------------------------------------ helpers
class _SmilesCheck:
    """RDKit parse check with a cache (pools repeat molecules)."""

    def __init__(self):
        self.ok: dict[str, bool] = {}

    def __call__(self, s: str) -> bool:
        got = self.ok.get(s)
        if got is None:
            from rdkit import Chem, RDLogger

            RDLogger.DisableLog("rdApp.*")
            got = bool(s) and " " not in s and Chem.MolFromSmiles(s) is not None
            self.ok[s] = got
        return got


def _need(task: str, path: Path) -> Path:
    if not path.is_file():
        raise MissingData(task, path)
    return path


def _read(task: str, path: Path, required: list[str]):
    from .samples import EmptyTable, read_table

    try:
        return read_table(_need(task, path), required=required)
    except EmptyTable as e:
        raise EmptyData(task, f"data file {e.path!r} holds no rows (it is empty or has only a header).",
                        fix=e.fix) from None


def _usable(td: TaskData) -> TaskData:
    """The task, or EmptyData when its pool or test split holds no row after invalid rows were skipped."""
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
def _dti_records(task: str, path: Path, counts: Counter, smiles_ok: _SmilesCheck) -> list[Record]:
    from .samples import VALIDATORS

    df = _read(task, path, ["SMILES", "Protein", "Y"])
    out = []
    for i, (s, p, y) in enumerate(zip(df["SMILES"], df["Protein"], df["Y"])):
        counts["rows_read"] += 1
        s = s.strip()
        if not smiles_ok(s):
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
    ok = _SmilesCheck()
    train_path = Path(train_path)
    train = _dti_records(name, train_path, counts, ok)
    files = [str(train_path)]
    if test_path is None:
        train, test = _split(train, test_fraction, seed)
    else:
        test = _dti_records(name, Path(test_path), counts, ok)
        files.append(str(test_path))
    return _usable(TaskData(name, title or name, "Molecule-protein interaction", "molecule_protein", train, test,
                            files=files, counts=dict(counts), protein_similarity=protein_similarity))


def _dti_loader(stem: str, title: str, pool: tuple[str, ...]):
    def load(data_dir: Path, *, seed: int = 0, test_fraction: float = 0.2, protein_similarity=None, **_):
        d = data_dir / "public" / "dti"
        pools = [d / f"{stem}_{p}.csv" for p in pool]
        pool_path = next((p for p in pools if p.is_file()), pools[0])
        test_path = _need(TASK_NAMES[stem], d / f"{stem}_test.csv")
        td = molecule_protein_task(pool_path, test_path, name=TASK_NAMES[stem], title=title,
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
    ok = _SmilesCheck()
    recs = []
    for i, (did, s, y) in enumerate(zip(df["Drug_ID"], df["Drug"], df["Y"])):
        counts["rows_read"] += 1
        s = s.strip()
        if not ok(s):
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


def _cyp_loader(enzyme: str, kind: str):
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


def _drug_smiles(task: str, path: Path, counts: Counter, ok: _SmilesCheck) -> dict[str, str]:
    col = "smiles"
    df = _read(task, path, ["drug", col])
    out = {}
    for d, s in zip(df["drug"], df[col]):
        s = s.strip()
        if ok(s):
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
    ok = _SmilesCheck()
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
    smiles = _drug_smiles(name, reg / "gdsc2_drug_smiles.tsv", counts, ok)
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
    ok = _SmilesCheck()
    smiles = _drug_smiles(name, _need(name, d / "oneil_drug_smiles.tsv"), counts, ok)
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


# ------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class TaskDef:
    name: str
    title: str
    group: str
    files: tuple[str, ...]  # relative to the data directory (for listings and messages)
    loader: Callable[..., TaskData]


TASK_NAMES = {"bindingdb_sample": "bindingdb", "biosnap_random": "biosnap", "human_random": "human"}

TASKS: dict[str, TaskDef] = {}


def _reg(t: TaskDef) -> None:
    TASKS[t.name] = t


_reg(TaskDef("bindingdb", "BindingDB", "Molecule-protein interaction",
             ("public/dti/bindingdb_sample_train.csv", "public/dti/bindingdb_sample_test.csv"),
             _dti_loader("bindingdb_sample", "BindingDB", ("train",))))
_reg(TaskDef("biosnap", "BioSNAP", "Molecule-protein interaction",
             ("public/dti/biosnap_random_val.csv", "public/dti/biosnap_random_test.csv"),
             _dti_loader("biosnap_random", "BioSNAP", ("train", "val"))))
_reg(TaskDef("human", "Human", "Molecule-protein interaction",
             ("public/dti/human_random_train.csv", "public/dti/human_random_test.csv"),
             _dti_loader("human_random", "Human", ("train",))))
_GDSC_REG = ("registry/gdsc2/gdsc2_drug_smiles.tsv", "registry/gdsc2/cell_line_top100_genes.tsv")
_reg(TaskDef("gdsc2", "GDSC2", "Molecule-cell", ("registry/gdsc2/gdsc2_ln_ic50.csv.gz", *_GDSC_REG),
             lambda d, **kw: gdsc2_task(d, labels="z", **kw)))
_reg(TaskDef("gdsc2_iorio", "GDSC2 (Iorio)", "Molecule-cell", ("public/gdsc2/gdsc2_iorio_labels.csv.gz", *_GDSC_REG),
             lambda d, **kw: gdsc2_task(d, labels="iorio", **kw)))
_reg(TaskDef("drugcomb", "DrugComb (O'Neil)", "Molecule-cell",
             ("public/drugcomb/oneil_loewe_triples.csv", "public/drugcomb/oneil_drug_smiles.tsv", _GDSC_REG[1]),
             lambda d, **kw: drugcomb_task(d, **kw)))
for _e in CYP_ENZYMES:
    _reg(TaskDef(_e.lower(), _e, "CYP inhibition", (f"public/cyp/{_e.lower()}_veith.tab", "public/cyp/cyp_enzymes.tsv"),
                 _cyp_loader(_e, "inhibition")))
for _e in ("CYP2C9", "CYP2D6", "CYP3A4"):
    _reg(TaskDef(f"{_e.lower()}_substrate", _e, "CYP substrate",
                 (f"public/cyp/{_e.lower()}_substrate_carbonmangels.tab", "public/cyp/cyp_enzymes.tsv"),
                 _cyp_loader(_e, "substrate")))

SUITES: dict[str, list[str]] = {
    # our reading of the paper's tables: Table 1 cross-modal interaction, Table 2 CYP
    "table1": ["bindingdb", "biosnap", "human", "gdsc2", "gdsc2_iorio", "drugcomb"],
    "table2": [f"{e.lower()}" for e in CYP_ENZYMES] + ["cyp2c9_substrate", "cyp2d6_substrate", "cyp3a4_substrate"],
}
SUITES["all"] = SUITES["table1"] + SUITES["table2"]


def list_tasks() -> list[TaskDef]:
    return list(TASKS.values())


def task_table(data_dir: str | Path | None = None) -> list[dict]:
    """One row per registered task: name, title, group, files and whether they are all present (for the app)."""
    d = Path(data_dir).expanduser().resolve() if data_dir else default_data_dir()
    rows = []
    for t in TASKS.values():
        missing = [f for f in t.files if d is None or not (d / f).is_file()]
        rows.append(dict(name=t.name, title=t.title, group=t.group, files=list(t.files), available=not missing,
                         missing=missing))
    return rows


def expand_names(names: list[str] | str) -> list[str]:
    """Task names with suites (table1, table2, all) expanded, duplicates removed, order kept."""
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for n in names:
        for part in str(n).split(","):
            part = part.strip().lower()
            if not part:
                continue
            if part in SUITES:
                out.extend(SUITES[part])
            elif part in TASKS:
                out.append(part)
            else:
                raise ESMError(f"Unknown task {part!r}.", fix=f"use one of {sorted(TASKS)} or a suite {sorted(SUITES)}.")
    return list(dict.fromkeys(out))


def load_task(name: str, data_dir: str | Path | None = None, **options) -> TaskData:
    """Load one registered task (SkippedTask when a file is absent or gives no usable row; ESMError for
    wrong columns)."""
    if name not in TASKS:
        raise ESMError(f"Unknown task {name!r}.", fix=f"use one of {sorted(TASKS)}.")
    return TASKS[name].loader(resolve_data_dir(data_dir), **options)


def load_tasks(names: list[str] | str, data_dir: str | Path | None = None, *, log: Callable[[str], None] | None = None,
               **options) -> tuple[list[TaskData], list[str]]:
    """Load several tasks; missing or empty datasets are skipped: returns (loaded, skip messages)."""
    loaded, skipped = [], []
    for n in expand_names(names):
        try:
            loaded.append(load_task(n, data_dir, **options))
        except SkippedTask as e:
            skipped.append(str(e.reason))
            if log:
                log(str(e.reason))
    return loaded, skipped
