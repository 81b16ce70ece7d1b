"""Evaluation harness: metrics against sklearn / hand computations, parsing of messy generations,
batched answering equal to the one-at-a-time Answerer, prompt fitting, app functions, and the
evaluate / compare CLI on the tiny random world (esm_core/evaluate.py)."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
import torch
from conftest import CELLS, MOLECULES, PROTEINS, write_run_yaml

from esm_core.answering.answerer import Answerer
from esm_core.answering.batched import Answers, BatchedAnswerer
from esm_core.benchmark.harness import (
    answer_side_by_side,
    build_query,
    evaluate_model,
    fit_prompt,
    reference_scores,
    task_prompts,
    training_prompts,
)
from esm_core.benchmark.metrics import Score, accuracy, bootstrap_scores, macro_f1, retrieval_majority
from esm_core.benchmark.reports import Report
from esm_core.benchmark.tasks import Record, TaskData
from esm_core.cli import main as cli
from esm_core.errors import ESMError

YN = ["Yes", "No"]


# ------------------------------------------------------------------------------------ metrics
def test_macro_f1_and_accuracy_by_hand():
    t = ["Yes", "Yes", "No", "No"]
    p = ["Yes", None, "No", "Yes"]
    # Yes: tp 1 fp 1 fn 1 -> 0.5 ; No: tp 1 fp 0 fn 1 -> 2/3
    assert macro_f1(t, p, YN) == pytest.approx((0.5 + 2 / 3) / 2)
    assert accuracy(t, p) == 0.5
    assert macro_f1(["Yes"] * 3, ["Yes"] * 3, YN) == pytest.approx(0.5)  # absent class scores 0 (sklearn)


def test_macro_f1_equals_sklearn_with_unparsed():
    from sklearn.metrics import f1_score

    rng = random.Random(0)
    for labels in (YN, ["Sensitive", "Resistant"], ["a", "b", "c"]):
        for _ in range(20):
            t = [rng.choice(labels) for _ in range(rng.randint(1, 40))]
            p = [rng.choice(labels + [None]) for _ in t]
            want = f1_score(t, ["<none>" if v is None else v for v in p], labels=labels, average="macro",
                            zero_division=0)
            assert macro_f1(t, p, labels) == pytest.approx(want)


def test_bootstrap_against_an_independent_loop():
    from sklearn.metrics import accuracy_score, f1_score

    rng = random.Random(1)
    t = [rng.choice(YN) for _ in range(60)]
    p = [v if rng.random() < 0.7 else rng.choice(YN + [None]) for v in t]
    s = bootstrap_scores(t, p, YN, n_boot=300, seed=7)
    # same draws, computed one resample at a time with sklearn
    g = np.random.default_rng(7)
    idx = np.concatenate([g.integers(0, 60, size=(256, 60)), g.integers(0, 60, size=(44, 60))])
    pp = np.array(["<none>" if v is None else v for v in p])
    tt = np.array(t)
    accs = [accuracy_score(tt[i], pp[i]) for i in idx]
    f1s = [f1_score(tt[i], pp[i], labels=YN, average="macro", zero_division=0) for i in idx]
    assert (s.acc_lo, s.acc_hi) == pytest.approx(tuple(np.percentile(accs, [2.5, 97.5])))
    assert (s.f1_lo, s.f1_hi) == pytest.approx(tuple(np.percentile(f1s, [2.5, 97.5])))
    assert s.acc_lo <= s.acc <= s.acc_hi and s.f1_lo <= s.f1 <= s.f1_hi
    assert s.n == 60 and s.n_unparsed == sum(v is None for v in p)
    assert bootstrap_scores(t, p, YN, n_boot=300, seed=7) == s
    assert bootstrap_scores(t, p, YN, n_boot=300, seed=8) != s
    perfect = bootstrap_scores(t, t, YN, n_boot=200)
    assert (perfect.acc_lo, perfect.acc_hi) == (1.0, 1.0)


def test_retrieval_majority_ties_fall_back():
    assert retrieval_majority(["Yes", "No", "Yes"], "No") == "Yes"
    assert retrieval_majority(["Yes", "No"], "No") == "No"
    assert retrieval_majority([], "Yes") == "Yes"


def test_parsing_messy_generations():
    texts = [" Yes\n", " **No**.", " yes", "Final answer: No\n", " Yesterday", "", " I think Yes", " - No",
             " [Yes]", "  no, because", " Final Answer - Yes", " Maybe"]
    want = ["Yes", "No", "Yes", "No", None, None, None, "No", "Yes", "No", "Yes", None]
    a = Answers([YN] * len(texts), torch.zeros(len(texts), 2), texts)
    got = a.by_generation()
    assert got == want
    s = bootstrap_scores(["Yes"] * len(texts), got, YN, n_boot=0)
    assert s.n_unparsed == 4 and s.acc == pytest.approx(4 / 12)


# ------------------------------------------------------------------------------------ toy tasks
def toy_tasks():
    rnd = random.Random(0)
    dti = [Record({"smiles": rnd.choice(MOLECULES), "protein": rnd.choice(PROTEINS[:6])}, rnd.choice(YN),
                  {"i": i}) for i in range(50)]
    cells = [c + " " + " ".join(f"G{j}" for j in range(i % 4)) for i, c in enumerate(CELLS)]
    pair = [Record({"smiles": rnd.choice(MOLECULES), "smiles_2": rnd.choice(MOLECULES), "genes": rnd.choice(cells)},
                   rnd.choice(["Synergistic", "Antagonistic"])) for _ in range(30)]
    cyp = [Record({"smiles": rnd.choice(MOLECULES)}, rnd.choice(YN)) for _ in range(30)]
    from esm_core.answering.prompts import Item

    return {
        "dti": TaskData("toy_dti", "Toy DTI", "Molecule-protein interaction", "molecule_protein", dti[:36], dti[36:]),
        "pair": TaskData("toy_pair", "Toy pairs", "Molecule-cell", "drug_pair", pair[:20], pair[20:]),
        "cyp": TaskData("toy_cyp", "Toy CYP", "CYP inhibition", "cyp_inhibition", cyp[:20], cyp[20:],
                        context=[("Enzyme (CYP2D6)", Item("protein", "MGLEAPRSAG"))]),
    }


@pytest.fixture(scope="module")
def tasks():
    return toy_tasks()


@pytest.fixture(scope="module")
def ba(workspace):
    return BatchedAnswerer(workspace.sset, workspace.encoders, batch_size=4)


def test_batched_equals_one_at_a_time(workspace, tasks):
    qa = Answerer(workspace.sset, workspace.encoders)
    prompts = []
    for td in tasks.values():  # mixed tasks: different labels, lengths and shared prefixes
        prompts += [td.prompt(r, k=3) for r in td.test[:3]]
    for adapter in (None, "prot"):
        ref_lp = torch.cat([qa.label_logprobs([p], adapter) for p in prompts])
        ref_gen = [qa.generate([p], adapter, max_new_tokens=5)[0] for p in prompts]
        for bs, pc in ((3, True), (16, False)):
            fast = BatchedAnswerer(workspace.sset, workspace.encoders, batch_size=bs, prefix_cache=pc)
            a = fast.run(prompts, adapter, max_new_tokens=5)
            assert torch.allclose(a.logprobs, ref_lp, atol=2e-4), (bs, pc, adapter)
            assert a.texts == ref_gen
        cyp = fast.run(prompts[-3:], adapter, max_new_tokens=5)  # prefix cache past the shared enzyme item
        assert torch.allclose(cyp.logprobs, ref_lp[-3:], atol=2e-4) and cyp.texts == ref_gen[-3:]
    # the same task's prompts share a prefix that is cached
    same = [tasks["dti"].prompt(r, k=3) for r in tasks["dti"].test[:5]]
    fast = BatchedAnswerer(workspace.sset, workspace.encoders)
    assert fast._prefix_len(same) > 100
    assert fast._prefix_len(prompts) >= 1
    # a shared modality item (the CYP enzyme) extends the cached prefix past it
    cyp = [tasks["cyp"].prompt(r, k=3) for r in tasks["cyp"].test[:4]]
    enzyme_end = fast.prompt_length(type(cyp[0])(cyp[0].segments[:2], YN))
    assert fast._prefix_len(cyp) > enzyme_end
    assert fast._prefix_len(cyp[:1]) == fast.prompt_length(cyp[0])


def test_adapters_change_the_answers(ba, tasks):
    prompts = [tasks["dti"].prompt(r, k=2) for r in tasks["dti"].test[:4]]
    base = ba.run(prompts, None, generate=False).logprobs
    spec = ba.run(prompts, "mol", generate=False).logprobs
    assert not torch.allclose(base, spec)
    assert torch.allclose(ba.run(prompts, None, generate=False).logprobs, base)  # adapter switch leaves no trace


def test_fit_prompt_drops_least_similar_examples(workspace, tasks):
    td = tasks["dti"]
    rec = td.test[0]
    fa = BatchedAnswerer(workspace.sset, workspace.encoders)
    full = fit_prompt(td, rec, fa, k=5)
    n_full = fa.prompt_length(full)
    assert full.meta["dropped"] == 0 and n_full == fa.qa.segment_embeds(full.segments).shape[0]
    fa.qa.max_length = n_full - 1
    short = fit_prompt(td, rec, fa, k=5)
    assert short.meta["dropped"] >= 1 and fa.prompt_length(short) <= n_full - 1
    kept = [c.index for c in short.meta["chosen"]]
    assert kept == [c.index for c in full.meta["chosen"]][:len(kept)]  # the most similar ones stay
    fa.qa.max_length = 20
    assert fit_prompt(td, rec, fa, k=5) is None
    tp = task_prompts(td, fa, n=5, seed=0)
    assert tp.n_too_long == 5 and tp.prompts == []
    with pytest.raises(ESMError, match="longer than"):
        fa.run([full], None)


def _long_protein_task(n_train=30, n_test=6):
    rnd = random.Random(5)
    prots = ["M" + "".join(rnd.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(rnd.randint(150, 400)))
             for _ in range(8)]
    recs = [Record({"smiles": rnd.choice(MOLECULES), "protein": rnd.choice(prots)}, rnd.choice(YN), {"i": i})
            for i in range(n_train + n_test)]
    return TaskData("long_dti", "Long DTI", "Molecule-protein interaction", "molecule_protein",
                    recs[:n_train], recs[n_train:])


def _proteins_of(p) -> list[str]:
    from esm_core.answering.prompts import Item

    return [s.raw for s in p.segments if isinstance(s, Item) and s.modality == "protein"]


def test_fit_prompt_windows_proteins_so_that_all_examples_fit(workspace):
    """The example-fit guarantee: a prompt over the context first gets its proteins (examples' and query's)
    windowed to their first N residues, N as large as fits; examples are dropped only below the minimum."""
    from esm_core.benchmark.harness import MIN_PROTEIN_WINDOW

    td = _long_protein_task()
    fa = BatchedAnswerer(workspace.sset, workspace.encoders)
    fa.qa.max_length = 10**6  # lengths only: nothing here runs the model
    for rec in td.test:
        full = fit_prompt(td, rec, fa, k=5)
        n_full = fa.prompt_length(full)
        assert full.meta["protein_window"] is None and len(full.meta["chosen"]) == 5
        fa.qa.max_length = n_full * 2 // 3
        p = fit_prompt(td, rec, fa, k=5)
        w = p.meta["protein_window"]
        assert p.meta["dropped"] == 0 and len(p.meta["chosen"]) == 5  # every example kept
        assert fa.prompt_length(p) <= fa.qa.max_length and MIN_PROTEIN_WINDOW <= w
        whole = [td.train[c.index].values["protein"] for c in p.meta["chosen"]] + [rec.values["protein"]]
        assert _proteins_of(p) == [s[:w] for s in whole]  # the first w residues of every protein
        assert fa.prompt_length(td.prompt(rec, chosen=p.meta["chosen"], residues=w + 1)) > fa.qa.max_length  # largest
        fa.qa.max_length = 10**6
    # below the minimum window, the least similar examples go (at the minimum window)
    rec = td.test[0]
    at_min = td.prompt(rec, k=5, residues=MIN_PROTEIN_WINDOW)
    fa.qa.max_length = fa.prompt_length(at_min) - 1
    p = fit_prompt(td, rec, fa, k=5)
    assert p.meta["dropped"] >= 1 and p.meta["protein_window"] == MIN_PROTEIN_WINDOW
    assert fa.prompt_length(p) <= fa.qa.max_length
    tp = task_prompts(td, fa, n=None)
    assert tp.n_windowed == len(tp.prompts) and tp.n_too_long == 0


def test_task_prompts_sampling_and_training_prompts(ba, tasks):
    td = tasks["dti"]
    a = task_prompts(td, ba, n=6, seed=1)
    assert a.rows == task_prompts(td, ba, n=6, seed=1).rows and len(a.rows) == 6
    assert a.rows != task_prompts(td, ba, n=6, seed=2).rows
    assert len(task_prompts(td, ba, n=None).rows) == len(td.test)
    tr = training_prompts(td, n=8, seed=0, k=3)
    assert len(tr) == 8 and all(p.answer in YN for p in tr) and all(p.meta["task"] == "toy_dti" for p in tr)
    # a training row never serves as its own example
    for p in tr:
        q = p.meta["query"]["i"]
        assert all(td.train[c.index].meta["i"] != q for c in p.meta["chosen"])


def test_evaluate_model_and_references(ba, tasks):
    td = tasks["cyp"]
    tp = task_prompts(td, ba, n=None, k=3)
    res = evaluate_model(ba, tp, "cell", n_boot=50)
    gold = tp.gold
    for mode in ("generation", "likelihood"):
        s = res.scores[mode]
        preds = [r[f"pred_{mode}"] for r in res.predictions]
        assert s.n == len(gold) and s.acc == pytest.approx(accuracy(gold, preds))
        assert s.f1 == pytest.approx(macro_f1(gold, preds, td.labels))
    assert res.scores["generation"].n_unparsed == sum(r["pred_generation"] is None for r in res.predictions)
    assert all(abs(sum(r["probs"].values()) - 1) < 1e-5 for r in res.predictions)
    refs = reference_scores(tp, n_boot=20)
    maj = td.majority_label()
    assert refs["majority class"].acc == pytest.approx(np.mean([g == maj for g in gold]))
    knn = [retrieval_majority(p.meta["example_labels"], maj) for p in tp.prompts]
    assert refs["majority of the 3 examples"].acc == pytest.approx(accuracy(gold, knn))


def test_build_query_and_side_by_side(ba, tasks, workspace):
    td = tasks["dti"]
    q = build_query(td, {"smiles": "CCO", "protein": PROTEINS[0]}, k=4)
    assert len(q.examples) == 4 and q.prompt.answer is None
    for row, c in zip(q.examples, q.prompt.meta["chosen"]):
        assert row["pool_row"] == c.index and row["similarity"] == round(c.score, 4)
        assert row["Molecule"] == td.train[c.index].values["smiles"] and row["label"] == td.train[c.index].label
    assert list(q.table().columns)[:4] == ["rank", "label", "similarity", "reason"]
    with pytest.raises(ESMError):
        build_query(td, 999)
    sset = workspace.sset
    avg = {k: sum(sset.adapters[n].tensors[k].float() for n in sset.names) / 3 for k in sset.lora_keys}
    sset.add_adapter("avg_test", avg, dict(sset.adapters["mol"].config))
    try:
        rows = answer_side_by_side(ba, [q.prompt, build_query(td, 0).prompt])
    finally:
        sset.remove_adapter("avg_test")
    assert [r["model"] for r in rows if r["prompt"] == 0] == ["base", "mol", "prot", "cell", "avg_test"]
    for r in rows:
        assert r["p(Yes)"] + r["p(No)"] == pytest.approx(1.0, abs=1e-5)
        assert r["answer_likelihood"] == ("Yes" if r["p(Yes)"] > r["p(No)"] else "No")
    assert "gold" in rows[1] and rows[1]["prompt"] == 1


def test_report_markdown_has_n_in_every_cell(tasks):
    rep = Report()
    s = Score(0.5, 0.4, 0.6, 0.45, 0.3, 0.55, 10, 2)
    for name, kind in (("base", "base"), ("Average", "merge")):
        for t in tasks.values():
            rep.add(name, kind, t, "generation", s)
            rep.add(name, kind, t, "likelihood", s)
    rep.add("reference: majority class", "reference", tasks["dti"], "reference", s)
    md = rep.markdown()
    body = [l for l in md.splitlines() if l.startswith("| base") or l.startswith("| Average")]
    assert body and all(l.count("n=10") == 2 * (l.count("|") - 4) // 2 for l in body)
    assert "2 unparsed" in md.split("### Answer by likelihood")[0]
    assert "unparsed" not in md.split("### Answer by likelihood")[1]
    assert md.count("reference: majority class") == 6  # 3 groups x 2 modes


# ------------------------------------------------------------------------------------ CLI
PROT_A, PROT_B = PROTEINS[0], PROTEINS[3]


@pytest.fixture(scope="module")
def cli_env(world, tmp_path_factory):
    d = tmp_path_factory.mktemp("evalcli")
    write_run_yaml(d, world, method=dict(probes_per_modality=12, batch_size=4, n_projections=64))
    rnd = random.Random(3)
    data = d / "data" / "public" / "dti"
    data.mkdir(parents=True)
    pairs = [(m, p) for m in MOLECULES for p in (PROT_A, PROT_B, PROTEINS[5])]
    for stem in ("human_random", "bindingdb_sample"):
        drawn = rnd.sample(pairs, 42)  # distinct inputs: repeats would be removed (loaders.dedupe)
        for split, rows_ in (("train", drawn[12:]), ("test", drawn[:12])):
            rows = [f"{m},{p},{rnd.choice(['0', '1.0'])}" for m, p in rows_]
            (data / f"{stem}_{split}.csv").write_text("SMILES,Protein,Y\n" + "\n".join(rows) + "\n")
    return d


def test_cli_evaluate_table_json_and_skips(cli_env, world, capsys):
    out = cli_env / "eval.json"
    args = ["evaluate", "--config", str(cli_env / "run.yaml"), "--data-dir", str(cli_env / "data"), "--task",
            "human,biosnap", "--n", "8", "--k", "3", "--n-boot", "50", "--no-progress"]
    assert cli(args + ["--model", "mol", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "skipped: Task 'biosnap' skipped" in text and "biosnap_random" in text
    assert "| mol |" in text and "n=8" in text and "reference: majority class" in text
    rep = json.loads(out.read_text())
    rows = {(r["model"], r["mode"]): r for r in rep["rows"]}
    assert rows[("mol", "generation")]["n"] == 8 and ("mol", "likelihood") in rows
    assert rep["tasks"][0]["evaluated"] == 8 and len(rep["skipped"]) == 1
    preds = rep["predictions"]["mol|human"]
    # the same adapter loaded from its directory gives the same answers
    out2 = cli_env / "eval_dir.json"
    assert cli(args + ["--model", str(world["adapters"]["mol"]), "--out", str(out2)]) == 0
    rep2 = json.loads(out2.read_text())
    assert list(rep2["predictions"].values())[0] == preds
    capsys.readouterr()
    assert cli(args + ["--model", "nobody"]) == 2
    assert "error:" in capsys.readouterr().err
    assert cli(args + ["--modes", "vibes"]) == 2
    capsys.readouterr()
    assert cli(args + ["--min-test-rows", "13"]) == 2  # every task skipped: an error, not an empty success
    got = capsys.readouterr()
    assert "'human' skipped: 12 test rows" in got.out and "every task was skipped" in got.err


def test_cli_compare_table_csv(cli_env, capsys):
    from esm_core.merging.base import MergeMethod, MergeOutput, weighted_sum
    from esm_core.merging.registry import REGISTRY, register

    seen = {}

    def learn(ctx, params):  # a data-needing method: records what the harness gives it
        seen["data"] = ctx.data
        K = len(ctx.names)
        return MergeOutput(weighted_sum(ctx, {k: torch.full((K,), 1.0 / K) for k in ctx.keys}))

    register(MergeMethod("test_learner", "Test learner", "-", "-", (), learn, frozenset({"data", "model"})))
    common = ["compare", "--config", str(cli_env / "run.yaml"), "--data-dir", str(cli_env / "data"), "--k", "2",
              "--n-boot", "20", "--train-prompts", "5", "--no-progress"]
    try:
        out = cli_env / "cmp"
        rc = cli(common + ["--task", "human", "--n", "6", "--methods", "average,test_learner", "--out", str(out)])
        assert rc == 0, capsys.readouterr().err
        assert len(seen["data"]) == 5 and all(p.answer in YN and p.meta["task"] == "human" for p in seen["data"])
        # suite scope: one merge on the training prompts of every task
        rc = cli(common + ["--task", "human,bindingdb", "--n", "3", "--methods", "test_learner", "--no-base",
                           "--no-specialists", "--data-scope", "suite", "--out", str(cli_env / "cmp_suite")])
        assert rc == 0
        assert sorted({p.meta["task"] for p in seen["data"]}) == ["bindingdb", "human"] and len(seen["data"]) == 10
        suite = json.loads((cli_env / "cmp_suite" / "results.json").read_text())
        assert list(suite["meta"]["merges"]) == ["test_learner"]
        assert {r["task"] for r in suite["rows"] if r["model"] == "Test learner"} == {"human", "bindingdb"}
    finally:
        REGISTRY.pop("test_learner", None)
    md = (out / "table.md").read_text()
    for model in ("base", "specialist: mol", "specialist: cell", "Average", "Test learner", "reference: majority class"):
        assert f"| {model} |" in md
    rows = list(csv.DictReader(open(out / "table.csv")))
    assert {r["model"] for r in rows} >= {"base", "Average", "Test learner"}
    assert all(int(r["n"]) == 6 for r in rows)
    res = json.loads((out / "results.json").read_text())
    assert "average" in res["meta"]["merges"] and "test_learner|human" in res["meta"]["merges"]
    # --spaces: one row per method and merge space, the merge in each space recorded
    rc = cli(common + ["--task", "human", "--n", "4", "--methods", "average", "--no-base", "--no-specialists",
                       "--spaces", "factors,delta", "--out", str(cli_env / "cmp_spaces")])
    assert rc == 0, capsys.readouterr().err
    sp = json.loads((cli_env / "cmp_spaces" / "results.json").read_text())
    assert sp["meta"]["spaces"] == ["factors", "delta"]
    assert set(sp["meta"]["merges"]) == {"average|factors", "average|delta"}
    assert {r["model"] for r in sp["rows"] if r.get("kind") == "merge" or r["model"].startswith("Average")} \
        == {"Average [factors]", "Average [delta]"}
    # the average of three identical-scaling adapters equals the hand average: same answers as evaluate would give
    avg = [r for r in rows if r["model"] == "Average" and r["mode"] == "likelihood"][0]
    assert 0.0 <= float(avg["acc"]) <= 1.0
