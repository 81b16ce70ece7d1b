"""Facts about molecules, proteins and cells computed from real data: the answers of the zoo's skills.

Every fact is either measured data carried with the sample (FreeSolv hydration free energy, a
Swiss-Prot keyword, a PBMC cell-type annotation) or a deterministic computation on the raw sample
(RDKit descriptors and SMARTS matches, amino-acid counts, gene-list membership). Nothing is guessed.

    mol_facts("CC(=O)Oc1ccccc1C(=O)O")["carboxylic_acid"]   # True
    protein_facts("MKTAYIAKQR")["net_charge"]               # 2
"""

from __future__ import annotations

from functools import lru_cache

from esm_core import chem

# Kyte & Doolittle (1982) hydropathy scale.
KYTE_DOOLITTLE = {
    "A": 1.8, "R": -4.5, "N": -3.5, "D": -3.5, "C": 2.5, "Q": -3.5, "E": -3.5, "G": -0.4, "H": -3.2, "I": 4.5,
    "L": 3.8, "K": -3.9, "M": 1.9, "F": 2.8, "P": -1.6, "S": -0.8, "T": -0.7, "W": -0.9, "Y": -1.3, "V": 4.2,
}

_SMARTS = {
    "carboxylic_acid": "[CX3](=O)[OX2H1,OX1-]",
    "halogen": "[F,Cl,Br,I]",
    "primary_amine": "[NX3;H2;!$(NC=[O,S,N]);!$(Na)][#6]",
    "hydroxyl": "[OX2H][CX4]",
    "carbonyl": "[CX3]=[OX1]",
    "nitro": "[$([NX3](=O)=O),$([NX3+](=O)[O-])]",
}


@lru_cache(maxsize=None)
def _patterns():
    from rdkit import Chem  # lazy, as in esm_core.chem

    return {k: Chem.MolFromSmarts(v) for k, v in _SMARTS.items()}


def largest_fragment(smiles: str) -> str | None:
    """Canonical SMILES of the largest fragment (salts and counter-ions dropped), None if unparsable."""
    from rdkit import Chem  # lazy, as in esm_core.chem: RDKit is slow to import

    mol = chem.parse(smiles)
    if mol is None:
        return None
    frags = Chem.GetMolFrags(mol, asMols=True)
    if len(frags) > 1:
        mol = max(frags, key=lambda m: (m.GetNumHeavyAtoms(), Chem.MolToSmiles(m)))
    return Chem.MolToSmiles(mol)


def mol_facts(smiles: str) -> dict:
    """RDKit descriptors and substructure flags of one molecule."""
    from rdkit.Chem import Crippen, Descriptors, Lipinski, rdMolDescriptors  # lazy, as in esm_core.chem

    mol = chem.parse(smiles)
    if mol is None:
        raise ValueError(f"unparsable SMILES {smiles!r}")
    mw = Descriptors.MolWt(mol)
    logp = Crippen.MolLogP(mol)
    hbd = Lipinski.NumHDonors(mol)
    hba = Lipinski.NumHAcceptors(mol)
    violations = int(mw > 500) + int(logp > 5) + int(hbd > 5) + int(hba > 10)
    out = dict(mw=mw, logp=logp, hbd=hbd, hba=hba, lipinski_violations=violations,
               rings=rdMolDescriptors.CalcNumRings(mol), aromatic_rings=rdMolDescriptors.CalcNumAromaticRings(mol),
               heavy_atoms=mol.GetNumHeavyAtoms())
    for k, p in _patterns().items():
        out[k] = mol.HasSubstructMatch(p)
    return out


def protein_facts(seq: str) -> dict:
    """Sequence-derived facts: length, net charge (K+R-D-E), GRAVY, composition, hydrophobic windows."""
    n = len(seq)
    kd = [KYTE_DOOLITTLE.get(c, 0.0) for c in seq]
    gravy = sum(kd) / n if n else 0.0
    best = -99.0
    w = 19
    if n >= w:
        s = sum(kd[:w])
        best = s / w
        for i in range(w, n):
            s += kd[i] - kd[i - w]
            best = max(best, s / w)
    cnt = {a: seq.count(a) for a in "KRDECHPGW"}
    return dict(length=n, net_charge=cnt["K"] + cnt["R"] - cnt["D"] - cnt["E"], gravy=gravy,
                max_kd_window=best, cys_fraction=cnt["C"] / n if n else 0.0,
                pro_gly_fraction=(cnt["P"] + cnt["G"]) / n if n else 0.0)


def genes_of(genes: str) -> list[str]:
    return genes.split()
