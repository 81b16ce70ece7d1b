"""LoRA adapters on disk: their keys, reading and checking them, writing merged ones (PEFT format).

A factor is named by a :class:`LoraKey` (block, module, A|B) whatever prefix its file uses.
Reading refuses, naming the adapter and the fix: non-LoRA or DoRA adapters, pickle files,
NaN/Inf values, tensors that are no block LoRA factor, and an adapter_config.json that disagrees
with the weights (rank, target_modules). :func:`check_adapters_agree` names the adapter that
differs from the others. Merged adapters are written with the template's key names, so stock
``PeftModel.from_pretrained`` loads them.

    ad = read_adapter("assets/zoo/molecule", "molecule")
    ad.tensors[LoraKey(0, "self_attn.q_proj", "A")]          # [r, in_features]
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from esm_core.errors import ESMError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# A LoRA tensor key as PEFT saves it (adapter name stripped), e.g.
#   base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
_KEY_RE = re.compile(
    r"^(?P<path>.*?(?:^|\.)(?:layers|h|blocks|block)\.(?P<layer>\d+)\.(?P<module>.+?))"
    r"\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$"
)


@dataclass(frozen=True, order=True)
class LoraKey:
    """One LoRA factor: block index, module path inside the block, and 'A' or 'B'."""

    layer: int
    module: str  # e.g. "self_attn.q_proj"
    ab: str  # "A" | "B"

    def __str__(self) -> str:
        return f"layers.{self.layer}.{self.module}.lora_{self.ab}"

    @property
    def short(self) -> str:
        """Module's last name, e.g. q_proj."""
        return self.module.rsplit(".", 1)[-1]

    @staticmethod
    def parse(s: str) -> "LoraKey":
        m = re.match(r"^layers\.(\d+)\.(.+)\.lora_([AB])$", s)
        if not m:
            raise ValueError(f"not a canonical LoRA key: {s!r}")
        return LoraKey(int(m.group(1)), m.group(2), m.group(3))


def parse_peft_key(key: str) -> tuple[LoraKey, str] | None:
    """(LoraKey, module path in the wrapped model) for a PEFT LoRA tensor key, else None."""
    m = _KEY_RE.match(key)
    if not m:
        return None
    path = m.group("path")
    if path.startswith("base_model.model."):
        path = path[len("base_model.model."):]
    return LoraKey(int(m.group("layer")), m.group("module"), m.group("ab")), path


@dataclass
class AdapterWeights:
    """A LoRA adapter read from disk: its config and its factors by canonical key."""

    name: str
    path: str | None
    config: dict
    tensors: dict[LoraKey, torch.Tensor]
    file_keys: dict[LoraKey, str] = field(default_factory=dict)  # canonical -> key in the file
    module_paths: dict[tuple[int, str], str] = field(default_factory=dict)  # (layer, module) -> model path

    @property
    def rank(self) -> int:
        return int(self.config.get("r", 8))

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha", self.rank))

    def scaling_for(self, layer: int, module: str) -> float:
        """PEFT's scaling for one module: alpha/r (or alpha/sqrt(r) with rsLoRA), with patterns."""
        path = self.module_paths.get((layer, module), f"layers.{layer}.{module}")
        r = _pattern_value(self.config.get("rank_pattern") or {}, path, self.rank)
        a = _pattern_value(self.config.get("alpha_pattern") or {}, path, self.alpha)
        return a / math.sqrt(r) if self.config.get("use_rslora") else a / r

    def modules(self) -> list[tuple[int, str]]:
        return sorted({(k.layer, k.module) for k in self.tensors})

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def delta_norms(self) -> dict[tuple[int, str], float]:
        """Frobenius norm of scaling * B @ A per (layer, module): the weight change it makes."""
        out = {}
        for layer, module in self.modules():
            a = self.tensors[LoraKey(layer, module, "A")].float()
            b = self.tensors[LoraKey(layer, module, "B")].float()
            out[(layer, module)] = float(torch.linalg.matrix_norm(b @ a) * self.scaling_for(layer, module))
        return out


def _pattern_value(patterns: dict, path: str, default):
    # PEFT matches rank/alpha patterns as regex suffixes of the module path.
    for pat, val in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", path):
            return val
    return default


