"""The Probe page (AppTest): counts, previews, bad rows, uploads, picked rows, the tokenised probe.

Runs on the demo zoo when assets/zoo/run.yaml exists, else on the tiny world of conftest written
out as a run.yaml (with a few bad rows in its data files). Expected values come from the data files
and the uploaded tables themselves.
"""

from __future__ import annotations

import base64
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import MOLECULES, PROTEINS, write_run_yaml
from streamlit.testing.v1 import AppTest

from esm_core.encoders import SoftTokenEncoder, SoftTokenProjector
from esm_core.runspec import load_run_spec
from esm_core.samples import read_table

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "assets" / "zoo" / "run.yaml"
BAD_MOLECULES = ["not((", "C1CC"]  # unparsable, unclosed ring
SOFT_TOKENS, CELL_CAP = 4, 5  # every cell sample of conftest is longer than CELL_CAP characters


@pytest.fixture(scope="module")
def tiny_run(world, tmp_path_factory):
    d = tmp_path_factory.mktemp("app_probe")
    path = write_run_yaml(d, world, molecules=MOLECULES[:6] + BAD_MOLECULES[:1] + MOLECULES[6:] + BAD_MOLECULES[1:],
                          proteins=PROTEINS + ["MK1A"])
    # like the zoo: molecules through a soft-token encoder, cells capped at a few tokens
    torch.manual_seed(0)
    SoftTokenEncoder("morgan", {}, SoftTokenProjector(2048, 16, SOFT_TOKENS, 32)).save(d / "mol_enc")
    cfg = yaml.safe_load(path.read_text())
    cfg["modalities"][0]["encoder"] = dict(type="soft_token", path="mol_enc")
    cfg["modalities"][2]["max_tokens"] = CELL_CAP
    path.write_text(yaml.safe_dump(cfg))
    return d / "run.yaml"


@pytest.fixture
def demo(tiny_run):
    return load_run_spec(ZOO if ZOO.is_file() else tiny_run)


@pytest.fixture
def at(monkeypatch, world, tiny_run):
    monkeypatch.setenv("ESM_ALLOWED_ROOTS", os.pathsep.join([str(tiny_run.parent), str(world["dir"])]))
    if ZOO.is_file():
        monkeypatch.delenv("ESM_DEMO_SPEC", raising=False)
    else:
        monkeypatch.setenv("ESM_DEMO_SPEC", str(tiny_run))
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    app.run()
    app.switch_page("pages/probe.py")
    app.run()
    _ok(app)
    return app


def _ok(at):
    assert not at.exception, [e.value for e in at.exception]


def _counts(at) -> pd.DataFrame:
    return next(d.value for d in at.dataframe if "truncated" in d.value.columns).set_index("modality")


def _errors(at) -> str:
    return "\n".join(e.value for e in at.error)


def _file_rows(m) -> list[str]:
    return read_table(m.data.path, required=[m.data.column])[m.data.column].tolist()


