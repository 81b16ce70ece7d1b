"""``python -m esm_core zoo <build|skills|results|demo-data>``: build and measure the demo zoo.

    python -m esm_core zoo build --out /tmp/zoo [--tiny] [--seed 0] [--overwrite]
    python -m esm_core zoo skills [--zoo assets/zoo] [--merged runs/merged ...] [--per-label 40]
    python -m esm_core zoo results [--zoo assets/zoo] [--out assets/zoo/RESULTS.md]
    python -m esm_core zoo demo-data --out assets/demo [--overwrite]

One entry of the command table in esm_core/cli/__init__.py.
"""

from __future__ import annotations

import argparse
import json
import time

from esm_core.errors import ESMError
from esm_core.io import Input, reserve_output
from esm_core.paths import ZOO_DIR
from esm_core.progress import tqdm_progress
from esm_core.zoo.build import BuildConfig, build_zoo
from esm_core.zoo.data import registry_dir, write_demo
from esm_core.zoo.load import load_skill_sets, load_zoo
from esm_core.zoo.report import own_other_table
from esm_core.zoo.results import retention_table, run_results
from esm_core.zoo.scoring import measure_skills
from esm_core.zoo.skills import SKILL_BY_NAME


def _add(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="zoo_cmd", required=True)
    b = sub.add_parser("build", help="Build the demo zoo from the data (fixed seeds).")
    b.add_argument("--out", required=True, help="Output directory (refused if it exists, unless --overwrite).")
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--tiny", action="store_true", help="A miniature zoo through the same path (seconds).")
    b.add_argument("--seed", type=int, default=None, help="Seed of every random choice (default 0).")
    b.add_argument("--data-dir", default=None, help="Shared data directory (default ../shared/data or $ESM_DATA_DIR).")
    b.add_argument("--demo", default=None, help="Demo CSV directory (default assets/demo).")
    b.add_argument("--no-public", action="store_true", help="Do not read public/ proteins for training.")
    b.add_argument("--no-eval", action="store_true", help="Skip the held-out skill measurement (SKILLS.md).")
    b.add_argument("--reuse", default=None, metavar="ZOO", help="Take every stage not named in --stages from this "
                   "built zoo (read only; its stages must have been built with the same settings).")
    b.add_argument("--stages", default=None, help="With --reuse: comma-separated specialist stages to rebuild "
                   "(molecule, protein, cell; molecule needs all three).")
    b.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("skills", help="Held-out skill accuracies: base, specialists, merged adapters.")
    s.add_argument("--zoo", default=None, help="Zoo directory (default assets/zoo).")
    s.add_argument("--merged", action="append", default=[], metavar="DIR",
                   help="A merged adapter directory (from `python -m esm_core merge`) to score too (repeatable).")
    s.add_argument("--models", default=None, help="Comma-separated subset: base,molecule,protein,cell,<merged name>.")
    s.add_argument("--per-label", type=int, default=40, help="Questions per label and skill (at most).")
    s.add_argument("--k", type=int, default=1, help="In-context examples per question (the zoo was trained with 0-1).")
    s.add_argument("--skills", default=None, help="Comma-separated skill names (default: all).")
    s.add_argument("--how", default="likelihood,generation", help="likelihood and/or generation.")
    s.add_argument("--json", default=None, help="Also write the per-skill rows to this JSON file (refused if it "
                   "exists, unless --overwrite).")
    s.add_argument("--overwrite", action="store_true", help="Replace an existing --json file.")
    s.add_argument("--no-progress", action="store_true")

    r = sub.add_parser("results", help="Retention table of ES (both presets x 3 modes) and average -> RESULTS.md.")
    r.add_argument("--zoo", default=None, help="Zoo directory (default assets/zoo).")
    r.add_argument("--out", default=None, help="Markdown output (default: RESULTS.md in the zoo directory; "
                   "refused if it exists, unless --overwrite).")
    r.add_argument("--overwrite", action="store_true", help="Replace an existing --out file.")
    r.add_argument("--per-label", type=int, default=40)
    r.add_argument("--k", type=int, default=1, help="In-context examples per question.")
    r.add_argument("--no-progress", action="store_true")

    d = sub.add_parser("demo-data", help="Write the demo CSVs + SOURCES.md from the registry data.")
    d.add_argument("--out", required=True, help="Output folder (refused if it exists, unless --overwrite "
                   "replaces a folder this tool wrote).")
    d.add_argument("--data-dir", default=None, help="Shared data directory (default ../shared/data or $ESM_DATA_DIR).")
    d.add_argument("--overwrite", action="store_true")


