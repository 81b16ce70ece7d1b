"""Bad input loses nothing, runs nothing, says one clear thing: the table-driven refusal suite.

One scratch world (base, adapters, a soft-token encoder, probe data, a run config, a folder of the
user's own) is built once and hashed. Every case of ``CASES`` runs the command line on it (in
process, as ``python -m esm_core`` would) and must end with its exit status and one line holding
the expected fragment, without a traceback, and with every file of the scratch world unchanged.
Outputs, locks, races and a SIGKILL during a write have their own tests below.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CELLS, MOLECULES, PROTEINS

from esm_core.cli import main as cli
from esm_core.errors import ESMError
from esm_core.tiny import ALL_TARGETS, make_lora_adapter

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ the scratch world
def _config(S: Path, *, specialists=None, modalities=None, method=None, **top) -> dict:
    mods = modalities or [
        dict(name="molecule", prefix="Molecule: ", kind="smiles", encoder=dict(type="soft_token", path="../enc"),
             data=dict(path="../data/mol.csv", column="smiles")),
        dict(name="protein", prefix="Protein: ", kind="protein", data=dict(path="../data/prot.tsv", column="seq")),
        dict(name="cell", prefix="Cell: ", kind="genes", data=dict(path="../data/cell.csv", column="genes"))]
    specs = specialists or [dict(name="mol", adapter="../models/mol", modality="molecule"),
                            dict(name="prot", adapter="../models/prot", modality="protein"),
                            dict(name="cell", adapter="../models/cell", modality="cell")]
    return dict(base="../models/base", specialists=specs, modalities=mods,
                method=method or dict(probes_per_modality=12, batch_size=4), **top)


def _variant(S: Path, name: str, cfg: dict | str) -> str:
    p = S / "cfg" / f"{name}.yaml"
    p.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    return str(p)


def _edit_adapter(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def S(world, tmp_path_factory) -> Path:
    from esm_core.encoders import SoftTokenEncoder, SoftTokenProjector

    S = tmp_path_factory.mktemp("scratch")
    (S / "models").mkdir()
    shutil.copytree(world["base"], S / "models" / "base")
    for n in ("mol", "prot", "cell"):
        shutil.copytree(world["adapters"][n], S / "models" / n)
    _edit_adapter(S / "models" / "mol", S / "models" / "r16", r=16)  # says r=16, holds rank-4 factors
    _edit_adapter(S / "models" / "mol", S / "models" / "fewer_targets", target_modules=["q_proj", "v_proj"])
    make_lora_adapter(S / "models" / "base", S / "models" / "no_down", seed=5, r=4, alpha=8, scale=0.2,
                      targets=[t for t in ALL_TARGETS if t != "down_proj"])
    torch.manual_seed(0)
    SoftTokenEncoder("morgan", {"n_bits": 64}, SoftTokenProjector(64, 16, 2, 32), label="mol").save(S / "enc")
    (S / "data").mkdir()
    (S / "data" / "mol.csv").write_text("smiles\n" + "\n".join(MOLECULES) + "\n")
    (S / "data" / "prot.tsv").write_text("id\tseq\n" + "\n".join(f"p{i}\t{s}" for i, s in enumerate(PROTEINS)) + "\n")
    (S / "data" / "cell.csv").write_text("genes\n" + "\n".join(CELLS) + "\n")
    (S / "user").mkdir()
    (S / "user" / "notes.txt").write_text("my own notes\n")
    (S / "cfg").mkdir()
    (S / "cfg" / "run.yaml").write_text(yaml.safe_dump(_config(S), sort_keys=False))
    c = _config(S)
    c["specialists"][0]["adapter"] = "../models/no_down"
    _variant(S, "blame", c)
    for name, adapter in (("r16", "r16"), ("targets", "fewer_targets")):
        c = _config(S)
        c["specialists"][0]["adapter"] = f"../models/{adapter}"
        _variant(S, name, c)
    for v in ("false", "no", 1, "yes"):
        _variant(S, f"trust_{v}", _config(S, trust_remote_code=v))
    for i, bad in enumerate(["../evil", "/abs/x", "a.b", ".", "a/b", ""]):
        c = _config(S)
        c["specialists"][1]["name"] = bad
        _variant(S, f"spname_{i}", c)
        c = _config(S)
        c["modalities"][2]["name"] = bad
        c["specialists"][2]["modality"] = bad
        _variant(S, f"modname_{i}", c)
    for key, val in (("max_tokens", -3), ("max_tokens", "forty"), ("kind", "dna"), ("prefix", ["x"])):
        c = _config(S)
        c["modalities"][1][key] = val
        _variant(S, f"mod_{key}_{val}", c)
    _variant(S, "bomb", textwrap.dedent("""\
        a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
        b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
        c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
        d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
        e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
        f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
        g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
        h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
        base: *h
        """))
    _variant(S, "notmapping", "- just\n- a list\n")
    _variant(S, "unknownkey", yaml.safe_dump(_config(S, colour="red")))
    (S / "cfg" / "binary.yaml").write_bytes(b"\xff\xfe\x00base: x\n")
    return S


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def S_hashes(S):
    return tree_hashes(S)


def _run(argv) -> tuple[int, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli([str(a) for a in argv])
        except SystemExit as e:  # argparse refusals
            rc = e.code
    return rc, out.getvalue() + err.getvalue()


def M(S, out, *more, cfg="run"):
    return ["merge", "--config", S / "cfg" / f"{cfg}.yaml", "--out", out, "--no-progress", *more]


def SET(S, *pairs, cfg="run", out=None):
    argv = ["coefficients", "--config", S / "cfg" / f"{cfg}.yaml", "--out", out or S.parent / "nowhere_out",
            "--no-progress"]
    for p in pairs:
        argv += ["--set", p]
    return argv


# (id, argv builder, exit status, fragment of the message)
CASES = [
    # 1. an output that contains, is, or lies inside an input
    ("out-contains-config", lambda S: M(S, S / "cfg", "--overwrite"), 2, "contains the run config"),
    ("out-contains-base", lambda S: M(S, S / "models", "--overwrite"), 2, "contains the base model"),
    ("out-is-encoder", lambda S: M(S, S / "enc", "--overwrite"), 2, "is the encoder of modality 'molecule'"),
    ("out-contains-probe-data", lambda S: M(S, S / "data", "--overwrite"), 2, "contains the probe data"),
    ("out-contains-everything", lambda S: M(S, S, "--overwrite"), 2, "contains the base model"),
    ("out-is-adapter", lambda S: M(S, S / "models" / "mol", "--overwrite"), 2, "is the adapter of specialist 'mol'"),
    ("out-inside-adapter", lambda S: M(S, S / "models" / "mol" / "sub"), 2, "lies inside the adapter"),
    ("out-is-config-file", lambda S: M(S, S / "cfg" / "run.yaml", "--overwrite"), 2, "is the run config"),
    ("out-not-ours", lambda S: M(S, S / "user", "--overwrite"), 2, "did not write"),
    ("out-exists", lambda S: M(S, S / "user"), 2, "already exists"),
    ("out-is-a-file", lambda S: M(S, S / "user" / "notes.txt", "--overwrite"), 2, "is not a directory"),
    ("out-under-a-file", lambda S: M(S, S / "user" / "notes.txt" / "x"), 2, "is not a writable directory"),
    ("coef-without-out", lambda S: ["coefficients", "--config", S / "cfg" / "run.yaml", "--no-progress"], 2,
     "coefficients needs --out"),
    ("coef-contains-config", lambda S: ["coefficients", "--config", S / "cfg" / "run.yaml", "--out", S / "cfg",
                                        "--overwrite"], 2, "contains the run config"),
    # 4. evaluate and compare follow the same output rules
    ("evaluate-out-is-probe-data", lambda S: ["evaluate", "--config", S / "cfg" / "run.yaml", "--out",
                                              S / "data" / "mol.csv", "--overwrite"], 2, "is the probe data"),
    ("evaluate-out-in-task-data", lambda S: ["evaluate", "--config", S / "cfg" / "run.yaml", "--data-dir", S / "data",
                                             "--out", S / "data" / "scores.json"], 2, "inside the task data directory"),
    ("evaluate-out-exists", lambda S: ["evaluate", "--config", S / "cfg" / "run.yaml", "--out",
                                       S / "user" / "notes.txt"], 2, "already exists"),
    ("evaluate-out-unwritable", lambda S: ["evaluate", "--config", S / "cfg" / "run.yaml", "--out",
                                           S / "user" / "notes.txt" / "s.json"], 2, "cannot be written"),
    ("evaluate-out-is-config", lambda S: ["evaluate", "--config", S / "cfg" / "run.yaml", "--out",
                                          S / "cfg" / "run.yaml", "--overwrite"], 2, "is the run config"),
    ("compare-out-contains-config", lambda S: ["compare", "--config", S / "cfg" / "run.yaml", "--methods", "average",
                                               "--out", S / "cfg", "--overwrite"], 2, "contains the run config"),
    ("compare-out-not-ours", lambda S: ["compare", "--config", S / "cfg" / "run.yaml", "--methods", "average",
                                        "--out", S / "user", "--overwrite"], 2, "did not write"),
    ("compare-unknown-space", lambda S: ["compare", "--config", S / "cfg" / "run.yaml", "--methods", "average",
                                         "--spaces", "factors,weights", "--out", S.parent / "o_sp"], 2,
     "--spaces factors,delta"),
    # 2. trust_remote_code: only a YAML boolean true enables it
    *[(f"trust-{v}", lambda S, v=v: M(S, S.parent / "o_trust", cfg=f"trust_{v}"), 2, "trust_remote_code")
      for v in ("false", "no", 1, "yes")],
    # 3. names are identifiers
    *[(f"specialist-name-{i}", lambda S, i=i: M(S, S.parent / "o_name", cfg=f"spname_{i}"), 2,
       "specialists[1].name=") for i in range(6)],
    *[(f"modality-name-{i}", lambda S, i=i: M(S, S.parent / "o_name", cfg=f"modname_{i}"), 2,
       "it must be letters (Unicode letters too), digits, '_' and '-'") for i in range(6)],
    # 6. YAML alias bombs and other malformed configs
    ("yaml-alias-bomb", lambda S: M(S, S.parent / "o_bomb", cfg="bomb"), 2, "expands to more than"),
    ("yaml-not-a-mapping", lambda S: M(S, S.parent / "o_x", cfg="notmapping"), 2, "must be a mapping"),
    ("yaml-unknown-key", lambda S: M(S, S.parent / "o_x", cfg="unknownkey"), 2, "Unknown key(s) ['colour']"),
    ("yaml-not-utf8", lambda S: M(S, S.parent / "o_x", cfg="binary"), 2, "not UTF-8"),
    ("yaml-missing", lambda S: M(S, S.parent / "o_x", cfg="nope"), 2, "does not exist"),
    ("set-bad-yaml", lambda S: SET(S, "tau_elem=[1,"), 2, "not valid YAML"),
    ("set-not-pair", lambda S: SET(S, "tau_elem"), 2, "is not NAME=VALUE"),
    # 7. every setting has a type and a range
    ("n_projections-bool", lambda S: SET(S, "n_projections=true"), 2, "n_projections=True"),
    ("standardize-text", lambda S: SET(S, 'standardize="False"'), 2, "standardize='False'"),
    ("seed-fraction", lambda S: SET(S, "seed=1.5"), 2, "seed=1.5"),
    ("seed-text", lambda S: SET(S, "seed=abc"), 2, "seed='abc'"),
    ("seed-huge", lambda S: SET(S, f"seed={2**100}"), 2, "seed=12676506002282294"),
    ("probes-fraction", lambda S: SET(S, "probes_per_modality=32.7"), 2, "probes_per_modality=32.7"),
    ("token_layers-text", lambda S: SET(S, "token_layers=[x]"), 2, "token_layers"),
    ("swd_p-huge", lambda S: SET(S, "swd_p=1e308"), 2, "swd_p='1e308' in the method settings is out of range"),
    ("tau_layer-inf", lambda S: SET(S, "tau_layer=.inf"), 2, "tau_layer=inf"),
    ("n_projections-huge", lambda S: SET(S, "n_projections=1e12"), 2, "n_projections"),
    ("tau_elem-zero", lambda S: SET(S, "tau_elem=0"), 2, "out of range"),
    ("mode-unknown", lambda S: SET(S, "mode=both"), 2, "one of 'combined', 'layer', 'element'"),
    ("setting-unknown", lambda S: SET(S, "colour=red"), 2, "Unknown method setting"),
    ("preset-unknown", lambda S: ["coefficients", "--config", S / "cfg" / "run.yaml", "--out", S.parent / "o_x",
                                  "--preset", "mine"], 2, "Unknown preset"),
    ("max_tokens-negative", lambda S: M(S, S.parent / "o_x", cfg="mod_max_tokens_-3"), 2,
     "modalities[1].max_tokens=-3"),
    ("max_tokens-text", lambda S: M(S, S.parent / "o_x", cfg="mod_max_tokens_forty"), 2,
     "modalities[1].max_tokens='forty'"),
    ("kind-unknown", lambda S: M(S, S.parent / "o_x", cfg="mod_kind_dna"), 2, "one of 'smiles', 'protein'"),
    ("prefix-list", lambda S: M(S, S.parent / "o_x", cfg="mod_prefix_['x']"), 2, "modalities[1].prefix"),
    ("param-nan", lambda S: M(S, S.parent / "o_x", "--method", "ties", "--param", "density=.nan"), 2,
     "not a finite number"),
    ("param-bool", lambda S: M(S, S.parent / "o_x", "--method", "ties", "--param", "density=true"), 2,
     "not a number"),
    ("param-unknown", lambda S: M(S, S.parent / "o_x", "--method", "ties", "--param", "colour=1"), 2,
     "has no parameter(s) ['colour']"),
    # 8. adapter_config.json that disagrees with the weights
    ("adapter-config-rank", lambda S: M(S, S.parent / "o_x", cfg="r16"), 2, "says rank r=16"),
    ("adapter-config-targets", lambda S: M(S, S.parent / "o_x", cfg="targets"), 2,
     "which adapter_config.json does not target"),
    # 15. the adapter that differs from the majority is the one named
    ("blame-the-odd-one", lambda S: M(S, S.parent / "o_x", cfg="blame"), 2,
     "Adapter 'mol' targets different modules than the other specialists ('prot', 'cell'): it lacks mlp.down_proj"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_one_clear_line_and_nothing_changes(case, S, S_hashes):
    _, build, want_rc, fragment = case
    rc, text = _run(build(S))
    assert rc == want_rc, text
    assert fragment in text, text
    assert "Traceback" not in text
    assert len(text) < 2000, len(text)  # one line, values cut short (an alias bomb would be megabytes)
    err_lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1 and "Fix:" in err_lines[0], text
    assert tree_hashes(S) == S_hashes  # no input touched, nothing written into the world
    assert not [p for p in S.parent.iterdir() if p.name.startswith(("o_", "nowhere"))]  # no output made


# ------------------------------------------------------------------------------------ outputs that succeed
def test_overwrite_replaces_only_an_output_this_tool_wrote(S, S_hashes, tmp_path):
    out = tmp_path / "merged"
    assert _run(M(S, out, "--method", "average"))[0] == 0
    marker = json.loads((out / ".esm_output.json").read_text())
    assert "adapter_model.safetensors" in marker["files"] and marker["command"] == "merge"
    rc, text = _run(M(S, out, "--method", "average"))
    assert rc == 2 and "already exists" in text
    assert _run(M(S, out, "--method", "ties", "--overwrite"))[0] == 0
    assert json.loads((out / "manifest.json").read_text())["merge"]["method"] == "ties"
    (out / "my_notes.txt").write_text("mine")  # the user keeps something in the output folder
    rc, text = _run(M(S, out, "--method", "average", "--overwrite"))
    assert rc == 2 and "holds files this tool did not write (my_notes.txt)" in text
    assert (out / "my_notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temp or lock left beside it
    assert tree_hashes(S) == S_hashes


def test_evaluate_and_compare_outputs_are_atomic_and_need_overwrite(S, tmp_path):
    from esm_core.io import reserve_output

    f = tmp_path / "scores.json"
    with reserve_output(f, kind="file", command="test") as r:
        r.write_file('{"a": 1}')
    assert json.loads(f.read_text()) == {"a": 1}
    with pytest.raises(ESMError, match="already exists"):
        reserve_output(f, kind="file")
    with reserve_output(f, kind="file", overwrite=True) as r:
        r.write_file('{"a": 2}')
    assert json.loads(f.read_text()) == {"a": 2} and sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"]


# ------------------------------------------------------------------------------------ two writers
def test_a_second_writer_fails_at_once_while_the_first_holds_the_output(S, tmp_path):
    from esm_core.io import reserve_output

    out = tmp_path / "shared_out"
    with reserve_output(out, kind="dir", command="first run"):
        rc, text = _run(M(S, out, "--method", "average"))
        assert rc == 2 and "Another esm_core run is writing" in text and f"pid {os.getpid()}" in text
    assert not out.exists()
    assert _run(M(S, out, "--method", "average"))[0] == 0  # the lock is gone with the first run


def _spawn(argv, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_two_merges_racing_to_one_output_one_wins_the_other_says_so(S, tmp_path):
    out = tmp_path / "race"
    argv = ["-m", "esm_core", *[str(a) for a in M(S, out, "--method", "average")]]
    procs = [_spawn(argv) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read() + p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(t for rc, t in results if rc == 2)
    assert "Another esm_core run is writing" in loser or "already exists" in loser, loser
    assert "Traceback" not in loser
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race"]


# ------------------------------------------------------------------------------------ a kill during the write
SLOW_WRITE = """
import sys, time
import esm_core.merging.output as m
orig = m.save_adapter_files
def slow(directory, *a, **k):
    orig(directory, *a, **k)
    print("WRITING", directory, flush=True)
    time.sleep(600)  # the disk stalls; the test kills us here
