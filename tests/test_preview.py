"""esm_core.analysis.preview: sample previews, probe spans, and safe parsing of uploaded tables."""

import gzip

import pytest

from esm_core.analysis.preview import (
    column_samples,
    gene_frequency,
    gene_table,
    guess_column,
    molecule_grid_svg,
    protein_stats,
    read_upload,
    span_counts,
    token_spans,
)
from esm_core.errors import ESMError


def test_protein_stats():
    lengths, comp = protein_stats(["AAC", "cw ", "AXA"])
    assert lengths["length"].tolist() == [3, 2, 3]
    c = comp.set_index("amino_acid")
    assert c.loc["A", "count"] == 4 and c.loc["C", "count"] == 2 and c.loc["W", "count"] == 1
    assert c.loc["X", "count"] == 1  # non-standard letters are listed after the 20
    assert list(comp["amino_acid"][:20]) == list("ACDEFGHIKLMNPQRSTVWY")
    assert c.loc["A", "fraction"] == pytest.approx(4 / 8) and comp["fraction"].sum() == pytest.approx(1.0)


def test_gene_lists():
    t = gene_table(["CD3E CD4 IL7R", "LYZ,CST3", "CD4;CD3E"], top=2)
    assert list(t.columns) == ["sample", "genes", "1", "2"]
    assert t.iloc[0][["1", "2"]].tolist() == ["CD3E", "CD4"] and t["genes"].tolist() == [3, 2, 2]
    f = gene_frequency(["CD3E CD4 IL7R", "LYZ CST3", "CD4 CD3E", "CD4 CD4"], top=2)
    assert f.iloc[0]["gene"] == "CD4" and f.iloc[0]["samples"] == 3  # counted once per sample
    assert "IL7R" not in f["gene"].tolist()  # third in its list, outside the top 2
    assert f.iloc[0]["share"] == pytest.approx(0.75)


def test_token_spans_group_consecutive_tokens():
    toks = [("<s>", None), ("M", None), (":", None), ("C", "molecule"), ("O", "molecule"), ("\n", None),
            ("M", "protein"), ("K", "protein")]
    spans = token_spans(toks)
    assert spans == [(None, ["<s>", "M", ":"]), ("molecule", ["C", "O"]), (None, ["\n"]), ("protein", ["M", "K"])]
    assert span_counts(toks) == {"": 4, "molecule": 2, "protein": 2}


def test_molecule_grid_svg():
    svg = molecule_grid_svg(["CCO", "not((", "c1ccccc1"], legends=["a", "b", "c"])
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert svg.count("class='bond-") > 0
    with pytest.raises(ESMError, match="none of the SMILES parses"):
        molecule_grid_svg(["not(("])


def test_read_upload_limits_and_formats():
    df = read_upload(b"name,smiles\nethanol,CCO\nbenzene,c1ccccc1\n", "m.csv", max_bytes=1000)
    assert list(df.columns) == ["name", "smiles"] and df["smiles"].tolist() == ["CCO", "c1ccccc1"]
    df = read_upload(b"id\tseq\n1\tMKT\n", "p.tsv", max_bytes=1000)
    assert df["seq"].tolist() == ["MKT"] and df["id"].tolist() == ["1"]  # strings, not numbers
    df = read_upload(gzip.compress(b"smiles\nCCN\n"), "m.csv.gz", max_bytes=1000)
    assert df["smiles"].tolist() == ["CCN"]
    with pytest.raises(ESMError, match="over the"):
        read_upload(b"x\n" + b"C\n" * 600, "big.csv", max_bytes=1000)
    with pytest.raises(ESMError, match="cannot be read|holds no rows"):
        read_upload(b"", "empty.csv", max_bytes=1000)
    with pytest.raises(ESMError, match="cannot be read"):
        read_upload(b'a,b\n"1,2\n', "broken.csv", max_bytes=1000)


def test_column_choice_and_wrong_column():
    df = read_upload(("name,smiles\n" + "\n".join(f"mol{i},{'C' * (i + 1)}O" for i in range(10))
                      + "\nbad,not((\n").encode(), "m.csv", max_bytes=10_000)
    assert guess_column(df, "smiles") == "smiles"
    assert guess_column(df, "smiles", preferred="name") == "name"  # the run's column name wins when present
    raws = column_samples(df, "smiles", "smiles", where="m.csv", min_valid=8)
    assert len(raws) == 11 and raws[-1] == "not(("  # raw rows; validation reports the bad one later
    with pytest.raises(ESMError) as ei:
        column_samples(df, "name", "smiles", where="m.csv", min_valid=8, modality="molecule")
    assert "Column 'name' of m.csv does not hold SMILES strings" in ei.value.reason
    assert "only 0 of 11" in ei.value.reason and "molecule" in ei.value.fix
    with pytest.raises(ESMError, match=r"lacks column\(s\) \['seq'\]"):
        column_samples(df, "seq", "protein", where="m.csv", min_valid=8)
    with pytest.raises(ESMError, match="holds only 11 samples"):
        column_samples(df, "name", "text", where="m.csv", min_valid=20)
