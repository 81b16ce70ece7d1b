"""LoRA extraction from a full fine-tune (the job of ``mergekit-extract-lora``), one tensor at a time.

Some specialists (Prot2Text-V2: a full fine-tune of LLaMA-3.1-8B, ~22 GB of shards) ship no LoRA.
For each adapted linear module of the blocks (default: q, k, v, o, gate, up, down of every block)
dW = W_ft - W_base is factorised by its truncated SVD of rank r: B = U_r diag(S_r) (the singular
values go into B), A = V_r^T, the best rank-r approximation. Written: a stock PEFT LoRA folder
(r, lora_alpha = r: scaling 1; keys ``base_model.model.<module path>.lora_A.weight``), read back
with :func:`esm_core.adapters.read_adapter` before it is moved into place, and ``extract_report.json``:
per module ||dW||, the relative residual ||dW - B A||_F / ||dW||_F of the factors as saved, the rank
a 1 % residual needs; totals; every tensor not extracted (embeddings, LM head, norms) that differs.

Streaming: planning reads safetensors headers only (pickles never); then each module's two weights
are read with ``safe_open`` (the index names the shard) and the handle closed; dW is decomposed in
float32 (float64 up to ``SMALL`` elements) by LAPACK's SVD, or with ``method="gram"`` by the float64
eigendecomposition of its smaller Gram matrix (the same factors, ~10x faster on a CPU); on the CPU, or
a GPU with ``device="cuda"``. Other tensors are compared in row chunks. Memory: a few tensors.

    ext = extract_lora("ckpt/prot2text", "models/llama-3.1-8b", 64, progress=tqdm_progress())
    extract_to("imports/prot", "ckpt/prot2text", "models/llama-3.1-8b", 64)   # the command's path
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from esm_core.adapters import AdapterWeights, LoraKey, read_adapter, save_adapter_files
from esm_core.errors import ESMError
from esm_core.io import Input, reserve_output
from esm_core.progress import ProgressFn

DEFAULT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INDEX = "model.safetensors.index.json"
REPORT = "extract_report.json"
SMALL = 1 << 20  # matrices up to this many elements are decomposed in float64 with precision="auto"
CHUNK = 1 << 20  # elements per read when comparing tensors that are not extracted
TARGET = 0.01  # the relative residual whose rank the report gives
PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
FLOATS = {"F16", "BF16", "F32", "F64"}
OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
METHODS = ("svd", "gram")
SPLIT = "B = U_r diag(S_r), A = V_r^T (singular values in B)"
_BLOCK_RE = re.compile(r"^(?P<stack>(?:.*\.)?(?:layers|h|blocks|block))\.(?P<layer>\d+)\.(?P<module>.+)\.weight$")


# ------------------------------------------------------------------------------------ checkpoints
class Checkpoint:
    """A local model folder of safetensors (one file, or shards + index): tensor name -> file, headers only."""

    def __init__(self, path: str | Path, role: str):
        self.role, self.path = role, Path(path)
        p, self.files, self.meta = self.path, {}, {}  # name -> file; name -> (shape, safetensors dtype)
        if not p.exists():
            raise ESMError(f"The {role} {str(p)!r} does not exist.", fix=f"give the {role}'s local model folder.")
        if not p.is_dir():
            raise ESMError(f"The {role} {str(p)!r} is not a folder.", fix=f"give the folder holding the {role}.")
        if (p / "adapter_config.json").is_file():
            raise ESMError(f"The {role} {str(p)!r} is a LoRA adapter folder, not a full model checkpoint.",
                           fix="extraction needs the full fine-tuned weights and the full base weights.")
        if (p / INDEX).is_file():
            self._from_index(p / INDEX)
        else:
            shards = [p / "model.safetensors"] if (p / "model.safetensors").is_file() else sorted(p.glob("*.safetensors"))
            if not shards:
                pickles = sorted(f.name for pat in PICKLES for f in p.glob(pat))
                raise ESMError(f"The {role} {str(p)!r} holds " + (f"only pickle weights ({', '.join(pickles[:3])}), "
                               "which are never loaded." if pickles else "no .safetensors weights."),
                               fix="convert it to safetensors with a trusted tool (save_pretrained(safe_serialization="
                                   "True) in a sandbox)." if pickles else f"give the {role}'s model folder.")
            for f in shards:
                for name in self._header(f):
                    if name in self.files:
                        raise ESMError(f"The {role}: tensor {name!r} is in both {self.files[name].name} and {f.name}.",
                                       fix=f"keep one checkpoint per folder, or add its {INDEX}.")
                    self.files[name] = f

    def _from_index(self, index: Path) -> None:
        try:
            wm = json.loads(index.read_text()).get("weight_map")
        except (OSError, ValueError, AttributeError) as e:
            raise ESMError(f"The {self.role}: {str(index)!r} is not a readable index ({e}).",
                           fix="restore the checkpoint's index file.") from None
        if not isinstance(wm, dict) or not wm:
            raise ESMError(f"The {self.role}: {str(index)!r} has no weight_map.", fix="restore the index file.")
        headers: dict[str, set] = {}
        for name, shard in sorted(wm.items()):
            if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
                raise ESMError(f"The {self.role}: the index puts {name!r} in {shard!r}, which is not a "
                               "safetensors file of this folder (pickle shards are never loaded).",
                               fix="use a safetensors checkpoint.")
            f = self.path / shard
            if shard not in headers and not f.is_file():
                raise ESMError(f"The {self.role}: shard {shard!r} named by the index is missing.",
                               fix="download or copy every shard of the checkpoint.")
            headers[shard] = headers.get(shard) or set(self._header(f))
            if name not in headers[shard]:
                raise ESMError(f"The {self.role}: the index puts {name!r} in {shard!r}, which does not hold it.",
                               fix="restore the checkpoint's index file.")
            self.files[name] = f

    def _header(self, f: Path) -> list[str]:
        try:
            with safe_open(str(f), framework="pt") as h:
                names = list(h.keys())
                for n in names:
                    sl = h.get_slice(n)
                    self.meta[n] = (tuple(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError, ValueError) as e:
            raise ESMError(f"The {self.role}: {str(f)!r} is not a readable safetensors file ({e}).",
                           fix="re-download or re-save that file.") from None
        return names

    def shape(self, name: str) -> tuple[int, ...]:
        return self.meta[name][0]

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """One tensor (or a row range); the file handle, and its mapping, are closed on return."""
        with safe_open(str(self.files[name]), framework="pt") as h:
            return h.get_tensor(name) if rows is None else h.get_slice(name)[rows]

    def sizes(self) -> list[dict]:
        return [dict(file=f.name, bytes=f.stat().st_size) for f in sorted(set(self.files.values()))]


# ------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    """What an extraction will do, checked from headers only (no weights read)."""

    ft: Checkpoint
    base: Checkpoint
    rank: int
    modules: tuple[str, ...]
    items: list[tuple[LoraKey, str]]  # (LoraKey of A, tensor name) per adapted module, in block order
    others: list[str]  # every other tensor name of either checkpoint

    def inputs(self) -> list[Input]:
        return [Input(str(self.ft.path), "fine-tuned checkpoint"), Input(str(self.base.path), "base checkpoint")]


def _selected(ck: Checkpoint, modules: tuple[str, ...]) -> dict[tuple[int, str], str]:
    out, stacks = {}, set()
    for name in ck.files:
        m = _BLOCK_RE.match(name)
        if m and any(m["module"] == t or m["module"].endswith("." + t) for t in modules):
            out[(int(m["layer"]), m["module"])] = name
            stacks.add(m["stack"])
    if len(stacks) > 1:
        raise ESMError(f"The {ck.role} has more than one stack of blocks ({', '.join(sorted(stacks))}); one "
                       "adapter file cannot name both.", fix="extract from a decoder-only checkpoint.")
    return out


def plan_extraction(ft_dir: str | Path, base_dir: str | Path, rank: int,
                    modules: tuple[str, ...] | list[str] | None = None) -> Plan:
    """Check the inputs from their headers (folders, safetensors, module sets, shapes, rank) before any work."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ESMError(f"--rank {rank!r} is not a positive integer.", fix="give a LoRA rank such as --rank 64.")
    modules = modules.split(",") if isinstance(modules, str) else modules  # "q_proj,v_proj" as on the command line
    modules = tuple(DEFAULT_MODULES if modules is None else (m.strip() for m in modules if m.strip()))
    bad = [m for m in modules if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", m)]
    if not modules or bad:
        raise ESMError(f"--modules {','.join(bad) or '(empty)'} does not name linear modules.",
                       fix="give module names such as q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj.")
    ft, base = Checkpoint(ft_dir, "fine-tuned checkpoint"), Checkpoint(base_dir, "base checkpoint")
    if ft.path.resolve() == base.path.resolve():
        raise ESMError(f"The fine-tuned checkpoint and --base are the same folder {str(ft.path)!r}.",
                       fix="give the fine-tuned model first and the base it was trained from as --base.")
    sel_ft, sel_base = _selected(ft, modules), _selected(base, modules)
    for t in modules:
        if not any(m == t or m.endswith("." + t) for _, m in sel_ft):
            have = sorted({x["module"] for n in ft.files if (x := _BLOCK_RE.match(n)) and len(ft.shape(n)) == 2})
            raise ESMError(f"--modules {t!r}: the fine-tuned checkpoint has no block module of that name.",
                           fix=f"choose among {', '.join(have[:12]) or 'none'}.")
    for a, b, sa, sb in ((ft, base, sel_ft, sel_base), (base, ft, sel_base, sel_ft)):
        missing = sorted(set(sa) - set(sb))
        if missing:
            raise ESMError(f"{len(missing)} module(s) of the {a.role} are missing in the {b.role} "
                           f"({', '.join(sa[k] for k in missing[:3])}"
                           f"{' ...' if len(missing) > 3 else ''}): they are not the same architecture.",
                           fix="give the base the fine-tune was trained from (same blocks and modules).")
    items = []
    for key in sorted(sel_ft):
        nf, nb = sel_ft[key], sel_base[key]
        (sf, df), (sb, db) = ft.meta[nf], base.meta[nb]
        if sf != sb:
            raise ESMError(f"{nf}: shape {list(sf)} in the fine-tuned checkpoint but {list(sb)} in the base.",
                           fix="give the base the fine-tune was trained from (same sizes).")
        if nf != nb:
            raise ESMError(f"{nf!r} is {nb!r} in the base.", fix="save both with the same model class.")
        if len(sf) != 2 or df not in FLOATS or db not in FLOATS:
            raise ESMError(f"{nf} is a {len(sf)}-D {df}/{db} tensor; only floating-point linear weights (2-D) are "
                           "extracted (quantized checkpoints are not).",
                           fix="use unquantized checkpoints (bf16/fp16/fp32), or leave that module out of --modules.")
        if rank > min(sf):
            raise ESMError(f"--rank {rank} is larger than {nf}'s smaller side ({list(sf)}: at most rank {min(sf)}).",
                           fix=f"choose --rank {min(sf)} or less (or leave that module out of --modules).")
        items.append((LoraKey(key[0], key[1], "A"), nf))
    others = sorted((set(ft.files) | set(base.files)) - {n for _, n in items})
    return Plan(ft, base, rank, modules, items, others)


# ------------------------------------------------------------------------------------ numbers
def check_options(device: str = "cpu", dtype: str = "float32", precision: str = "auto", method: str = "svd"):
    """(torch device, factor dtype) for the run options, or an ESMError naming the bad one."""
    for flag, val, allowed in (("--dtype", dtype, tuple(OUT_DTYPES)), ("--method", method, METHODS),
                               ("--precision", precision, ("auto", "float32", "float64"))):
        if val not in allowed:
            raise ESMError(f"{flag} {val!r} is not one of {', '.join(allowed)}.", fix=f"give {flag} {allowed[0]}.")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
        raise ESMError(f"--device {device!r} is not cpu, cuda or auto.", fix="give --device cpu, cuda or auto.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ESMError(f"--device {device} was asked, but no CUDA GPU is visible.", fix="use --device cpu or auto.")
    return torch.device(device), OUT_DTYPES[dtype]


def _tails(s: np.ndarray) -> np.ndarray:
    e = np.asarray(s, dtype=np.float64) ** 2
    return np.append(np.cumsum(e[::-1])[::-1], 0.0)  # tails[k] = sum of s_i^2 for i >= k


def rank_for(s: np.ndarray, target: float = TARGET) -> int:
    """The smallest k whose truncation leaves a relative residual <= target (from the singular values s)."""
    t = _tails(s)
    return int(np.argmax(t <= target ** 2 * t[0]))


def _uniform_rank(tails: list[np.ndarray], total: float, target: float = TARGET) -> int:
    """The smallest rank that, used for every module, leaves a relative residual <= target over all of them."""
    n = max(len(t) for t in tails)
    return int(np.argmax(sum(np.pad(t, (0, n - len(t))) for t in tails) <= target ** 2 * total))


def _factorise(dw: torch.Tensor, rank: int, out_dtype: torch.dtype, method: str):
    """(B, A, all singular values, ||dW - B A||_F of the factors as saved); dW is overwritten."""
    if method == "svd":
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        b, a = u[:, :rank] * s[:rank], vh[:rank].clone()  # a clone: a view would keep all of vh alive
        del u, vh
    else:  # the eigenvectors of the smaller Gram matrix (float64): the same factors, far fewer flops
        tall = dw.shape[0] > dw.shape[1]
        lam, v = torch.linalg.eigh(dw.T @ dw if tall else dw @ dw.T)
        s, v = lam.flip(0).clamp_min(0).sqrt(), v.flip(1)[:, :rank]
        if tall:  # v: right singular vectors
            b, a = dw @ v, v.T.contiguous()
        else:  # v: left singular vectors; A = V_r^T = diag(1/s_r) U_r^T dW (0 where s_r = 0)
            inv = torch.where(s[:rank] > s[0] * 1e-12, 1 / s[:rank], torch.zeros_like(s[:rank]))
            b, a = v * s[:rank], inv[:, None] * (v.T @ dw)
    b, a = b.to(out_dtype), a.to(out_dtype)
    dw.addmm_(b.to(dw.dtype), a.to(dw.dtype), alpha=-1)
    return b.cpu(), a.cpu(), s.double().cpu().numpy(), float(torch.linalg.matrix_norm(dw))


def _compare(plan: Plan, name: str) -> dict | None:
    """How a tensor that is not extracted differs between the checkpoints, read in row chunks (None: identical)."""
    ft, base = plan.ft, plan.base
    kind = ("embedding" if "embed" in name else "lm_head" if "lm_head" in name else "norm" if "norm" in name
            else "block tensor not extracted" if _BLOCK_RE.match(name) else "other")
    if name not in ft.files or name not in base.files:
        return dict(name=name, kind=kind, status=f"only in the {'fine-tuned' if name in ft.files else 'base'} checkpoint")
    if ft.shape(name) != base.shape(name):
        return dict(name=name, kind=kind, status=f"shape differs: {list(ft.shape(name))} vs {list(base.shape(name))}")
    shape = ft.shape(name)
    step = max(1, CHUNK // max(1, math.prod(shape[1:])))
    d2 = b2 = 0.0
    for i in range(0, shape[0] if shape else 1, step):
        rows = slice(i, min(shape[0], i + step)) if shape else None
        x, y = base.read(name, rows).double(), ft.read(name, rows).double()
        d2, b2 = d2 + float(y.sub_(x).square_().sum()), b2 + float(x.square_().sum())
    if d2 == 0.0:
        return None
    return dict(name=name, kind=kind, status="differs", delta_norm=math.sqrt(d2),
                rel_delta=math.sqrt(d2 / b2) if b2 else None)


# ------------------------------------------------------------------------------------ extraction
class Extraction(NamedTuple):
    """The extracted LoRA: factors by canonical key, the PEFT config, and the report (JSON-ready)."""

    tensors: dict[LoraKey, torch.Tensor]
    config: dict
    report: dict


def run_extraction(plan: Plan, *, device: str = "cpu", dtype: str = "float32", precision: str = "auto",
                   method: str = "svd", progress: ProgressFn | None = None) -> Extraction:
    """Decompose every planned module, one at a time; compare the rest. progress(msg, fraction) may cancel."""
    (dev, out_dtype), t0 = check_options(device, dtype, precision, method), time.perf_counter()
    sizes = [math.prod(plan.ft.shape(n)) for _, n in plan.items]
    work = sum(sizes) + 0.05 * sum(math.prod(plan.ft.shape(n)) for n in plan.others if n in plan.ft.files)
    done, tensors, rows, tails = 0.0, {}, [], []
    for (key, name), size in zip(plan.items, sizes):
        if progress:
            progress(f"layers.{key.layer}.{key.module}", done / work)
        small = precision == "float64" or (precision == "auto" and size <= SMALL)
        cd = torch.float64 if method == "gram" or small else torch.float32
        w = plan.base.read(name).to(dev, cd)
        base_norm, dw = float(torch.linalg.matrix_norm(w)), plan.ft.read(name).to(dev, cd).sub_(w)
        del w
        if not bool(torch.isfinite(dw).all()):
            raise ESMError(f"{name}: the weights hold NaN/Inf values.", fix="repair or re-download the checkpoints.")
        b, a, s, resid = _factorise(dw, plan.rank, out_dtype, method)
        del dw
        tails.append(_tails(s))
        norm = float(np.sqrt(tails[-1][0]))
        tensors[key], tensors[LoraKey(key.layer, key.module, "B")] = a, b
        rows.append(dict(layer=key.layer, module=key.module, path=name[: -len(".weight")],
                         shape=list(plan.ft.shape(name)), precision=str(cd).replace("torch.", ""),
                         delta_norm=norm, base_norm=base_norm, rel_delta=norm / base_norm if base_norm else None,
                         rel_residual=resid / norm if norm else 0.0,
                         rel_residual_svd=float(np.sqrt(tails[-1][plan.rank] / norm ** 2)) if norm else 0.0,
                         rank_for_1pct=rank_for(s), max_rank=len(s), unchanged=norm == 0.0))
        done += size
    differ = []
    for name in plan.others:
        if progress:
            progress(f"comparing {name}", done / work)
        if c := _compare(plan, name):
            differ.append(c)
        done += 0.05 * (math.prod(plan.ft.shape(name)) if name in plan.ft.files else 0)
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=plan.rank, lora_alpha=plan.rank,
                  target_modules=list(plan.modules), lora_dropout=0.0, bias="none", use_rslora=False,
                  use_dora=False, fan_in_fan_out=False, init_lora_weights=True, inference_mode=True,
                  modules_to_save=None, rank_pattern={}, alpha_pattern={},
                  base_model_name_or_path=str(plan.base.path))
    run = dict(device=str(dev), dtype=dtype, precision=precision, method=method, seconds=time.perf_counter() - t0)
    report = _report(plan, rows, tails, differ, tensors, run)
    if progress:
        progress("done", 1.0)
    return Extraction(tensors, config, report)


def _report(plan: Plan, rows: list[dict], tails: list, differ: list[dict], tensors: dict, run: dict) -> dict:
    total = sum(r["delta_norm"] ** 2 for r in rows)
    resid = sum((r["rel_residual"] * r["delta_norm"]) ** 2 for r in rows)
    worst = max(rows, key=lambda r: r["rel_residual"])
    totals = dict(modules=len(rows), unchanged_modules=sum(r["unchanged"] for r in rows),
                  delta_norm=math.sqrt(total), residual_norm=math.sqrt(resid),
                  rel_residual=math.sqrt(resid / total) if total else 0.0,
                  max_rel_residual=worst["rel_residual"], worst_module=worst["path"],
                  rank_for_1pct_max=max(r["rank_for_1pct"] for r in rows),
                  rank_for_1pct_median=float(np.median([r["rank_for_1pct"] for r in rows])),
                  uniform_rank_for_1pct=_uniform_rank(tails, total) if total else 0,
                  lora_parameters=sum(t.numel() for t in tensors.values()),
                  not_extracted_differ=len(differ), not_extracted_identical=len(plan.others) - len(differ))
    return dict(format="esm_core.extract_report/1", ft=str(plan.ft.path), base=str(plan.base.path),
                rank=plan.rank, lora_alpha=plan.rank, scaling=1.0, split=SPLIT, target=TARGET,
                target_modules=list(plan.modules), **run, totals=totals, modules=rows, not_extracted=differ,
                inputs=dict(ft=plan.ft.sizes(), base=plan.base.sizes()))


def extract_lora(ft_dir: str | Path, base_dir: str | Path, rank: int, *, modules=None, device: str = "cpu",
                 dtype: str = "float32", precision: str = "auto", method: str = "svd",
                 progress: ProgressFn | None = None) -> Extraction:
    """Plan (headers only, refusing bad inputs) and extract; nothing is written."""
    return run_extraction(plan_extraction(ft_dir, base_dir, rank, modules), device=device, dtype=dtype,
                          precision=precision, method=method, progress=progress)


# ------------------------------------------------------------------------------------ writing
def as_adapter(ext: Extraction, name: str = "extracted") -> AdapterWeights:
    """The extraction as an in-memory adapter, with stock PEFT key names."""
    paths = {(r["layer"], r["module"]): r["path"] for r in ext.report["modules"]}
    keys = {k: f"base_model.model.{paths[(k.layer, k.module)]}.lora_{k.ab}.weight" for k in ext.tensors}
    return AdapterWeights(name=name, path=None, config=ext.config, tensors=ext.tensors, file_keys=keys,
                          module_paths=paths)


def save_extraction(directory: str | Path, ext: Extraction) -> None:
    """Write the adapter files and extract_report.json into an existing folder, then read the adapter back."""
    d = Path(directory)
    save_adapter_files(d, ext.tensors, as_adapter(ext), ext.config)
    (d / REPORT).write_text(json.dumps(ext.report, indent=1))
    if set(read_adapter(d, "extracted").tensors) != set(ext.tensors):  # pragma: no cover - a bug, not a user's
        raise RuntimeError("the written adapter does not read back with the extracted keys")


def extract_to(out: str | Path, ft_dir: str | Path, base_dir: str | Path, rank: int, *, modules=None,
               overwrite: bool = False, device: str = "cpu", dtype: str = "float32", precision: str = "auto",
               method: str = "svd", progress: ProgressFn | None = None) -> tuple[Extraction, Path]:
    """Plan and check everything, reserve ``out`` (esm_core/io.py's policy), extract, write; (extraction, path)."""
    plan = plan_extraction(ft_dir, base_dir, rank, modules)
    check_options(device, dtype, precision, method)
    with reserve_output(out, kind="dir", overwrite=overwrite, inputs=plan.inputs(), command="extract-lora") as target:
        ext = run_extraction(plan, device=device, dtype=dtype, precision=precision, method=method, progress=progress)
        path = target.write_dir(lambda tmp: save_extraction(tmp, ext),
                                meta=dict(ft=str(plan.ft.path), base=str(plan.base.path), rank=rank))
    return ext, path
