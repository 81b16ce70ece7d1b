"""Where an import reads its tensors: finding the weight files of a source and reading them one by one.

A source is a folder or a file, in one of three formats (``auto`` picks one from what is there):

- ``peft``: a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or, only with
  ``allow_pickle``, ``adapter_model.bin``);
- ``checkpoint``: a full model checkpoint, ``model.safetensors``, shards named by
  ``model.safetensors.index.json``, any ``*.safetensors`` in a folder, or one ``.safetensors`` file.
  Tensors are read through ``safe_open``, one at a time: the checkpoint is never in memory whole;
- ``pickle``: a ``.pt``/``.bin``/``.pth``/``.ckpt`` file (or a folder holding one, or shards named by
  ``pytorch_model.bin.index.json``). Pickle files can run code when loaded, so they are read only
  when the user asks (``allow_pickle``), and then only with ``torch.load(..., weights_only=True)``.

:func:`find_source` only looks at file names and configs (cheap; pickle refusals happen here);
:func:`open_reader` opens the weights.
"""

from __future__ import annotations

import json
import pickle
import re
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from esm_core.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from esm_core.errors import ESMError

FORMATS = ("auto", "peft", "checkpoint", "pickle")
PICKLE_SUFFIXES = (".pt", ".bin", ".pth", ".ckpt")
JSON_CAP = 64 * 2**20
# Where training scripts nest the state dict inside a pickled checkpoint, tried in this order.
NESTED = ("state_dict", "model_state_dict", "model", "module", "weights")
PICKLE_FIX = ("pass --allow-pickle (in the app: tick 'allow pickle') if you trust the file: it is then read with "
              "torch.load(weights_only=True), which builds tensors only, and written once as safetensors.")


@dataclass
class Source:
    """A located source: its format, its weight files, and the configs found next to them."""

    path: Path
    format: str  # peft | checkpoint | pickle
    files: list[Path]
    pickled: bool = False
    folder: Path | None = None  # the folder whose configs describe the weights (None: a lone file)
    adapter_config: dict | None = None

    @property
    def what(self) -> str:
        return f"Source {str(self.path)!r}"


def read_json(path: Path, what: str, cap: int = JSON_CAP):
    """A JSON file of a model folder (config, index, tokenizer), refused above ``cap`` bytes or when broken."""
    size = path.stat().st_size
    if size > cap:
        raise ESMError(f"{what}: {str(path)!r} is {size / 2**20:.1f} MiB, more than the {cap // 2**20} MiB such a "
                       "file can be.", fix="point at the model's own files, as they were downloaded.")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ESMError(f"{what}: {str(path)!r} is not valid JSON ({e}).",
                       fix="download the file again, or remove it if it is not part of the model.") from None


def _adapter_config(folder: Path, what: str) -> dict | None:
    p = folder / ADAPTER_CONFIG
    if not p.is_file():
        return None
    cfg = read_json(p, what)
    if not isinstance(cfg, dict):
        raise ESMError(f"{what}: {ADAPTER_CONFIG} does not hold a JSON object.", fix="use the adapter's own config.")
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise ESMError(f"{what} is a {ptype} adapter, not LoRA.", fix="ES-Merging merges LoRA adapters only.")
    if cfg.get("use_dora"):
        raise ESMError(f"{what} uses DoRA (use_dora=true), whose magnitude vectors cannot be merged element-wise.",
                       fix="import plain LoRA specialists.")
    if cfg.get("lora_bias"):
        raise ESMError(f"{what} trains LoRA biases (lora_bias=true), which are not merged.",
                       fix="import adapters trained without lora_bias.")
    return cfg


