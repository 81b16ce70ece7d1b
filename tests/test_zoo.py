"""The committed demo zoo (assets/zoo) meets the issue's acceptance checks.

    pytest tests/test_zoo.py

- files: size budget, safetensors only, standard loaders, tokenizer properties;
- skills: every specialist beats the base on its own modality's held-out skills by >= 20 points
  and gains <= 5 points over the base on each other modality (label likelihood, a fixed subset);
- docs/METHOD.md section 8 (Fig. 2): the last-block SWD matrix (specialists x modalities) is diagonal-dominant;
- no committed line of assets/ equals a line of the public data files.
The zoo is loaded once per session; skill sets are small fixed subsets to keep the suite lean.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from esm_core.paths import DEMO_DIR, ZOO_DIR
from esm_core.zoo.build import BuildConfig

MODS = ("molecule", "protein", "cell")


@pytest.fixture(scope="session")
def zoo():
    from esm_core.zoo.load import load_zoo

    return load_zoo(ZOO_DIR)


def test_zoo_files_budget_and_formats():
    files = [f for f in ZOO_DIR.rglob("*") if f.is_file()]
    total = sum(f.stat().st_size for f in files)
    assert total <= 25 * 2**20, f"zoo is {total / 2**20:.1f} MB"
    assert max(f.stat().st_size for f in files) <= 10 * 2**20  # the base is written in shards
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert weights and all(f.suffix == ".safetensors" for f in weights)
    for sub in ("base", *MODS, "molecule_encoder"):
        assert (ZOO_DIR / sub).is_dir()
    for name in ("run.yaml", "RESULTS.md", "SKILLS.md", "build.json"):
        assert (ZOO_DIR / name).is_file(), name


def test_tokenizer_loads_with_autotokenizer_and_keeps_genes_whole():
    from transformers import AutoTokenizer

    from esm_core.zoo.data import load_demo

    tok = AutoTokenizer.from_pretrained(ZOO_DIR / "base", local_files_only=True)
    assert None not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    for lab in (" Yes", " No"):
        assert len(tok(lab, add_special_tokens=False)["input_ids"]) == 1
    genes = " ".join(load_demo().cells_heldout["genes"].head(200)).split()
    single = sum(len(tok(" " + g, add_special_tokens=False)["input_ids"]) == 1 for g in genes)
    assert single / len(genes) >= 0.9


def test_base_has_untied_embeddings_and_distinct_residue_tokens(zoo):
    """With tied embeddings the next-residue LM loss pulled the 20 residue tokens together (mean cosine
    0.87) and the protein specialist could not learn a question; the zoo's base is untied (as
    LLaMA-3.1-8B) and its residue tokens stay apart."""
    spec, sset, enc = zoo
    assert sset.model.config.tie_word_embeddings is False
    tok = sset.tokenizer
    ids = [tok(" " + a, add_special_tokens=False)["input_ids"] for a in "ACDEFGHIKLMNPQRSTVWY"]
    assert all(len(i) == 1 for i in ids)
    e = torch.nn.functional.normalize(sset.model.get_input_embeddings().weight[[i[0] for i in ids]].float(), dim=1)
    cos = (e @ e.T).detach()
    mean_off = float((cos.sum() - cos.diagonal().sum()) / (20 * 19))
    assert mean_off < 0.5, f"residue embeddings mean cosine {mean_off:.2f}"


def test_run_yaml_describes_the_zoo(zoo):
    from esm_core.pipeline import read_probe_samples
    from esm_core.samples import validate

    spec, sset, enc = zoo
    assert [(s.name, s.modality) for s in spec.specialists] == [(m, m) for m in MODS]
    assert [(m.name, m.prefix, m.kind) for m in spec.modalities] == [
        ("molecule", "Molecule: ", "smiles"), ("protein", "Protein: ", "protein"), ("cell", "Cell: ", "genes")]
    assert spec.modalities[0].encoder.type == "soft_token"
    assert type(enc["molecule"]).__name__ == "SoftTokenEncoder"
    assert spec.method.preset == "reference"
    raw = read_probe_samples(spec)
    for m in spec.modalities:
        assert len(validate(raw[m.name], m.kind).values) >= 330, m.name
        assert m.data.path.startswith(str(DEMO_DIR.resolve()))
    cfg = BuildConfig()  # the committed zoo is the builder's defaults
    assert (sset.num_layers, sset.hidden_size) == (cfg.layers, cfg.hidden) and sset.num_layers >= 8
    assert sset.lm.config.max_position_embeddings >= 2048
    assert spec.method.batch_size == cfg.probe_batch


@pytest.fixture(scope="session")
def skill_report(zoo):
    from esm_core.zoo.load import load_skill_sets, measure

    spec, sset, enc = zoo
    sets = load_skill_sets(k=1, per_label=40)  # the sets SKILLS.md reports (small subsets are too noisy)
    return measure(sset, enc, [None, *MODS], sets, methods=("likelihood",), batch_size=16)


@pytest.mark.parametrize("specialist", MODS)
def test_specialist_beats_base_by_20_points_on_own_modality(skill_report, specialist):
    rep = skill_report
    own = rep.accuracy(specialist, specialist) - rep.accuracy("base", specialist)
    assert own >= 0.20, f"{specialist}: own-modality gain {100 * own:.1f} points"


@pytest.mark.parametrize("specialist", MODS)
def test_specialist_gains_at_most_5_points_on_other_modalities(skill_report, specialist):
    rep = skill_report
    for other in MODS:
        if other != specialist:
            gain = rep.accuracy(specialist, other) - rep.accuracy("base", other)
            assert gain <= 0.05, f"{specialist} on {other}: {100 * gain:+.1f} points over the base"


@pytest.mark.parametrize("preset", ["reference", "paper"])  # standardised SWD or raw hidden states
def test_fig2_distance_matrix_is_diagonal_dominant(zoo, preset):
    from esm_core.pipeline import Workspace, estimate
    from esm_core.zoo.load import demo_spec

    spec, sset, enc = zoo
    ws = Workspace.from_spec(demo_spec(mode="layer", preset=preset), sset=sset)  # D does not depend on the mode
    res = estimate(ws)
    assert res.probe_summary["n_probes"] == {"reference": 330, "paper": 110}[preset]  # docs/METHOD.md section 2 table
    D = res.layer.D[:, :, -1]
    own = [res.modalities.index(m) for m in res.own_modalities]
    for k, name in enumerate(res.specialists):
        row = D[k].tolist()
        assert max(range(len(row)), key=row.__getitem__) == own[k], f"{name}: {row}"


def test_committed_build_record_matches_demo_data():
    from esm_core.zoo.data import DEMO_FILES

    info = json.loads((ZOO_DIR / "build.json").read_text())
    for f in DEMO_FILES:
        digest = hashlib.sha256((DEMO_DIR / f).read_bytes()).hexdigest()[:16]
        assert info["data"][f] == digest, f"{f} changed since the zoo was built"


def test_no_committed_line_comes_from_public_data():
    from esm_core.paths import default_data_dir

    pub = default_data_dir() / "public"
    if not pub.is_dir():
        pytest.skip("public data not present")
    import gzip

    seen = set()
    for f in pub.rglob("*"):
        if f.is_file():
            op = gzip.open if f.suffix == ".gz" else open
            with op(f, "rt", errors="replace") as fh:
                seen.update(hashlib.sha256(s.encode()).digest() for s in (ln.strip() for ln in fh) if len(s) >= 8)
    hits = []
    for root in (DEMO_DIR, ZOO_DIR):
        for f in root.rglob("*"):
            if f.is_file() and f.suffix in (".csv", ".md", ".json", ".yaml", ".txt", ".tsv"):
                for ln in f.read_text(errors="replace").splitlines():
                    s = ln.strip()
                    if len(s) >= 8 and hashlib.sha256(s.encode()).digest() in seen:
                        hits.append((f.name, s[:40]))
    assert not hits, hits[:5]


def test_results_md_holds_the_cross_modal_table_for_every_model():
    """The zoo's Table 1 (issue "A demo world ..."): every model of RESULTS.md's retention table plus the
    oracle has a row of accuracies on the composite questions, one column per rule and per modality pair."""
    from esm_core.zoo.generic import RULES

    text = (ZOO_DIR / "RESULTS.md").read_text()
    part = text.split("## Cross-modal questions")[1].split("\n## ")[0]
    lines = [ln for ln in part.splitlines() if ln.startswith("| ") and not ln.startswith("| model")]
    rows = {ln.split("|")[1].strip(): [float(x) for x in ln.split("|")[2:-1]] for ln in lines}
    expected = ["base", *MODS, *(f"es-{p}-{m}" for p in ("reference", "paper") for m in ("combined", "layer", "element")),
                "average", "ties", "oracle"]
    assert list(rows) == expected
    header = next(ln for ln in part.splitlines() if ln.startswith("| model"))
    cols = [c.strip() for c in header.split("|")[1:-1]]
    assert cols == ["model", *RULES, "molecule-protein", "molecule-cell", "protein-cell", "all"]
    assert all(len(v) == len(cols) - 1 and all(0 <= x <= 100 for x in v) for v in rows.values())
