"""The skill-retention table of the zoo: ES-Merging (both presets x three modes) and plain average.

    python -m esm_core zoo results                     # writes assets/zoo/RESULTS.md

One command: load the zoo, estimate ES coefficients with the ``reference`` and the ``paper``
preset (default settings otherwise), merge with each mode (combined, layer, element) and with the
plain average, load every merged adapter next to the specialists on the one base copy, and score
the base, the specialists and the merged models on every held-out skill set (label likelihood and
generation + parsing). Numbers are written as measured.

Retention of modality m by a merged model = (acc_merged(m) - acc_base(m)) / (acc_spec_m(m) -
acc_base(m)): the share of the specialist's gain over the base that survives the merge.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from esm_core.coefficients import combine
from esm_core.config import MethodConfig
from esm_core.io import Input, reserve_output
from esm_core.merging.base import MergeContext
from esm_core.merging.registry import get_method
from esm_core.paths import ZOO_DIR
from esm_core.pipeline import Workspace, estimate
from esm_core.zoo.composite import PAIRS, CompositeReport, composite_sets, score_composites
from esm_core.zoo.data import load_demo
from esm_core.zoo.generic import RULES
from esm_core.zoo.load import demo_spec, load_zoo
from esm_core.zoo.report import own_other_table
from esm_core.zoo.scoring import SkillReport, _render, measure_skills
from esm_core.zoo.skills import MODALITIES, heldout_skill_sets

PRESETS = ("reference", "paper")
MODES = ("combined", "layer", "element")


def merged_models(ws, *, presets=PRESETS, modes=MODES, progress=None) -> tuple[list[str], dict]:
    """Add ES (presets x modes), average and TIES merges to ws.sset as extra adapters; returns names and info."""

    sset = ws.sset
    template = sset.adapters[sset.names[0]]
    names, info = [], {"estimation": {}}
    for preset in presets:
        cfg = ws.spec.method.replace(preset=preset) if ws.spec.method.preset != preset else ws.spec.method
        cfg = MethodConfig.from_preset(preset, **{k: getattr(ws.spec.method, k) for k in ws.spec.method.overridden})
        t0 = time.perf_counter()
        res = estimate(ws, cfg)
        est_s = time.perf_counter() - t0
        info["estimation"][preset] = dict(
            seconds=est_s, probes=res.probe_summary.get("n_probes"),
            D_last=res.layer.D[:, :, -1].tolist(), alpha=res.layer.alpha.tolist(),
            mean_lambda={m: _mean_lambda(res, mode=m) for m in modes})
        for mode in modes:
            ctx = MergeContext.from_specialists(sset, workspace=ws, es_result=res, seed=cfg.seed, config=cfg)
            out = get_method("es").run(ctx, {"mode": mode})
            name = f"es-{preset}-{mode}"
            sset.add_adapter(name, out.tensors, out.adapter_config(template, sset.base_path, ctx.folded))
            names.append(name)
        if progress:
            progress(f"merged with preset {preset}", 0.5)
    for base_method in ("average", "ties"):
        ctx = MergeContext.from_specialists(sset, workspace=ws, seed=ws.spec.method.seed, config=ws.spec.method)
        out = get_method(base_method).run(ctx, {})
        sset.add_adapter(base_method, out.tensors, out.adapter_config(template, sset.base_path, ctx.folded))
        names.append(base_method)
    return names, info


def _mean_lambda(res, mode: str) -> list[float]:
    if mode == res.config.mode:
        lam = res.lam
    elif mode == "layer":
        shapes = {k: tuple(v.shape[1:]) for k, v in res.lam.items()}
        lam = combine(res.layer.alpha, None, "layer", keys=sorted(shapes), shapes=shapes)
    else:
        lam = combine(res.layer.alpha, res.element.beta, mode)
    return torch.stack([v.reshape(v.shape[0], -1).mean(1) for v in lam.values()]).mean(0).tolist()


def retention(rep: SkillReport, model: str, modality: str, how: str = "likelihood") -> float | None:
    spec = rep.accuracy(modality, modality, how)
    base = rep.accuracy("base", modality, how)
    gain = spec - base
    if abs(gain) < 1e-9:
        return None
    return (rep.accuracy(model, modality, how) - base) / gain


def retention_table(rep: SkillReport, merged: list[str], how: str = "likelihood", fmt: str = "markdown") -> str:
    hdr = ["model", *[f"{m} acc" for m in MODALITIES], "mean acc", *[f"{m} retained" for m in MODALITIES],
           "mean retained"]
    lines = []
    for model in rep.models():
        acc = [100 * rep.accuracy(model, m, how) for m in MODALITIES]
        row = [model, *[f"{a:.1f}" for a in acc], f"{sum(acc) / 3:.1f}"]
        if model in merged:
            rets = [retention(rep, model, m, how) for m in MODALITIES]
            row += [("-" if r is None else f"{100 * r:.0f} %") for r in rets]
            ok = [r for r in rets if r is not None]
            row.append(f"{100 * sum(ok) / len(ok):.0f} %" if ok else "-")
        else:
            row += ["", "", "", ""]
        lines.append(row)
    return _render(hdr, lines, fmt)


def composite_markdown(crep: CompositeReport, per_label: int) -> list[str]:
    n = sum(r["n"] for r in crep.rows if r["model"] == "base")
    return [
        "## Cross-modal questions (the zoo's Table 1)",
        "",
        f"{n} held-out questions that combine one fact of each of two modalities by a rule "
        f"({', '.join(RULES)}; esm_core/zoo/composite.py): {len(PAIRS)} skill pairs x {len(RULES)} rules x "
        f"{per_label} questions per label, no in-context examples, the query holding a molecule, a protein and a "
        "cell. The base learned the form of such questions on generic facts only; each specialist learned only "
        "its own modality's facts. *oracle* = the two right specialists each answer their own single-fact "
        "question on the same query, and the rule combines the two answers. Accuracy in % by label likelihood; "
        "labels are balanced, so chance is 50 (under `xor` each fact alone says nothing about the label).",
        "",
        crep.table("markdown"),
        "",
    ]


def results_markdown(rep: SkillReport, merged: list[str], info: dict, *, k: int, per_label: int,
                     crep: CompositeReport | None = None, composite_per_label: int = 10) -> str:
    est = info["estimation"]
    n_q = sum(r["n"] for r in rep.rows if r["model"] == "base")
    out = [
        "# Demo zoo: skill retention after merging",
        "",
        "Produced by `python -m esm_core zoo results` (esm_core/zoo/results.py) on the committed zoo;",
        "numbers as measured. Models: the base, the three specialists, ES-Merging with both presets",
        "(`reference`, `paper`) in each mode (`combined` = Eq. 4, `layer` = alpha only, `element` =",
        "beta only), the plain average and TIES of the LoRA factors. Every merged adapter is loaded next to the",
        "specialists on the one base copy; each modality keeps its own encoder (the molecule soft-token",
        "encoder).",
        "",
        f"Held-out skill sets: {n_q} questions over {len({r['skill'] for r in rep.rows})} skills, balanced Yes/No,",
        f"mixed-modality prompts (molecule + protein + cell in the query) with {k} in-context examples from",
        f"the train split, at most {per_label} questions per label and skill. Accuracy in % is the mean over",
        "a modality's skills. *Retained* = (merged - base) / (specialist - base) on that modality.",
        "",
        "## Retention (label likelihood)",
        "",
        retention_table(rep, merged, "likelihood"),
        "",
        "## Retention (generation + parsing; unparsed answers count as wrong)",
        "",
        retention_table(rep, merged, "generation"),
        "",
        "## Specialists vs base (label likelihood)",
        "",
        own_other_table(rep, "likelihood", "markdown"),
        "",
        *(composite_markdown(crep, composite_per_label) if crep is not None else []),
        "## ES estimation",
        "",
    ]
    for preset, e in est.items():
        D = e["D_last"]
        out += [f"Preset `{preset}`: {e['probes']} probes, estimation {e['seconds']:.1f} s "
                "(this run; see bench/bench_zoo_estimate.py for the timing benchmark).", "",
                "SWD at the last block (docs/METHOD.md section 8 (Fig. 2); rows = specialists, columns = probe modalities):", "",
                _render(["specialist", *MODALITIES], [[n, *[f"{v:.3f}" for v in row]] for n, row in zip(MODALITIES, D)],
                        "markdown"), "",
                "Layer coefficient alpha (rows = specialists, columns = blocks):", "",
                _render(["specialist", *[f"block {i}" for i in range(len(e["alpha"][0]))]],
                        [[n, *[f"{v:.3f}" for v in row]] for n, row in zip(MODALITIES, e["alpha"])], "markdown"), "",
                "Mean lambda per specialist: " + "; ".join(
                    f"{mode}: " + ", ".join(f"{n} {v:.3f}" for n, v in zip(MODALITIES, lam))
                    for mode, lam in e["mean_lambda"].items()), ""]
    out += ["## Every skill (label likelihood)", "", rep.skill_table("likelihood", "markdown"), "",
            "## Every skill (generation + parsing)", "", rep.skill_table("generation", "markdown"), "",
            "Unparsed generations: " + ", ".join(f"{m} {rep.unparsed(m)}" for m in rep.models()) + ".", "",
            f"Scoring took {rep.seconds:.0f} s.", ""]
    return "\n".join(out)


def run_results(zoo_dir: str | Path | None = None, out_path: str | Path | None = None, *, k: int = 1,
                per_label: int = 40, composite_per_label: int = 10, progress=None,
                overwrite: bool = False) -> tuple[SkillReport, dict, Path]:
    """Estimate, merge, score; write RESULTS.md (default: inside the zoo directory)."""

    zoo = Path(zoo_dir) if zoo_dir else ZOO_DIR
    out = Path(out_path) if out_path else zoo / "RESULTS.md"
    inputs = [Input(p, role) for p, role in demo_spec(zoo).input_paths()]
    with reserve_output(out, kind="file", overwrite=overwrite, inputs=inputs, command="zoo results") as target:
        rep, info, text = _results(zoo, k=k, per_label=per_label, composite_per_label=composite_per_label,
                                   progress=progress)
        return rep, info, target.write_file(text)


def _results(zoo: Path, *, k: int, per_label: int, composite_per_label: int = 10, progress=None):
    spec, sset, encoders = load_zoo(zoo)
    ws = Workspace.from_spec(spec, sset=sset)
    merged, info = merged_models(ws, progress=progress)
    demo = load_demo()  # read once: the skill questions and the composite questions both come from it
    sets = heldout_skill_sets(demo, k=k, per_label=per_label)
    models = [None, *sset.names, *merged]
    rep = measure_skills(sset, ws.encoders, sets, models, progress=progress)
    crep = None
    if composite_per_label:
        csets = composite_sets(demo, per_label=composite_per_label)
        crep = score_composites(sset, ws.encoders, csets, models, progress=progress)
        info["composite"] = {"rows": crep.rows, "seconds": crep.seconds}
    return rep, info, results_markdown(rep, merged, info, k=k, per_label=per_label, crep=crep,
                                       composite_per_label=composite_per_label)
