"""Task loaders: columns, skipped rows, label rules, seeded splits, missing files, prompt content
(esm_core/benchmark/tasks.py, loaders.py, taskdata.py). Hand-made files in tmp dirs; the real data
directory only in the last tests."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from esm_core.answering.prompts import ANSWER_MARK, Item
from esm_core.benchmark.loaders import cyp_task, drugcomb_task, gdsc2_task, molecule_protein_task, split_indices
from esm_core.benchmark.tasks import MissingData, expand_names, load_task, load_tasks, task_table
from esm_core.errors import ESMError
from esm_core.paths import DATA_ENV, default_data_dir

PROT = "MKTAYIAKQRQISFVKSHFSRQ"
PROT2 = "MALWMRLLPLLALLALWGPDP"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def dti_csv(path, rows):
    return write(path, "SMILES,Protein,Y\n" + "".join(f"{s},{p},{y}\n" for s, p, y in rows))


def test_molecule_protein_any_csv_float_labels_and_skips(tmp_path):
    tr = dti_csv(tmp_path / "train.csv", [("CCO", PROT, "1.0"), ("C1CC(", PROT, "0"), ("CCN", "MK7T", "1"),
                                          ("CCC", PROT2, "0.0"), ("CCCl", PROT, "2"), ("CCBr", PROT, "x")])
    te = dti_csv(tmp_path / "test.csv", [("c1ccccc1", PROT, "1"), ("CCCO", PROT2, "0")])
    td = molecule_protein_task(tr, te, name="mine")
    assert [r.label for r in td.train] == ["Yes", "No"]
    assert td.counts == {"rows_read": 8, "invalid_smiles": 1, "invalid_protein": 1, "bad_label": 2}
    assert [r.values["smiles"] for r in td.test] == ["c1ccccc1", "CCCO"]
    assert td.labels == ["Yes", "No"] and td.family == "molecule_protein"


def test_wrong_columns_is_a_clear_error(tmp_path):
    bad = write(tmp_path / "bad.csv", "smiles,Protein,label\nCCO,MKT,1\n")
    with pytest.raises(ESMError) as e:
        molecule_protein_task(bad, name="bad")
    assert "SMILES" in str(e.value) and "bad.csv" in str(e.value) and "lacks" in str(e.value)
    with pytest.raises(ESMError, match="Drug_ID"):
        cyp_task(write(tmp_path / "c.tab", "Drug\tY\nCCO\t1\n"), "CYP2D6", sequence="MKT")


def test_one_file_gets_a_seeded_split(tmp_path):
    rows = [("C" * (i % 20 + 1) + "O", PROT if i < 20 else PROT2, i % 2) for i in range(40)]  # 40 distinct pairs
    f = dti_csv(tmp_path / "all.csv", rows)
    a = molecule_protein_task(f, test_fraction=0.25, seed=3)
    b = molecule_protein_task(f, test_fraction=0.25, seed=3)
    c = molecule_protein_task(f, test_fraction=0.25, seed=4)
    assert len(a.test) == 10 and len(a.train) == 30
    key = lambda td: [r.meta["row"] for r in td.test]  # noqa: E731
    assert key(a) == key(b) and key(a) != key(c)
    assert not set(key(a)) & {r.meta["row"] for r in a.train}
    tr, te = split_indices(10, 0.3, 0)
    assert sorted(tr.tolist() + te.tolist()) == list(range(10)) and len(te) == 3
    with pytest.raises(ESMError):
        split_indices(10, 1.0, 0)


def test_prompt_fields_and_examples(tmp_path):
    tr = dti_csv(tmp_path / "tr.csv", [("CCO", PROT, 1), ("CCN", PROT, 0), ("CCC", PROT2, 1)])
    te = dti_csv(tmp_path / "te.csv", [("CCCO", PROT, 0)])
    td = molecule_protein_task(tr, te)
    p = td.prompt(td.test[0], k=2)
    items = [s for s in p.segments if isinstance(s, Item)]
    assert [(i.modality, i.raw) for i in items[-2:]] == [("molecule", "CCCO"), ("protein", PROT)]
    assert len(items) == 6  # 2 examples + query, molecule and protein each
    assert p.answer == "No" and p.labels == ["Yes", "No"]
    assert p.text().count(ANSWER_MARK) == 3 and p.text().endswith(ANSWER_MARK)
    assert p.meta["example_labels"] == [td.train[c.index].label for c in p.meta["chosen"]]
    assert all(c.reason == "same protein" for c in p.meta["chosen"])
    assert "interacts with the protein" in p.text()


def cyp_files(tmp_path, n=30):
    f = write(tmp_path / "cyp.tab", "Drug_ID\tDrug\tY\n" + "".join(
        f"{i}.0\t{'C' * (i + 1)}{'O' if i % 3 else 'N'}\t{i % 2}\n" for i in range(n)) + "99\tC1CC(\t1\n")
    enz = write(tmp_path / "cyp_enzymes.tsv", "enzyme\tuniprot\tlength\tsequence\nCYP2D6\tP10635\t5\tMGLEA\n")
    return f, enz


def test_cyp_task_enzyme_joins_prompt_once(tmp_path):
    f, enz = cyp_files(tmp_path)
    td = cyp_task(f, "CYP2D6", enzymes_path=enz, test_fraction=0.2, seed=0)
    dups = sum(td.counts.get(k, 0) for k in ("test_duplicates", "pool_duplicates", "pool_rows_in_test"))
    assert td.counts["invalid_smiles"] == 1 and len(td.train) + len(td.test) + dups == 30 and len(td.test) == 6
    keys = [r.values["smiles"] for r in td.train + td.test]
    assert len(keys) == len(set(keys))  # repeated molecules were removed (loaders.dedupe)
    p = td.prompt(td.test[0], k=5)
    items = [s for s in p.segments if isinstance(s, Item)]
    assert items[0] == Item("protein", "MGLEA")
    assert sum(i.modality == "protein" for i in items) == 1  # once, not per example
    assert sum(i.modality == "molecule" for i in items) == 6
    assert "Enzyme (CYP2D6): " in p.text()
    sub = cyp_task(f, "CYP2D6", kind="substrate", sequence="MGLEA")
    assert "substrate" in sub.prompt(sub.test[0]).text() and sub.name == "cyp2d6_substrate"
    with pytest.raises(ESMError, match="not listed"):
        cyp_task(f, "CYP9Z9", enzymes_path=enz)


def gdsc_dir(tmp_path):
    d = tmp_path / "data"
    genes = " ".join(f"G{i}" for i in range(100))
    write(d / "registry/gdsc2/cell_line_top100_genes.tsv", f"cell_key\ttop_genes_desc\nA1\t{genes}\nB2\t{genes[::-1]}\n")
    write(d / "registry/gdsc2/gdsc2_drug_smiles.tsv", "drug\tsmiles\nd1\tCCO\nd2\tc1ccccc1\nbad\tC1CC(\n")
    z = [("A1", "d1", -1.5), ("A1", "d2", 0.3), ("B2", "d1", 1.0), ("B2", "d2", -1.0), ("A1", "bad", -3),
         ("ZZ", "d1", 2.0), ("B2", "d1", -0.99), ("A1", "d1", 1.01)]
    write(d / "registry/gdsc2/gdsc2_ln_ic50.csv.gz", "cell_line,cell_key,drug,ln_ic50,ln_ic50_drug_z\n" +
          "".join(f"{c},{c},{dr},0.0,{v}\n" for c, dr, v in z))
    return d


def test_gdsc2_z_rule(tmp_path):
    d = gdsc_dir(tmp_path)
    td = gdsc2_task(d, z_threshold=1.0, test_fraction=0.25, seed=0)
    recs = td.train + td.test
    got = sorted((r.meta["cell"], r.meta["drug"], r.label) for r in recs)
    # A1/d1 twice (z -1.5 and +1.01): the same inputs, so one of them is removed as a repeat (loaders.dedupe)
    assert [g[:2] for g in got] == [("A1", "d1"), ("B2", "d1"), ("B2", "d2")]
    assert got[1:] == [("B2", "d1", "Resistant"), ("B2", "d2", "Sensitive")]
    assert sum(td.counts.get(k, 0) for k in ("test_duplicates", "pool_duplicates", "pool_rows_in_test")) == 1
    assert td.counts["between_thresholds"] == 2 and td.counts["cell_without_genes"] == 1
    assert td.counts["drug_without_smiles"] == 1 and td.counts["drugs_invalid_smiles"] == 1
    assert all(len(r.values["genes"].split()) == 50 for r in recs)
    loose = gdsc2_task(d, z_threshold=0.2)
    assert len(loose.train) + len(loose.test) == 4  # 6 labelled rows, A1/d1 and B2/d1 each twice
    p = td.prompt(td.test[0])
    assert "Sensitive or Resistant" in p.text() and p.labels == ["Sensitive", "Resistant"]
    assert [s.modality for s in p.segments if isinstance(s, Item)][-2:] == ["molecule", "cell"]


def test_drugcomb_replicates_averaged_and_thresholds(tmp_path):
    d = gdsc_dir(tmp_path)
    write(d / "public/drugcomb/oneil_drug_smiles.tsv", "drug\tsmiles\nx\tCCO\ny\tCCN\nz\tCCC\n")
    rows = [("x", "y", "L1", 40, "A1"), ("y", "x", "L1", 10, "A1"),  # replicate pair (unordered): mean 25 -> dropped
            ("x", "z", "L1", 31, "A1"), ("y", "z", "L2", -5, "B2"), ("x", "y", "L3", 50, ""),
            ("x", "y", "L2", 0, "B2"), ("x", "z", "L2", 60, "B2"), ("x", "z", "L2", 40, "B2")]
    write(d / "public/drugcomb/oneil_loewe_triples.csv", "drug_1,drug_2,cell_line,synergy_loewe,gdsc_cell_key\n" +
          "".join(f"{a},{b},{c},{v},{k}\n" for a, b, c, v, k in rows))
    td = drugcomb_task(d, test_fraction=0.25)
    recs = sorted(((r.meta["drug_1"], r.meta["drug_2"], r.meta["cell"]), r.label, r.meta["loewe"])
                  for r in td.train + td.test)
    assert recs == [(("x", "z", "L1"), "Synergistic", 31.0), (("x", "z", "L2"), "Synergistic", 50.0),
                    (("y", "z", "L2"), "Antagonistic", -5.0)]
    assert td.counts["replicates_averaged"] == 2 and td.counts["cell_without_genes"] == 1
    p = td.prompt(td.test[0])
    assert [s.modality for s in p.segments if isinstance(s, Item)][-3:] == ["molecule", "molecule", "cell"]
    assert "Drug 2: " in p.text()


def test_missing_dataset_skipped_with_message(tmp_path, capsys):
    msgs = []
    loaded, skipped = load_tasks(["biosnap", "cyp2d6"], tmp_path, log=msgs.append)
    assert loaded == [] and len(skipped) == 2 and msgs == skipped
    assert "biosnap" in skipped[0] and str(tmp_path / "public" / "dti") in skipped[0]
    assert "cyp2d6_veith.tab" in skipped[1]
    with pytest.raises(MissingData):
        load_task("gdsc2", tmp_path)


def test_registered_loader_reads_files_by_name(tmp_path):
    dti_csv(tmp_path / "public/dti/human_random_train.csv", [("CCO", PROT, 1), ("CCN", PROT2, 0)])
    dti_csv(tmp_path / "public/dti/human_random_test.csv", [("CCC", PROT, 1)])
    dti_csv(tmp_path / "public/dti/biosnap_random_val.csv", [("CCO", PROT, 1)])
    dti_csv(tmp_path / "public/dti/biosnap_random_test.csv", [("CCC", PROT, 0)])
    loaded, skipped = load_tasks("human,biosnap,bindingdb", tmp_path)
    assert [t.name for t in loaded] == ["human", "biosnap"] and len(skipped) == 1 and "bindingdb" in skipped[0]
    assert "validation file is the example pool" in loaded[1].note


def test_suites_and_unknown_names():
    assert expand_names(["table1"])[:3] == ["bindingdb", "biosnap", "human"]
    assert expand_names("cyp2d6, cyp2d6,table2")[0] == "cyp2d6" and len(expand_names("all")) == 14
    with pytest.raises(ESMError, match="Unknown task"):
        expand_names("nope")


def test_data_dir_setting(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert default_data_dir() == tmp_path.resolve()


def test_record_from_user_input(tmp_path):
    td = molecule_protein_task(dti_csv(tmp_path / "a.csv", [("CCO", PROT, 1), ("CCN", PROT, 0)]), test_fraction=0.5)
    rec = td.record_from({"smiles": " CCO ", "protein": "mk taY"})
    assert rec.values == {"smiles": "CCO", "protein": "MKTAY"}
    with pytest.raises(ESMError, match="RDKit"):
        td.record_from({"smiles": "C1CC(", "protein": PROT})
    with pytest.raises(ESMError, match="lacks"):
        td.record_from({"smiles": "CCO"})


# ------------------------------------------------------------------------------------ real data (read in place)
REAL = default_data_dir()
needs_real = pytest.mark.skipif(REAL is None or not (REAL / "public" / "dti").is_dir(),
                                reason="../shared/data not present")


@needs_real
def test_real_bindingdb_and_cyp_enzyme():
    td = load_task("bindingdb")
    assert len(td.train) == 172 and len(td.test) == 49 and td.counts.get("invalid_smiles", 0) == 0
    p = td.prompt(td.test[0])
    assert len(p.meta["chosen"]) == 5


@needs_real
def test_real_gdsc2_z_labels_balanced():
    td = load_task("gdsc2")
    n = len(td.train) + len(td.test)
    assert 50_000 < n < 60_000
    sens = sum(r.label == "Sensitive" for r in td.train + td.test) / n
    assert 0.45 < sens < 0.55


def test_protein_residues_cut_in_prompts_only(tmp_path):
    long_a, long_b = PROT * 3, PROT * 2 + PROT2  # share their first 30 residues, differ later
    td = molecule_protein_task(dti_csv(tmp_path / "tr.csv", [("CCO", long_a, 1), ("CCN", long_b, 0)]),
                               dti_csv(tmp_path / "te.csv", [("CCC", long_a, 1)]))
    td.protein_residues = 30
    p = td.prompt(td.test[0], k=1)
    prots = [s.raw for s in p.segments if isinstance(s, Item) and s.modality == "protein"]
    assert prots == [long_a[:30], long_a[:30]]
    assert p.meta["chosen"][0].index == 0 and p.meta["chosen"][0].reason == "same protein"  # whole sequences compared


def test_task_table_reports_availability(tmp_path):
    dti_csv(tmp_path / "public/dti/human_random_train.csv", [("CCO", PROT, 1)])
    rows = {r["name"]: r for r in task_table(tmp_path)}
    assert rows["human"]["missing"] == ["public/dti/human_random_test.csv"] and not rows["human"]["available"]
    dti_csv(tmp_path / "public/dti/human_random_test.csv", [("CCO", PROT, 1)])
    rows = {r["name"]: r for r in task_table(tmp_path)}
    assert rows["human"]["available"] and not rows["cyp2d6"]["available"] and len(rows) == 14