class _Spans(HTMLParser):
    """Modality spans of the probe HTML: [(modality, [token, ...])] in order."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.spans, self._stack, self._in_sup = [], [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "span" and "esm-span" in (a.get("class") or ""):
            self.spans.append((a["data-modality"], []))
            self._stack.append("mod")
        elif tag == "span" and self._stack and self._stack[-1] == "mod" and "outline" in (a.get("style") or ""):
            self._stack.append("tok")
            self.spans[-1][1].append("")
        elif tag == "span":
            self._stack.append("other")
        self._in_sup = tag == "sup" or self._in_sup

    def handle_endtag(self, tag):
        if tag == "sup":
            self._in_sup = False
        elif tag == "span" and self._stack:
            self._stack.pop()

    def handle_data(self, data):
        if self._stack and self._stack[-1] == "tok" and not self._in_sup:
            self.spans[-1][1][-1] += data


def _spans(at) -> list[tuple[str, list[str]]]:
    p = _Spans()
    p.feed(at.html[0].value)
    return p.spans


def _holds(at) -> dict[str, int]:
    cap = next(c.value for c in at.caption if c.value.startswith("Probe "))
    return {m: int(r) for m, r in re.findall(r"(\w+) #(\d+)", cap.split("holds", 1)[1])}


def _check_span(m, tokens, raw):
    if m.encoder.type == "soft_token":
        import json

        n = json.loads((Path(m.encoder.path) / "encoder_config.json").read_text())["n_tokens"]
        assert len(tokens) == n and all(t.startswith("<") for t in tokens)
    else:
        from esm_core.encoders import separated

        # the whole sample as the encoder shows it, or its first max_tokens tokens; the prefix's trailing
        # space is joined to the first token (tokenised with the text before it, docs/METHOD.md section 1)
        text = "".join(tokens)
        assert text.startswith(" ") and (" " + separated(raw, m.encoder.options.get("separator"))).startswith(text)


def test_counts_previews_and_tokenised_probe(at, demo):
    cfg = demo.method
    counts = _counts(at)
    assert list(counts.index) == [m.name for m in demo.modalities]
    used = set()
    for m in demo.modalities:
        row = counts.loc[m.name]
        rows = _file_rows(m)
        # only the seeded draw is validated: valid and bad count the examined rows
        assert row["total"] == len(rows) and row["valid"] + row["bad"] == row["examined"] <= len(rows)
        assert row["source"] == f"data file {Path(m.data.path).name} · column {m.data.column}"
        used.add(int(row["used"]))
    assert used == {min(cfg.probes_per_modality, int(counts["valid"].min()))}  # joint: one sample of each
    if not ZOO.is_file():
        assert counts["bad"].tolist() == [2, 1, 0]  # the seeded draws of 12 happen to hold every bad row
        assert (counts["examined"] < counts["total"]).all()
        assert counts["truncated"].tolist() == [0, 0, 12]  # char tokenizer: every cell is over CELL_CAP
        bad = next(d.value for d in at.dataframe if "reason" in d.value.columns)
        assert bad["row"].tolist() == [6, 17] and bad["raw"].tolist() == BAD_MOLECULES
        assert set(bad["reason"]) == {"RDKit cannot parse this SMILES"}
    # previews: molecule drawings, protein charts, ranked gene lists
    kinds = [m.kind for m in demo.modalities]
    if "smiles" in kinds:
        svg = base64.b64decode(at.image[0].value[0].split(",", 1)[1]).decode()
        assert "<svg" in svg and "bond-" in svg
    if "genes" in kinds:
        genes = next(d.value for d in at.dataframe if "genes" in d.value.columns and "1" in d.value.columns)
        assert genes["genes"].min() >= 1 and all(isinstance(g, str) and g for g in genes["1"])
    assert len(at.get("plotly_chart")) >= 2 * kinds.count("protein") + kinds.count("genes")
    # tokenised probe 0: one highlighted span per modality, in probe order, holding the sample it names
    spans = _spans(at)
    assert [s[0] for s in spans] == [m.name for m in demo.modalities]
    if not ZOO.is_file():
        assert spans[0][1] == [f"<tok{i}>" for i in range(SOFT_TOKENS)] and len(spans[2][1]) == CELL_CAP
    holds = _holds(at)
    for m, (name, toks) in zip(demo.modalities, spans):
        _check_span(m, toks, _file_rows(m)[holds[name]])
    at.number_input(key="pr_index").set_value(1).run()
    _ok(at)
    holds1 = _holds(at)
    assert holds1 != holds
    for m, (name, toks) in zip(demo.modalities, _spans(at)):
        _check_span(m, toks, _file_rows(m)[holds1[name]])


def test_settings_count_seed_and_separate_layout(at, demo):
    M = len(demo.modalities)
    at.number_input(key="pr_n").set_value(9)
    at.number_input(key="pr_seed").set_value(7)
    at.radio(key="pr_layout").set_value("separate")
    next(b for b in at.button if b.label == "Apply settings").click()
    at.run()
    _ok(at)
    cfg = at.session_state["esm"].method
    assert (cfg.probes_per_modality, cfg.seed, cfg.layout) == (9, 7, "separate")
    assert _counts(at)["used"].tolist() == [9] * M
    assert any(f"{9 * M} probes · layout **separate**" in c.value for c in at.caption)
    spans = _spans(at)
    assert len(spans) == 1 and spans[0][0] == demo.modalities[0].name  # one modality per probe
    at.number_input(key="pr_index").set_value(9 * M - 1).run()
    assert [s[0] for s in _spans(at)] == [demo.modalities[-1].name]
    assert _holds(at).keys() == {demo.modalities[-1].name}
    # back to fewer probes: the chosen index is kept inside the new range
    at.radio(key="pr_layout").set_value("joint")
    next(b for b in at.button if b.label == "Apply settings").click()
    at.run()
    _ok(at)
    assert at.number_input(key="pr_index").value == 8 and len(_spans(at)) == M


def test_upload_wrong_column_bad_rows_and_size_limit(at, demo):
    from ui.sample_pools import UPLOAD_LIMIT

    m = next(x for x in demo.modalities if x.kind == "smiles")
    good = ["CCO", "c1ccccc1", "CC(=O)O", "CCN", "CCCC", "O=C=O", "CC(C)O", "CCl", "CBr", "C#N"]
    smiles = good[:3] + ["not(("] + good[3:6] + ["C1CC"] + good[6:] + ["xyz"]
    csv = "name,smiles\n" + "\n".join(f"m{i},{s}" for i, s in enumerate(smiles)) + "\n"
    at.file_uploader(key=f"pr_up_{m.name}").set_value(("mine.csv", csv.encode(), "text/csv")).run()
    _ok(at)
    col = at.selectbox(key=f"pr_upcol_{m.name}")
    assert col.value == "smiles" and col.options == ["name", "smiles"]
    col.set_value("name")
    at.button(key=f"pr_up_go_{m.name}").click().run()
    err = _errors(at)
    assert "Column 'name' of upload 'mine.csv' does not hold SMILES strings: only 0 of 13 values are valid" in err
    assert f"choose the column that holds the {m.name} samples" in err
    assert _counts(at).loc[m.name, "total"] == len(_file_rows(m))  # nothing applied
    at.selectbox(key=f"pr_upcol_{m.name}").set_value("smiles")
    at.button(key=f"pr_up_go_{m.name}").click().run()
    _ok(at)
    assert not at.error, _errors(at)
    row = _counts(at).loc[m.name]
    assert row["source"] == "upload mine.csv · column smiles"
    assert (row["total"], row["valid"], row["bad"]) == (13, 10, 3)
    bad = next(d.value for d in at.dataframe if "reason" in d.value.columns and "xyz" in d.value["raw"].tolist())
    assert bad["row"].tolist() == [3, 7, 12] and bad["raw"].tolist() == ["not((", "C1CC", "xyz"]
    assert set(bad["reason"]) == {"RDKit cannot parse this SMILES"}
    # an upload over the limit is refused before parsing
    big = b"smiles\n" + b"C" * (UPLOAD_LIMIT + 1)
    at.file_uploader(key=f"pr_up_{m.name}").set_value(("big.csv", big, "text/csv")).run()
    assert f"over the {UPLOAD_LIMIT // 2**20} MiB limit" in _errors(at)
    at.file_uploader(key=f"pr_up_{m.name}").set_value(None)
    at.button(key=f"pr_reset_{m.name}").click().run()
    _ok(at)
    assert _counts(at).loc[m.name, "source"].startswith("data file ")


def test_pick_rows(at, demo):
    m = next(x for x in demo.modalities if x.kind == "protein")
    rows = _file_rows(m)
    keep = [0, 2, 3, 5, 8, 9, 10, 11, 13]
    at.session_state[f"pr_pick_{m.name}"] = {
        "edited_rows": {i: {"use": False} for i in range(len(rows)) if i not in keep},
        "added_rows": [], "deleted_rows": []}
    at.run()
    at.button(key=f"pr_pick_go_{m.name}").click().run()
    _ok(at)
    assert not at.error, _errors(at)
    row = _counts(at).loc[m.name]
    assert row["total"] == len(keep) and row["source"].startswith(f"{len(keep)} rows picked from data file")
    assert at.session_state["esm"].samples[m.name] == [rows[i] for i in keep]
    # too few rows for min_probes: refused, nothing changes
    at.session_state[f"pr_pick_{m.name}"] = {
        "edited_rows": {i: {"use": i in (0, 2, 3)} for i in range(len(rows))}, "added_rows": [], "deleted_rows": []}
    at.run()
    at.button(key=f"pr_pick_go_{m.name}").click().run()
    assert "only 3 of 3 samples are valid" in _errors(at) and "fewer than the 8 needed" in _errors(at)
    assert _counts(at).loc[m.name, "total"] == len(keep)
