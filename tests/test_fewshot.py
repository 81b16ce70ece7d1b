"""Example selection on small hand-made pools: exact-protein match first, fill order, Jaccard ties,
drug-pair alignment, exclusion and determinism (esm_core/fewshot.py, docs/METHOD.md section 7)."""

from __future__ import annotations

import numpy as np
import pytest

from esm_core.benchmark.fewshot import (
    EmbeddingProteinSimilarity,
    KmerProteinSimilarity,
    MoleculeCellSelector,
    MoleculeIndex,
    MoleculeProteinSelector,
    MoleculeSelector,
    jaccard,
    tanimoto,
)
from esm_core.chem import fingerprint
from esm_core.errors import ESMError


def rdkit_tanimoto(q, pool):
    from rdkit import DataStructs
    from rdkit.Chem import AllChem, MolFromSmiles

    fq = AllChem.GetMorganFingerprintAsBitVect(MolFromSmiles(q), 2, nBits=2048)
    return np.array([DataStructs.TanimotoSimilarity(fq, AllChem.GetMorganFingerprintAsBitVect(MolFromSmiles(s), 2,
                                                                                               nBits=2048))
                     for s in pool])


POOL_MOLS = ["CCO", "CCCO", "CCCCO", "c1ccccc1", "c1ccccc1O", "CC(=O)O", "CCN", "CCCN", "CCO"]


def test_tanimoto_matches_rdkit_reference():
    got = tanimoto("CCCO", POOL_MOLS)
    assert np.allclose(got, rdkit_tanimoto("CCCO", POOL_MOLS))
    assert got[1] == 1.0 and got[0] < 1.0
    with pytest.raises(ESMError, match="cannot be parsed"):
        fingerprint("C1CC(")


def test_molecule_index_dedupes_and_caches():
    idx = MoleculeIndex(POOL_MOLS)
    assert len(idx.unique) == 8 and idx.ids(["CCO", "CCO"]).tolist() == [0, 0]
    a = idx.similarity("CCO")
    assert idx.similarity("CCO") is a


def test_cyp_selector_top_k_by_tanimoto_ties_by_row():
    sel = MoleculeSelector(POOL_MOLS)
    got = sel.select("CCO", k=3)
    t = rdkit_tanimoto("CCO", POOL_MOLS)
    # rows 0 and 8 are both CCO (Tanimoto 1): pool order breaks the tie
    assert [c.index for c in got[:2]] == [0, 8]
    assert got[2].index == int(np.argsort(-t, kind="stable")[2])
    assert all(c.reason == "similar molecule" for c in got)
    assert [c.score for c in got] == sorted([c.score for c in got], reverse=True)
    assert [c.index for c in sel.select("CCO", k=3, exclude={0})][:1] == [8]
    assert sel.select("CCO", k=0) == []


# ------------------------------------------------------------------------------------ molecule-protein
PA, PB, PC, PD = "MKTAYIAKQRQISFVKSHFSRQ", "MKTAYIAKQRQISFVKSHFSRA", "GGSGGSGGSGGSWWYYFF", "PPPPKKGAPPPPKKGA"


def mp_pool():
    # rows:   0      1      2      3     4      5      6      7
    smiles = ["CCO", "CCCO", "c1ccccc1", "CCN", "CCCCO", "CCO", "c1ccccc1O", "CCCN"]
    prots = [PA, PB, PA, PC, PB, PD, PC, PA]
    return smiles, prots


def test_same_protein_first_sorted_by_tanimoto():
    smiles, prots = mp_pool()
    sel = MoleculeProteinSelector(smiles, prots)
    got = sel.select("CCCO", PA, k=5)
    same = [i for i in range(8) if prots[i] == PA]  # rows 0, 2, 7
    t = rdkit_tanimoto("CCCO", smiles)
    assert [c.index for c in got[:3]] == sorted(same, key=lambda i: (-t[i], i))
    assert all(c.reason == "same protein" for c in got[:3])
    assert all(c.reason == "similar protein" for c in got[3:])
    assert len(got) == 5
    # exact protein match is case-insensitive and never repeated in the fill
    assert {c.index for c in got[3:]}.isdisjoint(same)


