"""The base model and K LoRA specialists on ONE copy of the base (METHOD.md section 0-1).

A specialist is the base with its PEFT LoRA adapter active; the base is the same PEFT model with
adapters disabled, so only one copy of the base weights is ever in memory. Adapters are read and
written by (layer, module, A|B), and checked for compatibility before anything is loaded into the
model: a refusal names the adapter, the module and the shapes.

    sset = SpecialistSet.load("assets/zoo/base", {"molecule": ".../molecule", "protein": ...})
    with sset.use("molecule"):   # specialist
        ...
    with sset.use(None):         # base
        ...
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .errors import ESMError
from .gate import ModelGate

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


def check_adapter_fits_base(ad: AdapterWeights, model: nn.Module, num_layers: int) -> None:
    """Every LoRA factor must sit on an existing linear module of the base with matching shapes."""
    modules = dict(model.named_modules())
    for (layer, module), path in sorted(ad.module_paths.items()):
        if layer >= num_layers:
            raise ESMError(f"Adapter {ad.name!r} adapts block {layer}, but the base has only {num_layers} "
                           "blocks: it was trained on a different base.",
                           fix="pick adapters trained on this base model.")
        mod = modules.get(path)
        if mod is None:
            raise ESMError(f"Adapter {ad.name!r} adapts module {path!r}, which the base model does not have: "
                           "it was trained on a different architecture.",
                           fix="pick adapters trained on this base model.")
        if isinstance(mod, nn.Embedding):
            raise ESMError(f"Adapter {ad.name!r} adapts the embedding {path!r}; adapted embeddings would change "
                           "the probe inputs.", fix="use adapters on linear layers only.")
        if not isinstance(mod, nn.Linear):
            raise ESMError(f"Adapter {ad.name!r} adapts {path!r}, a {type(mod).__name__}; only linear "
                           "layers are supported.")
        a = ad.tensors[LoraKey(layer, module, "A")]
        b = ad.tensors[LoraKey(layer, module, "B")]
        if a.shape[1] != mod.in_features or b.shape[0] != mod.out_features or a.shape[0] != b.shape[1]:
            raise ESMError(f"Adapter {ad.name!r}: shapes at layers.{layer}.{module} do not fit the base "
                           f"(lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}; base linear "
                           f"{mod.in_features} -> {mod.out_features}). It was trained on a base of another "
                           "size.", fix="pick adapters trained on this base model.")
    held = set(ad.module_paths.values())
    blocks = find_decoder_layers(model)
    prefix = next((n for n, m in model.named_modules() if m is blocks), "model.layers")
    missing = []
    for name, mod in modules.items():
        if not isinstance(mod, nn.Linear) or not name.startswith(prefix + "."):
            continue
        layer = int(name[len(prefix) + 1:].split(".", 1)[0])
        if name not in held and _targets(ad.config, name, layer) and ad.config.get("target_modules") != "all-linear":
            missing.append(name)
    if missing:
        raise ESMError(f"Adapter {ad.name!r}: adapter_config.json targets {len(missing)} module(s) that its weights "
                       f"lack (e.g. {missing[0]}); PEFT would give them fresh random factors.",
                       fix="use the adapter_config.json saved with these weights (or correct target_modules).")


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks (LLaMA/Mistral/Qwen: model.layers; GPT-2: transformer.h)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks", "block"):
            if n is None or len(mod) == n:
                return mod
    raise ESMError(f"Cannot find the transformer blocks of {type(model).__name__}.",
                   fix="use a decoder-only causal LM (LLaMA-style) as the base.")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ESMError("Setting device='cuda' but no CUDA GPU is visible.", fix="use device: auto or cpu.")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
            "float64": torch.float64}[dtype]


def _quiet_transformers():
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except Exception:  # pragma: no cover - logging knobs only
        pass


def load_tokenizer(base: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(base, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ESMError(f"Cannot load a tokenizer from {base!r}: {str(e).splitlines()[0]}",
                       fix="point 'base:' at a local model directory that holds its tokenizer files.") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_base_model(base: str, *, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    p = Path(base)
    if p.is_dir():
        if not list(p.glob("*.safetensors")):
            raise ESMError(f"Base model {base!r} has no .safetensors weights (pickle checkpoints are never "
                           "loaded).", fix="convert the base to safetensors.")
    elif p.exists() or base.startswith((".", "/")):
        raise ESMError(f"Base model {base!r} is not a directory.", fix="point 'base:' at a model directory.")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, local_files_only=True,
                                                     use_safetensors=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        msg = str(e).splitlines()[0]
        if "trust_remote_code" in str(e):
            raise ESMError(f"Base model {base!r} needs custom code: {msg}",
                           fix="set trust_remote_code: true only if you trust that directory.") from None
        raise ESMError(f"Cannot load base model {base!r}: {msg}",
                       fix="point 'base:' at a local transformers model directory.") from None
    model.to(device)
    model.eval()
    for p_ in model.parameters():
        p_.requires_grad_(False)
    return model


class SpecialistSet:
    """One base model carrying K LoRA adapters (PEFT multi-adapter)."""

    def __init__(self, model, tokenizer, adapters: list[AdapterWeights], modalities: list[str | None],
                 base_path: str, device: torch.device, dtype: torch.dtype):
        self.model = model  # peft.PeftModel
        self.tokenizer = tokenizer
        self.adapters = {a.name: a for a in adapters}
        self.names = [a.name for a in adapters]
        self.modalities = list(modalities)
        self.base_path = base_path
        self.device = device
        self.dtype = dtype
        self.lm = model.get_base_model()
        self.blocks = find_decoder_layers(self.lm)
        self.num_layers = len(self.blocks)
        self.hidden_size = int(self.lm.config.hidden_size)
        self.lora_keys: list[LoraKey] = sorted(adapters[0].tensors)
        self._extra: dict[str, None] = {}  # extra adapters (merged models), least recently used first
        # the model's active adapter, hooks and grad flags are shared: one operation at a time
        self.gate = ModelGate()

    def exclusive(self, label: str = "model work"):
        """Hold the model for a whole operation (reentrant; fair between threads): see esm_core.gate."""
        return self.gate.hold(label)

    # ---------------------------------------------------------------- construction
    @classmethod
    def load(cls, base: str, adapters: dict[str, str] | list[tuple[str, str]], *,
             modalities: list[str | None] | None = None, device: str = "auto", dtype: str = "auto",
             trust_remote_code: bool = False, same_rank: bool = True) -> "SpecialistSet":
        items = list(adapters.items()) if isinstance(adapters, dict) else list(adapters)
        if len(items) < 2:
            raise ESMError(f"ES-Merging needs at least 2 specialists, got {len(items)}.",
                           fix="add another adapter.")
        weights = [read_adapter(path, name) for name, path in items]  # cheap checks before the base loads
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        tok = load_tokenizer(base, trust_remote_code)
        lm = load_base_model(base, device=dev, dtype=dt, trust_remote_code=trust_remote_code)
        return cls.from_model(lm, tok, items, modalities=modalities, base_path=base, same_rank=same_rank,
                              weights=weights)

    @classmethod
    def from_model(cls, lm, tokenizer, adapters: list[tuple[str, str]], *, modalities=None, base_path: str = "",
                   same_rank: bool = True, weights: list[AdapterWeights] | None = None) -> "SpecialistSet":
        """Wrap an already-built base model (e.g. random weights made on a GPU for a benchmark)."""
        from peft import PeftModel

        items = list(adapters)
        weights = weights or [read_adapter(path, name) for name, path in items]
        n_layers = len(find_decoder_layers(lm))
        for w in weights:  # a wrong base is the most useful diagnosis, so it comes first
            check_adapter_fits_base(w, lm, n_layers)
        check_adapters_agree(weights, same_rank=same_rank)
        first_name, first_path = items[0]
        model = PeftModel.from_pretrained(lm, first_path, adapter_name=first_name, is_trainable=False)
        for name, path in items[1:]:
            model.load_adapter(path, adapter_name=name, is_trainable=False)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        mods = list(modalities) if modalities is not None else [None] * len(items)
        p0 = next(lm.parameters())
        return cls(model, tokenizer, weights, mods, base_path, p0.device, p0.dtype)

    # ---------------------------------------------------------------- switching
    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        """Run the base (name=None) or one adapter (specialist or an added merged adapter)."""
        with self.gate.hold("model work"):
            if name is None:
                with self.model.disable_adapter():
                    yield
                return
            if name not in self.names and name not in self._extra:
                raise ESMError(f"No adapter named {name!r} is loaded.", fix=f"use one of {self.names}.")
            if name in self._extra:
                self._extra[name] = self._extra.pop(name)  # most recently used last
            self.model.base_model.set_adapter(name, inference_mode=True)
            yield

    def lora_layer(self, name: str, key: LoraKey) -> tuple[nn.Linear, nn.Linear, float]:
        """The (lora_A, lora_B, scaling) modules of adapter `name` at (layer, module)."""
        mod = self.blocks[key.layer].get_submodule(key.module)
        return mod.lora_A[name], mod.lora_B[name], float(mod.scaling[name])

    def scaling(self, name: str, layer: int, module: str) -> float:
        mod = self.blocks[layer].get_submodule(module)
        return float(mod.scaling[name])

    def modality_of(self, name: str) -> str | None:
        return self.modalities[self.names.index(name)]

    def parameters_of(self, name: str) -> dict[LoraKey, nn.Parameter]:
        """The live LoRA parameters of one adapter, by canonical key."""
        out = {}
        for k in self.lora_keys:
            a, b, _ = self.lora_layer(name, k)
            out[k] = (a if k.ab == "A" else b).weight
        return out

    # ---------------------------------------------------------------- extra adapters (merged models)
    def add_adapter(self, name: str, tensors: dict[LoraKey, torch.Tensor], config: dict) -> None:
        """Load a merged adapter next to the specialists, on the same base copy."""
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict

        if name in self.names:
            raise ESMError(f"Adapter name {name!r} is taken by a specialist.", fix="choose another name.")
        with self.gate.hold("loading an adapter"):
            if name in self._extra:
                self.remove_adapter(name)
            allowed = set(LoraConfig.__dataclass_fields__)
            cfg = LoraConfig(**{k: v for k, v in config.items() if k in allowed and k not in ("peft_type",)})
            cfg.inference_mode = True
            self.model.add_adapter(name, cfg)
            template = self.adapters[self.names[0]]
            sd = {template.file_keys[k]: t.to(self.dtype) for k, t in tensors.items()}
            set_peft_model_state_dict(self.model, sd, adapter_name=name)
            for p in self.model.parameters():
                p.requires_grad_(False)
            self._extra[name] = None

    def remove_adapter(self, name: str) -> None:
        with self.gate.hold("removing an adapter"):
            if name in self._extra:
                self.model.base_model.set_adapter(self.names[0], inference_mode=True)
                self.model.delete_adapter(name)
                self._extra.pop(name, None)

    def ensure_adapter(self, name: str, tensors, config: dict, *, keep: int = 16) -> str:
        """Load adapter ``name`` unless it is loaded; evict the least recently used extra adapters beyond
        ``keep``. ``tensors``: the factors, or a function returning them (called only when loading).
        Hold ``exclusive`` around this and the work that uses the adapter, so no one evicts it between."""
        with self.gate.hold("loading an adapter"):
            if name in self._extra:
                self._extra[name] = self._extra.pop(name)
                return name
            while len(self._extra) >= max(1, keep):
                self.remove_adapter(next(iter(self._extra)))
            self.add_adapter(name, tensors() if callable(tensors) else tensors, config)
            return name

    @property
    def extra_adapters(self) -> list[str]:
        return sorted(self._extra)

    def describe(self) -> list[dict]:
        """One row per adapter for tables: rank, alpha, targets, parameters."""
        rows = []
        for n in self.names:
            a = self.adapters[n]
            rows.append(dict(name=n, modality=self.modality_of(n), rank=a.rank, alpha=a.alpha,
                             scaling=a.scaling_for(*a.modules()[0]),
                             target_modules=sorted({m.rsplit('.', 1)[-1] for _, m in a.modules()}),
                             parameters=a.num_parameters(), path=a.path))
        return rows
