"""The registry of few-shot benchmark tasks (docs/METHOD.md section 7): names, suites, loading by name.

    td = load_task("biosnap")                       # data directory: see default_data_dir()
    prompt = td.prompt(td.test[0], k=5)             # few-shot prompt; prompt.meta["chosen"]: examples
    tasks, skipped = load_tasks(["table1"])         # missing files are skipped with a message

Registered tasks (files relative to the data directory; suites ``table1``, ``table2``, ``all``; the
label rules and the rows a loader skips are in ``loaders``):

| task | pool / test | labels |
|---|---|---|
| bindingdb, biosnap, human | ``public/dti/<name>_*_{train,test}.csv`` (BioSNAP has no train file here: its val file is the pool) | Y = 1 -> Yes, 0 -> No |
| gdsc2 | ``registry/gdsc2/``, seeded split | per-drug z-score rule |
| gdsc2_iorio | ``public/gdsc2/gdsc2_iorio_labels.csv.gz``, seeded split | Iorio 2016 thresholds |
| drugcomb | ``public/drugcomb/`` (O'Neil, the DrugComb stand-in), seeded split | Loewe > 30 Synergistic, < 0 Antagonistic |
| cyp1a2 ... cyp3a4 | ``public/cyp/cyp*_veith.tab``, seeded split | Y = 1 -> Yes (inhibitor) |
| cyp2c9_substrate, cyp2d6_substrate, cyp3a4_substrate | ``public/cyp/cyp*_substrate_carbonmangels.tab`` (not shipped here: skipped) | Y = 1 -> Yes |

A task whose file is missing (:class:`MissingData`) or gives no usable row is a :class:`SkippedTask`,
which :func:`load_tasks` turns into a skip message. The loaders also take any file with the same
columns (``loaders.molecule_protein_task``, ``loaders.cyp_task``).

The data directory is a setting: the ``data_dir`` argument, else the ``ESM_DATA_DIR`` environment
variable, else ``../shared/data`` next to the repository root when it exists. Files under
``public/`` are read in place and never copied into the project.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from esm_core.benchmark.loaders import CYP_ENZYMES, cyp_loader, drugcomb_task, dti_loader, gdsc2_task
from esm_core.benchmark.taskdata import MissingData, Record, SkippedTask, TaskData
from esm_core.errors import ESMError
from esm_core.paths import default_data_dir, resolve_data_dir

# the public task API: callers import these from here
__all__ = ["MissingData", "Record", "SkippedTask", "TaskData", "TaskDef", "TASKS", "SUITES", "list_tasks",
           "task_table", "expand_names", "load_task", "load_tasks"]


# ------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class TaskDef:
    name: str
    title: str
    group: str
    files: tuple[str, ...]  # relative to the data directory (for listings and messages)
    loader: Callable[..., TaskData]


TASKS: dict[str, TaskDef] = {}


def _reg(t: TaskDef) -> None:
    TASKS[t.name] = t


_reg(TaskDef("bindingdb", "BindingDB", "Molecule-protein interaction",
             ("public/dti/bindingdb_sample_train.csv", "public/dti/bindingdb_sample_test.csv"),
             dti_loader("bindingdb", "bindingdb_sample", "BindingDB", ("train",))))
_reg(TaskDef("biosnap", "BioSNAP", "Molecule-protein interaction",
             ("public/dti/biosnap_random_val.csv", "public/dti/biosnap_random_test.csv"),
             dti_loader("biosnap", "biosnap_random", "BioSNAP", ("train", "val"))))
_reg(TaskDef("human", "Human", "Molecule-protein interaction",
             ("public/dti/human_random_train.csv", "public/dti/human_random_test.csv"),
             dti_loader("human", "human_random", "Human", ("train",))))
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
                 cyp_loader(_e, "inhibition")))
for _e in ("CYP2C9", "CYP2D6", "CYP3A4"):
    _reg(TaskDef(f"{_e.lower()}_substrate", _e, "CYP substrate",
                 (f"public/cyp/{_e.lower()}_substrate_carbonmangels.tab", "public/cyp/cyp_enzymes.tsv"),
                 cyp_loader(_e, "substrate")))

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
