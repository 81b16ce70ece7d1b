"""The zoo's build path cannot rot: a miniature zoo through the same builder, and the pieces it uses.

    pytest tests/test_zoo_build.py

Table-driven checks of the facts behind the skills (RDKit, sequence arithmetic), the mixed-modality
prompt format, the demo-data split, and one miniature ``zoo build`` (tiny model, a few steps) that
is then loaded by the ordinary loaders and queried.
"""

from __future__ import annotations

import json
import random
import time

import pytest
import torch

from esm_core.errors import ESMError
from esm_core.paths import DEMO_DIR
from esm_core.zoo.data import load_demo
from esm_core.zoo.facts import largest_fragment, mol_facts, protein_facts

MOL_CASES = [  # (smiles, fact, expected)
    ("CC(=O)Oc1ccccc1C(=O)O", "carboxylic_acid", True),  # aspirin
    ("CC(=O)Oc1ccccc1C(=O)O", "aromatic_rings", 1),
    ("CCO", "hydroxyl", True),
    ("c1ccccc1O", "hydroxyl", False),  # phenol OH is not aliphatic
    ("ClC(Cl)Cl", "halogen", True),
    ("CCN", "primary_amine", True),
    ("CC(N)=O", "primary_amine", False),  # an amide, not an amine
    ("C1CC2CCC3CCCC3C2C1", "rings", 3),
    ("O=[N+]([O-])c1ccccc1", "nitro", True),
]


@pytest.mark.parametrize("smiles,fact,expected", MOL_CASES)
def test_molecule_facts(smiles, fact, expected):
    assert mol_facts(smiles)[fact] == expected


def test_lipinski_and_fragments():
    big = "CCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC(=O)O"  # logP far above 5, MW above 500
    f = mol_facts(big)
    assert f["lipinski_violations"] >= 2 and f["mw"] > 500
    assert mol_facts("CCO")["lipinski_violations"] == 0
    assert largest_fragment("CC(N)Cc1ccc(O)cc1.Br") == largest_fragment("CC(N)Cc1ccc(O)cc1")
    assert largest_fragment("not a smiles") is None


def test_protein_facts_by_hand():
    f = protein_facts("KKRDE")
    assert f["length"] == 5 and f["net_charge"] == 1
    assert protein_facts("DDDEK")["net_charge"] == -3
    assert protein_facts("IIII")["gravy"] == pytest.approx(4.5)
    tm = "L" * 19
    assert protein_facts("KK" + tm + "KK")["max_kd_window"] == pytest.approx(3.8)
    assert protein_facts("KKKK")["max_kd_window"] < 0  # shorter than a window
    assert protein_facts("CCAA")["cys_fraction"] == pytest.approx(0.5)


def test_skills_balanced_heldout_and_mixed_prompts():
    from esm_core.zoo.skills import MODALITIES, SKILLS, heldout_skill_sets

    sets = heldout_skill_sets(load_demo(), k=2, per_label=6)
    assert set(sets) == {s.name for s in SKILLS}
    assert {s.modality for s in SKILLS} == set(MODALITIES)
    for name, ss in sets.items():
        answers = [p.answer for p in ss.prompts]
        assert answers.count("Yes") == answers.count("No") == 6, name
        p = ss.prompts[0]
        text = p.text()
        assert text.rstrip().endswith("Final answer:")
        query = text.split("Query:\n", 1)[1]
        for field in ("Molecule: ", "Protein: ", "Cell: "):  # the query holds all three modalities
            assert field in query, (name, field)
        assert text.count("Final answer:") == 3  # two examples + the query
        items = [s for s in p.segments if not isinstance(s, str)]
        assert [i.modality for i in items[-3:]] == list(MODALITIES)
        assert all(i.modality == ss.skill.modality for i in items[:-3])  # examples show the asked modality


def test_heldout_questions_use_heldout_samples_and_train_examples():
    from esm_core.answering.prompts import Item
    from esm_core.zoo.skills import heldout_skill_sets

    demo = load_demo()
    held = set(demo.molecules_heldout["smiles"])
    train = set(demo.molecules_train["smiles"])
    assert not held & train
    ss = heldout_skill_sets(demo, k=3, per_label=5, skills=["mol_logp"])["mol_logp"]
    for p in ss.prompts:
        items = [s for s in p.segments if isinstance(s, Item) and s.modality == "molecule"]
        assert all(i.raw in train for i in items[:-1])
        assert items[-1].raw in held


