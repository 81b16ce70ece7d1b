"""``python -m esm_core stability``: how solid the coefficients are (esm_core/analysis/stability.py)."""

from __future__ import annotations

import json

import torch

from esm_core.analysis.stability import stability
from esm_core.cli.common import load_spec, method_args, spec_inputs
from esm_core.io import reserve_output
from esm_core.pipeline import Workspace
from esm_core.progress import tqdm_progress


def _add(p):
    method_args(p)
    p.add_argument("--draws", type=int, default=20, help="Bootstrap draws of the probes, and projection seeds (B).")
    p.add_argument("--groups", type=int, default=20,
                   help="Groups of units whose element scores are kept apart for the bootstrap (G).")


def _run(args) -> int:
    spec = load_spec(args)
    with reserve_output(args.out, kind="dir", overwrite=args.overwrite, inputs=spec_inputs(spec),
                        command="stability") as target:
        prog = None if args.no_progress else tqdm_progress("stability")
        ws = Workspace.from_spec(spec, progress=prog)
        st = stability(ws, draws=args.draws, groups=args.groups, seed=spec.method.seed, progress=prog)

        def write(tmp):
            from safetensors.torch import save_file

            report = {"summary": st.summary(), "blocks": st.block_rows(), "modules": st.module_rows(),
                      "seconds": st.seconds, "specialists": st.names, "config": spec.method.resolved()}
            (tmp / "stability.json").write_text(json.dumps(report, indent=2, default=str))
            tensors = {"alpha": st.alpha, "alpha_boot": st.alpha_boot, "alpha_seed": st.alpha_seed}
            tensors.update({f"stable_top/{k}": v.to(dtype=torch.uint8) for k, v in st.stable_mask.items()})
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "stability.safetensors"))

        out = target.write_dir(write)
    s = st.summary()
    print(f"stability over {s['draws']} draws ({s['groups']} groups of units), {st.seconds['total_s']:.1f} s")
    print(f"alpha std: {s['alpha std (probes)']:.4f} over probe draws, {s['alpha std (seeds)']:.4f} over projection seeds")
    print(f"lambda std: {s['lambda std (probes)']:.4f} (probes), {s['lambda std (seeds)']:.4f} (seeds); elements with a "
          f"stable top specialist: {s['stable top (probes)']:.1%} (probes), {s['stable top (seeds)']:.1%} (seeds)")
    print("alpha std by samples per modality: " + ", ".join(f"{n}: {v:.4f}" for n, v in s["alpha std by probes"].items()))
    print(f"written to {out}")
    return 0


COMMANDS = [("stability", _add, _run, "Bootstrap the probes and sweep the projection seeds: spread of alpha and lambda.")]
