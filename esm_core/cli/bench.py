"""``python -m esm_core evaluate | compare``: the few-shot benchmark from the command line.

    python -m esm_core evaluate --config assets/zoo/run.yaml --model base --task human --n 200
    python -m esm_core compare --config assets/zoo/run.yaml --tasks table1,table2 --out runs/table

docs/METHOD.md section 7: test rows become few-shot prompts, answered by generation and by label
likelihood; accuracy and macro-F1 with bootstrap intervals; the paper's Table 1/2 layout.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from esm_core.answering.batched import BatchedAnswerer
from esm_core.benchmark.comparison import CompareSettings, run_comparison
from esm_core.benchmark.harness import MODES, evaluate_model, task_prompts
from esm_core.benchmark.reports import Report, facts_line, task_facts
from esm_core.benchmark.taskfile import FAMILIES, FAMILY_HELP, task_from_file
from esm_core.benchmark.tasks import expand_names, load_tasks
from esm_core.cli.common import parse_value, spec_inputs
from esm_core.errors import ESMError
from esm_core.io import Input, reserve_output
from esm_core.merging.registry import get_method, list_methods
from esm_core.paths import default_config, default_data_dir
from esm_core.pipeline import Workspace, estimate
from esm_core.progress import tqdm_progress
from esm_core.runspec import load_run_spec


def resolve_model(ws, model: str) -> tuple[str, str | None]:
    """'base', a specialist name, or an adapter directory -> (display name, adapter name)."""
    if model == "base":
        return "base", None
    if model in ws.sset.names:
        return model, model
    if Path(model).is_dir():
        return Path(model).name, ws.sset.attach_dir(model, f"dir:{Path(model).name}")
    raise ESMError(f"Model {model!r} is not 'base', a specialist ({ws.sset.names}) or an adapter directory.")


# ------------------------------------------------------------------------------------ CLI: evaluate
def _common_args(p) -> None:
    p.add_argument("--config", default=None, help="YAML run config (default: assets/zoo/run.yaml when present).")
    p.add_argument("--task", "--tasks", dest="tasks", action="append", default=[],
                   help="Task name or suite (table1, table2, all); repeatable or comma-separated. Default: all.")
    p.add_argument("--data-dir", default=None, help="Folder holding public/ and registry/ (default ../shared/data).")
    p.add_argument("--task-file", action="append", default=[], metavar="PATH",
                   help="A data file of your own, evaluated as a task of --family (repeatable); with --task-file and "
                        "no --task, only the file tasks run. " + FAMILY_HELP)
    p.add_argument("--family", default=None, choices=sorted(FAMILIES), help="Task family of every --task-file.")
    p.add_argument("--enzyme", default=None, help="CYP enzyme of a cyp / cyp_substrate --task-file, e.g. CYP2D6.")
    p.add_argument("--n", type=int, default=500, help="Test rows per task (seeded sample; all if fewer).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the row sample and the bootstrap.")
    p.add_argument("--split-seed", type=int, default=0, help="Seed of the train/test split of unsplit datasets.")
    p.add_argument("--k", type=int, default=5, help="In-context examples per prompt.")
    p.add_argument("--modes", default="generation,likelihood", help="Answer modes: generation, likelihood or both.")
    p.add_argument("--n-boot", type=int, default=1000, help="Bootstrap resamples for the 95 %% intervals.")
    p.add_argument("--batch-size", type=int, default=16, help="Prompts per forward pass.")
    p.add_argument("--protein-residues", type=int, default=None,
                   help="Show only the first N residues of each protein in prompts (the demo zoo's proteins were "
                        "80-residue windows); selection still compares whole sequences. Default: whole sequences, "
                        "windowed only as far as needed for the k examples to fit the model's context.")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    p.add_argument("--min-test-rows", type=int, default=0,
                   help="Skip (with a message) tasks whose test split has fewer rows than this.")
    p.add_argument("--no-progress", action="store_true", help="No progress bars.")


def _setup(args, *, probes: bool = False):
    cfg = _config_path(args)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ESMError(f"--modes {args.modes!r} is not a list of {list(MODES)}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    files = list(getattr(args, "task_file", []) or [])
    if files and not args.family:
        raise ESMError("--task-file needs --family: which kind of task the file holds.",
                       fix="add --family " + " | ".join(sorted(FAMILIES)) + ".")
    file_tasks = [task_from_file(f, args.family, seed=args.split_seed, enzyme=args.enzyme, data_dir=args.data_dir)
                  for f in files]  # refused before anything loads
    names = expand_names(args.tasks or ([] if files else ["all"]))
    tasks, skipped = load_tasks(names, args.data_dir, seed=args.split_seed,
                                log=lambda m: print(f"skipped: {m}", flush=True))
    taken = {t.name for t in tasks}
    for t in file_tasks:
        while t.name in taken:
            t.name += "_file"
        taken.add(t.name)
        print(f"task file {t.files[0]}: {t.name} ({args.family}), {len(t.train)} pool / {len(t.test)} test rows; "
              f"{t.note}; {t.load_note()}", flush=True)
        tasks.append(t)
    for t in list(tasks):
        t.protein_residues = args.protein_residues
        if len(t.test) < args.min_test_rows:
            msg = f"Task {t.name!r} skipped: {len(t.test)} test rows, fewer than --min-test-rows {args.min_test_rows}."
            print(f"skipped: {msg}", flush=True)
            skipped.append(msg)
            tasks.remove(t)
    if not tasks:  # before the models load
        raise ESMError("No task could be evaluated: every task was skipped (" + "; ".join(skipped)[:400] + ").",
                       fix="check --task and --data-dir (the data directory must hold the task files).")
    ws = Workspace.from_spec(load_run_spec(cfg), with_samples=probes)
    answerer = BatchedAnswerer(ws.sset, ws.encoders, batch_size=args.batch_size)
    return cfg, modes, tasks, skipped, ws, answerer


def _settings(args) -> dict:
    return {k: v for k, v in sorted(vars(args).items()) if isinstance(v, (str, int, float, bool, list, type(None)))}


def _prog(args, desc):
    return None if args.no_progress else tqdm_progress(desc)


def _evaluate_add(p) -> None:
    _common_args(p)
    p.add_argument("--model", default="base", help="'base', a specialist name, or a PEFT adapter directory.")
    p.add_argument("--out", default=None, help="JSON file for scores, task facts and per-row predictions "
                   "(refused if it exists, unless --overwrite; never an input).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing --out file.")


def _config_path(args) -> Path:
    cfg = args.config or default_config()
    if cfg is None:
        raise ESMError("No run config given and assets/zoo/run.yaml does not exist.", fix="pass --config run.yaml.")
    return Path(cfg)


def _inputs(args) -> list:
    """Every path evaluate/compare read: the run's inputs, the task data directory, an adapter --model."""

    out = spec_inputs(load_run_spec(_config_path(args)))
    data = Path(args.data_dir) if args.data_dir else default_data_dir()
    if data is not None:
        out.append(Input(str(data), "task data directory"))
    for f in getattr(args, "task_file", []) or []:
        out.append(Input(f, "task file given as --task-file"))
    model = getattr(args, "model", None)
    if model and model != "base" and Path(model).exists():
        out.append(Input(model, "adapter directory given as --model"))
    return out