def test_demo_split_is_disjoint_and_windows_come_from_heldout():
    demo = load_demo()
    assert not set(demo.proteins_train["accession"]) & set(demo.proteins_heldout["accession"])
    assert set(demo.protein_windows_heldout["accession"]) <= set(demo.proteins_heldout["accession"])
    assert len(demo.protein_windows_heldout) >= 330
    assert len(set(demo.protein_windows_heldout["sequence"])) == len(demo.protein_windows_heldout)
    ids = lambda df: set(zip(df["source"], df["cell_id"]))  # noqa: E731
    assert not ids(demo.cells_train) & ids(demo.cells_heldout)
    assert min(len(demo.molecules_heldout), len(demo.cells_heldout)) >= 330
    src = (DEMO_DIR / "SOURCES.md").read_text()
    for f in ("molecules_train.csv", "molecules_heldout.csv", "proteins_heldout.csv", "protein_windows_heldout.csv",
              "cells_heldout.csv", "Apache-2.0", "CC BY 4.0", "BSD-3", "MIT"):
        assert f in src


def test_demo_data_is_reproduced_from_the_registry(tmp_path):
    from esm_core.paths import default_data_dir
    from esm_core.zoo.data import DEMO_FILES, write_demo

    if not (default_data_dir() / "registry").is_dir():
        pytest.skip("shared registry data not present")
    write_demo(tmp_path)
    for f in (*DEMO_FILES, "SOURCES.md"):
        assert (tmp_path / f).read_bytes() == (DEMO_DIR / f).read_bytes(), f


def test_missing_demo_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ESMError, match="lacks"):
        load_demo(tmp_path)


def test_tokenizer_single_token_labels_and_genes():
    from esm_core.zoo.tokenizer import train_tokenizer

    lines = ["Cell: CD3E CD74 HLA-DRA MS4A1", "Final answer: Yes", "Final answer: No"] * 50
    tok = train_tokenizer(lines, vocab_size=300)
    assert len(tok(" Yes", add_special_tokens=False)["input_ids"]) == 1
    assert len(tok(" HLA-DRA", add_special_tokens=False)["input_ids"]) == 1
    assert tok.decode(tok("Final answer: Yes\n", add_special_tokens=False)["input_ids"]) == "Final answer: Yes\n"
    assert None not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


def test_generic_tasks_answer_what_they_claim():
    from esm_core.zoo.generic import GENERIC_TASKS

    rng = random.Random(0)
    checks = {
        "even": lambda f: int(f[0][1]) % 2 == 0,
        "greater": lambda f: int(f[0][1]) > int(f[1][1]),
        "sum": lambda f: sum(int(v) for v in f[0][1].split()) > 0,
        "list_long": lambda f: len(f[0][1].split()) > 5,
    }
    for t in GENERIC_TASKS:
        for _ in range(30):
            p = t.param(rng) if t.param else None
            fields, label = t.sample(rng, p)
            assert label in t.labels
            if t.name in checks:
                assert checks[t.name](fields) == (label == t.labels[0]), t.name
            if t.name == "contains":
                assert (p in fields[0][1].split()) == (label == "Yes")