def read_adapter_config(path: str | Path, name: str) -> dict:
    p = Path(path)
    if not p.is_dir():
        raise ESMError(f"Adapter {name!r}: directory {str(p)!r} does not exist.",
                       fix="point the specialist's 'adapter:' at a PEFT adapter directory.")
    cfg_path = p / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise ESMError(f"Adapter {name!r}: {str(p)!r} is not a PEFT adapter directory (no {ADAPTER_CONFIG}).",
                       fix="save the adapter with PeftModel.save_pretrained, or pick its directory.")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ESMError(f"Adapter {name!r}: {str(cfg_path)!r} is not valid JSON ({e}).") from None
    if not isinstance(cfg, dict):
        raise ESMError(f"Adapter {name!r}: {str(cfg_path)!r} does not hold a JSON object.")
    ptype = str(cfg.get("peft_type", "")).upper()
    if ptype != "LORA":
        raise ESMError(f"Adapter {name!r} is a {ptype or 'unknown'} adapter, not LoRA.",
                       fix="ES-Merging merges LoRA adapters only; pick LoRA specialists.")
    if cfg.get("use_dora"):
        raise ESMError(f"Adapter {name!r} uses DoRA (use_dora=true), whose magnitude vectors cannot be "
                       "merged element-wise.", fix="use plain LoRA specialists.")
    if cfg.get("lora_bias"):
        raise ESMError(f"Adapter {name!r} trains LoRA biases (lora_bias=true), which are not merged.",
                       fix="use adapters without lora_bias.")
    if cfg.get("modules_to_save"):
        raise ESMError(f"Adapter {name!r} fully trains modules {cfg['modules_to_save']} (modules_to_save), "
                       "which LoRA merging cannot combine.",
                       fix="save those modules separately (e.g. as the modality encoder) and drop them "
                           "from the adapter.")
    return cfg