m.save_adapter_files = slow
from esm_core.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_while_writing_leaves_nothing_partial_and_the_next_run_cleans_up(S, S_hashes, tmp_path):
    out = tmp_path / "killed"
    p = _spawn(["-c", SLOW_WRITE, *[str(a) for a in M(S, out, "--method", "average")]])
    line = ""
    deadline = time.monotonic() + 300
    while "WRITING" not in line and time.monotonic() < deadline:  # the app's own signal, not a sleep
        line = p.stdout.readline()
        if not line and p.poll() is not None:
            break
    assert "WRITING" in line, p.stderr.read()
    tmp = Path(line.split()[1])
    assert (tmp / "adapter_model.safetensors").is_file()  # killed with a half-written output in hand
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert not out.exists()  # the final path holds nothing partial
    assert tmp.exists() and tmp.name.startswith(".killed.esm-tmp-")
    rc, text = _run(M(S, out, "--method", "average"))
    assert rc == 0, text
    assert "removed .killed.esm-tmp-" in text and "temporary output of an interrupted run" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed"]
    assert (out / "adapter_model.safetensors").is_file()
    assert tree_hashes(S) == S_hashes


def test_an_interrupted_replace_gets_the_previous_output_back(tmp_path):
    from esm_core.io import reserve_output

    out = tmp_path / "o"
    with reserve_output(out) as r:
        r.write_dir(lambda d: (d / "a.txt").write_text("first"))
    aside = tmp_path / ".o.esm-old-1234abcd"
    os.rename(out, aside)  # what a kill between the two renames of a replace leaves
    notes = []
    with reserve_output(out, overwrite=True, log=notes.append) as r:
        assert (out / "a.txt").read_text() == "first" and not aside.exists()
        r.write_dir(lambda d: (d / "a.txt").write_text("second"))
    assert "restored the previous output" in notes[0]
    assert (out / "a.txt").read_text() == "second"