def test_tiny_zoo_builds_loads_and_answers(tmp_path):
    from esm_core.adapters import read_adapter
    from esm_core.answering.answerer import Answerer
    from esm_core.zoo.build import ALL_TARGETS, BuildConfig, build_zoo
    from esm_core.zoo.load import load_zoo
    from esm_core.zoo.skills import heldout_skill_sets

    cfg = BuildConfig.tiny()
    t0, c0 = time.perf_counter(), time.process_time()
    out = build_zoo(tmp_path / "zoo", cfg, progress=False, log=lambda m: None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # CPU seconds of this process (all threads): a quiet machine's wall time is at most this; the wall
    # time itself depends on what else shares the CPU, so it is only reported
    assert cpu < 60, f"miniature build used {cpu:.0f} CPU s ({wall:.0f} s wall)"
    for sub in ("base", "molecule", "protein", "cell", "molecule_encoder"):
        assert (out / sub).is_dir()
        assert not [f for f in (out / sub).iterdir() if f.suffix in (".bin", ".pt", ".pkl", ".pth")]
    info = json.loads((out / "build.json").read_text())
    assert info["config"]["layers"] == cfg.layers and "skills" in info
    assert (out / "SKILLS.md").read_text().startswith("# Demo zoo")
    # a 3-step miniature fails the specialist checks, and the build says so (written, not hidden)
    assert info["failed_checks"] and "## Checks" in (out / "SKILLS.md").read_text()
    assert "**failed**" in (out / "SKILLS.md").read_text()
    ads = [read_adapter(out / m, m) for m in ("molecule", "protein", "cell")]
    for ad in ads:  # the paper's LoRA configuration: all 7 modules in every block, one rank
        assert {(l, m.rsplit(".", 1)[-1]) for l, m in ad.modules()} == {(l, t) for l in range(cfg.layers)
                                                                        for t in ALL_TARGETS}
        assert ad.rank == cfg.lora_r
    assert any(float(t.abs().sum()) > 0 for k, t in ads[0].tensors.items() if k.ab == "B")  # trained, not init
    spec, sset, enc = load_zoo(out)
    assert [s.modality for s in spec.specialists] == ["molecule", "protein", "cell"]
    assert spec.modalities[0].encoder.type == "soft_token"
    p = heldout_skill_sets(load_demo(), k=1, per_label=4, skills=["cell_b"])["cell_b"].prompts[:2]
    lp = Answerer(sset, enc).label_logprobs(p, "cell")
    assert lp.shape == (2, 2) and bool(lp.isfinite().all())
    with pytest.raises(ESMError, match="already exists"):
        build_zoo(out, cfg, progress=False, log=lambda m: None)

    # rebuild one stage on this zoo: the others are copied byte for byte, the zoo read is left as it was, and the
    # rebuilt stage (same seeds, same settings, same machine) comes out the same
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    again = build_zoo(tmp_path / "zoo2", cfg, progress=False, log=lambda m: None, evaluate=False, reuse=out,
                      stages=("protein",))
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before
    for sub in ("base", "molecule", "molecule_encoder", "cell"):
        for f in (out / sub).iterdir():
            assert (again / sub / f.name).read_bytes() == f.read_bytes(), f
    new_ad = read_adapter(again / "protein", "protein")
    assert all(torch.equal(t, new_ad.tensors[k]) for k, t in ads[1].tensors.items())
    info2 = json.loads((again / "build.json").read_text())
    assert info2["reused"]["stages"] == ["base", "molecule", "cell"] and info2["reused"]["from"] == str(out)
    assert info2["base_history"] == info["base_history"] and "protein_history" in info2


def _reuse_cases():
    from esm_core.zoo.build import BuildConfig

    tiny = BuildConfig.tiny()
    other_rank = BuildConfig.tiny()
    other_rank.lora_r = 4
    other_base = BuildConfig.tiny()
    other_base.layers = 3
    return [
        (("base",), tiny, "a new base is a new zoo"),
        (("molecule",), tiny, "rebuild them too"),
        (("protein", "dna"), tiny, "name one or more of base, molecule, protein, cell"),
        ((), tiny, "name one or more"),
        (("protein",), other_rank, "its molecule stage was built with other settings than this build's (lora_r: 2 vs 4"),
        (("protein", "cell"), other_base, "its base stage was built with other settings than this build's (layers: 2 vs 3)"),
    ]


@pytest.mark.parametrize("stages,cfg,msg", _reuse_cases())
def test_partial_rebuild_refusals(tmp_path, stages, cfg, msg):
    """A partial rebuild that would mix stages built differently is refused before any work."""
    import dataclasses

    from esm_core.zoo.build import BuildConfig, build_zoo

    old = tmp_path / "old"
    (old / "base").mkdir(parents=True)
    (old / "build.json").write_text(json.dumps({"config": dataclasses.asdict(BuildConfig.tiny())}))
    with pytest.raises(ESMError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        build_zoo(tmp_path / "new", cfg, reuse=old, stages=stages, progress=False, log=lambda m: None)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("reuse,stages,msg", [
    ("missing", ("protein",), "not a zoo written by `zoo build`"),
    (None, ("protein",), "--stages needs --reuse"),
])
def test_partial_rebuild_needs_a_built_zoo(tmp_path, reuse, stages, msg):
    from esm_core.zoo.build import BuildConfig, build_zoo

    with pytest.raises(ESMError, match=msg):
        build_zoo(tmp_path / "new", BuildConfig.tiny(), reuse=tmp_path / reuse if reuse else None, stages=stages,
                  progress=False, log=lambda m: None)
    assert not (tmp_path / "new").exists()


def test_contrast_pools_make_the_asked_residue_absent_or_frequent():
    from esm_core.zoo.skills import AMINO_ACIDS, SKILL_BY_NAME, Pools, contrast_pools, demo_pools, skills_of

    r = random.Random(1)
    pools = demo_pools(load_demo(), "train")
    pools = Pools({**pools.rows, "protein": pools.rows["protein"]
                   + [{"sequence": "".join(r.choice(AMINO_ACIDS) for _ in range(80))} for _ in range(400)]})
    skills = skills_of("protein")
    marks = [s.residue for s in skills]
    assert sorted(marks) == ["C", "H", "W"]
    rate = 0.15
    rich = contrast_pools(pools, skills, random.Random(0), rate)
    assert rich.rows["molecule"] is pools.rows["molecule"] and rich.rows["cell"] is pools.rows["cell"]
    assert contrast_pools(pools, skills_of("cell"), random.Random(0), rate) is pools
    n = len(pools.rows["protein"])
    for s in skills:
        pos, neg = rich.labelled(s)
        assert len(pos) + len(neg) == n and 0.4 < len(pos) / n < 0.6  # a fair coin per row and residue
        for i in neg:
            assert s.residue not in rich.rows["protein"][i]["sequence"]
        share = [rich.rows["protein"][i]["sequence"].count(s.residue) / len(rich.rows["protein"][i]["sequence"])
                 for i in pos]
        assert rate * 0.6 < sum(share) / len(share) < rate * 1.5  # frequent: ~rate on average (plus natural ones)
        assert SKILL_BY_NAME[s.name].label(rich.rows["protein"][pos[0]]) == "Yes"
    for a, b in zip(pools.rows["protein"], rich.rows["protein"]):
        assert len(a["sequence"]) == len(b["sequence"])
        keep = [x == y for x, y in zip(a["sequence"], b["sequence"]) if x not in marks]
        assert sum(keep) / max(1, len(keep)) > 0.4  # the rest of the sequence is the natural one, mostly


def _report(acc: dict):
    """A SkillReport from {(model, modality): accuracy}, two skills per modality at that accuracy."""
    from esm_core.zoo.scoring import SkillReport

    return SkillReport([{"model": m, "modality": mod, "skill": f"{mod}_{i}", "n": 10, "acc_likelihood": a}
                        for (m, mod), a in acc.items() for i in range(2)])


def _accs(**over):
    """Base at 0.5 everywhere; each specialist +0.30 on its own modality and +0.0 elsewhere, unless overridden."""
    mods = ("molecule", "protein", "cell")
    acc = {("base", m): 0.5 for m in mods}
    acc.update({(s, m): (0.8 if s == m else 0.5) for s in mods for m in mods})
    acc.update({tuple(k.split("__")): v for k, v in over.items()})
    return acc


@pytest.mark.parametrize("over,expected", [
    ({}, []),
    ({"protein__protein": 0.502}, ["protein specialist: +0.2 points over the base on its own skills (needs +20)"]),
    ({"cell__molecule": 0.58}, ["cell specialist: +8.0 points over the base on another modality's skills (at most +5)"]),
    ({"molecule__molecule": 0.70, "molecule__cell": 0.55}, []),  # exactly +20 and +5 pass
])
def test_failed_checks_name_the_specialist_and_the_gap(over, expected):
    from esm_core.zoo.report import failed_checks, skills_markdown

    rep = _report(_accs(**over))
    assert failed_checks(rep) == expected
    md = skills_markdown(rep)
    assert ("**all pass**" in md) == (not expected)


@pytest.mark.parametrize("argv,msg", [
    (["zoo", "skills", "--skills", "mol_logp,no_such_skill"], "Unknown skill"),
    (["zoo", "demo-data", "--out", str(DEMO_DIR)], "already exists"),
    (["zoo", "build", "--out", str(DEMO_DIR)], "is the demo data directory, an input"),
    (["zoo", "skills", "--zoo", str(DEMO_DIR)], "not a zoo directory"),
])
def test_cli_refusals_are_one_line_errors(argv, msg, capsys):
    from esm_core.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and msg in err and "\n" not in err


def test_text_encoder_separator_gives_one_token_per_residue_everywhere():
    """A protein shown "M K T ..." is tokenized the same way by the encoder, the Answerer and training."""
    from esm_core.answering.prompts import Item
    from esm_core.encoders import TextEncoder, separated
    from esm_core.zoo.skills import shown_text
    from esm_core.zoo.tokenizer import train_tokenizer
    from esm_core.zoo.train import Tokens, sample_from_segments

    seqs = ["MKTAYIAKQRQISFVKSHFSRQ", "MDEKRCLLGGAPW", "MSTNPKPQRKTKRNTNRRPQDVKFPGG"]
    tok = train_tokenizer([" ".join(s) for s in seqs] * 20 + ["Protein: the cell and the molecule"] * 20, vocab_size=300)
    emb = torch.nn.Embedding(len(tok), 4)
    plain, spaced = TextEncoder(tok, emb), TextEncoder(tok, emb, separator=" ")
    raw = seqs[0]
    assert separated(raw, " ") == " ".join(raw) and separated(raw, None) == raw
    assert spaced.n_tokens(raw) == len(raw)  # one token per residue
    assert [t.strip() for t in spaced.tokens(raw)] == list(raw)
    assert shown_text("protein", raw) == " ".join(raw) and shown_text("cell", "CD3E CD74") == "CD3E CD74"
    s = sample_from_segments(Tokens(tok), ["Protein: ", Item("protein", raw)], " Yes", lm=False)
    assert s.pieces[-1][1] == spaced.ids(raw)  # training sees exactly the encoder's tokens
    assert plain.ids(raw) != spaced.ids(raw)


def test_protein_facts_are_of_the_window_the_prompt_shows():
    from esm_core.zoo.skills import PROMPT_RESIDUES, SKILL_BY_NAME, demo_pools

    pools = demo_pools(load_demo(), "heldout")
    rows = pools.rows["protein"]
    assert rows and max(len(r["sequence"]) for r in rows) == PROMPT_RESIDUES
    charge = SKILL_BY_NAME["prot_charge"]
    for r in rows[:20]:
        s = r["sequence"]
        assert charge.fact(r) == (sum(s.count(a) for a in "KR") - sum(s.count(a) for a in "DE") > 0)


def test_batches_are_not_sorted_by_length_by_default():
    """Length-sorted batches made single-label batches (gene lists of cell lines tokenize longer than
    blood cells'), which stalled learning; the default draws plain random batches."""
    from esm_core.zoo.train import Sample, bucketed

    lens = iter(range(10_000))
    fn = lambda rng: Sample([("ids", [1] * (1 + rng.randrange(50)))], [next(lens)])  # noqa: E731
    gen = bucketed(fn, random.Random(0), 8, {}, bucket=1)
    for first in (0, 8, 16):  # each batch holds the next 8 draws, whatever their lengths
        assert sorted(s.answer[0] for s in next(gen)) == list(range(first, first + 8))
    lens = iter(range(10_000))
    sorted_b = next(bucketed(fn, random.Random(0), 8, {}, bucket=8))  # a length-sorted cut of 64 draws
    ids = sorted(s.answer[0] for s in sorted_b)
    assert ids != list(range(ids[0], ids[0] + 8)) and max(ids) < 64


def test_molecule_encoder_pretraining_makes_facts_linearly_readable():
    from esm_core.encoders import SoftTokenProjector, morgan_fingerprint
    from esm_core.zoo.build import BuildConfig, pretrain_molecule_encoder
    from esm_core.zoo.skills import demo_pools

    pools = demo_pools(load_demo(), "train")
    cfg = BuildConfig(encoder_pretrain_steps=150, morgan_bits=512)
    torch.manual_seed(0)
    proj = SoftTokenProjector(512, 64, 2, 16)
    info = pretrain_molecule_encoder(proj, pools, lambda s: morgan_fingerprint(s, n_bits=512), cfg, 0, log=lambda m: None)
    acc = info["train_fact_accuracy"]
    assert set(acc) >= {"mol_aromatic", "mol_halogen", "mol_weight"}
    assert acc["mol_halogen"] >= 0.9 and acc["mol_aromatic"] >= 0.9  # substructures sit in the fingerprint bits


def test_single_modality_training_questions_hold_only_the_asked_modality():
    """Specialist training mixes single-modality queries (BuildConfig.single_frac) into the mixed ones;
    the label is the same fact of the same sample either way."""
    from esm_core.answering.prompts import Item
    from esm_core.zoo.skills import SKILL_BY_NAME, demo_pools, sample_question

    pools = demo_pools(load_demo(), "train")
    skill = SKILL_BY_NAME["prot_his"]
    for mixed, want in ((False, ["protein"]), (True, ["molecule", "protein", "cell"])):
        for seed in range(6):
            p = sample_question(skill, pools, random.Random(seed), k=1, mixed=mixed)
            items = [s for s in p.segments if isinstance(s, Item)]
            assert [i.modality for i in items[1:]] == want  # items[0] is the in-context example
            query_protein = [i for i in items[1:] if i.modality == "protein"][0].raw
            assert p.answer == ("Yes" if "H" in query_protein else "No")
            assert ("Molecule: " in p.text().split("Query:\n", 1)[1]) == mixed


def _keep_fixture():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from esm_core.zoo.train import Sample

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    pm = get_peft_model(lm, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                       lora_dropout=0.0, task_type="CAUSAL_LM"))
    inner = pm.get_base_model()
    # one sequence: 3 text ids, then 4 "protein" ids and 3 "cell" ids (both kept), an "x" id; an answer token
    s = Sample([("ids", [1, 5, 6]), ("ids", [7, 8, 9, 10], "protein"), ("ids", [11, 12, 14], "cell"),
                ("ids", [15], "x")], [13], lm=False, keep=("protein", "cell"))
    return pm, inner, s


def test_keep_loss_is_zero_for_the_base_and_measures_only_kept_tokens():
    from esm_core.zoo.train import batch_loss

    pm, inner, s = _keep_fixture()
    _, info = batch_loss(inner, [s], {}, keep_weight=1.0, base_off=pm.disable_adapter)
    assert info["keep_loss"] == pytest.approx(0.0, abs=1e-12)  # LoRA B = 0: the adapter is the base
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    loss, info = batch_loss(inner, [s], {}, keep_weight=1.0, base_off=pm.disable_adapter)
    # the oracle: per kept modality (protein positions 3..6, cell 7..9) and block, the mean over tokens and
    # dimensions of the squared change in units of the base states' per-dimension variance; mean of those
    x = inner.get_input_embeddings()(torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11, 12, 14, 15, 13]]))
    with torch.no_grad():
        h = inner.model(inputs_embeds=x, output_hidden_states=True).hidden_states[1:]
        with pm.disable_adapter():
            hb = inner.model(inputs_embeds=x, output_hidden_states=True).hidden_states[1:]
    terms = []
    for sl in (slice(3, 7), slice(7, 10)):
        for a, b in zip(h, hb):
            d = (a[0, sl] - b[0, sl]).double()
            var = ((b[0, sl] - b[0, sl].mean(0)) ** 2).mean(0).double()
            terms.append(float((d ** 2 / var).mean()))
    want = sum(terms) / len(terms)
    assert info["keep_loss"] == pytest.approx(want, rel=1e-3) and info["keep_loss"] > 1e-4
    loss.backward()  # the keep term sends gradients into the LoRA
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for n, p in pm.named_parameters() if "lora_A" in n)


