"""A user's own task file (``--task-file PATH --family F``) and repeated inputs across the split
(esm_core/benchmark/loaders.py: task_from_file, dedupe)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import MOLECULES, PROTEINS

from esm_core.cli import main as cli
from esm_core.benchmark.loaders import cyp_task, dedupe, molecule_protein_task
from esm_core.benchmark.taskfile import task_from_file
from esm_core.benchmark.taskdata import Record, TaskData
from esm_core.errors import ESMError

ENZ = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEG"
MORE = ["CCO", "CCN", "CCC", "CCCl", "CCBr", "c1ccccc1", "c1ccncc1", "CC(=O)O", "CC(=O)N", "OCCO", "NCCO", "CCOC",
        "CCCC", "CCCCC", "CCCCCC", "CC(C)O", "CC(C)C", "CC(C)N", "C1CCCCC1", "C1CCNCC1", "C1CCOCC1", "OC(=O)CCO",
        "NC(=O)CCN", "CC=O", "CC#N", "C=CC", "C=CCO", "CSC", "CS(=O)C", "FC(F)F"]


def _data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data" / "public" / "cyp"
    d.mkdir(parents=True)
    (d / "cyp_enzymes.tsv").write_text(f"enzyme\tsequence\nCYP2D6\t{ENZ}\n")
    rows = [f"D{i}\t{s}\t{i % 2}" for i, s in enumerate(MORE)]
    (d / "cyp2d6_veith.tab").write_text("Drug_ID\tDrug\tY\n" + "\n".join(rows) + "\n")
    return tmp_path / "data"


def test_repeated_inputs_are_removed_and_counted():
    r = lambda s, y: Record({"smiles": s}, y)  # noqa: E731
    td = TaskData("t", "t", "g", "cyp_inhibition", [r("CCO", "Yes"), r("CCN", "No"), r("CCN", "No"), r("CCC", "Yes")],
                  [r("CCO", "No"), r("CCCl", "Yes"), r("CCCl", "Yes")])
    dedupe(td)
    assert [x.values["smiles"] for x in td.test] == ["CCO", "CCCl"]
    assert [x.values["smiles"] for x in td.train] == ["CCN", "CCC"]
    assert td.counts == {"test_duplicates": 1, "pool_rows_in_test": 1, "pool_duplicates": 1}
    assert "pool row with a test row's inputs" in td.load_note() + str(td.skipped_rows)


def test_a_file_of_repeated_rows_cannot_score_by_copying(tmp_path):
    """Before: a file of repeated rows put copies of each test row in the pool (majority of examples: 100 %)."""
    rows = [(s, PROTEINS[0], i % 2) for i, s in enumerate(MOLECULES[:10])] * 4
    f = tmp_path / "rep.csv"
    f.write_text("SMILES,Protein,Y\n" + "".join(f"{s},{p},{y}\n" for s, p, y in rows))
    td = molecule_protein_task(f, seed=0)
    test_keys = {(x.values["smiles"], x.values["protein"]) for x in td.test}
    assert not test_keys & {(x.values["smiles"], x.values["protein"]) for x in td.train}
    assert len(td.train) + len(td.test) == 10
    assert td.counts["pool_duplicates"] + td.counts["pool_rows_in_test"] + td.counts.get("test_duplicates", 0) == 30


def test_cyp_file_by_path_equals_the_registered_task(tmp_path):
    data = _data_dir(tmp_path)
    path = data / "public" / "cyp" / "cyp2d6_veith.tab"
    reg = cyp_task(path, "CYP2D6", enzymes_path=data / "public" / "cyp" / "cyp_enzymes.tsv", seed=4)
    mine = task_from_file(path, "cyp", enzyme="CYP2D6", data_dir=data, seed=4)
    assert [(r.values, r.label) for r in mine.test] == [(r.values, r.label) for r in reg.test]
    assert [(r.values, r.label) for r in mine.train] == [(r.values, r.label) for r in reg.train]
    assert mine.context == reg.context and "seeded split (seed 4" in mine.note
    assert str(mine.prompt(mine.test[0], k=3).segments) == str(reg.prompt(reg.test[0], k=3).segments)


def test_split_column_and_families(tmp_path):
    f = tmp_path / "pairs.csv"
    lines = ["SMILES,SMILES_2,genes,Y,split"]
    for i, s in enumerate(MORE[:12]):
        lines.append(f"{s},{MORE[i + 12]},FTL KRAS TP53 G{i},{i % 2},{'test' if i < 4 else 'train'}")
    f.write_text("\n".join(lines) + "\n")
    td = task_from_file(f, "drugcomb")
    assert len(td.test) == 4 and len(td.train) == 8 and td.family == "drug_pair"
    assert {r.label for r in td.train} == {"Synergistic", "Antagonistic"} and "split column" in td.note
    assert "Synergistic" in str(td.prompt(td.test[0], k=2).segments)


@pytest.mark.parametrize("case, make, family, kw, match", [
    ("unknown-family", lambda p: p, "smiles", {}, "is not a known task family"),
    ("missing-file", lambda p: p / "nope.csv", "dti", {}, "does not exist"),
    ("cyp-without-enzyme", lambda p: p, "cyp", {}, "needs the enzyme"),
    ("wrong-columns", lambda p: p, "gdsc", {}, "lacks"),
    ("bad-split", lambda p: p, "dti", {"split": "dev"}, "is not train or test"),
])
def test_task_file_refusals(tmp_path, case, make, family, kw, match):
    f = tmp_path / "t.csv"
    split = kw.get("split")
    f.write_text("SMILES,Protein,Y" + (",split" if split else "") + "\n"
                 + "".join(f"{s},{PROTEINS[1]},{i % 2}" + (f",{split}" if split else "") + "\n"
                           for i, s in enumerate(MORE[:6])))
    before = f.read_bytes()
    with pytest.raises(ESMError, match=match):
        task_from_file(make(f) if case == "missing-file" else f, family)
    assert f.read_bytes() == before


def test_cli_task_file_same_numbers_as_the_data_directory(tmp_path, world, capsys):
    from conftest import write_run_yaml

    d = tmp_path / "run"
    d.mkdir()
    write_run_yaml(d, world, method=dict(probes_per_modality=12, batch_size=4, n_projections=64))
    data = _data_dir(tmp_path)
    common = ["evaluate", "--config", str(d / "run.yaml"), "--data-dir", str(data), "--model", "mol", "--n", "6",
              "--k", "2", "--n-boot", "20", "--modes", "likelihood", "--no-progress", "--split-seed", "1"]
    assert cli(common + ["--task", "cyp2d6", "--out", str(tmp_path / "a.json")]) == 0
    path = data / "public" / "cyp" / "cyp2d6_veith.tab"
    assert cli(common + ["--task-file", str(path), "--family", "cyp", "--enzyme", "CYP2D6",
                         "--out", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "task file" in out and "seeded split (seed 1" in out
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    pick = lambda rep: [(r["mode"], r["acc"], r["f1"], r["n"]) for r in rep["rows"] if r["model"] == "mol"]  # noqa: E731
    assert pick(a) == pick(b) and pick(a)
    assert list(a["predictions"].values()) == list(b["predictions"].values())
    assert cli(common + ["--task-file", str(path), "--out", str(tmp_path / "c.json")]) == 2
    assert "--task-file needs --family" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()
