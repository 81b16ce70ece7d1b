"""Training prompts from the demo zoo's skills, for the learned merges (AdaMerging, fine-tuning).

Balanced questions whose query AND examples come from the demo data's TRAIN split, never the
held-out split the skills are scored on.
"""

from __future__ import annotations

from pathlib import Path

from esm_core.errors import ESMError
from esm_core.paths import DEMO_DIR
from esm_core.zoo.data import load_demo
from esm_core.zoo.skills import SKILL_BY_NAME, demo_pools, sample_question


def skill_training_prompts(skills: list[str], n_per_skill: int = 32, *, k: int = 2, seed: int = 0,
                           demo_dir: str | Path | None = None) -> list:
    """Training data for AdaMerging / fine-tuning from the demo zoo's skills: balanced questions
    (labels alternate) whose query AND examples come from the demo data's TRAIN split, never the
    held-out split the skill sets are scored on. ``meta["task"]`` = the skill, so learned methods batch
    per skill."""
    import random


    unknown = [s for s in skills if s not in SKILL_BY_NAME]
    if unknown or not skills:
        raise ESMError(f"Unknown or no skill(s) {unknown or skills}.", fix=f"use some of {sorted(SKILL_BY_NAME)}.")
    pools = demo_pools(load_demo(demo_dir or DEMO_DIR), "train")
    out = []
    for name in skills:
        skill = SKILL_BY_NAME[name]
        pos, neg = pools.labelled(skill)
        if not pos or not neg:
            raise ESMError(f"Skill {name!r} has no training sample of one of its labels.",
                           fix="choose another skill.")
        rng = random.Random(f"{seed}:train:{name}")
        for i in range(int(n_per_skill)):
            p = sample_question(skill, pools, rng, k, want=i % 2 == 0)
            p.meta["task"] = name
            out.append(p)
    return out
