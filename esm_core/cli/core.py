"""``python -m esm_core coefficients | merge | methods | settings``: estimate, merge, list.

    python -m esm_core coefficients --config run.yaml --out runs/coef [--seed 7] [--overwrite]
    python -m esm_core merge --config run.yaml --out runs/merged [--method es] [--param mode=layer]
    python -m esm_core methods          # the merge-method registry
    python -m esm_core settings         # every method setting with its help and preset values
"""

from __future__ import annotations

import json
import time
from dataclasses import fields

from esm_core.cli.common import estimate_with_progress, load_spec, method_args, name_values, print_summary, spec_inputs
from esm_core.config import PRESETS, MethodConfig
from esm_core.errors import ESMError
from esm_core.io import reserve_output
from esm_core.merging.base import MergeContext
from esm_core.merging.output import build_manifest, write_merged
from esm_core.merging.registry import get_method, list_methods
from esm_core.pipeline import Workspace, cost_of, save_result
from esm_core.progress import tqdm_progress


def _coef_add(p):
    method_args(p, out_required=False)
    p.add_argument("--with-states", action="store_true", help="Also save the pooled hidden states (for the app).")
    p.add_argument("--dry-run", action="store_true",
                   help="Load the run, print the cost estimate (FLOPs, memory, time on this device) and stop; "
                        "writes nothing.")


def _coef_run(args) -> int:
    spec = load_spec(args)
    if args.dry_run:
        ws = Workspace.from_spec(spec, progress=None if args.no_progress else tqdm_progress())
        print(f"estimate: {cost_of(ws).summary()}")
        return 0
    if args.out is None:
        raise ESMError("coefficients needs --out (where to write coefficients.safetensors and the manifest).",
                       fix="add --out DIR, or --dry-run to print the cost estimate only.")
    with reserve_output(args.out, kind="dir", overwrite=args.overwrite, inputs=spec_inputs(spec),
                        command="coefficients") as target:
        ws, res = estimate_with_progress(spec, args)

        def write(tmp):
            save_result(res, tmp / "coefficients.safetensors", include_states=args.with_states)
            man = build_manifest(ws.sset, spec=spec, es_result=res)
            (tmp / "manifest.json").write_text(json.dumps(man, indent=2, sort_keys=True, default=str))

        out = target.write_dir(write)
    print_summary(res, out)
    return 0


def _merge_add(p):
    method_args(p)
    p.add_argument("--method", default="es", help="Merge method from the registry (see `methods`).")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="Merge-method parameter (repeatable).")


def _merge_run(args) -> int:
    spec = load_spec(args)
    method = get_method(args.method)
    params = name_values(args.param, "--param", "density=0.3")
    method.resolve_params(params)  # fail before any heavy work
    with reserve_output(args.out, kind="dir", overwrite=args.overwrite, inputs=spec_inputs(spec),
                        command="merge") as target:
        t0 = time.perf_counter()
        res = None
        if "es" in method.needs:
            ws, res = estimate_with_progress(spec, args)
        else:
            ws = Workspace.from_spec(spec)
        ctx = MergeContext.from_specialists(ws.sset, workspace=ws, es_result=res, seed=spec.method.seed, config=spec.method,
                                            progress=None if args.no_progress else tqdm_progress(method.pretty))
        out = method.run(ctx, params)
        out.info["merge_s"] = time.perf_counter() - t0
        path = write_merged(target, out, ws.sset, spec=spec, es_result=res, ctx=ctx)
    if res is not None:
        print_summary(res, path)
    print(f"merged adapter ({method.pretty}) written to {path}")
    return 0


def _methods_add(p):
    p.add_argument("--json", action="store_true")


def _methods_run(args) -> int:
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
    for f in fields(MethodConfig):
        if f.metadata.get("internal"):
            continue
        pv = "  ".join(f"{p}={PRESETS[p][f.name]!r}" for p in PRESETS if f.name in PRESETS[p])
        print(f"{f.name:<22} default={f.default!r}  {pv}\n{'':<22} {f.metadata['help']}")
    return 0


COMMANDS = [
    ("coefficients", _coef_add, _coef_run, "Estimate ES coefficients; write coefficients.safetensors + manifest."),
    ("merge", _merge_add, _merge_run, "Merge the specialists with a registered method; write a PEFT adapter."),
    ("methods", _methods_add, _methods_run, "List the merge methods."),
    ("settings", lambda p: None, _settings_run, "List every method setting with help and preset values."),
]