def test_only_same_protein_when_enough():
    smiles, prots = mp_pool()
    got = MoleculeProteinSelector(smiles, prots).select("CCCO", PA, k=2)
    assert len(got) == 2 and all(c.reason == "same protein" for c in got)


def test_fill_order_follows_protein_similarity_one_pair_each():
    smiles, prots = mp_pool()
    # hand-made embeddings: similarity to the query (PA) is PD 0.9 > PC 0.5 > PB 0.1
    emb = {PA: [1.0, 0.0], PB: [0.1, np.sqrt(1 - 0.01)], PC: [0.5, np.sqrt(0.75)], PD: [0.9, np.sqrt(1 - 0.81)]}
    sim = EmbeddingProteinSimilarity(lambda seqs: np.array([emb[s] for s in seqs]))
    sel = MoleculeProteinSelector(smiles, prots, protein_similarity=sim)
    got = sel.select("CCCCO", PA, k=6)
    assert [c.reason for c in got] == ["same protein"] * 3 + ["similar protein"] * 3
    fill = got[3:]
    # proteins in order PD, PC, PB; from each the most Tanimoto-similar molecule to CCCCO
    t = rdkit_tanimoto("CCCCO", smiles)
    assert [prots[c.index] for c in fill] == [PD, PC, PB]
    assert fill[1].index == max([3, 6], key=lambda i: (t[i], -i))
    assert fill[2].index == max([1, 4], key=lambda i: (t[i], -i))
    assert [round(c.detail["protein_similarity"], 6) for c in fill] == [0.9, 0.5, 0.1]
    assert got[3].score == pytest.approx(t[5])


def test_fill_when_query_protein_unseen_and_excluded_rows():
    smiles, prots = mp_pool()
    sel = MoleculeProteinSelector(smiles, prots)
    got = sel.select("CCO", "MKTAYIAKQRQISFVKSHFSRW", k=2)  # unseen point mutant of PA/PB
    assert all(c.reason == "similar protein" for c in got)
    assert {prots[c.index] for c in got} == {PA, PB}  # the two homologues before the unrelated ones
    got = sel.select("CCO", PA, k=8, exclude={0, 2})
    assert 0 not in [c.index for c in got] and 2 not in [c.index for c in got]
    assert [c.index for c in got if c.reason == "same protein"] == [7]


def test_kmer_similarity_fallback():
    ks = KmerProteinSimilarity().fit([PA, PB, PC, "MK"])
    s = ks.similarity(PA)
    assert s[0] == pytest.approx(1.0)
    assert s[1] > 0.8 > s[2]  # a point mutant beats an unrelated sequence
    assert s[3] == 0.0  # too short to hold a 3-mer
    # lower-case and non-standard letters are handled (X bucket)
    assert ks.similarity(PA.lower())[0] == pytest.approx(1.0)
    assert np.isfinite(ks.similarity("MKTBZUO")).all()


def test_protein_ties_broken_by_best_molecule_then_row():
    # three other proteins, all with the same embedding similarity to the query
    smiles = ["CCO", "CCCCCCCC", "CCCO", "CCO"]
    prots = ["AAAA", "CCCC", "DDDD", "EEEE"]
    sim = EmbeddingProteinSimilarity(lambda seqs: np.array([[1.0, 0.0] if s == "QQQQ" else [0.5, 0.5] for s in seqs]))
    got = MoleculeProteinSelector(smiles, prots, protein_similarity=sim).select("CCO", "QQQQ", k=4)
    # equal protein similarity: higher Tanimoto first (rows 0 and 3 both CCO -> row order), then 2, then 1
    assert [c.index for c in got] == [0, 3, 2, 1]


# ------------------------------------------------------------------------------------ molecule-cell
G1 = ["G%d" % i for i in range(50)]
G1_SHUF = list(reversed(G1)) + ["EXTRA%d" % i for i in range(10)]  # same top-50 set, other order, longer list
G_HALF = G1[:25] + ["H%d" % i for i in range(25)]  # Jaccard 25/75
G_HALF2 = G1[25:] + ["K%d" % i for i in range(25)]  # also 25/75: a Jaccard tie with G_HALF
G_FAR = ["Z%d" % i for i in range(50)]


