"""A merged model on disk: the PEFT adapter, its coefficients, its encoders and a manifest.

    write_merged("runs/es", out, sset, spec=spec, es_result=res, ctx=ctx)   # atomic, via esm_core.io
    files = merged_files(out, sset, spec=spec)                               # the same files in memory

The directory loads with stock ``PeftModel.from_pretrained``: ``adapter_config.json`` +
``adapter_model.safetensors``; beside them ``coefficients.safetensors`` (every signal and the
coefficients the merge used), ``encoders.json`` + ``encoders/<modality>/`` (one encoder per
modality, as the merged model needs: docs/METHOD.md section 0) and ``manifest.json`` (the run,
preset, input hashes, package versions, timings).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from esm_core.adapters import save_adapter_files
from esm_core.io import Input, Reservation, dir_hashes, file_hash, package_versions, reserve_output, zip_files
from esm_core.merging import space
from esm_core.merging.base import MergeContext, MergeOutput
from esm_core.pipeline import result_metadata, result_tensors
from esm_core.runspec import run_spec_to_dict


def merged_inputs(sset, spec=None) -> list[Input]:
    """Every path a merge reads: base, adapters and (with a run spec) encoders, probe data, the config."""

    out = [Input(sset.base_path, "base model")]
    out += [Input(a.path, f"adapter of {n!r}") for n, a in sset.adapters.items() if a.path]
    if spec is not None:
        out += [Input(p, role) for p, role in spec.input_paths()]
    return out


def write_merged(out_dir, out: MergeOutput, sset, *, spec=None, es_result=None, ctx: MergeContext | None = None,
                 overwrite: bool = False, manifest_extra: dict | None = None) -> Path:
    """Write a merged adapter directory atomically (adapter, coefficients, encoders, manifest).

    ``out_dir``: a path (checked and locked by esm_core.io.reserve_output here) or a Reservation
    the caller made before its heavy work."""

    if isinstance(out_dir, Reservation):
        return out_dir.write_dir(lambda tmp: write_merged_into(tmp, out, sset, spec=spec, es_result=es_result, ctx=ctx,
                                                               manifest_extra=manifest_extra))
    with reserve_output(out_dir, kind="dir", overwrite=overwrite, inputs=merged_inputs(sset, spec),
                        command="merge") as r:
        return write_merged(r, out, sset, spec=spec, es_result=es_result, ctx=ctx, manifest_extra=manifest_extra)


def write_merged_into(tmp: Path, out: MergeOutput, sset, *, spec=None, es_result=None,
                      ctx: MergeContext | None = None, manifest_extra: dict | None = None) -> None:
    """The files of a merged adapter directory, written into the (empty, temporary) directory tmp."""
    t0 = time.perf_counter()
    template = sset.adapters[sset.names[0]]
    folded = bool(ctx.folded) if ctx is not None else False
    cfg = out.adapter_config(template, sset.base_path, folded)
    save_adapter_files(tmp, out.tensors, template, cfg)
    coef = {}
    if es_result is not None:

        coef.update(result_tensors(es_result))
        meta = result_metadata(es_result)
    else:
        meta = {"format": "esm_core.merge_coefficients/1", "specialists": json.dumps(sset.names)}
    if out.coefficients is not None:
        # the coefficients this merge used (e.g. an ES merge in another mode than the estimation's)
        coef.update({f"lambda/{k}": v.float().contiguous() for k, v in out.coefficients.items()})
        meta["merge_method"] = str(out.info.get("method", ""))
        meta["merge_info"] = json.dumps(out.info, default=str)
    coef.update({k: v.detach().float().contiguous().cpu() for k, v in out.extra_tensors.items()})
    if coef:
        from safetensors.torch import save_file

        save_file(coef, str(tmp / "coefficients.safetensors"), metadata=meta)
    enc = _copy_encoders(tmp, spec)
    manifest = build_manifest(sset, spec=spec, es_result=es_result, out=out, folded=folded,
                              scalings=ctx.scalings if ctx else {}, encoders=enc)
    manifest["timings"].update({"write_s": time.perf_counter() - t0})
    if ctx is not None and ctx.tensors:
        manifest["updates"] = update_report(out, ctx, folded)
    if manifest_extra:
        manifest.update(manifest_extra)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))


def update_report(out: MergeOutput, ctx: MergeContext, folded: bool) -> dict:
    """What the merged update keeps of each specialist's update, per module (esm_core/merging/space.py)."""
    one = folded or out.scaling_one

    def merged_scale(layer, module):
        return 1.0 if one else ctx.scaling(ctx.names[0], layer, module)

    rows = space.update_shares(out.tensors, ctx.tensors, ctx.scaling, merged_scale=merged_scale)
    return {"space": out.info.get("space", ctx.space), "summary": space.share_summary(rows, ctx.names), "modules": rows,
            "note": "share k: least-squares weight of specialist k's own update s_k B_k A_k in the merged "
                    "update; cross energy: the fraction of the merged update's energy outside their span"}