def _evaluate_run(args) -> int:
    import contextlib


    with contextlib.ExitStack() as stack:
        target = None
        if args.out:
            target = stack.enter_context(reserve_output(args.out, kind="file", overwrite=args.overwrite,
                                                        inputs=_inputs(args), command="evaluate"))
        return _evaluate(args, target)


def _evaluate(args, target) -> int:
    cfg, modes, tasks, skipped, ws, answerer = _setup(args)
    name, adapter = resolve_model(ws, args.model)
    rep = Report(skipped=skipped, meta=dict(command="evaluate", settings=_settings(args), config=str(cfg),
                                            model=args.model, n=args.n,
                                            seed=args.seed, split_seed=args.split_seed, k=args.k, modes=modes))
    for task in tasks:
        tp = task_prompts(task, answerer, n=args.n, seed=args.seed, k=args.k)
        rep.tasks.append(task_facts(tp))
        res = evaluate_model(answerer, tp, adapter, model_name=name, modes=modes, n_boot=args.n_boot,
                             seed=args.seed, progress=_prog(args, f"{name} / {task.name}"))
        rep.add_result(res, "model", task, keep_predictions=True)
        rep.add_references(tp, n_boot=args.n_boot, seed=args.seed)
        print(f"{task.name}: {len(tp.prompts)} prompts in {res.seconds:.1f}s", flush=True)
        print(facts_line(rep.tasks[-1]), flush=True)
    print(rep.markdown(modes))
    if target is not None:
        target.write_file(json.dumps(rep.to_json(), indent=1, default=str))
        print(f"written {target.path}")
    return 0


