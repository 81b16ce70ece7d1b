"""Bad input gives a clear error, loses nothing and is never silent (bad data files, huge probe files, silent skips, CSV formulas).

One table of cases, one parametrised test. Each case builds its own input (files under tmp_path, the
tiny random world of conftest for the CLI) and asserts what the user must see:

- row 9: empty and header-only files give an ESMError naming the file (any table, probe data); a task
  file without rows, or a split whose rows are all invalid, is skipped with the skipped rows by reason,
  and evaluate refuses in one line when every task is skipped -- never a pandas traceback;
- row 10: a 200k-row probe file: only the seeded draw is validated (validator calls counted), fast,
  with progress and a summary that says how many rows were examined;
- row 11: evaluate / compare print the rows skipped by reason, the prompts left out as too long and
  the examples a prompt really held of k (console and the Markdown table);
- row 13: CSV downloads defuse spreadsheet formulas in text cells and keep numbers numbers.
"""

from __future__ import annotations

import io
import random
import re
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pandas as pd
import pytest
from conftest import MOLECULES, PROTEINS, ROOT, modality_specs, write_run_yaml

from esm_core.cli import main as cli
from esm_core.config import MethodConfig
from esm_core.errors import ESMError
from esm_core.runspec import DataSpec, ModalitySpec


@dataclass
class Ctx:
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture
    request: pytest.FixtureRequest

    @property
    def world(self):
        return self.request.getfixturevalue("world")


@dataclass(frozen=True)
class Case:
    row: int
    name: str
    check: Callable[[Ctx], None]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _raises(fn, *fragments: str) -> str:
    with pytest.raises(ESMError) as ei:
        fn()
    msg = str(ei.value)
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


# ------------------------------------------------------------------------------------ row 9
def read_empty(ctx: Ctx, *, name: str, text: str) -> None:
    from esm_core.samples import read_table

    path = _write(ctx.tmp / name, text)
    _raises(lambda: read_table(path, required=["smiles"]), str(path), "holds no rows", "Fix:")


def probe_file_empty(ctx: Ctx, *, text: str) -> None:
    from esm_core.pipeline import read_probe_samples

    path = _write(ctx.tmp / "mol.csv", text)
    mod = ModalitySpec("molecule", "Molecule: ", "smiles", data=DataSpec(str(path), "smiles"))
    spec = SimpleNamespace(modalities=[mod])
    _raises(lambda: read_probe_samples(spec), str(path), "holds no rows")


def _dti_csv(rows: list[tuple[str, str, str]]) -> str:
    return "SMILES,Protein,Y\n" + "".join(f"{s},{p},{y}\n" for s, p, y in rows)


