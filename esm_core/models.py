"""The one loader: a base model and K LoRA specialists on ONE copy of the base (docs/METHOD.md sections 0-1).

A specialist is the base with its adapter active; the base is the same PEFT model with adapters
disabled, so only one copy of the base weights is ever in memory. Every adapter is checked
against the others and against the base before anything is loaded. The model's active adapter,
hooks and grad flags are shared state: every operation holds ``sset.gate`` (esm_core/gate.py).

    sset, encoders = load_models(spec)        # the run's base, adapters and one encoder per modality
    with sset.use("molecule"):                # a specialist
        ...
    with sset.use(None):                      # the base
        ...
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from esm_core.adapters import AdapterWeights, LoraKey, _targets, check_adapters_agree, read_adapter
from esm_core.encoders import build_encoder
from esm_core.errors import ESMError
from esm_core.gate import ModelGate


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


def prepare_transformers():
    """Before the first model loads: the Hugging Face libraries offline (local directories only, never a
    hub; the loaders also pass local_files_only) and without progress bars or warnings."""
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ.setdefault(k, "1")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except Exception:  # pragma: no cover - logging knobs only
        pass


def source_of(base: str) -> tuple[str, dict]:
    """(folder, extra from_pretrained arguments) of a base: a model folder, or a ``.gguf`` file
    (dequantised by transformers; needs the ``gguf`` package)."""
    p = Path(base)
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ESMError(f"Base model file {base!r} does not exist.", fix="point 'base:' at a local .gguf file.")
        try:
            import gguf  # noqa: F401  (optional: only GGUF bases need it)
        except ImportError:
            raise ESMError(f"Base model {base!r} is a GGUF file, and the gguf package is not installed.",
                           fix="pip install gguf (or convert the base to safetensors).") from None
        return str(p.parent), {"gguf_file": p.name}
    return base, {}


def load_tokenizer(base: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    prepare_transformers()
    folder, extra = source_of(base)
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as e:
        raise ESMError(f"Cannot load a tokenizer from {base!r}: {str(e).splitlines()[0]}",
                       fix="point 'base:' at a local model directory that holds its tokenizer files.") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def plan_devices(weight_bytes: float, device: torch.device, *, free: list[int] | None = None,
                 headroom: float = 0.8) -> dict | None:
    """Where the base goes: None (one device, the model fits), or accelerate's max_memory per GPU
    (``device_map="auto"``) when it fits only across the visible GPUs; a clear error when it fits
    nowhere. ``free``: free bytes per GPU (default: asked from CUDA); ``headroom``: the share of free
    memory the weights may take (the rest is for activations)."""
    if device.type != "cuda":
        return None
    if free is None:
        free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
    usable = [int(f * headroom) for f in free]
    if weight_bytes <= usable[device.index or 0]:
        return None
    if weight_bytes <= sum(usable):
        return {i: u for i, u in enumerate(usable)}
    raise ESMError(f"The base needs {weight_bytes / 2**30:.1f} GiB for its weights, but the {len(free)} visible "
                   f"GPU(s) have {sum(free) / 2**30:.1f} GiB free ({headroom:.0%} of it usable).",
                   fix="use more or larger GPUs, a smaller dtype (dtype: bfloat16), or device: cpu.")


def load_base_model(base: str, *, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    prepare_transformers()
    folder, extra = source_of(base)
    p = Path(base)
    if p.is_dir():
        if not list(p.glob("*.safetensors")):
            raise ESMError(f"Base model {base!r} has no .safetensors weights (pickle checkpoints are never "
                           "loaded).", fix="convert the base to safetensors (or give a .gguf file).")
    elif not extra and (p.exists() or base.startswith((".", "/"))):
        raise ESMError(f"Base model {base!r} is not a directory.", fix="point 'base:' at a model directory.")
    try:
        cfg = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code, **extra)
        placement = plan_devices(weight_bytes(cfg, dtype), device)
        kw = {"device_map": "auto", "max_memory": placement} if placement else {}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                     use_safetensors=not extra, trust_remote_code=trust_remote_code,
                                                     **extra, **kw)
    except (OSError, ValueError) as e:
        msg = str(e).splitlines()[0]
        if "trust_remote_code" in str(e):
            raise ESMError(f"Base model {base!r} needs custom code: {msg}",
                           fix="set trust_remote_code: true only if you trust that directory.") from None
        raise ESMError(f"Cannot load base model {base!r}: {msg}",
                       fix="point 'base:' at a local transformers model directory or .gguf file.") from None
    if not placement:
        model.to(device)
    model.eval()
    for p_ in model.parameters():
        p_.requires_grad_(False)
    return model


def weight_bytes(config, dtype: torch.dtype) -> float:
    """Bytes of a decoder's weights from its config (blocks, embeddings and head), in dtype."""
    d, L = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    inter = getattr(config, "intermediate_size", 4 * d)
    d_kv = d // heads * kv
    params = L * (2 * d * d + 2 * d * d_kv + 3 * d * inter) + 2 * config.vocab_size * d
    return params * torch.finfo(dtype).bits / 8


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

    def attach_dir(self, path: str | Path, name: str | None = None) -> str:
        """Load a PEFT LoRA adapter directory (e.g. a merged model) next to the specialists, after
        checking that it adapts exactly the specialists' modules with their shapes; returns its name."""

        p = Path(path)
        name = name or p.name
        ad = read_adapter(p, name)
        check_adapters_agree([self.adapters[self.names[0]], ad])
        self.add_adapter(name, ad.tensors, ad.config)
        return name

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


# ------------------------------------------------------------------------------------ models
def load_models(spec) -> tuple["SpecialistSet", dict]:
    """The one loader: the base and the run's K adapters on ONE base copy (every adapter checked
    first), and one encoder per modality, with the run's device, dtype and trust_remote_code."""

    spec.validate()
    sset = SpecialistSet.load(spec.base, [(s.name, s.adapter) for s in spec.specialists],
                              modalities=[s.modality for s in spec.specialists], device=spec.method.device,
                              dtype=spec.method.dtype, trust_remote_code=spec.trust_remote_code)
    return sset, {m.name: build_encoder(m.encoder, sset) for m in spec.modalities}