def read_adapter(path: str | Path, name: str) -> AdapterWeights:
    """Read a PEFT LoRA adapter (safetensors only) into canonical keys."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = read_adapter_config(path, name)
    p = Path(path)
    wpath = p / ADAPTER_WEIGHTS
    if not wpath.is_file():
        if (p / "adapter_model.bin").exists():
            raise ESMError(f"Adapter {name!r} holds only adapter_model.bin, a pickle file, which is never "
                           "loaded.", fix="convert it to adapter_model.safetensors with a trusted tool.")
        raise ESMError(f"Adapter {name!r}: {str(p)!r} has no {ADAPTER_WEIGHTS}.")
    try:
        raw = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise ESMError(f"Adapter {name!r}: {str(wpath)!r} is not a readable safetensors file ({e}).") from None
    tensors, file_keys, paths = {}, {}, {}
    others = []
    for key, t in raw.items():
        parsed = parse_peft_key(key)
        if parsed is None:
            others.append(key)
            continue
        lk, mpath = parsed
        tensors[lk] = t
        file_keys[lk] = key
        paths[(lk.layer, lk.module)] = mpath
    if others:
        raise ESMError(f"Adapter {name!r} holds tensors that are not LoRA factors of a transformer block: "
                       f"{others[:3]}{' ...' if len(others) > 3 else ''}.",
                       fix="keep only lora_A/lora_B weights of block modules in the adapter.")
    if not tensors:
        raise ESMError(f"Adapter {name!r}: {str(wpath)!r} holds no LoRA tensors.")
    for (layer, module) in {(k.layer, k.module) for k in tensors}:
        for ab in "AB":
            if LoraKey(layer, module, ab) not in tensors:
                raise ESMError(f"Adapter {name!r}: module layers.{layer}.{module} has no lora_{ab} tensor.")
    check_config_matches_weights(name, cfg, tensors, paths)
    for k, t in tensors.items():
        if t.ndim != 2:
            raise ESMError(f"Adapter {name!r}: {k} has shape {tuple(t.shape)}; only linear-layer LoRA "
                           "(2-D factors) is supported.")
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ESMError(f"Adapter {name!r}: tensor {k} holds {bad} NaN/Inf value(s).",
                           fix="retrain or repair this adapter; merging would spread the NaNs.")
    return AdapterWeights(name=name, path=str(p), config=cfg, tensors=tensors, file_keys=file_keys,
                          module_paths=paths)


def _targets(cfg: dict, mpath: str, layer: int) -> bool:
    """Whether PEFT would put this adapter on module ``mpath`` (its target_modules / layers_to_transform)."""
    tm = cfg.get("target_modules")
    if tm is None:
        return True  # PEFT then uses the architecture's defaults; nothing to compare against
    if isinstance(tm, str):
        hit = tm == "all-linear" or re.fullmatch(tm, mpath) is not None
    else:
        hit = any(mpath == t or mpath.endswith("." + str(t)) for t in tm)
    ex = cfg.get("exclude_modules")
    if hit and ex:
        if isinstance(ex, str):
            hit = re.fullmatch(ex, mpath) is None
        else:
            hit = not any(mpath == t or mpath.endswith("." + str(t)) for t in ex)
    lt = cfg.get("layers_to_transform")
    if hit and lt is not None:
        hit = layer in ([lt] if isinstance(lt, int) else list(lt))
    return hit


def check_config_matches_weights(name: str, cfg: dict, tensors: dict, paths: dict) -> None:
    """adapter_config.json must describe the weights: the same rank, and target_modules that cover
    every adapted module (else PEFT skips those weights without a word)."""
    for (layer, module), mpath in sorted(paths.items()):
        a = tensors.get(LoraKey(layer, module, "A"))
        if a is None or a.ndim != 2:
            continue  # named by the checks that follow
        r = _pattern_value(cfg.get("rank_pattern") or {}, mpath, int(cfg.get("r", 8)))
        if int(a.shape[0]) != int(r):
            raise ESMError(f"Adapter {name!r}: adapter_config.json says rank r={r} for {mpath}, but its lora_A "
                           f"weight has rank {a.shape[0]} (shape {tuple(a.shape)}).",
                           fix="use the adapter_config.json saved with these weights (or correct 'r').")
        if not _targets(cfg, mpath, layer):
            raise ESMError(f"Adapter {name!r}: its weights adapt {mpath}, which adapter_config.json does not target "
                           f"(target_modules={cfg.get('target_modules')!r}); PEFT would skip those weights.",
                           fix="use the adapter_config.json saved with these weights (or correct target_modules).")


def _block_summary(pairs) -> str:
    by_mod: dict[str, list[int]] = {}
    for l, m in sorted(pairs):
        by_mod.setdefault(m, []).append(l)
    return ", ".join(f"{m} (blocks {','.join(map(str, ls[:6]))}{'...' if len(ls) > 6 else ''})"
                     for m, ls in by_mod.items())


def check_adapters_agree(adapters: list[AdapterWeights], *, same_rank: bool = True) -> None:
    """Refuse adapters that cannot be merged element by element, naming the adapter that differs from
    the others (the majority's module set; with no majority, the first two that differ)."""
    from collections import Counter

    sets = [frozenset(a.modules()) for a in adapters]
    counts = Counter(sets)
    if len(counts) > 1:
        (top, n_top), *rest = counts.most_common()
        majority = top if n_top > rest[0][1] else None
        if majority is not None:
            ad = next(a for a, m in zip(adapters, sets) if m != majority)
            mods, others = set(ad.modules()), [a.name for a, m in zip(adapters, sets) if m == majority]
            parts = []
            if majority - mods:
                parts.append("lacks " + _block_summary(majority - mods))
            if mods - majority:
                parts.append("adds " + _block_summary(mods - majority))
            raise ESMError(f"Adapter {ad.name!r} targets different modules than the other specialists "
                           f"({', '.join(map(repr, others))}): it {' and '.join(parts)}.",
                           fix=f"use a {ad.name!r} adapter trained with the same target_modules as the others.")
        # no majority (e.g. two adapters): say how the second differs from the first
        a, b = adapters[0], next(x for x, m in zip(adapters, sets) if m != sets[0])
        ma, mb = set(a.modules()), set(b.modules())
        parts = []
        if ma - mb:
            parts.append("lacks " + _block_summary(ma - mb))
        if mb - ma:
            parts.append("adds " + _block_summary(mb - ma))
        raise ESMError(f"Adapter {b.name!r} targets different modules than {a.name!r}: it {' and '.join(parts)}.",
                       fix="use specialists trained with the same target_modules.")
    ref = adapters[0]
    for ad in adapters[1:]:
        if same_rank:
            for k in sorted(ref.tensors):
                a, b = ref.tensors[k].shape, ad.tensors[k].shape
                if a != b:
                    what = ("ranks differ" if (k.ab == "A" and a[1] == b[1]) or (k.ab == "B" and a[0] == b[0])
                            else "shapes differ")
                    raise ESMError(f"Adapters {ref.name!r} and {ad.name!r}: {what} at {k} "
                                   f"({tuple(a)} vs {tuple(b)}).",
                                   fix="element-wise merging needs one LoRA rank and one base size for all "
                                       "specialists.")


def merged_config(template: AdapterWeights, base_path: str | None, folded: bool, rank: int | None = None) -> dict:
    """A merged adapter's config: the template's; scaling 1 when ``folded``; ``rank`` when the merge
    changed it (a delta-space merge: one rank everywhere, scaling 1)."""
    cfg = dict(template.config)
    cfg["inference_mode"] = True
    if base_path:
        cfg["base_model_name_or_path"] = base_path
    if rank is not None:
        cfg.update(r=int(rank), lora_alpha=int(rank), use_rslora=False, rank_pattern={}, alpha_pattern={})
    elif folded:
        # scalings live in B now: make PEFT's scaling 1 for every module
        cfg["lora_alpha"] = template.rank
        cfg["use_rslora"] = False
        cfg["alpha_pattern"] = dict(cfg.get("rank_pattern") or {})
    return cfg


def save_adapter_files(directory: Path, tensors: dict[LoraKey, torch.Tensor], template: AdapterWeights,
                       config: dict, dtype: torch.dtype | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors with the template's key names (stock PEFT format)."""
    from safetensors.torch import save_file

    dtype = dtype or next(iter(template.tensors.values())).dtype
    sd = {template.file_keys[k]: v.detach().to(dtype).contiguous().cpu() for k, v in tensors.items()}
    save_file(sd, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
