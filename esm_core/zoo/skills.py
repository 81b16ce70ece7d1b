"""The zoo's skills: binary questions about a molecule, a protein or a cell, and how to score them.

A skill is a question with two labels whose answer is a fact about one sample (see facts.py):
RDKit descriptors and substructures or a FreeSolv measurement for molecules, sequence-derived
facts or a Swiss-Prot keyword for proteins, a PBMC cell type or a GDSC expression fact for cells.
Every question is asked in a MIXED-modality prompt (docs/METHOD.md section 7 format): the query holds a
molecule, a protein and a cell, the question asks about one of them, and k in-context examples
show the asked modality with its label.

Held-out skill sets come from the held-out demo samples (assets/demo/*_heldout.csv), balanced
between the two labels, with in-context examples from the train split (the few-shot pool):

    sets = heldout_skill_sets(load_demo())                 # {skill name: SkillSet}
    report = measure_skills(sset, encoders, sets, [None, "molecule", "merged"])
    print(report.table())                                  # the skill-retention table
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

from esm_core.answering.prompts import Example, Item, Prompt, few_shot_prompt
from esm_core.encoders import separated
from esm_core.errors import ESMError
from esm_core.zoo.facts import genes_of, mol_facts, protein_facts

MODALITIES = ("molecule", "protein", "cell")


FIELD = {"molecule": "Molecule", "protein": "Protein", "cell": "Cell"}


PREFIX = {m: f"{FIELD[m]}: " for m in MODALITIES}


SYSTEM = {
    "molecule": "You are an expert medicinal chemist. Answer the question about the molecule of the query.",
    "protein": "You are an expert protein biochemist. Answer the question about the protein of the query.",
    "cell": "You are an expert in cell biology and cancer cell lines. Answer the question about the cell of the query.",
}


YES_NO = ("Yes", "No")


# how the zoo's text encoders show a modality: proteins one residue per token ("M K T ..."), the
# `separator` option of the protein's text encoder in run.yaml; the training code uses the same
SEPARATOR = {"protein": " "}


def shown_text(modality: str, raw: str) -> str:
    return separated(raw, SEPARATOR.get(modality))


@lru_cache(maxsize=200_000)
def _mf(smiles: str) -> dict:
    return mol_facts(smiles)


@lru_cache(maxsize=50_000)
def _pf(seq: str) -> dict:
    return protein_facts(seq)


def _hfe(row):
    v = row.get("hydration_free_energy", "")
    return None if v in ("", None) else float(v) < -4.0


def _keyword(name):
    def fn(row):
        kw = row.get("keywords")
        if kw is None:  # not a Swiss-Prot record: unknown
            return None
        return name in [k.strip() for k in kw.split(";")]
    return fn


def _pbmc(types):
    def fn(row):
        if row.get("source") != "pbmc68k":
            return None
        return row["cell_type"] in types
    return fn


def _gdsc_gene(gene):
    def fn(row):
        if row.get("source") != "gdsc2_cell_line":
            return None
        return gene in genes_of(row["genes"])
    return fn


def _primary(row):
    src = row.get("source")
    if src not in ("pbmc68k", "gdsc2_cell_line"):
        return None
    return src == "pbmc68k"


@dataclass(frozen=True)
class Skill:
    """One binary question about one modality; ``fact(row)`` -> True (labels[0]), False, or None (n/a)."""

    name: str
    modality: str
    question: str
    fact: Callable[[dict], bool | None]
    source: str  # where the answer comes from, for the tables
    labels: tuple[str, str] = YES_NO
    # a protein skill that asks whether one residue is present: its letter (the builder's contrast warm-up,
    # contrast_pools, makes that residue absent or frequent)
    residue: str | None = None

    def label(self, row: dict) -> str | None:
        v = self.fact(row)
        return None if v is None else self.labels[0 if v else 1]


# The skills the zoo trains and measures: each is learnable by the zoo's small LLaMA (BuildConfig) with a
# rank-8 LoRA in a few CPU minutes (measured while building the zoo: SKILLS.md).
SKILLS: tuple[Skill, ...] = (
    Skill("mol_aromatic", "molecule", "Does the molecule contain an aromatic ring?",
          lambda r: _mf(r["smiles"])["aromatic_rings"] > 0, "RDKit aromatic ring count"),
    Skill("mol_carboxylic_acid", "molecule", "Does the molecule contain a carboxylic acid group?",
          lambda r: _mf(r["smiles"])["carboxylic_acid"], "RDKit SMARTS"),
    Skill("mol_halogen", "molecule", "Does the molecule contain a halogen atom?",
          lambda r: _mf(r["smiles"])["halogen"], "RDKit SMARTS"),
    Skill("mol_three_rings", "molecule", "Does the molecule have at least three rings?",
          lambda r: _mf(r["smiles"])["rings"] >= 3, "RDKit ring count"),
    Skill("mol_logp", "molecule", "Is the molecule's logP above 3?",
          lambda r: _mf(r["smiles"])["logp"] > 3.0, "RDKit Crippen logP"),
    Skill("mol_weight", "molecule", "Is the molecular weight above 350 Da?",
          lambda r: _mf(r["smiles"])["mw"] > 350.0, "RDKit molecular weight"),
    Skill("mol_hydration", "molecule", "Is the measured hydration free energy below -4 kcal/mol?",
          _hfe, "FreeSolv experimental value"),
    Skill("prot_trp", "protein", "Does the sequence contain tryptophan (W)?",
          lambda r: "W" in r["sequence"], "sequence", residue="W"),
    Skill("prot_cys", "protein", "Does the sequence contain cysteine (C)?",
          lambda r: "C" in r["sequence"], "sequence", residue="C"),
    Skill("prot_his", "protein", "Does the sequence contain histidine (H)?",
          lambda r: "H" in r["sequence"], "sequence", residue="H"),
    Skill("cell_t", "cell", "Is this cell a T cell?", _pbmc(set(("CD4+/CD25 T Reg", "CD8+ Cytotoxic T",
          "CD8+/CD45RA+ Naive Cytotoxic", "CD4+/CD45RO+ Memory", "CD4+/CD45RA+/CD25- Naive T"))),
          "PBMC 68k annotation"),
    Skill("cell_monocyte", "cell", "Is this cell a CD14+ monocyte?", _pbmc({"CD14+ Monocyte"}),
          "PBMC 68k annotation"),
    Skill("cell_primary", "cell", "Is this a primary blood cell rather than a cancer cell line?", _primary,
          "PBMC 68k vs GDSC cell line"),
)


# Harder questions kept for users of bigger models (ask them on the Query page or pass them to
# heldout_skill_sets(skills=...)): a gene lookup in a ranked list, composition thresholds of a sequence
# (net charge, GRAVY, ...), a sequence motif, a Swiss-Prot keyword, a rare PBMC type. The tiny zoo
# specialists stayed near chance on them in pilot runs (e.g. protein composition: answer loss flat at
# ln 2 for 800 steps). Those pilots ran on an earlier base with tied embeddings, whose residue tokens
# had collapsed together (BuildConfig.tie_embeddings); they were not re-tried on the untied base.
EXTRA_SKILLS: tuple[Skill, ...] = (
    Skill("prot_pro_gly", "protein", "Are proline and glycine together at least 12.5 % of the sequence?",
          lambda r: _pf(r["sequence"])["pro_gly_fraction"] >= 0.125, "amino-acid counts"),
    Skill("prot_charge", "protein", "Is the net charge (K + R - D - E) of the sequence positive?",
          lambda r: _pf(r["sequence"])["net_charge"] > 0, "amino-acid counts"),
    Skill("prot_gravy", "protein", "Is the GRAVY hydropathy of the sequence above -0.25?",
          lambda r: _pf(r["sequence"])["gravy"] > -0.25, "Kyte-Doolittle GRAVY"),
    Skill("prot_tm", "protein", "Does the sequence contain a hydrophobic transmembrane-like segment "
          "(19 residues with mean Kyte-Doolittle hydropathy of at least 1.6)?",
          lambda r: _pf(r["sequence"])["max_kd_window"] >= 1.6, "Kyte-Doolittle window"),
    Skill("prot_cysteine", "protein", "Is cysteine at least 2.5 % of the sequence?",
          lambda r: _pf(r["sequence"])["cys_fraction"] >= 0.025, "amino-acid counts"),
    Skill("mol_hydroxyl", "molecule", "Does the molecule have an aliphatic hydroxyl group?",
          lambda r: _mf(r["smiles"])["hydroxyl"], "RDKit SMARTS"),
    Skill("mol_lipinski", "molecule", "Does the molecule obey Lipinski's rule of five (at most one violation)?",
          lambda r: _mf(r["smiles"])["lipinski_violations"] <= 1, "RDKit MW, Crippen logP, HBD, HBA"),
    Skill("prot_sequon", "protein", "Does the sequence contain an N-glycosylation motif N-X-S/T (X not P)?",
          lambda r: re.search("N[^P][ST]", r["sequence"]) is not None, "sequence motif"),
    Skill("prot_transport", "protein", "Is the protein annotated with the Swiss-Prot keyword Transport?",
          _keyword("Transport"), "Swiss-Prot KW line"),
    Skill("cell_b", "cell", "Is this cell a B cell?", _pbmc({"CD19+ B"}), "PBMC 68k annotation"),
    Skill("cell_vim", "cell", "Is the mesenchymal marker VIM among the cell line's top-ranked genes?",
          _gdsc_gene("VIM"), "GDSC expression"),
    Skill("cell_krt19", "cell", "Is the epithelial keratin KRT19 among the cell line's top-ranked genes?",
          _gdsc_gene("KRT19"), "GDSC expression"),
    Skill("cell_male", "cell", "Is the Y-chromosome gene RPS4Y1 among the cell line's top-ranked genes?",
          _gdsc_gene("RPS4Y1"), "GDSC expression"),
)


SKILL_BY_NAME = {s.name: s for s in SKILLS + EXTRA_SKILLS}


AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def contrast_pools(pools: Pools, skills: list[Skill], rng: random.Random, rate: float) -> Pools:
    """The pools with every protein row rewritten, for each residue skill, so that its residue is either absent
    (each occurrence replaced by a random other residue, none of the skills' residues) or frequent (each position
    turned into it with probability uniform in [rate/2, 3 rate/2]); a coin per row and residue. The facts follow
    the rewritten sequence (Pools.labelled recomputes them).

    A presence question hinges on one residue among a prompt's ~290 tokens; on natural sequences a fresh LoRA
    gets no first-order signal from it. On contrast rows, attention spread evenly over the query already
    carries the answer (builder: contrast_questions).
    """
    marks = [s.residue for s in skills if s.residue]
    if not marks:
        return pools
    fill = [a for a in AMINO_ACIDS if a not in marks]

    def rewrite(seq: str) -> str:
        out = list(seq)
        for x in marks:
            if rng.random() < 0.5:
                out = [rng.choice(fill) if c == x else c for c in out]
            else:
                f = rng.uniform(rate * 0.5, rate * 1.5)
                out = [x if rng.random() < f else c for c in out]
        return "".join(out)

    rows = {m: ([dict(r, sequence=rewrite(r["sequence"])) for r in rs] if m == "protein" else rs)
            for m, rs in pools.rows.items()}
    return Pools(rows)


def skills_of(modality: str) -> list[Skill]:
    return [s for s in SKILLS if s.modality == modality]


def raw_of(modality: str, row: dict) -> str:
    return row["smiles"] if modality == "molecule" else row["sequence"] if modality == "protein" else row["genes"]


# ------------------------------------------------------------------------------------ pools
@dataclass
class Pools:
    """Sample rows per modality (dicts with smiles / sequence / genes and metadata)."""

    rows: dict[str, list[dict]]
    _index: dict = field(default_factory=dict, repr=False)

    def labelled(self, skill: Skill) -> tuple[list[int], list[int]]:
        """Row indices whose fact is labels[0] / labels[1] (cached)."""
        key = skill.name
        if key not in self._index:
            pos, neg = [], []
            for i, r in enumerate(self.rows[skill.modality]):
                v = skill.fact(r)
                if v is None:
                    continue
                (pos if v else neg).append(i)
            self._index[key] = (pos, neg)
        return self._index[key]


PROMPT_RESIDUES = 80  # residues of a protein a zoo prompt shows (its N-terminal window); facts are of that window


def demo_pools(demo, split: str, extra: dict[str, list[dict]] | None = None) -> Pools:
    """Pools from DemoData ('train' or 'heldout'), plus extra rows (e.g. public training proteins).

    Protein rows hold their first PROMPT_RESIDUES residues: the sequence-derived facts are computed on
    exactly what the prompt shows (a tiny LLM reads ~30 BPE tokens per protein, not ~100).
    """
    def recs(df):
        return df.to_dict("records")

    rows = {
        "molecule": recs(getattr(demo, f"molecules_{split}")),
        "protein": recs(getattr(demo, f"proteins_{split}")),
        "cell": recs(getattr(demo, f"cells_{split}")),
    }
    for m, extra_rows in (extra or {}).items():
        rows[m] = rows[m] + list(extra_rows)
    rows["protein"] = [dict(r, sequence=r["sequence"][:PROMPT_RESIDUES]) for r in rows["protein"]]
    return Pools(rows)


# ------------------------------------------------------------------------------------ prompts
def skill_prompt(skill: Skill, query: dict[str, str], label: str | None, examples: list[tuple[str, str]]) -> Prompt:
    """Mixed-modality prompt: examples show the asked modality only, the query holds the modalities of
    ``query`` (all three for a held-out question) in the fixed order molecule, protein, cell."""
    m = skill.modality
    exs = [Example([(FIELD[m], Item(m, raw))], lab) for raw, lab in examples]
    q = Example([(FIELD[mm], Item(mm, query[mm])) for mm in MODALITIES if mm in query])
    p = few_shot_prompt(SYSTEM[m], skill.question, list(skill.labels), exs, q, answer=label)
    p.meta["skill"] = skill.name
    return p


def sample_question(skill: Skill, pools: Pools, rng: random.Random, k: int, *, example_pools: Pools | None = None,
                    want: bool | None = None, mixed: bool = True) -> Prompt:
    """A random balanced question of one skill from pools (examples from example_pools, default pools).

    mixed=False: the query holds only the asked modality (a single-modality prompt, as a specialist's
    own training data has them); held-out questions are always mixed.
    """
    pos, neg = pools.labelled(skill)
    want = rng.random() < 0.5 if want is None else want
    idx = rng.choice(pos if want else neg)
    return _question(skill, pools, idx, want, rng, k, example_pools or pools, mixed=mixed)


def _question(skill, pools, idx, want, rng, k, ex_pools, mixed: bool = True) -> Prompt:
    m = skill.modality
    epos, eneg = ex_pools.labelled(skill)
    examples = []
    for _ in range(k):
        w = rng.random() < 0.5
        j = rng.choice(epos if w else eneg)
        if ex_pools is pools and j == idx:
            j = rng.choice(epos if w else eneg)
        examples.append((raw_of(m, ex_pools.rows[m][j]), skill.labels[0 if w else 1]))
    query = {}
    for mm in MODALITIES:
        if mm == m:
            query[mm] = raw_of(mm, pools.rows[m][idx])
        elif mixed:
            query[mm] = raw_of(mm, rng.choice(pools.rows[mm]))
    return skill_prompt(skill, query, skill.labels[0 if want else 1], examples)


@dataclass
class SkillSet:
    """The held-out questions of one skill (balanced), as ready prompts."""

    skill: Skill
    prompts: list[Prompt]

    @property
    def n(self) -> int:
        return len(self.prompts)


def heldout_skill_sets(demo, *, k: int = 1, per_label: int = 40, seed: int = 0,
                       skills: list[str] | None = None) -> dict[str, SkillSet]:
    """Balanced held-out question sets: up to per_label questions per label, k train-pool examples each."""
    held = demo_pools(demo, "heldout")
    train = demo_pools(demo, "train")
    out = {}
    for s in (SKILLS if skills is None else SKILLS + EXTRA_SKILLS):
        if skills is not None and s.name not in skills:
            continue
        pos, neg = held.labelled(s)
        n = min(len(pos), len(neg), per_label)
        if n < min(4, per_label):
            raise ESMError(f"Skill {s.name!r} has only {min(len(pos), len(neg))} held-out samples of one label.",
                           fix="check the demo data (assets/demo) or lower per_label.")
        rng = random.Random(f"{seed}:{s.name}")
        chosen = [(i, True) for i in rng.sample(pos, n)] + [(i, False) for i in rng.sample(neg, n)]
        rng.shuffle(chosen)
        prompts = [_question(s, held, i, w, rng, k, train) for i, w in chosen]
        out[s.name] = SkillSet(s, prompts)
    return out
