"""Merged adapters: lambda -> merged LoRA factors (Eq. 1), the merge-method registry, atomic output.

Eq. 1, element by element and for the A and the B factors separately:

    theta_{l,j} = sum_k lambda^k_{l,j} * theta^k_{l,j}

Adapters with different ``lora_alpha`` are allowed: each adapter's scaling is folded into its B
before merging and the merged adapter is written with scaling 1 (the manifest says so).

Merge methods live one per file in ``esm_core/methods/`` and register themselves here with their
pretty name, paper reference and parameters (which fill the app's select boxes):

    method = get_method("es")
    out = method.run(MergeContext.from_specialists(sset, es_result=res), {})
    write_merged(out_dir, out, sset, manifest=...)

Output directory (PEFT format plus extras), written to a temporary directory and renamed into place:
``adapter_config.json``, ``adapter_model.safetensors``, ``coefficients.safetensors`` (when the
method has coefficients), ``encoders.json`` + ``encoders/<modality>/`` and ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import ESMError
from .io import Input
from .specialists import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterWeights, LoraKey


# ------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class Param:
    """A merge-method parameter, described well enough to build a widget and a CLI flag."""

    name: str
    default: Any
    help: str
    kind: str = "float"  # float | int | bool | choice | str
    choices: tuple = ()
    min: float | None = None
    max: float | None = None


@dataclass
class MergeContext:
    """What a merge method may use. ``tensors`` hold each specialist's factors (scaling folded if needed)."""

    names: list[str]
    tensors: dict[str, dict[LoraKey, torch.Tensor]]
    sset: Any = None  # SpecialistSet, for methods that run the model (AdaMerging, fine-tuning)
    workspace: Any = None  # pipeline.Workspace (probe samples and encoders)
    es_result: Any = None  # pipeline.ESResult, for ES-Merging
    data: Any = None  # task data, for methods that learn from examples
    seed: int = 0
    progress: Callable[[str, float], None] | None = None
    folded: bool = False
    scalings: dict[str, float] = field(default_factory=dict)

    @property
    def keys(self) -> list[LoraKey]:
        return sorted(self.tensors[self.names[0]])

    def stacked(self, key: LoraKey) -> torch.Tensor:
        """[K, *shape] float32 stack of one factor across specialists."""
        return torch.stack([self.tensors[n][key].float() for n in self.names])

    @classmethod
    def from_specialists(cls, sset, **kw) -> "MergeContext":
        tensors, folded, scalings = prepare_tensors([sset.adapters[n] for n in sset.names])
        return cls(names=list(sset.names), tensors=tensors, sset=sset, folded=folded, scalings=scalings, **kw)


@dataclass
class MergeOutput:
    tensors: dict[LoraKey, torch.Tensor]  # merged factors
    coefficients: dict[LoraKey, torch.Tensor] | None = None  # [K, *shape] per-element weights, if any
    info: dict = field(default_factory=dict)
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # saved into coefficients.safetensors