# ------------------------------------------------------------------------------------ CLI: compare
def _compare_add(p) -> None:
    _common_args(p)
    p.add_argument("--methods", default="all", help="Merge methods from the registry, comma-separated (default all).")
    p.add_argument("--no-base", action="store_true", help="Leave out the base model row.")
    p.add_argument("--no-specialists", action="store_true", help="Leave out the specialists' rows.")
    p.add_argument("--param", action="append", default=[], metavar="METHOD.NAME=VALUE",
                   help="A merge-method parameter, e.g. ties.density=0.3 (repeatable).")
    p.add_argument("--train-prompts", type=int, default=64,
                   help="Training-row prompts given to methods that learn from data (AdaMerging, fine-tuning).")
    p.add_argument("--spaces", default="",
                   help="Merge spaces to compare, comma-separated: factors (Eq. 1), delta (the updates, re-factorised); "
                        "each method gets one row per space, labelled [factors] / [delta]. Default: the run's "
                        "merge_space, unlabelled.")
    p.add_argument("--data-scope", choices=("task", "suite"), default="task",
                   help="Methods that learn from data: one merge per task on its training prompts (task), or one "
                        "merge on the training prompts of every task together (suite, AdaMerging's multi-task setting).")
    p.add_argument("--out", required=True, help="Output folder: table.md, table.csv, results.json (refused if it "
                   "exists, unless --overwrite replaces a folder this tool wrote; never an input).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing --out folder written by esm_core.")


def _method_params(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for it in items:
        if "=" not in it or "." not in it.split("=", 1)[0]:
            raise ESMError(f"--param {it!r} is not METHOD.NAME=VALUE.", fix="write e.g. --param ties.density=0.3.")
        k, v = it.split("=", 1)
        m, n = k.split(".", 1)
        out.setdefault(m.strip(), {})[n.strip()] = parse_value(v, f"--param {k.strip()}")
    return out


def _spaces(text: str) -> list[str | None]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in ("factors", "delta")]
    if bad or len(set(items)) != len(items):
        raise ESMError(f"--spaces {text!r}: {'unknown ' + repr(bad) if bad else 'a space is repeated'}.",
                       fix="write --spaces factors, --spaces delta or --spaces factors,delta.")
    return items or [None]


def _compare_run(args) -> int:
    # argument mistakes first (before the output is reserved and before any heavy work)
    params = _method_params(args.param)
    methods = ([m.name for m in list_methods()] if args.methods.strip().lower() == "all"
               else [m.strip() for m in args.methods.split(",") if m.strip()])
    resolved = {m: get_method(m) for m in methods}
    for m, meth in resolved.items():
        meth.resolve_params(params.get(m))
    for m in sorted(set(params) - set(resolved)):
        get_method(m)  # a typo is an error; a known method that is not compared is only noted
        print(f"note: --param for {m!r} ignored: it is not among the compared methods.", flush=True)
    args.space_list = _spaces(args.spaces)
    with reserve_output(args.out, kind="dir", overwrite=args.overwrite, inputs=_inputs(args),
                        command="compare") as target:
        return _compare(args, target, params, methods, resolved)


def _compare(args, target, params: dict, methods: list[str], resolved: dict) -> int:
    needs_es = any("es" in m.needs for m in resolved.values())
    cfg, modes, tasks, skipped, ws, answerer = _setup(args, probes=needs_es)
    t_all = time.perf_counter()
    rep = Report(skipped=skipped, meta=dict(command="compare", settings=_settings(args), config=str(cfg),
                                            methods=methods, n=args.n,
                                            seed=args.seed, split_seed=args.split_seed, k=args.k, modes=modes,
                                            params=params, train_prompts=args.train_prompts,
                                            data_scope=args.data_scope, merges={}))
    if needs_es:
        t0 = time.perf_counter()
        es_result = estimate(ws, progress=_prog(args, "ES coefficients"))
        rep.meta["es_estimate_s"] = time.perf_counter() - t0
    else:
        es_result = None
    spaces = tuple(getattr(args, "space_list", None) or [None])
    rep.meta["spaces"] = [s or ws.spec.method.merge_space for s in spaces]
    settings = CompareSettings(n=args.n, seed=args.seed, k=args.k, modes=tuple(modes), n_boot=args.n_boot,
                               spaces=spaces, params=params, train_prompts=args.train_prompts,
                               data_scope=args.data_scope, base=not args.no_base, specialists=not args.no_specialists)
    run_comparison(ws, answerer, tasks, resolved, settings, es_result=es_result, report=rep,
                   progress_for=lambda desc: _prog(args, desc), log=lambda msg: print(msg, flush=True),
                   on_task=lambda facts: print(facts_line(facts), flush=True))
    rep.meta["total_s"] = time.perf_counter() - t_all  # the estimation included
    md = rep.markdown(modes)

    def write(tmp: Path) -> None:
        (tmp / "table.md").write_text(md + "\n")
        rep.write_csv(tmp / "table.csv")
        (tmp / "results.json").write_text(json.dumps(rep.to_json(), indent=1, default=str))

    out_dir = target.write_dir(write)
    print(md)
    print(f"written {out_dir}/table.md, table.csv, results.json")
    return 0


COMMANDS = [
    ("evaluate", _evaluate_add, _evaluate_run,
     "Few-shot evaluation of one model (base, specialist or adapter dir) on tasks; table + JSON."),
    ("compare", _compare_add, _compare_run,
     "Merge methods x task suite -> the paper's Table 1/2 layout (Markdown, CSV, JSON)."),
]