def _perturb_lora(pm, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _states(pm, inner, rows):
    """Block outputs of the adapter model and of the base on right-padded id rows (oracle: full batch)."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    x = inner.get_input_embeddings()(ids)
    with torch.no_grad():
        o = inner.model(inputs_embeds=x, attention_mask=mask, output_hidden_states=True)
        with pm.disable_adapter():
            ob = inner.model(inputs_embeds=x, attention_mask=mask, output_hidden_states=True)
    return o, ob


def test_keep_terms_on_a_batch_match_a_full_batch_oracle_tokens_and_pooled():
    """The base runs only on the rows with kept tokens, cut after the last one; the token and the pooled keep
    terms equal an oracle that runs the base on the whole batch."""
    from esm_core.zoo.train import Sample, batch_loss

    pm, inner, _ = _keep_fixture()
    _perturb_lora(pm)
    rng = random.Random(0)
    samples, rows, spans = [], [], []
    for b in range(6):
        n_prot = rng.randint(2, 6)
        pre = [1, 5] + [rng.randint(2, 30) for _ in range(rng.randint(0, 3))]
        prot = [rng.randint(2, 30) for _ in range(n_prot)]
        tail = [rng.randint(2, 30) for _ in range(rng.randint(1, 8))]  # unkept text after the block
        pieces = [("ids", pre), ("ids", prot, "protein"), ("ids", tail)]
        samples.append(Sample(pieces, [13], lm=False, keep=("protein",)))
        rows.append(pre + prot + tail + [13])
        spans.append(slice(len(pre), len(pre) + n_prot))
    # a seventh, longer row without kept tokens: the base need not run on it
    samples.append(Sample([("ids", [1] + [7] * 20)], [13], lm=False, keep=("protein",)))
    rows.append([1] + [7] * 20 + [13])
    _, info = batch_loss(inner, samples, {}, keep_weight=1.0, keep_pool_weight=1.0, base_off=pm.disable_adapter)
    o, ob = _states(pm, inner, rows)
    tok_terms, pool_terms = [], []
    for h, hb in zip(o.hidden_states[1:], ob.hidden_states[1:]):
        a = torch.cat([h[b, sp] for b, sp in enumerate(spans)]).double()
        c = torch.cat([hb[b, sp] for b, sp in enumerate(spans)]).double()
        tok_terms.append(float(((a - c) ** 2 / c.var(0, unbiased=False)).mean()))
        pa = torch.stack([h[b, sp].mean(0) for b, sp in enumerate(spans)]).double()
        pc = torch.stack([hb[b, sp].mean(0) for b, sp in enumerate(spans)]).double()
        pool_terms.append(float(((pa - pc) ** 2 / pc.var(0, unbiased=False)).mean()))
    assert info["keep_loss"] == pytest.approx(sum(tok_terms) / len(tok_terms), rel=1e-3)
    assert info["keep_pool_loss"] == pytest.approx(sum(pool_terms) / len(pool_terms), rel=1e-3)
    # the pooled points spread less than the tokens: the same change costs more there
    assert info["keep_pool_loss"] > info["keep_loss"] > 1e-4
    # fewer than 4 samples with the modality: no pooled term (its variance would be noise)
    _, few = batch_loss(inner, samples[:3], {}, keep_weight=1.0, keep_pool_weight=1.0, base_off=pm.disable_adapter)
    assert "keep_pool_loss" not in few and few["keep_loss"] > 0


def test_distilled_answers_follow_the_base_not_the_gold_label():
    """A ``distill`` sample (another modality's question) is scored by KL(base || model) of its first answer
    token, not by its gold answer: zero for the base itself, the oracle's KL after the LoRA moves."""
    from esm_core.zoo.train import Sample, batch_loss

    pm, inner, _ = _keep_fixture()
    gold = Sample([("ids", [1, 5, 6, 7])], [13], lm=False)
    other = Sample([("ids", [1, 8, 9, 10, 11, 12])], [14, 15], lm=False, distill=True)
    _, info = batch_loss(inner, [gold, other], {}, base_off=pm.disable_adapter)
    # zero up to float32 round-off (the base runs on the cut sub-batch, the model on the padded batch;
    # -7.5e-9 measured on one CPU): four orders of magnitude below the perturbed KL checked next
    assert info["distill_kl"] == pytest.approx(0.0, abs=1e-6)
    _perturb_lora(pm)
    loss, info = batch_loss(inner, [gold, other], {}, base_off=pm.disable_adapter)
    o, ob = _states(pm, inner, [[1, 5, 6, 7, 13], [1, 8, 9, 10, 11, 12, 14, 15]])
    with torch.no_grad():
        lp = torch.log_softmax(inner.lm_head(o.last_hidden_state[1, 5]).double(), -1)
        lb = torch.log_softmax(inner.lm_head(ob.last_hidden_state[1, 5]).double(), -1)
        want_kl = float((lb.exp() * (lb - lp)).sum())
        want_ce = float(-torch.log_softmax(inner.lm_head(o.last_hidden_state[0, 3]).double(), -1)[13])
    assert info["distill_kl"] == pytest.approx(want_kl, rel=1e-3) and want_kl > 1e-4
    assert info["answer_loss"] == pytest.approx(want_ce, rel=1e-4)  # only the gold sample's answer
    assert float(loss.detach()) == pytest.approx(want_ce + want_kl, rel=1e-3)
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for n, p in pm.named_parameters() if "lora_A" in n)
