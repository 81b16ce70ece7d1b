"""Command line: ``python -m esm_core <command>``.

    python -m esm_core coefficients --config run.yaml --out runs/coef [--seed 7] [--overwrite]
    python -m esm_core merge --config run.yaml --out runs/merged [--method es] [--param mode=layer]
    python -m esm_core methods          # the merge-method registry
    python -m esm_core settings         # every method setting with its help and preset values

User mistakes end with exit status 2 and one line ``error: <reason>``; nothing half-written is left.
Other commands (zoo, evaluate, compare) are registered by their modules through ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from typing import Callable

from .errors import Cancelled, ESMError

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def command(name: str, help: str):
    def deco(pair):
        COMMANDS[name] = (pair[0], pair[1], help)
        return pair
    return deco


def tqdm_progress(desc: str = "ES-Merging"):
    """A progress callback (message, fraction) drawing one tqdm bar on stderr."""
    from tqdm import tqdm

    bar = tqdm(total=1000, desc=desc, unit="‰", leave=False, file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")

    def cb(msg: str, frac: float):
        bar.set_postfix_str(msg[:40])
        bar.n = int(1000 * min(max(frac, 0.0), 1.0))
        bar.refresh()
        if frac >= 1.0:
            bar.close()
    return cb


def _method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML run config (base, specialists, modalities, method).")
    p.add_argument("--out", required=True, help="Output directory (refused if it exists, unless --overwrite).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output directory.")
    p.add_argument("--seed", type=int, default=None, help="Override the config's seed.")
    p.add_argument("--preset", default=None, help="Override the config's preset (reference or paper).")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="Override any method setting, e.g. --set tau_elem=0.3 (repeatable).")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")


def _parse_value(s: str, where: str = "a NAME=VALUE argument"):
    """A command-line value read as YAML (numbers, booleans, lists), with the config's safety limits."""
    from .config import parse_yaml_text

    return parse_yaml_text(s, where)


def _load_spec(args):
    from .config import load_run_spec

    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise ESMError(f"--set {item!r} is not NAME=VALUE.", fix="write e.g. --set tau_elem=0.3.")
        k, v = item.split("=", 1)
        overrides[k.strip()] = _parse_value(v, f"--set {k.strip()}")
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.preset is not None:
        overrides["preset"] = args.preset
    return load_run_spec(args.config, **overrides)


def spec_inputs(spec) -> list:
    """Every path a run reads (base, adapters, encoders, probe data, the config): never an output."""
    from .io import Input

    return [Input(p, role) for p, role in spec.input_paths()]


def _estimate(spec, args):
    from .pipeline import Workspace, estimate

    prog = None if args.no_progress else tqdm_progress()
    ws = Workspace.from_spec(spec, progress=prog)
    return ws, estimate(ws, progress=prog)


# ------------------------------------------------------------------------------------ coefficients
def _coef_add(p):
    _method_args(p)
    p.add_argument("--with-states", action="store_true", help="Also save the pooled hidden states (for the app).")


def _coef_run(args) -> int:
    from .io import reserve_output
    from .merge import build_manifest
    from .pipeline import save_result

    spec = _load_spec(args)
    with reserve_output(args.out, kind="dir", overwrite=args.overwrite, inputs=spec_inputs(spec),
                        command="coefficients") as target:
        ws, res = _estimate(spec, args)

        def write(tmp):
            save_result(res, tmp / "coefficients.safetensors", include_states=args.with_states)
            man = build_manifest(ws.sset, spec=spec, es_result=res)
            (tmp / "manifest.json").write_text(json.dumps(man, indent=2, sort_keys=True, default=str))

        out = target.write_dir(write)
    _print_summary(res, out)
    return 0


def _print_summary(res, out) -> None:
    import torch

    print(f"preset={res.config.preset} mode={res.config.mode} probes={res.probe_summary.get('n_probes')} "
          f"time={res.timings.get('estimate_total_s', 0):.1f}s -> {out}")
    a = res.layer.alpha
    print("alpha per layer (rows = specialists):")
    for k, n in enumerate(res.specialists):
        print(f"  {n:>12}: " + " ".join(f"{v:.3f}" for v in a[k].tolist()))
    mean_lam = torch.stack([v.reshape(v.shape[0], -1).mean(1) for v in res.lam.values()]).mean(0)
    print("mean lambda: " + ", ".join(f"{n}={v:.3f}" for n, v in zip(res.specialists, mean_lam.tolist())))