def _run(args) -> int:
    return {"build": _build, "skills": _skills, "results": _results, "demo-data": _demo}[args.zoo_cmd](args)


def _build(args) -> int:
    cfg = BuildConfig.tiny() if args.tiny else BuildConfig()
    if args.seed is not None:
        cfg.seed = args.seed
    if args.no_public:
        cfg.use_public = False
    t0 = time.perf_counter()
    path = build_zoo(args.out, cfg, demo_dir=args.demo, data_dir=args.data_dir, overwrite=args.overwrite,
                     progress=not args.no_progress, evaluate=not args.no_eval, reuse=args.reuse,
                     stages=tuple(x.strip() for x in args.stages.split(",") if x.strip()) if args.stages else None)
    print(f"zoo built in {time.perf_counter() - t0:.0f} s -> {path}")
    skills = path / "SKILLS.md"
    if skills.is_file():
        print(skills.read_text())
    return 0


def _skills(args) -> int:
    import contextlib


    with contextlib.ExitStack() as stack:
        target = None
        if args.json:
            inputs = [Input(str(args.zoo or ZOO_DIR), "zoo directory")]
            inputs += [Input(d, "merged adapter directory") for d in args.merged]
            target = stack.enter_context(reserve_output(args.json, kind="file", overwrite=args.overwrite,
                                                        inputs=inputs, what="--json", command="zoo skills"))
        return _skills_run(args, target)


def _skills_run(args, target) -> int:
    how = tuple(h.strip() for h in args.how.split(",") if h.strip())
    names = [s.strip() for s in args.skills.split(",")] if args.skills else None
    if names:
        bad = [n for n in names if n not in SKILL_BY_NAME]
        if bad:
            raise ESMError(f"Unknown skill(s) {bad}.", fix=f"use names from {sorted(SKILL_BY_NAME)}.")
    spec, sset, encoders = load_zoo(args.zoo)
    for d in args.merged:
        sset.attach_dir(d)
    models = [None, *sset.names, *sset.extra_adapters]
    if args.models:
        want = [m.strip() for m in args.models.split(",") if m.strip()]
        known = ["base", *sset.names, *sset.extra_adapters]
        bad = [m for m in want if m not in known]
        if bad:
            raise ESMError(f"Unknown model(s) {bad}.", fix=f"choose from {known}.")
        models = [None if m == "base" else m for m in want]
    sets = load_skill_sets(k=args.k, per_label=args.per_label, skills=names)
    prog = None if args.no_progress else tqdm_progress("skills")
    rep = measure_skills(sset, encoders, sets, models, methods=how, progress=prog)
    for h in how:
        print(f"\n== accuracy by modality ({h}), % ==")
        print(rep.table(h))
        if "base" in rep.models() and all(m in rep.models() for m in sset.names):
            print(f"\n== specialists: own vs other modalities ({h}), % ==")
            print(own_other_table(rep, h))
        print(f"\n== every skill ({h}), % ==")
        print(rep.skill_table(h))
    if "generation" in how:
        print("\nunparsed generations: " + ", ".join(f"{m} {rep.unparsed(m)}" for m in rep.models()))
    print(f"\nscored {sum(r['n'] for r in rep.rows)} answers in {rep.seconds:.0f} s")
    if target is not None:
        target.write_file(json.dumps(rep.rows, indent=1))
    return 0


def _results(args) -> int:
    prog = None if args.no_progress else tqdm_progress("results")
    rep, info, out = run_results(args.zoo, args.out, k=args.k, per_label=args.per_label, progress=prog,
                                 overwrite=args.overwrite)
    merged = [m for m in rep.models() if m.startswith("es-") or m == "average"]
    print(retention_table(rep, merged, "likelihood", fmt="text"))
    print(f"\nwritten to {out}")
    return 0


def _demo(args) -> int:
    inputs = [Input(str(registry_dir(args.data_dir)), "registry data directory")]
    counts = {}
    with reserve_output(args.out, kind="dir", overwrite=args.overwrite, inputs=inputs, command="zoo demo-data") as t:
        t.write_dir(lambda tmp: counts.update(write_demo(tmp, args.data_dir)))
    for f, n in counts.items():
        print(f"{f:32s} {n:6d} rows")
    return 0


COMMANDS = [("zoo", _add, _run, "The demo zoo: build it, measure skills, retention results, demo data.")]