@dataclass(frozen=True)
class MergeMethod:
    name: str
    pretty: str
    paper: str
    url: str
    params: tuple[Param, ...]
    fn: Callable[[MergeContext, dict], MergeOutput]
    needs: frozenset = frozenset()  # "es" (ES coefficients), "model", "data"
    summary: str = ""

    def resolve_params(self, given: dict | None) -> dict:
        given = dict(given or {})
        names = {p.name for p in self.params}
        bad = sorted(set(given) - names)
        if bad:
            raise ESMError(f"Merge method {self.name!r} has no parameter(s) {bad}.",
                           fix=f"its parameters are {sorted(names) or 'none'}.")
        out = {}
        for p in self.params:
            v = given.get(p.name, p.default)
            out[p.name] = self._check_param(p, v)
        return out

    def _check_param(self, p: Param, v):
        from .config import short_repr

        def bad(what: str):
            return ESMError(f"Parameter {p.name}={short_repr(v)} of {self.name!r} is not {what}.",
                            fix=f"give {p.name} {what} ({p.help})")

        if p.kind == "float":
            if isinstance(v, str):
                try:
                    v = float(v)
                except ValueError:
                    raise bad("a number") from None
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise bad("a number")
            v = float(v)
            if v != v or v in (float("inf"), float("-inf")):
                raise bad("a finite number")
        elif p.kind == "int":
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad("a whole number")
        elif p.kind == "bool":
            if not isinstance(v, bool):
                raise bad("true or false")
        elif p.kind == "choice":
            if v not in p.choices:
                raise ESMError(f"Parameter {p.name}={short_repr(v)} of {self.name!r} is not allowed.",
                               fix=f"choose one of {list(p.choices)}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)  # e.g. --param weights=1 (YAML reads a number)
        elif not isinstance(v, str):
            raise bad("text")
        if p.min is not None and v < p.min or p.max is not None and v > p.max:
            lo = "-inf" if p.min is None else p.min
            hi = "inf" if p.max is None else p.max
            raise ESMError(f"Parameter {p.name}={short_repr(v)} of {self.name!r} is out of range [{lo}, {hi}].",
                           fix=f"choose a value between {lo} and {hi} ({p.help})")
        return v

    def run(self, ctx: MergeContext, params: dict | None = None) -> MergeOutput:
        resolved = self.resolve_params(params)
        if "es" in self.needs and ctx.es_result is None:
            raise ESMError(f"Merge method {self.name!r} needs ES coefficients.",
                           fix="run the coefficient estimation first.")
        if "model" in self.needs and ctx.sset is None:
            raise ESMError(f"Merge method {self.name!r} needs the loaded models.")
        if "data" in self.needs and not ctx.data:
            raise ESMError(f"Merge method {self.name!r} learns from task data, and none was given.",
                           fix="pick a task (app: Merge page; CLI: `compare`) whose training rows it can use.")
        if "model" in self.needs:  # learned merges train on the shared model: hold it for the whole run
            with ctx.sset.exclusive(f"{self.pretty} merge"):
                out = self.fn(ctx, resolved)
        else:
            out = self.fn(ctx, resolved)
        out.info.setdefault("method", self.name)
        out.info.setdefault("params", resolved)
        for k, t in out.tensors.items():
            if not torch.isfinite(t).all():
                raise ESMError(f"Merge method {self.name!r} produced NaN/Inf at {k}.",
                               fix="check its parameters (e.g. a zero density or temperature).")
        return out


REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    REGISTRY[method.name] = method
    return method


def _load_methods() -> None:
    from . import methods  # noqa: F401  (registers on import)


def get_method(name: str) -> MergeMethod:
    _load_methods()
    if name not in REGISTRY:
        raise ESMError(f"Unknown merge method {name!r}.", fix=f"use one of {sorted(REGISTRY)}.")
    return REGISTRY[name]


def list_methods() -> list[MergeMethod]:
    _load_methods()
    return [REGISTRY[k] for k in sorted(REGISTRY, key=lambda n: (n != "es", n))]


# ------------------------------------------------------------------------------------ tensors
def prepare_tensors(adapters: list[AdapterWeights]) -> tuple[dict[str, dict[LoraKey, torch.Tensor]], bool, dict]:
    """Per-specialist factors in float32; scalings folded into B when they differ across adapters."""
    keys = sorted(adapters[0].tensors)
    modules = sorted({(k.layer, k.module) for k in keys})
    sc = {a.name: {m: a.scaling_for(*m) for m in modules} for a in adapters}
    ref = sc[adapters[0].name]
    folded = any(abs(sc[a.name][m] - ref[m]) > 1e-12 * max(1.0, abs(ref[m])) for a in adapters for m in modules)
    out = {}
    for a in adapters:
        t = {}
        for k in keys:
            v = a.tensors[k].float()
            if folded and k.ab == "B":
                v = v * sc[a.name][(k.layer, k.module)]
            t[k] = v
        out[a.name] = t
    scalings = {a.name: sc[a.name][modules[0]] for a in adapters}
    return out, folded, scalings


def weighted_sum(ctx: MergeContext, lam: dict[LoraKey, torch.Tensor]) -> dict[LoraKey, torch.Tensor]:
    """Eq. 1: merged[key] = sum_k lam[key][k] * theta_k[key] (lam broadcastable to [K, *shape])."""
    out = {}
    for k in ctx.keys:
        w = lam[k].float()
        st = ctx.stacked(k)
        while w.ndim < st.ndim:
            w = w.unsqueeze(-1)
        out[k] = (w * st).sum(0)
    return out


def merged_config(template: AdapterWeights, base_path: str | None, folded: bool) -> dict:
    cfg = dict(template.config)
    cfg["inference_mode"] = True
    if base_path:
        cfg["base_model_name_or_path"] = base_path
    if folded:
        # scalings live in B now: make PEFT's scaling 1 for every module
        cfg["lora_alpha"] = template.rank
        cfg["use_rslora"] = False
        cfg["alpha_pattern"] = dict(cfg.get("rank_pattern") or {})
    return cfg


# ------------------------------------------------------------------------------------ files
def file_hash(path: str | Path, full_limit: int = 256 * 2**20) -> str:
    """sha256 of a file; for files over full_limit, of its size, first and last 4 MiB ('partial:')."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    with open(p, "rb") as f:
        if size <= full_limit:
            for chunk in iter(lambda: f.read(2**20), b""):
                h.update(chunk)
            return h.hexdigest()
        h.update(str(size).encode())
        h.update(f.read(4 * 2**20))
        f.seek(size - 4 * 2**20)
        h.update(f.read())
    return "partial:" + h.hexdigest()


def dir_hashes(directory: str | Path, patterns=("*.json", "*.safetensors", "*.model", "*.txt")) -> dict[str, str]:
    d = Path(directory)
    if not d.is_dir():
        return {}
    out = {}
    for pat in patterns:
        for f in sorted(d.glob(pat)):
            out[f.name] = file_hash(f)
    return out


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "safetensors", "pot", "numpy", "rdkit", "umap-learn", "streamlit"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    from . import __version__

    out["esm_core"] = __version__
    return out


def save_adapter_files(directory: Path, tensors: dict[LoraKey, torch.Tensor], template: AdapterWeights,
                       config: dict, dtype: torch.dtype | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors with the template's key names (stock PEFT format)."""
    from safetensors.torch import save_file

    dtype = dtype or next(iter(template.tensors.values())).dtype
    sd = {template.file_keys[k]: v.detach().to(dtype).contiguous().cpu() for k, v in tensors.items()}
    save_file(sd, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))


