"""``python -m esm_core extract-lora``: a LoRA adapter extracted from a full fine-tune (esm_core/importing/extract.py).

    python -m esm_core extract-lora ckpt/prot2text --base models/llama-3.1-8b --rank 64 --out imports/prot
    python -m esm_core extract-lora FT --base BASE --rank 16 --out DIR --modules q_proj,v_proj --device cuda

Prints one row per module name (over all blocks) and the totals; extract_report.json in --out has
every module. One entry of the command table in esm_core/cli/__init__.py.
"""

from __future__ import annotations

import argparse

import numpy as np

from esm_core.importing.extract import DEFAULT_MODULES, METHODS, OUT_DTYPES, extract_to
from esm_core.progress import tqdm_progress


def add(p: argparse.ArgumentParser) -> None:
    p.add_argument("ft", metavar="FT", help="The fully fine-tuned model folder (safetensors; pickles never).")
    p.add_argument("--base", required=True, help="The base model folder the fine-tune started from.")
    p.add_argument("--rank", required=True, type=int, help="LoRA rank r (lora_alpha = r: scaling 1).")
    p.add_argument("--out", required=True, help="Output folder: a PEFT LoRA adapter + extract_report.json "
                   "(refused if it exists, unless --overwrite).")
    p.add_argument("--modules", default=",".join(DEFAULT_MODULES),
                   help="Comma-separated linear modules of the blocks (default: %(default)s).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output folder written by esm_core.")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto (a GPU when one is visible).")
    p.add_argument("--dtype", default="float32", choices=sorted(OUT_DTYPES), help="dtype of the saved factors.")
    p.add_argument("--precision", default="auto", choices=("auto", "float32", "float64"),
                   help="SVD precision (auto: float64 for small matrices, float32 otherwise).")
    p.add_argument("--method", default="svd", choices=METHODS,
                   help="svd: LAPACK SVD of dW; gram: float64 eigendecomposition of its smaller Gram matrix "
                        "(the same factors, about 10x faster on a CPU).")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")


def format_table(report: dict) -> str:
    """A short table: one row per module name (over all blocks), the totals, what differs but is not extracted."""
    by: dict[str, list[dict]] = {}
    for r in report["modules"]:
        by.setdefault(r["module"], []).append(r)
    lines = [f"rank {report['rank']} (lora_alpha {report['lora_alpha']}, scaling 1); {report['split']}",
             f"{'module':<18} {'blocks':>6} {'shape':>11} {'|dW|/|W|':>9} {'residual mean/max':>18} "
             f"{'rank@1% med/max':>16}"]
    for m, rs in by.items():
        rel = [r["rel_delta"] or 0.0 for r in rs]
        res = [r["rel_residual"] for r in rs]
        k = [r["rank_for_1pct"] for r in rs]
        lines.append(f"{m:<18} {len(rs):>6} {'x'.join(map(str, rs[0]['shape'])):>11} {np.mean(rel):>9.2e} "
                     f"{np.mean(res):>9.4f} / {max(res):<6.4f} {int(np.median(k)):>8} / {max(k):<6}")
    t = report["totals"]
    lines.append(f"{'total':<18} {t['modules']:>6} {'':>11} {'':>9} {t['rel_residual']:>9.4f} (all)  "
                 f"{'':>1} one rank for 1 % overall: {t['uniform_rank_for_1pct']}")
    diff = report["not_extracted"]
    if diff:
        shown = ", ".join(d["name"] + (f" (rel {d['rel_delta']:.2e})" if d.get("rel_delta") is not None
                                       else f" ({d['status']})") for d in diff[:4])
        lines.append(f"NOT extracted but different ({len(diff)}): {shown}{' ...' if len(diff) > 4 else ''}; "
                     "the adapter captures only the block modules above.")
    else:
        lines.append(f"the {t['not_extracted_identical']} tensors not extracted are identical in both checkpoints.")
    return "\n".join(lines)


def run(args) -> int:
    modules = [m for m in args.modules.split(",") if m.strip()]
    ext, path = extract_to(args.out, args.ft, args.base, args.rank, modules=modules, overwrite=args.overwrite,
                           device=args.device, dtype=args.dtype, precision=args.precision, method=args.method,
                           progress=None if args.no_progress else tqdm_progress("extract-lora"))
    print(format_table(ext.report))
    print(f"LoRA adapter (r={args.rank}, {ext.report['totals']['modules']} modules) and extract_report.json "
          f"written to {path} in {ext.report['seconds']:.1f}s")
    return 0


COMMANDS = [("extract-lora", add, run,
             "Extract a LoRA adapter (truncated SVD of W_ft - W_base) from a full fine-tune; write a PEFT folder.")]