def _indexed(folder: Path, index: Path, what: str) -> list[Path]:
    idx = read_json(index, what)
    wm = idx.get("weight_map") if isinstance(idx, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise ESMError(f"{what}: {index.name} has no weight_map.", fix="use the index file saved with the shards.")
    names = sorted({str(v) for v in wm.values()})
    for n in names:
        if Path(n).name != n or n in (".", ".."):
            raise ESMError(f"{what}: {index.name} names the shard {n!r}, which is not a file of the folder.",
                           fix="use the index file saved with the shards.")
        if not (folder / n).is_file():
            raise ESMError(f"{what}: {index.name} names the shard {n!r}, which is missing.",
                           fix="download every shard the index names into the same folder.")
    return [folder / n for n in names]


def _pickles(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def _refuse_pickle(what: str, files: list[Path]) -> None:
    names = ", ".join(p.name for p in files[:3]) + (" ..." if len(files) > 3 else "")
    raise ESMError(f"{what} holds only pickle weights ({names}); pickle files can run code when loaded, so they "
                   "are read only on request.", fix=PICKLE_FIX)


def _detect(p: Path) -> str:
    if p.is_file():
        if p.suffix == ".safetensors":
            return "checkpoint"
        if p.suffix in PICKLE_SUFFIXES:
            return "pickle"
        raise ESMError(f"Source {str(p)!r} is neither a safetensors file nor a pickled state dict "
                       f"({', '.join(PICKLE_SUFFIXES)}).", fix="point at the specialist's folder or weights file.")
    has_config = (p / ADAPTER_CONFIG).is_file()
    if has_config and any((p / n).is_file() for n in (ADAPTER_WEIGHTS, "adapter_model.bin", "adapter_model.pt")):
        return "peft"
    if any(p.glob("*.safetensors")):
        return "checkpoint"
    if _pickles(p):
        return "pickle"
    if has_config:
        return "peft"  # refused there, naming the missing weights
    raise ESMError(f"Source {str(p)!r} holds no weights (no {ADAPTER_WEIGHTS}, model.safetensors, shards with "
                   "model.safetensors.index.json, nor a .pt/.bin file).",
                   fix="point at the folder the specialist was published in.")


def find_source(path: str | Path, fmt: str = "auto", allow_pickle: bool = False) -> Source:
    """Locate the weight files of a source (nothing is loaded); refuse pickles unless allowed."""
    if fmt not in FORMATS:
        raise ESMError(f"--format {fmt!r} is not a source format.", fix=f"use one of {', '.join(FORMATS)}.")
    if str(path).strip() == "":
        raise ESMError("SOURCE is empty.", fix="give the folder or file of the published specialist.")
    p = Path(str(path)).expanduser().resolve()
    what = f"Source {str(p)!r}"
    if not p.exists():
        raise ESMError(f"{what} does not exist.", fix="give the folder or file of the published specialist.")
    fmt = _detect(p) if fmt == "auto" else fmt
    folder = p if p.is_dir() else None
    cfg = _adapter_config(folder, what) if folder else None
    if fmt == "peft":
        if folder is None or cfg is None:
            raise ESMError(f"{what} is not a PEFT adapter folder (no {ADAPTER_CONFIG}).",
                           fix="use --format checkpoint for a full model checkpoint, or --format auto.")
        if (p / ADAPTER_WEIGHTS).is_file():
            return Source(p, "peft", [p / ADAPTER_WEIGHTS], folder=folder, adapter_config=cfg)
        pick = [f for f in (p / "adapter_model.bin", p / "adapter_model.pt") if f.is_file()]
        if not pick:
            raise ESMError(f"{what} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}.",
                           fix="download the adapter's weights into the same folder.")
        if not allow_pickle:
            _refuse_pickle(what, pick)
        return Source(p, "peft", pick[:1], pickled=True, folder=folder, adapter_config=cfg)
    if fmt == "checkpoint":
        if folder is None:
            if p.suffix != ".safetensors":
                raise ESMError(f"{what} is not a safetensors file.", fix="use --format pickle for a .pt/.bin file.")
            return Source(p, "checkpoint", [p])
        index = sorted(p.glob("*.safetensors.index.json"))
        if len(index) > 1:
            raise ESMError(f"{what} holds several shard indexes ({', '.join(i.name for i in index)}).",
                           fix="point at a folder with one checkpoint.")
        if index:
            files = _indexed(p, index[0], what)
            return Source(p, "checkpoint", files, folder=folder, adapter_config=cfg)
        files = [p / "model.safetensors"] if (p / "model.safetensors").is_file() else sorted(p.glob("*.safetensors"))
        if not files:
            raise ESMError(f"{what} holds no model.safetensors, no shards with model.safetensors.index.json and no "
                           "other .safetensors file.",
                           fix="use --format pickle for .pt/.bin weights, or --format auto.")
        return Source(p, "checkpoint", files, folder=folder, adapter_config=cfg)
    # pickle
    if folder is None:
        if p.suffix not in PICKLE_SUFFIXES:
            raise ESMError(f"{what} is not a pickled state dict ({', '.join(PICKLE_SUFFIXES)}).",
                           fix="use --format checkpoint for safetensors, or --format auto.")
        files = [p]
    else:
        index = sorted(p.glob("*.bin.index.json"))
        if index:
            files = _indexed(p, index[0], what)
        else:
            files = _pickles(p)
            if not files:
                raise ESMError(f"{what} holds no .pt/.bin/.pth/.ckpt file.", fix="use --format auto.")
            if len(files) > 1:
                raise ESMError(f"{what} holds several pickle files ({', '.join(f.name for f in files[:4])}) and no "
                               "index naming them.", fix="give the one file to import as SOURCE.")
    if not allow_pickle:
        _refuse_pickle(what, files)
    return Source(p, "pickle", files, pickled=True, folder=folder, adapter_config=cfg)


class Reader:
    """Tensors of a source by key: names, shapes and dtypes without loading, then one tensor at a time."""

    def __init__(self, source: Source):
        self.source = source
        self._stack = ExitStack()
        self._where: dict[str, object] = {}  # key -> safe_open handle, or the loaded tensor (pickles)
        try:
            if source.pickled:
                self._open_pickles()
            else:
                self._open_safetensors()
        except BaseException:
            self._stack.close()
            raise

    def _open_safetensors(self) -> None:
        for f in self.source.files:
            try:
                h = self._stack.enter_context(safe_open(str(f), framework="pt"))
                keys = list(h.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise ESMError(f"{self.source.what}: {f.name} is not a readable safetensors file ({e}).",
                               fix="download the file again.") from None
            for k in keys:
                if k in self._where:
                    raise ESMError(f"{self.source.what}: tensor {k!r} is in more than one file.",
                                   fix="point at a folder holding one checkpoint.")
                self._where[k] = h

    def _open_pickles(self) -> None:
        for f in self.source.files:
            sd = load_pickled_state_dict(f, self.source.what)
            for k, t in sd.items():
                if k in self._where:
                    raise ESMError(f"{self.source.what}: tensor {k!r} is in more than one file.",
                                   fix="point at one checkpoint.")
                self._where[k] = t

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        h = self._where[key]
        return tuple(h.shape) if isinstance(h, torch.Tensor) else tuple(h.get_slice(key).get_shape())

    def numel(self, key: str) -> int:
        n = 1
        for s in self.shape(key):
            n *= int(s)
        return n

    def get(self, key: str) -> torch.Tensor:
        h = self._where[key]
        if isinstance(h, torch.Tensor):
            return h.detach().clone().contiguous()  # its own storage: pickles may share storage between keys
        return h.get_tensor(key)

    def dtypes(self, keys) -> str:
        """The most common dtype among keys, as torch names it."""
        c = Counter(str(self._where[k].dtype).removeprefix("torch.") if isinstance(self._where[k], torch.Tensor)
                    else _ST_DTYPES.get(self._where[k].get_slice(k).get_dtype(), "?") for k in keys)
        return c.most_common(1)[0][0] if c else "?"

    def close(self) -> None:
        self._where.clear()
        self._stack.close()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def load_pickled_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A pickled state dict, read with weights_only=True (tensors and plain containers only, no code)."""
    try:
        try:  # memory-mapped where the file allows it (the zip format), so a big checkpoint is not copied
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"WeightsUnpickler error:\s*(.*?)(?: Please use|\n\n|$)", str(e), re.S)
        why = " ".join((m.group(1) if m else "").split())[:200]
        raise ESMError(f"{what}: {path.name} is not a plain pickled state dict, or holds objects other than tensors, "
                       "which weights_only loading refuses" + (f" ({why})." if why else "."),
                       fix="re-save it as a plain state dict of tensors (or as safetensors).") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ESMError(f"{what}: {path.name} is not a readable torch file ({type(e).__name__}: "
                       f"{str(e).strip()[:200]}).", fix="download the file again.") from None
    sd = _state_dict_of(obj)
    if sd is None:
        raise ESMError(f"{what}: {path.name} holds no state dict of tensors (a {type(obj).__name__}).",
                       fix="point at a checkpoint holding the model's state dict.")
    return sd


def _state_dict_of(obj) -> dict[str, torch.Tensor] | None:
    if not isinstance(obj, dict):
        return None
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors:
        return tensors
    for k in NESTED:
        if isinstance(obj.get(k), dict):
            sd = _state_dict_of(obj[k])
            if sd:
                return sd
    return None