def _good_rows(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    rnd = random.Random(seed)
    return [(rnd.choice(MOLECULES), rnd.choice(PROTEINS), rnd.choice(["0", "1.0"])) for _ in range(n)]


def task_skipped(ctx: Ctx, *, test_text: str, fragments: tuple[str, ...]) -> None:
    from esm_core.benchmark.tasks import load_tasks

    d = ctx.tmp / "data" / "public" / "dti"
    _write(d / "human_random_train.csv", _dti_csv(_good_rows(20)))
    _write(d / "human_random_test.csv", test_text)
    loaded, skipped = load_tasks(["human"], ctx.tmp / "data")
    assert loaded == [] and len(skipped) == 1
    assert skipped[0].startswith("Task 'human' skipped: ")
    for f in fragments:
        assert f in skipped[0], (f, skipped[0])


ALL_INVALID_TEST = _dti_csv([("C1CC", PROTEINS[0], "1")] * 3 + [("CCO", "MK1A", "0")] * 2
                            + [("CCO", PROTEINS[1], "2")])


def evaluate_every_task_skipped(ctx: Ctx) -> None:
    """evaluate on a task whose test rows are all invalid: one error line and exit 2, no traceback."""
    d = ctx.tmp / "data" / "public" / "dti"
    _write(d / "human_random_train.csv", _dti_csv(_good_rows(20)))
    _write(d / "human_random_test.csv", ALL_INVALID_TEST)
    run = write_run_yaml(ctx.tmp, ctx.world)
    rc = cli(["evaluate", "--config", str(run), "--data-dir", str(ctx.tmp / "data"), "--task", "human",
              "--no-progress"])
    out = ctx.capsys.readouterr()
    assert rc == 2 and "Traceback" not in out.err
    assert "error: No task could be evaluated" in out.err and "test split is empty" in out.err
    assert "3 invalid SMILES, 2 invalid protein, 1 bad label" in out.err


# ------------------------------------------------------------------------------------ row 10
def _count_validator(ctx: Ctx, kind: str) -> list[int]:
    from esm_core.samples import VALIDATORS

    calls = [0]
    fn = VALIDATORS[kind]

    def counted(raw):
        calls[0] += 1
        return fn(raw)

    ctx.monkeypatch.setitem(VALIDATORS, kind, counted)
    return calls


BIG_ROWS, BAD_EVERY = 200_000, 7


def huge_probe_file(ctx: Ctx) -> None:
    """A 200k-row probe CSV: the column alone is read, only the drawn rows are validated, fast."""
    from esm_core.pipeline import read_probe_samples
    from esm_core.probes import build_probes

    lines = [f"m{i},{'not((' if i % BAD_EVERY == 3 else MOLECULES[i % len(MOLECULES)]},note {i}"
             for i in range(BIG_ROWS)]
    path = _write(ctx.tmp / "big.csv", "id,smiles,notes\n" + "\n".join(lines) + "\n")
    mods = modality_specs()
    mods[0].data = DataSpec(str(path), "smiles")
    calls = _count_validator(ctx, "smiles")
    seen: list[tuple[str, float]] = []
    cfg = MethodConfig.from_preset("reference", probes_per_modality=32)
    t0 = time.perf_counter()
    raw = read_probe_samples(SimpleNamespace(modalities=mods[:1]))
    probes = build_probes({"molecule": raw["molecule"], "protein": PROTEINS * 2, "cell": ["CD3E CD4"] * 32},
                          mods, cfg, progress=lambda msg, frac: seen.append((msg, frac)))
    assert time.perf_counter() - t0 < 10
    rep = probes.reports["molecule"]
    assert len(raw["molecule"]) == BIG_ROWS and rep.n_total == BIG_ROWS
    assert calls[0] == rep.n_examined < 32 + 20  # the draw, and a few more for the bad rows in it
    assert len(rep.values) == 32 and len(rep.bad) == rep.n_examined - 32
    assert all(r % BAD_EVERY == 3 for r, _, _ in rep.bad)
    assert probes.sample_rows["molecule"] == sorted(probes.sample_rows["molecule"])
    assert probes.summary()["molecule"] == dict(used=32, valid=32, bad=len(rep.bad), examined=rep.n_examined,
                                                total=BIG_ROWS)
    assert seen and seen[-1][1] == pytest.approx(1.0) and all(0 <= f <= 1 for _, f in seen)
    assert any("molecule" in msg for msg, _ in seen)


def clean_file_keeps_its_draw(ctx: Ctx) -> None:
    """Without bad rows the draw is the one of validating everything first (existing probe sets stay)."""
    from esm_core.probes import sample_modality

    raws = [MOLECULES[i % len(MOLECULES)] for i in range(5000)]
    calls = _count_validator(ctx, "smiles")
    for seed in (0, 3):
        rep, idx = sample_modality(raws, "smiles", 40, seed, 8, "molecule")
        old = sorted(random.Random(f"{seed}:molecule").sample(range(len(raws)), 40))
        assert [rep.rows[i] for i in idx] == old
    assert calls == [80]


# ------------------------------------------------------------------------------------ row 11
LONG = "".join(random.Random(0).choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(700))
HUGE = LONG * 4  # longer than the model's context (2048 positions) on its own


def _facts_data(ctx: Ctx) -> Path:
    """human: long proteins (windowed so that the examples fit), one query protein longer than the whole context
    on its own (windowed too: no prompt is left out), skipped rows of each kind."""
    d = ctx.tmp / "data" / "public" / "dti"
    # distinct inputs, none a test row's (repeats would be removed: loaders.dedupe)
    pool = [(MOLECULES[6 + i % 10], (LONG if i < 10 else "M" + LONG[1:]) if i % 2 else PROTEINS[i % 16], str(i % 2))
            for i in range(20)]
    _write(d / "human_random_train.csv", _dti_csv(pool + [("CCO", "MK1A", "1")]))
    test = [(MOLECULES[i], LONG if i % 2 else PROTEINS[i], str(i % 2)) for i in range(6)]
    _write(d / "human_random_test.csv", _dti_csv(test + [("CCN", HUGE, "1"), ("C1CC", PROTEINS[0], "0"),
                                                        ("CCO", PROTEINS[1], "maybe")]))
    return ctx.tmp / "data"


FACTS_LINE = re.compile(r"human: 30 rows read; skipped: 1 invalid SMILES, 1 invalid protein, 1 bad label; "
                        r"0 prompt\(s\) left out as too long; mean examples per prompt ([\d.]+) of k=3 "
                        r"\((\d+) dropped to fit the context; proteins of (\d+) prompt\(s\) windowed to a mean "
                        r"(\d+) residues\)")


def _check_facts(out: str, facts: dict) -> None:
    m = FACTS_LINE.search(out)
    assert m, out
    mean, dropped, windowed, window = float(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4))
    # 6 test rows + the HUGE one: every prompt keeps its 3 examples, the long proteins windowed instead
    assert facts["evaluated"] == 7 and facts["too_long"] == 0 and dropped == facts["examples_dropped_to_fit"] == 0
    assert mean == 3 and windowed == facts["windowed"] >= 4 and window == round(facts["mean_window"])
    assert 48 <= window < len(LONG)
    table = out.split("### Task facts", 1)[1]
    assert "| Human | 30 | 1 invalid SMILES, 1 invalid protein, 1 bad label | 7 | 0 | " in table


