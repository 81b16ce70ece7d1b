"""The committed demo zoo through the ordinary loaders: its run, its models, its held-out skill questions.

    spec = demo_spec(preset="paper")                 # a RunSpec for the committed zoo
    spec, sset, encoders = load_zoo()                # base + specialists + encoders (models.load_models)
    sets = load_skill_sets()                         # held-out skill questions (deterministic)
    rep = measure(sset, encoders, [None, "molecule"])
"""

from __future__ import annotations

from pathlib import Path

from esm_core.errors import ESMError
from esm_core.models import load_models
from esm_core.paths import DEMO_DIR, ZOO_DIR
from esm_core.runspec import load_run_spec
from esm_core.zoo.data import load_demo
from esm_core.zoo.scoring import measure_skills
from esm_core.zoo.skills import heldout_skill_sets


def check_zoo_dir(zoo_dir: str | Path) -> Path:
    d = Path(zoo_dir)
    if not (d / "run.yaml").is_file():
        raise ESMError(f"{str(d)!r} is not a zoo directory (no run.yaml).",
                       fix="build one with `python -m esm_core zoo build --out DIR` or use assets/zoo.")
    return d


def demo_spec(zoo_dir: str | Path | None = None, **method_overrides):
    """The zoo's RunSpec (run.yaml) with method settings overridden, e.g. demo_spec(preset='paper')."""
    d = check_zoo_dir(zoo_dir or ZOO_DIR)
    return load_run_spec(d / "run.yaml", **method_overrides)


def load_zoo(zoo_dir: str | Path | None = None, **method_overrides):
    """(RunSpec, SpecialistSet, encoders by modality) of a zoo, through the ordinary loaders."""
    spec = demo_spec(zoo_dir, **method_overrides)
    return (spec, *load_models(spec))


def load_skill_sets(demo_dir: str | Path | None = None, *, k: int = 1, per_label: int = 40, seed: int = 0,
                    skills: list[str] | None = None):
    """Held-out skill sets {name: SkillSet} built from the demo data (deterministic)."""
    return heldout_skill_sets(load_demo(demo_dir or DEMO_DIR), k=k, per_label=per_label, seed=seed, skills=skills)


def measure(sset, encoders, models, skill_sets=None, **kw):
    """Skill-retention scores (SkillReport) of models: None = base, or adapter names (specialists, merged)."""
    return measure_skills(sset, encoders, skill_sets if skill_sets is not None else load_skill_sets(), models, **kw)
