"""The import of one published specialist: its source read tensor by tensor, a clean PEFT folder written.

    report = import_specialist("ckpt/mol-llama", "imports/mol", alpha=32, base="models/llama-3.1-8b")

Order of work: the source's files are located and pickles refused unless allowed
(``sources.find_source``); the base's and the source's config.json are compared
(``compat``; a different base is refused before anything is read); the output is checked and
locked (``esm_core.io.reserve_output``: never the source, never inside it); then the tensor names
are sorted (``lora.plan_keys``), only the LoRA factors are read and checked (pairs, ranks, NaN,
shapes against the base), r and alpha are settled (``lora.resolve_scaling``), and the folder is
written atomically: ``adapter_config.json`` + ``adapter_model.safetensors`` (stock PEFT keys),
``extra_weights.safetensors`` (when the source carries more than the LoRA) and
``import_report.json``. The written adapter is read back with ``esm_core.adapters.read_adapter``
before the folder is moved into place.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from safetensors.torch import save_file

from esm_core.adapters import AdapterWeights, check_config_matches_weights, read_adapter, save_adapter_files
from esm_core.errors import ESMError
from esm_core.importing.compat import REPORT, BaseFacts, CompatVerdict, compare_bases, read_base_facts, shape_reasons
from esm_core.importing.lora import (
    LEFT_LLM,
    KeyPlan,
    Scaling,
    adapter_config,
    check_factors,
    plan_keys,
    resolve_scaling,
)
from esm_core.importing.sources import FORMATS, Reader, Source, find_source
from esm_core.io import Input, reserve_output

EXTRA = "extra_weights.safetensors"
REPORT_FORMAT = "esm_core.import_report/1"
EXAMPLES = 3

__all__ = ["EXTRA", "FORMATS", "REPORT", "import_specialist", "report_rows"]


def _check_numbers(rank, alpha) -> None:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ESMError(f"--rank {rank!r} is not a positive whole number.", fix="pass the LoRA rank, e.g. --rank 8, "
                                                                               "or leave it out (it is inferred).")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha) or alpha <= 0):
        raise ESMError(f"--alpha {alpha!r} is not a positive number.", fix="pass the specialist's lora_alpha, "
                                                                           "e.g. --alpha 32.")


def _base_facts(base: str | Path | None) -> tuple[Path | None, BaseFacts | None]:
    if base is None or str(base).strip() == "":
        return None, None
    bp = Path(str(base)).expanduser().resolve()
    if not bp.is_dir():
        raise ESMError(f"--base {str(bp)!r} is not a directory.", fix="point --base at the base model's folder.")
    facts = read_base_facts(bp, f"--base {str(bp)!r}")
    if facts is None:
        raise ESMError(f"--base {str(bp)!r} has no config.json.", fix="point --base at the base model's folder.")
    return bp, facts


def _groups(rd: Reader, groups: dict[str, list[str]]) -> dict:
    return {g: dict(count=len(ks), parameters=sum(rd.numel(k) for k in ks), examples=sorted(ks)[:EXAMPLES])
            for g, ks in sorted(groups.items())}


def _report(src: Source, rd: Reader, plan: KeyPlan, sc: Scaling, cfg: dict, *, out: Path, src_facts, verdict,
            base_path: Path | None, notes: list[str]) -> dict:
    kept, left = _groups(rd, plan.kept), _groups(rd, plan.left)
    blocks = sorted({lk.layer for lk in plan.lora})
    modules = sorted({lk.module for lk in plan.lora})
    scal = {p: sc.value(r=sc.rank_pattern.get(p), alpha=sc.alpha_pattern.get(p)) for p in sorted(plan.inner.values())}
    return dict(
        format=REPORT_FORMAT, source=str(src.path), source_format=src.format,
        source_files=[f.name for f in src.files],
        pickle=("read with torch.load(map_location='cpu', weights_only=True); written as safetensors"
                if src.pickled else None),
        output=str(out), base=str(base_path) if base_path else None,
        found=dict(tensors=len(rd.keys()), lora_factors=len(plan.lora), lora_modules=len(plan.inner),
                   blocks=blocks, modules=modules, block_list=plan.head, dtype=rd.dtypes(list(plan.lora.values()))),
        converted=dict(count=len(plan.lora), to="adapter_model.safetensors",
                       examples=[dict(source=plan.lora[k], written=plan.stock[k])
                                 for k in sorted(plan.lora)[:EXAMPLES]]),
        kept=dict(file=EXTRA if kept else None, count=sum(g["count"] for g in kept.values()),
                  parameters=sum(g["parameters"] for g in kept.values()), groups=kept),
        left_out=dict(count=sum(g["count"] for g in left.values()),
                      parameters=sum(g["parameters"] for g in left.values()), groups=left),
        lora=dict(r=sc.r, lora_alpha=sc.alpha, scaling=sc.value(), use_rslora=sc.use_rslora, rank_source=sc.rank_source,
                  alpha_source=sc.alpha_source, rank_pattern=sc.rank_pattern, alpha_pattern=sc.alpha_pattern,
                  scaling_varies=len(set(scal.values())) > 1, target_modules=cfg["target_modules"],
                  layers_to_transform=cfg.get("layers_to_transform")),
        source_base=src_facts.to_json() if src_facts else None,
        compat={k: v for k, v in verdict.to_json().items() if k != "facts"} if verdict else None,
        notes=notes,
    )


def import_specialist(source: str | Path, out: str | Path, *, fmt: str = "auto", rank: int | None = None,
                      alpha: float | None = None, allow_pickle: bool = False, base: str | Path | None = None,
                      overwrite: bool = False, log: Callable[[str], None] | None = None,
                      command: str = "import") -> dict:
    """Import one specialist into the folder ``out``; returns the report written as import_report.json."""
    _check_numbers(rank, alpha)
    src = find_source(source, fmt, allow_pickle)
    bp, base_facts = _base_facts(base)
    name = Path(str(out)).name or "imported"
    src_facts = read_base_facts(src.folder, src.what, strict=False) if src.folder else None
    verdict: CompatVerdict | None = None
    notes: list[str] = []
    if base_facts and src_facts:
        verdict = compare_bases(base_facts, src_facts, name)
        verdict.raise_if_refused(str(bp))
        notes += verdict.notes
    elif base_facts:
        notes.append("the source carries no config.json: it was compared with the base by its LoRA shapes only.")
    else:
        notes.append("no base given: the source's base was not compared with a run's base (pass --base, or check "
                     "later with esm_core.importing.check_bases).")
    inputs = [Input(str(src.path), "source")] + ([Input(str(bp), "base")] if bp else [])
    with reserve_output(out, kind="dir", overwrite=overwrite, inputs=inputs, what="--out", command=command,
                        log=log) as target, Reader(src) as rd:
        plan = plan_keys(rd.keys(), what=src.what, modules_to_save=(src.adapter_config or {}).get("modules_to_save"),
                         keep_others=src.format == "peft")
        if base_facts:
            reasons = shape_reasons(base_facts, {lk: rd.shape(k) for lk, k in plan.lora.items()})
            if reasons:
                raise ESMError(f"{src.what} does not fit the base {str(bp)!r}: {'; '.join(reasons)}.",
                               fix="import onto the base the specialist was trained on.")
        tensors = {lk: rd.get(k) for lk, k in sorted(plan.lora.items())}
        check_factors(tensors, src.what)
        sc = resolve_scaling(tensors, plan, src.adapter_config, rank=rank, alpha=alpha, what=src.what)
        facts = base_facts or src_facts
        base_path = str(bp) if bp else str((src.adapter_config or {}).get("base_model_name_or_path") or "")
        cfg = adapter_config(plan, sc, n_layers=facts.num_layers if facts else None, base_path=base_path,
                             task_type=(src.adapter_config or {}).get("task_type"))
        check_config_matches_weights(name, cfg, tensors, plan.inner)
        template = AdapterWeights(name, None, cfg, tensors, file_keys=plan.stock, module_paths=plan.inner)
        if plan.left.get(LEFT_LLM):
            notes.append(f"the source carries the language model's own weights ({len(plan.left[LEFT_LLM])} tensors): "
                         "left out; the adapter applies to the base it is merged on.")
        notes += plan.notes
        report = _report(src, rd, plan, sc, cfg, out=target.path, src_facts=src_facts, verdict=verdict,
                         base_path=bp, notes=notes)
        kept = sorted(k for ks in plan.kept.values() for k in ks)

        def write(tmp: Path) -> None:
            save_adapter_files(tmp, tensors, template, cfg)
            if kept:
                groups = {k: g for g, ks in plan.kept.items() for k in ks}
                save_file({k: rd.get(k) for k in kept}, str(tmp / EXTRA),
                          metadata={"format": "pt", "written_by": "esm_core import",
                                    "groups": json.dumps(groups, sort_keys=True)})
            read_adapter(tmp, name)  # the engine's reader takes the written adapter as it is
            (tmp / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True, default=str))

        target.write_dir(write, meta={"source": str(src.path)})
    return report


def report_rows(report: dict) -> list[dict]:
    """The report as a table for the app: what, how many, details."""
    lo = report["lora"]
    rows = [dict(what="source", count=len(report["source_files"]),
                 detail=f"{report['source_format']}: {', '.join(report['source_files'][:3])}"
                        + (" (pickle, read with weights_only=True)" if report.get("pickle") else "")),
            dict(what="tensors found", count=report["found"]["tensors"], detail=f"dtype {report['found']['dtype']}"),
            dict(what="LoRA factors converted", count=report["converted"]["count"],
                 detail=f"{report['found']['lora_modules']} modules in {len(report['found']['blocks'])} blocks "
                        f"({', '.join(m.rsplit('.', 1)[-1] for m in report['found']['modules'])})"),
            dict(what="r / lora_alpha / scaling", count=None,
                 detail=f"r={lo['r']} ({lo['rank_source']}), alpha={lo['lora_alpha']:g} ({lo['alpha_source']}), "
                        f"scaling={lo['scaling']:g}" + (" (varies per module)" if lo["scaling_varies"] else ""))]
    for part, label in (("kept", "kept"), ("left_out", "left out")):
        for g, d in report[part]["groups"].items():
            rows.append(dict(what=f"{label}: {g}", count=d["count"],
                             detail=f"{d['parameters']:,} parameters; e.g. {', '.join(d['examples'])}"))
    c = report.get("compat")
    rows.append(dict(what="base", count=None,
                     detail="not compared" if not report.get("base") else
                     ("fits the base" if c is None or c["ok"] else "refused") + f" ({report['base']})"))
    rows += [dict(what="note", count=None, detail=n) for n in report["notes"]]
    return rows
