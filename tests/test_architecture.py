"""The house keeps its shape: imports flow one way, modules stay small, one rule decides recomputation.

- ``lint-imports`` (import-linter, contracts in .importlinter) passes: every esm_core module imports
  only the layers below it, and the engine never imports Streamlit or ui/;
- a backwards import, planted in a scratch copy of the package, breaks the contract (so the
  contract really checks something);
- no engine or app module is over 400 lines, except the ones named here with the reason;
- a setting declares once which stage it invalidates, and both the pipeline and the app's
  cache key read that declaration (a fake setting added in a test is treated as declared).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic.dataclasses import dataclass

from esm_core.config import MethodConfig, _f
from esm_core.schema import _STRICT, Int

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))

# A single coherent script reads better whole: the zoo builder (one build, stage after stage).
LONG_ALLOWED = {"esm_core/zoo/build.py"}


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(cwd), "PATH": str(Path(sys.executable).parent)})


def test_imports_flow_one_way():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.mark.parametrize("plant", [
    ("esm_core/errors.py", "import esm_core.cli\n"),               # the bottom importing the top
    ("esm_core/probes.py", "from esm_core.pipeline import estimate\n"),
    ("esm_core/coefficients.py", "import streamlit\n"),            # the engine importing the app's library
])
def test_a_backwards_import_breaks_the_contract(tmp_path, plant):
    for name in ("esm_core", "ui"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    path, line = plant
    f = tmp_path / path
    f.write_text(f.read_text() + line)
    r = _lint(tmp_path)
    assert r.returncode != 0 and "BROKEN" in r.stdout, r.stdout


def test_no_god_files():
    long = {str(p.relative_to(ROOT)): n for d in ("esm_core", "ui", "pages") for p in (ROOT / d).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert set(long) <= LONG_ALLOWED, long


@dataclass(config=_STRICT)
class WithFakes(MethodConfig):
    """A config class with two more settings, each declaring its stage the way every setting does."""

    fake_pass: Int(0, 9) = _f(0, "A setting that needs a new pass (test only).", "pass")
    fake_derive: Int(0, 9) = _f(0, "A setting re-derived from stored signals (test only).", "derive")


def test_a_new_setting_is_handled_by_its_declared_stage(workspace):
    from esm_core.config import pass_key
    from esm_core.errors import ESMError
    from esm_core.pipeline import estimate, recompute, required_stage

    cfg = WithFakes.from_preset("reference", probes_per_modality=12, batch_size=4, n_projections=32)
    res = estimate(workspace, cfg)
    needs_pass, cheap = cfg.replace(fake_pass=3), cfg.replace(fake_derive=3)
    assert required_stage(res, needs_pass) == "pass" and required_stage(res, cheap) == "derive"
    with pytest.raises(ESMError, match="fake_pass"):
        recompute(res, needs_pass)  # without the models it cannot make the pass it needs
    assert recompute(res, cheap).config.fake_derive == 3
    # the estimation cache key (the app's store, pass_key) follows the same declaration
    assert pass_key(needs_pass) != pass_key(cfg) and pass_key(cheap) == pass_key(cfg)


def test_every_method_reference_points_at_a_section_that_exists():
    import re

    heads = {int(m) for m in re.findall(r"^## (\d+)\.", (ROOT / "docs" / "METHOD.md").read_text(), re.M)}
    refs, stray = [], []
    for d in ("esm_core", "ui", "pages", "tests", "bench"):
        for p in (ROOT / d).rglob("*.py"):
            text = p.read_text()
            for a, b in re.findall(r"docs/METHOD\.md sections? (\d+)(?:-(\d+))?", text):
                refs += [(p.name, n) for n in range(int(a), int(b or a) + 1)]
            if p.name != Path(__file__).name:  # this file names the patterns it looks for
                stray += [p.name for _ in re.findall(r"(?<!docs/)\bMETHOD\.md|DESIGN\.md", text)]
    assert refs and not stray, stray
    assert {n for _, n in refs} <= heads, sorted({r for r in refs if r[1] not in heads})
