"""``python -m esm_core import``: a published specialist as a clean PEFT adapter folder.

    python -m esm_core import ckpt/mol-llama --out imports/mol --alpha 32 --base models/llama-3.1-8b
    python -m esm_core import prot2text/checkpoint-500 --out imports/prot          # a PEFT folder
    python -m esm_core import prot2text/model.pt --out imports/prot --allow-pickle --alpha 32

Writes adapter_config.json + adapter_model.safetensors (stock PEFT keys), extra_weights.safetensors
(encoders, projectors, modules_to_save) and import_report.json (esm_core/importing). One entry of
the command table in esm_core/cli/__init__.py.
"""

from __future__ import annotations

import argparse

from esm_core.importing import FORMATS, import_specialist, report_rows


def add(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE",
                   help="The published specialist: a PEFT folder, a checkpoint folder (model.safetensors or shards + "
                        "index), a .safetensors file, or (with --allow-pickle) a .pt/.bin state dict.")
    p.add_argument("--out", required=True, help="Output folder (refused if it exists, unless --overwrite).")
    p.add_argument("--format", default="auto", choices=FORMATS, help="Source format (default: detected).")
    p.add_argument("--rank", type=int, default=None,
                   help="LoRA rank r; read from the tensors, so only a check (a disagreeing value is refused).")
    p.add_argument("--alpha", type=float, default=None,
                   help="lora_alpha; needed when no adapter_config.json says it (Mol-LLaMA: 32).")
    p.add_argument("--allow-pickle", action="store_true",
                   help="Read pickled .pt/.bin weights (torch.load with weights_only=True); off by default.")
    p.add_argument("--base", default=None, help="The base model folder: its config.json is compared with the source's "
                                                "and the LoRA shapes are checked against it.")
    p.add_argument("--overwrite", action="store_true", help="Replace an earlier import at --out.")


def run(args) -> int:
    report = import_specialist(args.source, args.out, fmt=args.format, rank=args.rank, alpha=args.alpha,
                               allow_pickle=args.allow_pickle, base=args.base, overwrite=args.overwrite)
    for row in report_rows(report):
        print(f"- {row['what']}: " + ("" if row["count"] is None else f"{row['count']}; ") + row["detail"])
    print(f"imported adapter written to {report['output']} (import_report.json says what was found, converted, kept "
          "and left out)")
    return 0


COMMANDS = [
    ("import", add, run, "Import a published specialist (PEFT folder, checkpoint, pickle) as a clean PEFT adapter."),
]