def evaluate_console_facts(ctx: Ctx) -> None:
    import json

    data = _facts_data(ctx)
    run = write_run_yaml(ctx.tmp, ctx.world)
    out_json = ctx.tmp / "eval.json"
    rc = cli(["evaluate", "--config", str(run), "--data-dir", str(data), "--task", "human", "--k", "3",
              "--modes", "likelihood", "--n-boot", "20", "--no-progress", "--out", str(out_json)])
    out = ctx.capsys.readouterr().out
    assert rc == 0
    facts = json.loads(out_json.read_text())["tasks"][0]
    assert facts["skipped_rows"] == {"invalid SMILES": 1, "invalid protein": 1, "bad label": 1}
    _check_facts(out, facts)


def compare_console_facts(ctx: Ctx) -> None:
    import json

    data = _facts_data(ctx)
    run = write_run_yaml(ctx.tmp, ctx.world)
    rc = cli(["compare", "--config", str(run), "--data-dir", str(data), "--task", "human", "--k", "3",
              "--modes", "likelihood", "--n-boot", "20", "--methods", "average", "--no-specialists",
              "--no-progress", "--out", str(ctx.tmp / "cmp")])
    out = ctx.capsys.readouterr().out
    assert rc == 0
    _check_facts(out, json.loads((ctx.tmp / "cmp" / "results.json").read_text())["tasks"][0])
    assert "### Task facts" in (ctx.tmp / "cmp" / "table.md").read_text()


def query_page_facts(ctx: Ctx) -> None:
    """The Query page: the task's load counts, and how many of the k examples the prompt really holds."""
    from streamlit.testing.v1 import AppTest

    ctx.request.getfixturevalue("app_env")
    ctx.monkeypatch.setenv("ESM_DATA_DIR", str(_facts_data(ctx)))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.run()
    at.switch_page("pages/query.py").run()
    at.radio(key="q_source").set_value("Benchmark tasks").run()
    at.number_input(key="q_row").set_value(1).run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    assert any("30 rows read; skipped: 1 invalid SMILES, 1 invalid protein, 1 bad label" in c.value
               for c in at.caption)
    text = next(m.value for m in at.markdown if "Gold answer of test row 1" in m.value)
    held, dropped = map(int, re.search(r"the prompt holds (\d+) of k=5 examples \((\d+) dropped to fit the "
                                       r"context\)", text).groups())
    shown = [len(d.value) for d in at.dataframe if "pool_row" in d.value.columns]  # no table without examples
    # long proteins: windowed (examples' and query's alike) so that all five examples fit
    window = int(re.search(r"every protein shown as its first (\d+) residues", text).group(1))
    assert held == 5 and dropped == 0 and held == sum(shown) and 48 <= window < len(LONG)