def test_identical_gene_set_first_then_jaccard():
    drugs = ["CCO", "c1ccccc1", "CCN", "CCCO", "CCO", "CCCCN"]
    cells = [G_HALF, G1_SHUF, G_FAR, G1, G_HALF, G_FAR]
    sel = MoleculeCellSelector(drugs, cells)
    got = sel.select("CCCO", G1, k=4)
    t = rdkit_tanimoto("CCCO", drugs)
    assert [c.reason for c in got] == ["same cell", "same cell", "similar cell", "similar cell"]
    assert [c.index for c in got[:2]] == sorted([1, 3], key=lambda i: (-t[i], i))  # set identity ignores order
    assert got[2].detail["jaccard"] == pytest.approx(25 / 75)
    assert got[2].index == max([0, 4], key=lambda i: (t[i], -i))  # best molecule within the cell
    assert got[3].detail["jaccard"] == 0.0
    assert jaccard(G1, G_HALF) == pytest.approx(25 / 75)


def test_jaccard_ties_broken_by_molecule_then_row():
    drugs = ["CCCCCC", "CCO", "CCO", "c1ccccc1"]
    cells = [G_HALF, G_HALF2, G_HALF, G_HALF2]
    sel = MoleculeCellSelector(drugs, cells)
    got = sel.select("CCO", G1, k=2)
    # both cells have Jaccard 1/3; each cell's best row is a CCO row (Tanimoto 1): rows 2 (G_HALF) and 1 (G_HALF2)
    # -> tie on Jaccard and on Tanimoto: pool order of the best rows decides (row 1 before row 2)
    assert [c.index for c in got] == [1, 2]
    assert got[0].detail["jaccard"] == got[1].detail["jaccard"]


def test_drug_pairs_mean_tanimoto_order_invariant():
    drugs = [("CCO", "c1ccccc1"), ("c1ccccc1", "CCO"), ("CCN", "CCCl"), ("CCO", "CCO")]
    cells = [G_FAR, G_FAR, G_FAR, G_FAR]
    sel = MoleculeCellSelector(drugs, cells)
    s = sel.drug_scores(("CCO", "c1ccccc1"))
    assert s[0] == pytest.approx(1.0) and s[1] == pytest.approx(1.0)  # a pair is unordered
    t_ccn, t_cccl = rdkit_tanimoto("CCO", ["CCN"])[0], rdkit_tanimoto("c1ccccc1", ["CCCl"])[0]
    t_ccn2, t_cccl2 = rdkit_tanimoto("c1ccccc1", ["CCN"])[0], rdkit_tanimoto("CCO", ["CCCl"])[0]
    assert s[2] == pytest.approx(max(t_ccn + t_cccl, t_ccn2 + t_cccl2) / 2)
    assert s[3] == pytest.approx((1.0 + rdkit_tanimoto("c1ccccc1", ["CCO"])[0]) / 2)
    got = sel.select(("c1ccccc1", "CCO"), G_FAR, k=2)
    assert [c.index for c in got] == [0, 1] and got[0].reason == "same cell" and "mean_tanimoto" in got[0].detail
    with pytest.raises(ESMError, match="drug"):
        sel.select("CCO", G_FAR, k=2)


def test_only_top_50_genes_define_the_cell():
    long_a = G1 + ["A%d" % i for i in range(20)]
    long_b = G1 + ["B%d" % i for i in range(20)]  # differs only after gene 50
    sel = MoleculeCellSelector(["CCO"], [long_a])
    got = sel.select("CCO", long_b, k=1)
    assert got[0].reason == "same cell"


def test_selection_is_deterministic_across_instances():
    smiles, prots = mp_pool()
    a = [c.index for c in MoleculeProteinSelector(smiles, prots).select("CCN", PC, k=5)]
    b = [c.index for c in MoleculeProteinSelector(list(smiles), list(prots)).select("CCN", PC, k=5)]
    assert a == b and len(set(a)) == len(a)
