"""Properties of probe samples to colour the embedding maps by (the Embeddings page).

Computed from the sample itself: a molecule's RDKit descriptors (esm_core/chem.py), a protein's length,
hydrophobic share and net charge at pH 7 (K, R +1; D, E -1), a cell's number of ranked genes and its
top gene. The data file's own columns (a cell type, a source) join these in the app when the samples are
the data file's rows.
"""

from __future__ import annotations

import pandas as pd

from esm_core import chem

HYDROPHOBIC = set("AILMFVWC")


def sample_properties(kind: str, raws: list[str]) -> pd.DataFrame:
    """One row per sample, one column per property of its kind (smiles, protein, genes); empty otherwise."""
    rows: list[dict] = []
    for r in raws:
        if kind == "smiles":
            rows.append(chem.descriptors(r))
        elif kind == "protein":
            n = len(r)
            rows.append({"length": float(n), "hydrophobic share": sum(c in HYDROPHOBIC for c in r) / max(1, n),
                         "net charge": float(sum(c in "KR" for c in r) - sum(c in "DE" for c in r))})
        elif kind == "genes":
            genes = r.split()
            rows.append({"genes": float(len(genes)), "top gene": genes[0] if genes else ""})
        else:
            rows.append({})
    return pd.DataFrame(rows, index=range(len(raws)))