# ------------------------------------------------------------------------------------ row 13
def csv_defused(ctx: Ctx) -> None:
    from ui.widgets import csv_bytes

    df = pd.DataFrame({"raw": ["=1+1", "+A1", "-cmd", "@SUM(A1)", "\tx", "\rx", "CCO", None],
                       "value": [-3.5, 1.0, -2.0, 0.0, 4.0, 5.0, 6.0, 7.0], "row": range(8)})
    df["=head"] = "ok"
    back = pd.read_csv(io.BytesIO(csv_bytes(df)), keep_default_na=False)
    assert back["raw"].tolist() == ["'=1+1", "'+A1", "'-cmd", "'@SUM(A1)", "'\tx", "'\rx", "CCO", ""]
    assert back["value"].dtype.kind == "f" and back["value"].tolist()[:3] == [-3.5, 1.0, -2.0]
    assert back["row"].tolist() == list(range(8)) and list(back.columns)[-1] == "'=head"
    assert df["raw"][0] == "=1+1"  # the shown table is untouched


# No page writes a CSV itself any more.
RAW_CSV_PENDING: set[str] = set()


def every_csv_download_defused(ctx: Ctx) -> None:
    """Every CSV download of pages/ and ui/ goes through ui.widgets.csv_bytes."""
    raw = {str(p.relative_to(ROOT)) for d in ("pages", "ui") for p in (ROOT / d).glob("*.py")
           if ".to_csv(" in p.read_text() and p.name != "widgets.py"}
    assert raw == RAW_CSV_PENDING
    assert (ROOT / "ui" / "widgets.py").read_text().count(".to_csv(") == 1  # inside csv_bytes


CASES = [
    Case(9, "empty csv", partial(read_empty, name="x.csv", text="")),
    Case(9, "empty tsv", partial(read_empty, name="x.tsv", text="")),
    Case(9, "header-only csv", partial(read_empty, name="x.csv", text="smiles\n")),
    Case(9, "header-only tsv", partial(read_empty, name="x.tsv", text="id\tsmiles\n")),
    Case(9, "empty probe file", partial(probe_file_empty, text="")),
    Case(9, "header-only probe file", partial(probe_file_empty, text="smiles\n")),
    Case(9, "empty task file", partial(task_skipped, test_text="", fragments=("human_random_test.csv",
                                                                              "holds no rows"))),
    Case(9, "header-only task file", partial(task_skipped, test_text="SMILES,Protein,Y\n",
                                             fragments=("human_random_test.csv", "holds no rows"))),
    Case(9, "all-invalid test split", partial(task_skipped, test_text=ALL_INVALID_TEST, fragments=(
        "test split is empty", "26 rows read; skipped: 3 invalid SMILES, 2 invalid protein, 1 bad label"))),
    Case(9, "evaluate with every task skipped", evaluate_every_task_skipped),
    Case(10, "200k-row probe file", huge_probe_file),
    Case(10, "clean file keeps its draw", clean_file_keeps_its_draw),
    Case(11, "evaluate prints task facts", evaluate_console_facts),
    Case(11, "compare prints task facts", compare_console_facts),
    Case(11, "query page shows examples held of k", query_page_facts),
    Case(13, "csv cells defused", csv_defused),
    Case(13, "every csv download defused", every_csv_download_defused),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"row{c.row}-{c.name.replace(' ', '-')}")
def test_bad_input(case: Case, tmp_path, monkeypatch, capsys, request):
    case.check(Ctx(tmp_path, monkeypatch, capsys, request))
