"""The demo zoo: a tiny base LLM and three LoRA specialists trained here on real biological data.

A faithful miniature of the paper's setting (a base + molecule, protein and cell specialists with
all-module LoRA of one rank; the molecule specialist with its own soft-token encoder), committed
under ``assets/zoo/`` and loaded by the same loaders as any real model. Build, measure, compare:

    python -m esm_core zoo build --out /tmp/zoo      # reproduce the zoo (esm_core/zoo/build.py)
    python -m esm_core zoo skills                    # held-out skill accuracies, base vs specialists
    python -m esm_core zoo results                   # retention table of ES / average -> RESULTS.md

From Python (the app):

    from esm_core.zoo import ZOO_DIR, demo_spec, load_skill_sets, measure
    spec = demo_spec(preset="paper")                 # a RunSpec for the committed zoo
    sets = load_skill_sets()                         # held-out skill questions
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ZOO_DIR = REPO / "assets" / "zoo"
DEMO_DIR = REPO / "assets" / "demo"

__all__ = ["ZOO_DIR", "DEMO_DIR", "demo_spec", "load_zoo", "load_skill_sets", "measure"]


def demo_spec(zoo_dir: str | Path | None = None, **method_overrides):
    """The zoo's RunSpec (run.yaml) with method settings overridden, e.g. demo_spec(preset='paper')."""
    from ..config import load_run_spec
    from .build import check_zoo_dir

    d = check_zoo_dir(zoo_dir or ZOO_DIR)
    return load_run_spec(d / "run.yaml", **method_overrides)


def load_zoo(zoo_dir: str | Path | None = None, **method_overrides):
    """(RunSpec, SpecialistSet, encoders by modality) of a zoo, through the ordinary loaders."""
    from ..encoders import build_encoder
    from ..specialists import SpecialistSet

    spec = demo_spec(zoo_dir, **method_overrides)
    sset = SpecialistSet.load(spec.base, [(s.name, s.adapter) for s in spec.specialists],
                              modalities=[s.modality for s in spec.specialists], device=spec.method.device,
                              dtype=spec.method.dtype)
    encoders = {m.name: build_encoder(m.encoder, sset) for m in spec.modalities}
    return spec, sset, encoders


def load_skill_sets(demo_dir: str | Path | None = None, *, k: int = 1, per_label: int = 40, seed: int = 0,
                    skills: list[str] | None = None):
    """Held-out skill sets {name: SkillSet} built from the demo data (deterministic)."""
    from .data import load_demo
    from .skills import heldout_skill_sets

    return heldout_skill_sets(load_demo(demo_dir or DEMO_DIR), k=k, per_label=per_label, seed=seed, skills=skills)


def measure(sset, encoders, models, skill_sets=None, **kw):
    """Skill-retention scores (SkillReport) of models: None = base, or adapter names (specialists, merged)."""
    from .skills import measure_skills

    return measure_skills(sset, encoders, skill_sets if skill_sets is not None else load_skill_sets(), models, **kw)