def _copy_encoders(tmp: Path, spec) -> dict:
    """One encoder per modality travels with the merged model (docs/METHOD.md section 0)."""
    if spec is None:
        return {}
    table = {}
    for m in spec.modalities:
        e = m.encoder
        entry = {"type": e.type, "options": e.options, "prefix": m.prefix, "kind": m.kind}
        if e.path:
            dst = tmp / "encoders" / m.name
            shutil.copytree(e.path, dst)
            entry["path"] = f"encoders/{m.name}"
        table[m.name] = entry
    (tmp / "encoders.json").write_text(json.dumps(table, indent=2))
    return table


def build_manifest(sset, *, spec=None, es_result=None, out: MergeOutput | None = None, folded: bool = False,
                   scalings: dict | None = None, encoders: dict | None = None) -> dict:

    inputs = {"base": {"path": sset.base_path, "files": dir_hashes(sset.base_path)}}
    for n in sset.names:
        a = sset.adapters[n]
        inputs[f"adapter:{n}"] = {"path": a.path, "files": dir_hashes(a.path)}
    if spec is not None:
        for m in spec.modalities:
            if m.data is not None and m.data.path and Path(m.data.path).is_file():
                inputs[f"probe_data:{m.name}"] = {"path": m.data.path, "sha256": file_hash(m.data.path)}
    man = {
        "tool": "esm_core",
        "created_unix": int(time.time()),
        "specialists": [dict(name=n, modality=sset.modality_of(n), path=sset.adapters[n].path) for n in sset.names],
        "inputs": inputs,
        "packages": package_versions(),
        "device": str(sset.device),
        "dtype": str(sset.dtype).replace("torch.", ""),
        "scaling": {
            "folded_into_B": folded,
            "per_adapter": scalings or {},
            "note": ("lora_alpha differs across specialists: each scaling was folded into its B factor and the "
                     "merged adapter has scaling 1" if folded else "all specialists share one scaling; kept"),
        },
        "timings": dict(es_result.timings) if es_result is not None else {},
        "encoders": encoders or {},
    }
    if spec is not None:
        man["run"] = run_spec_to_dict(spec)
    if es_result is not None:
        man["cost"] = {"estimate": es_result.cost, "measured_s": es_result.timings.get("estimate_total_s")}
        man["preset"] = es_result.config.preset
        man["method_config"] = es_result.config.resolved()
        man["probes"] = es_result.probe_summary
    if out is not None:
        man["merge"] = {k: v for k, v in out.info.items()}
    return man


# ------------------------------------------------------------------------------------ for the app
def merged_files(out: MergeOutput, sset, *, spec=None, es_result=None, folded: bool = False,
                 scalings: dict | None = None, manifest_extra: dict | None = None,
                 updates: dict | None = None) -> dict[str, bytes]:
    """Every file of the merged adapter directory (written into a temporary directory), by relative
    path: adapter_config.json, adapter_model.safetensors, coefficients.safetensors (when the method
    has coefficients), encoders.json + encoders/..., manifest.json. Nothing is left on disk.
    ``updates``: the merge's :func:`update_report` when the caller kept it (else computed here)."""
    if updates is None:  # the specialists' factors, for the manifest's update report
        ctx = MergeContext.from_specialists(sset)
        ctx.folded, ctx.scalings = bool(folded), dict(scalings or ctx.scalings)
    else:
        ctx = MergeContext(names=list(sset.names), tensors={}, folded=bool(folded), scalings=dict(scalings or {}))
        manifest_extra = {**(manifest_extra or {}), "updates": updates}
    with tempfile.TemporaryDirectory(prefix="esm_merged_") as tmp:
        d = Path(tmp)
        write_merged_into(d, out, sset, spec=spec, es_result=es_result, ctx=ctx, manifest_extra=manifest_extra)
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def zip_merged(out: MergeOutput, sset, *, folder: str = "merged", **kw) -> bytes:
    """The merged adapter directory as a zip: unzipped, ``folder/`` loads with stock
    ``PeftModel.from_pretrained(base, folder)``. Keywords as :func:`merged_files`."""
    return zip_files(merged_files(out, sset, **kw), folder)
