"""The one RDKit module (esm_core/chem.py): SMILES checks, Morgan fingerprints, Tanimoto, against RDKit itself."""

from __future__ import annotations

import numpy as np
import pytest

from esm_core import chem
from esm_core.errors import ESMError

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"


def test_check_smiles_reasons():
    assert chem.check_smiles(f" {ASPIRIN} ") == (ASPIRIN, None)
    assert chem.check_smiles("  ") == (None, "empty SMILES")
    assert chem.check_smiles("CC O") == (None, "SMILES contains a space")
    assert chem.check_smiles("C1CC") == (None, "RDKit cannot parse this SMILES")


def test_valid_smiles_takes_the_string_as_given():
    assert chem.valid_smiles("CCO") and not chem.valid_smiles(" CCO")
    assert not chem.valid_smiles("") and not chem.valid_smiles("C1CC")
    assert chem.parse("C1CC") is None and chem.heavy_atoms(ASPIRIN) == 13
    with pytest.raises(ESMError, match="cannot be parsed"):
        chem.mol("C1CC")


def test_fingerprints_and_tanimoto_match_rdkit():
    from rdkit import Chem, DataStructs
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    pool = ["CCO", "c1ccccc1", ASPIRIN]
    ref = [gen.GetFingerprint(Chem.MolFromSmiles(s)) for s in pool]
    assert [chem.fingerprint(s) for s in pool] == ref
    assert chem.morgan_generator(2, 2048) is chem.morgan_generator(2, 2048)
    got = chem.tanimoto_many(chem.fingerprint("CCCO"), [chem.fingerprint(s) for s in pool])
    assert got.dtype == np.float64
    assert got.tolist() == DataStructs.BulkTanimotoSimilarity(gen.GetFingerprint(Chem.MolFromSmiles("CCCO")), ref)
    counts = rdFingerprintGenerator.GetMorganGenerator(radius=3, fpSize=512).GetCountFingerprintAsNumPy(
        Chem.MolFromSmiles(ASPIRIN))
    assert np.array_equal(chem.fingerprint_array(ASPIRIN, 3, 512, counts=True), counts)