def merged_inputs(sset, spec=None) -> list[Input]:
    """Every path a merge reads: base, adapters and (with a run spec) encoders, probe data, the config."""
    from .io import Input

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
    from .io import Reservation, reserve_output

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
    cfg = merged_config(template, sset.base_path, folded)
    save_adapter_files(tmp, out.tensors, template, cfg)
    coef = {}
    if es_result is not None:
        from .pipeline import result_metadata, result_tensors

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
    if manifest_extra:
        manifest.update(manifest_extra)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))


def _copy_encoders(tmp: Path, spec) -> dict:
    """One encoder per modality travels with the merged model (METHOD.md section 0)."""
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
    from .config import run_spec_to_dict

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
        man["preset"] = es_result.config.preset
        man["method_config"] = es_result.config.resolved()
        man["probes"] = es_result.probe_summary
    if out is not None:
        man["merge"] = {k: v for k, v in out.info.items()}
    return man


# ------------------------------------------------------------------------------------ for the app
def merged_files(out: MergeOutput, sset, *, spec=None, es_result=None, folded: bool = False,
                 scalings: dict | None = None, manifest_extra: dict | None = None) -> dict[str, bytes]:
    """Every file of the merged adapter directory (written into a temporary directory), by relative
    path: adapter_config.json, adapter_model.safetensors, coefficients.safetensors (when the method
    has coefficients), encoders.json + encoders/..., manifest.json. Nothing is left on disk."""
    ctx = MergeContext(names=list(sset.names), tensors={}, folded=bool(folded), scalings=dict(scalings or {}))
    with tempfile.TemporaryDirectory(prefix="esm_merged_") as tmp:
        d = Path(tmp)
        write_merged_into(d, out, sset, spec=spec, es_result=es_result, ctx=ctx, manifest_extra=manifest_extra)
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def zip_files(files: dict[str, bytes], folder: str = "") -> bytes:
    """A zip (in memory) of relative path -> bytes, all under ``folder/`` when given."""
    import io
    import zipfile

    prefix = folder.strip("/") + "/" if folder.strip("/") else ""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for rel in sorted(files):
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise ValueError(f"not a relative path inside the archive: {rel!r}")
            z.writestr(prefix + rel, files[rel])
    return buf.getvalue()


