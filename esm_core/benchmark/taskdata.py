"""The data of a few-shot benchmark task (docs/METHOD.md section 7): records, the loaded task, load errors.

A task is a binary question about a molecule and a protein, a molecule (or drug pair) and a cell,
or a molecule and a fixed CYP enzyme: a system prompt (paraphrased from the paper's appendix), a
question, two labels and the fields that make up one example (:class:`FieldDef`, per family). A
loaded task (:class:`TaskData`) holds a training pool (for the in-context examples), a test split
of :class:`Record` rows and the load counts; it selects the examples of a query (``fewshot``) and
writes its few-shot prompt.

The loaders (``loaders``) build TaskData; the registry of named tasks is ``tasks``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from esm_core.answering.prompts import Example, Item, Prompt, few_shot_prompt
from esm_core.benchmark import fewshot
from esm_core.errors import ESMError
from esm_core.paths import DATA_ENV
from esm_core.samples import VALIDATORS


class SkippedTask(ESMError):
    """A task these files cannot give; ``tasks.load_tasks`` skips it with this message."""

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
                "cell_without_genes": "cell line without genes", "bad_genes": "invalid gene list",
                "test_duplicates": "test row repeating an earlier test row's inputs",
                "pool_duplicates": "pool row repeating an earlier pool row's inputs",
                "pool_rows_in_test": "pool row with a test row's inputs (would leak the answer)"}


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
        """The chosen training examples for a query record (docs/METHOD.md section 7), best first."""
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

    @property
    def shows_proteins(self) -> bool:
        """Whether prompts of this task hold a protein (a field or the shared context)."""
        return any(f.modality == "protein" for f in self.fields) or any(i.modality == "protein" for _, i in self.context)

    def _shown(self, modality: str, raw: str, residues: int | None = None) -> str:
        cap = min((x for x in (residues, self.protein_residues) if x), default=None)
        if modality == "protein" and cap:
            return raw[:cap]
        return raw

    def example(self, record: Record, with_label: bool = True, residues: int | None = None) -> Example:
        """The record as prompt fields. Proteins are cut to their first ``residues`` (or ``protein_residues``
        when set; the smaller wins); selection uses them whole."""
        return Example([(f.name, Item(f.modality, self._shown(f.modality, record.values[f.key], residues)))
                        for f in self.fields], record.label if with_label else None, dict(record.meta))

    def prompt(self, record: Record, k: int = 5, exclude=None, chosen=None, residues: int | None = None) -> Prompt:
        """Few-shot prompt for one query record; ``prompt.meta`` holds the chosen examples and their labels.

        ``chosen`` (a list of fewshot.Chosen) skips the selection, e.g. to drop examples that do not fit.
        ``residues``: show every protein (the examples', the query's, the context's) as its first N residues
        (``meta['protein_window']``), e.g. so that k examples fit the model's context.
        """
        if chosen is None:
            chosen = self.select(record, k, exclude)
        examples = [self.example(self.train[c.index], residues=residues) for c in chosen]
        p = few_shot_prompt(self.system, self.question, self.labels, examples,
                            self.example(record, False, residues=residues), answer=record.label,
                            context=[(n, Item(i.modality, self._shown(i.modality, i.raw, residues)))
                                     for n, i in self.context] or None)
        p.meta.update(task=self.name, chosen=list(chosen), example_labels=[e.label for e in examples],
                      query=dict(record.meta), protein_window=residues)
        return p

    def record_from(self, values: dict[str, str], label: str | None = None) -> Record:
        """A query record from user input (validated: SMILES parse, protein letters, genes)."""

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
