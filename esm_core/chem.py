"""RDKit in one place: parse and validate SMILES, Morgan fingerprints, Tanimoto similarity.

Every module that reads molecules goes through here (the ``smiles`` sample validator, the task
loaders, the few-shot selectors of docs/METHOD.md section 7, the soft-token encoders' ``morgan``
feature, the zoo's molecule facts, the previews), so a SMILES means the same thing everywhere:
RDKit's ``MolFromSmiles`` with its log quieted, and a fingerprint is the Morgan generator's output
for the same radius and bit count.

    mol = parse("CCO")                               # None when RDKit cannot parse it
    clean, why = check_smiles(" CCO ")               # ("CCO", None) or (None, reason)
    fp = fingerprint("CCO")                          # bit vector, radius 2, 2048 bits
    sims = tanimoto_many(fp, [fingerprint(s) for s in pool])

RDKit is imported inside the functions: importing it costs time that callers which never touch a
molecule (the app's start, most of the CLI) should not pay.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from esm_core.errors import ESMError

MORGAN_RADIUS = 2
MORGAN_BITS = 2048


def parse(smiles: str):
    """The RDKit molecule of a SMILES, or None when RDKit cannot parse it (RDKit's own log kept quiet)."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    return Chem.MolFromSmiles(smiles)


def mol(smiles: str):
    """The RDKit molecule of a SMILES; ESMError when RDKit cannot parse it."""
    m = parse(smiles)
    if m is None:
        raise ESMError(f"SMILES {smiles[:60]!r} cannot be parsed by RDKit.", fix="correct or drop this molecule.")
    return m


def check_smiles(raw: str) -> tuple[str | None, str | None]:
    """(stripped SMILES, None) when it is one RDKit parses, else (None, the reason)."""
    s = raw.strip()
    if not s:
        return None, "empty SMILES"
    if " " in s:
        return None, "SMILES contains a space"
    if parse(s) is None:
        return None, "RDKit cannot parse this SMILES"
    return s, None


@lru_cache(maxsize=1 << 16)
def valid_smiles(s: str) -> bool:
    """Whether ``s`` as given (not stripped) is a non-empty SMILES without spaces that RDKit parses.

    Cached: the data files the loaders read repeat molecules many times."""
    return bool(s) and " " not in s and parse(s) is not None


def heavy_atoms(smiles: str) -> int:
    """Number of heavy atoms of a SMILES; ESMError if unparsable."""
    return mol(smiles).GetNumHeavyAtoms()


def descriptors(smiles: str) -> dict[str, float]:
    """A few RDKit descriptors of a SMILES (molecular weight, Crippen logP, aromatic rings, heavy atoms, TPSA)."""
    from rdkit.Chem import Crippen, Descriptors, rdMolDescriptors

    m = mol(smiles)
    return {"molecular weight": float(Descriptors.MolWt(m)), "logP": float(Crippen.MolLogP(m)),
            "aromatic rings": float(rdMolDescriptors.CalcNumAromaticRings(m)),
            "heavy atoms": float(m.GetNumHeavyAtoms()), "TPSA": float(rdMolDescriptors.CalcTPSA(m))}


@lru_cache(maxsize=8)
def morgan_generator(radius: int = MORGAN_RADIUS, n_bits: int = MORGAN_BITS):
    """RDKit's Morgan fingerprint generator, one per (radius, bits)."""
    from rdkit.Chem import rdFingerprintGenerator

    return rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)


def fingerprint(smiles: str, radius: int = MORGAN_RADIUS, n_bits: int = MORGAN_BITS):
    """Morgan bit-vector fingerprint (RDKit ExplicitBitVect) of one SMILES; ESMError if unparsable."""
    return morgan_generator(radius, n_bits).GetFingerprint(mol(smiles))


def fingerprint_array(smiles: str, radius: int = MORGAN_RADIUS, n_bits: int = MORGAN_BITS,
                      counts: bool = False) -> np.ndarray:
    """Morgan fingerprint of one SMILES as RDKit's numpy array: bits, or counts; ESMError if unparsable."""
    m = mol(smiles)
    gen = morgan_generator(radius, n_bits)
    return gen.GetCountFingerprintAsNumPy(m) if counts else gen.GetFingerprintAsNumPy(m)


def tanimoto_many(query_fp, fps: list) -> np.ndarray:
    """[len(fps)] float64 Tanimoto similarity of one fingerprint to each of a list (RDKit bulk)."""
    from rdkit import DataStructs

    return np.asarray(DataStructs.BulkTanimotoSimilarity(query_fp, fps), dtype=np.float64)
