"""Helpers shared by the subcommands: run-config arguments, NAME=VALUE values, inputs, a summary."""

from __future__ import annotations

import argparse

from esm_core.errors import ESMError
from esm_core.io import Input
from esm_core.pipeline import Workspace, cost_of, estimate
from esm_core.progress import tqdm_progress
from esm_core.runspec import load_run_spec
from esm_core.schema import parse_yaml_text


def method_args(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument("--config", required=True, help="YAML run config (base, specialists, modalities, method).")
    p.add_argument("--out", required=out_required, help="Output directory (refused if it exists, unless --overwrite).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output directory.")
    p.add_argument("--seed", type=int, default=None, help="Override the config's seed.")
    p.add_argument("--preset", default=None, help="Override the config's preset (reference or paper).")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="Override any method setting, e.g. --set tau_elem=0.3 (repeatable).")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")


def parse_value(s: str, where: str = "a NAME=VALUE argument"):
    """A command-line value read as YAML (numbers, booleans, lists), with the config's safety limits."""

    return parse_yaml_text(s, where)


def name_values(items: list[str], flag: str, example: str) -> dict:
    """NAME=VALUE arguments (repeatable flags) -> {name: value}, each value read as YAML."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ESMError(f"{flag} {item!r} is not NAME=VALUE.", fix=f"write e.g. {flag} {example}.")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_value(v, f"{flag} {k.strip()}")
    return out


def load_spec(args):
    overrides = name_values(args.set, "--set", "tau_elem=0.3")
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.preset is not None:
        overrides["preset"] = args.preset
    return load_run_spec(args.config, **overrides)


def spec_inputs(spec) -> list:
    """Every path a run reads (base, adapters, encoders, probe data, the config): never an output."""

    return [Input(p, role) for p, role in spec.input_paths()]


def estimate_with_progress(spec, args):
    """Load the run, print what the estimation will cost (esm_core/cost.py), then run it."""
    prog = None if args.no_progress else tqdm_progress()
    ws = Workspace.from_spec(spec, progress=prog)
    print(f"estimate: {cost_of(ws).summary()}", flush=True)
    return ws, estimate(ws, progress=prog)


def print_summary(res, out) -> None:
    import torch

    took = res.timings.get("estimate_total_s", 0)
    print(f"preset={res.config.preset} mode={res.config.mode} probes={res.probe_summary.get('n_probes')} "
          f"time={took:.1f}s -> {out}")
    ideal = res.cost.get("ideal_seconds")
    if ideal:
        print(f"measured {took:.1f} s against the {ideal:.1f} s lower bound of the estimate "
              f"({took / ideal:.1f}x the device's peak time)")
    a = res.layer.alpha
    print("alpha per layer (rows = specialists):")
    for k, n in enumerate(res.specialists):
        print(f"  {n:>12}: " + " ".join(f"{v:.3f}" for v in a[k].tolist()))
    mean_lam = torch.stack([v.reshape(v.shape[0], -1).mean(1) for v in res.lam.values()]).mean(0)
    print("mean lambda: " + ", ".join(f"{n}={v:.3f}" for n, v in zip(res.specialists, mean_lam.tolist())))