# ------------------------------------------------------------------------------------ merge
def _merge_add(p):
    _method_args(p)
    p.add_argument("--method", default="es", help="Merge method from the registry (see `methods`).")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="Merge-method parameter (repeatable).")


def _merge_run(args) -> int:
    from .io import reserve_output
    from .merge import MergeContext, get_method, write_merged
    from .pipeline import Workspace

    spec = _load_spec(args)
    method = get_method(args.method)
    params = {}
    for item in args.param:
        if "=" not in item:
            raise ESMError(f"--param {item!r} is not NAME=VALUE.", fix="write e.g. --param density=0.3.")
        k, v = item.split("=", 1)
        params[k.strip()] = _parse_value(v, f"--param {k.strip()}")
    method.resolve_params(params)  # fail before any heavy work
    with reserve_output(args.out, kind="dir", overwrite=args.overwrite, inputs=spec_inputs(spec),
                        command="merge") as target:
        t0 = time.perf_counter()
        res = None
        if "es" in method.needs:
            ws, res = _estimate(spec, args)
        else:
            ws = Workspace.from_spec(spec)
        ctx = MergeContext.from_specialists(ws.sset, workspace=ws, es_result=res, seed=spec.method.seed,
                                            progress=None if args.no_progress else tqdm_progress(method.pretty))
        out = method.run(ctx, params)
        out.info["merge_s"] = time.perf_counter() - t0
        path = write_merged(target, out, ws.sset, spec=spec, es_result=res, ctx=ctx)
    if res is not None:
        _print_summary(res, path)
    print(f"merged adapter ({method.pretty}) written to {path}")
    return 0


# ------------------------------------------------------------------------------------ info
def _methods_add(p):
    p.add_argument("--json", action="store_true")


def _methods_run(args) -> int:
    from .merge import list_methods

    ms = list_methods()
    if args.json:
        print(json.dumps([dict(name=m.name, pretty=m.pretty, paper=m.paper, url=m.url,
                               params=[p.__dict__ for p in m.params]) for m in ms], indent=2, default=str))
        return 0
    for m in ms:
        ps = ", ".join(f"{p.name}={p.default!r}" for p in m.params) or "-"
        print(f"{m.name:<16} {m.pretty:<26} params: {ps}\n{'':<16} {m.paper}")
    return 0


def _settings_run(args) -> int:
    from .config import PRESETS, MethodConfig

    for f in fields(MethodConfig):
        if f.metadata.get("internal"):
            continue
        pv = "  ".join(f"{p}={PRESETS[p][f.name]!r}" for p in PRESETS if f.name in PRESETS[p])
        print(f"{f.name:<22} default={f.default!r}  {pv}\n{'':<22} {f.metadata['help']}")
    return 0


COMMANDS["coefficients"] = (_coef_add, _coef_run, "Estimate ES coefficients; write coefficients.safetensors + manifest.")
COMMANDS["merge"] = (_merge_add, _merge_run, "Merge the specialists with a registered method; write a PEFT adapter.")
COMMANDS["methods"] = (_methods_add, _methods_run, "List the merge methods.")
COMMANDS["settings"] = (lambda p: None, _settings_run, "List every method setting with help and preset values.")


def _register_optional() -> None:
    """Commands that live in other modules (zoo, evaluation) add themselves here if present."""
    import importlib

    for mod in ("esm_core.zoo.cli", "esm_core.evaluate"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def main(argv: list[str] | None = None) -> int:
    _register_optional()
    parser = argparse.ArgumentParser(prog="python -m esm_core", description="ES-Merging of LoRA specialists.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, (add, _, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        add(sp)
    args = parser.parse_args(argv)
    try:
        return int(COMMANDS[args.cmd][1](args) or 0)
    except ESMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Cancelled:
        print("error: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