def zip_merged(out: MergeOutput, sset, *, folder: str = "merged", **kw) -> bytes:
    """The merged adapter directory as a zip: unzipped, ``folder/`` loads with stock
    ``PeftModel.from_pretrained(base, folder)``. Keywords as :func:`merged_files`."""
    return zip_files(merged_files(out, sset, **kw), folder)


def _top_labels(c: torch.Tensor, tol: float) -> torch.Tensor:
    """[K, N] -> [N] index of the largest coefficient, -1 where the largest is tied (within tol)."""
    if c.shape[0] == 1:
        return torch.zeros(c.shape[1], dtype=torch.long)
    top2 = torch.topk(c, 2, dim=0)
    lab = top2.indices[0].clone()
    lab[(top2.values[0] - top2.values[1]) <= tol] = -1
    return lab


def compare_coefficients(c1, c2, names: list[str], *, tol: float = 1e-7) -> tuple[list[dict], dict]:
    """Compare two merges' per-element coefficients over the same elements.

    ``c1``, ``c2``: a [K, *shape] tensor each, or lists of them (several factors, compared together).
    Returns (one row per specialist: mean lambda of each merge, mean and max |lambda1 - lambda2|;
    overall: number of elements, share where the top specialist differs, shares of ties). The top
    specialist of an element is the one with the largest lambda; where the largest is tied (within
    ``tol``, e.g. an entry every specialist trimmed to 0) it is "tie", a label of its own.
    """
    def flat(c):
        cs = c if isinstance(c, (list, tuple)) else [c]
        return torch.cat([torch.as_tensor(x).detach().float().reshape(len(names), -1) for x in cs], dim=1)

    a, b = flat(c1), flat(c2)
    if a.shape != b.shape:
        raise ESMError(f"The two coefficient sets cover different elements ({tuple(a.shape)} vs {tuple(b.shape)}).",
                       fix="compare merges of the same specialists.")
    d = (a - b).abs()
    rows = [dict(specialist=n, mean_1=float(a[k].mean()), mean_2=float(b[k].mean()),
                 mean_abs_diff=float(d[k].mean()), max_abs_diff=float(d[k].max()))
            for k, n in enumerate(names)]
    t1, t2 = _top_labels(a, tol), _top_labels(b, tol)
    overall = dict(elements=int(a.shape[1]), top_differs=float((t1 != t2).float().mean()),
                   ties_1=float((t1 < 0).float().mean()), ties_2=float((t2 < 0).float().mean()),
                   mean_abs_diff=float(d.mean()))
    return rows, overall


def skill_training_prompts(skills: list[str], n_per_skill: int = 32, *, k: int = 2, seed: int = 0,
                           demo_dir: str | Path | None = None) -> list:
    """Training data for AdaMerging / fine-tuning from the demo zoo's skills: balanced questions
    (labels alternate) whose query AND examples come from the demo data's TRAIN split, never the
    held-out split the skill sets are scored on. ``meta["task"]`` = the skill, so learned methods batch
    per skill."""
    import random

    from .zoo import DEMO_DIR
    from .zoo.data import load_demo
    from .zoo.skills import SKILL_BY_NAME, demo_pools, sample_question

    unknown = [s for s in skills if s not in SKILL_BY_NAME]
    if unknown or not skills:
        raise ESMError(f"Unknown or no skill(s) {unknown or skills}.", fix=f"use some of {sorted(SKILL_BY_NAME)}.")
    pools = demo_pools(load_demo(demo_dir or DEMO_DIR), "train")
    out = []
    for name in skills:
        skill = SKILL_BY_NAME[name]
        pos, neg = pools.labelled(skill)
        if not pos or not neg:
            raise ESMError(f"Skill {name!r} has no training sample of one of its labels.",
                           fix="choose another skill.")
        rng = random.Random(f"{seed}:train:{name}")
        for i in range(int(n_per_skill)):
            p = sample_question(skill, pools, rng, k, want=i % 2 == 0)
            p.meta["task"] = name
            out.append(p)
    return out
