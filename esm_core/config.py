"""Everything a user can set for an ES-Merging run, in dataclasses with a help string per field.

Two presets settle the points where the paper's text and the authors' reference code differ
(METHOD.md section 5): ``reference`` (the default; the code that produced the paper's tables) and
``paper`` (the text). A preset only fills in defaults; every field stays settable, and
:func:`MethodConfig.resolved` records the preset, every value and which ones were overridden.

    >>> cfg = MethodConfig.from_preset("paper", tau_layer=0.7)
    >>> cfg.tau_elem, cfg.tau_layer, cfg.overridden
    (0.5, 0.7, ('tau_layer',))

The run as a whole (base model, specialists, modalities with their encoders and probe data) is a
:class:`RunSpec`, read from YAML by :func:`load_run_spec`; relative paths are taken relative to the
YAML file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ESMError

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's text (METHOD.md sections 1-4, left column of the table in section 5).
    "paper": dict(
        layout="joint",
        probes_per_modality=110,
        standardize=False,
        n_projections=1024,
        swd_p=2.0,
        first_delta="diff",
        other_modality_weight=1.0,
        tau_layer=1.0,
        element_signal="frobenius",
        element_modalities="all",
        element_group=1,
        zscore_scope="layer",
        tau_elem=0.5,
    ),
    # The authors' reference code (right column of the table in METHOD.md section 5).
    "reference": dict(
        layout="joint",
        probes_per_modality=330,
        standardize=True,
        n_projections=1024,
        swd_p=2.0,
        first_delta="raw",
        other_modality_weight=1.0,
        tau_layer=0.5,
        element_signal="mse",
        element_modalities="own",
        element_group=2,
        zscore_scope="tensor",
        tau_elem=0.1,
    ),
}
DEFAULT_PRESET = "reference"

_CHOICES = {
    "preset": tuple(PRESETS),
    "layout": ("joint", "separate"),
    "first_delta": ("diff", "raw"),
    "element_signal": ("frobenius", "mse"),
    "element_modalities": ("all", "own"),
    "zscore_scope": ("layer", "tensor"),
    "mode": ("combined", "layer", "element"),
    "device": ("auto", "cpu", "cuda", "mps"),
    "dtype": ("auto", "float32", "bfloat16", "float16", "float64"),
}


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class MethodConfig:
    """Hyper-parameters of ES-Merging (METHOD.md sections 1-4 and 6)."""

    preset: str = _f(DEFAULT_PRESET, "Named preset that fills the defaults: 'reference' (the authors' "
                     "code, produced the paper's tables) or 'paper' (the paper's text).")
    # --- probes (section 1)
    layout: str = _f("joint", "Probe layout: 'joint' = probe i holds the i-th sample of every modality; "
                     "'separate' = one modality per probe.")
    probes_per_modality: int = _f(330, "Samples drawn per modality (seeded). Joint layout: this many probes.",
                                  min=1)
    min_probes: int = _f(8, "Refuse to run when fewer valid samples than this remain in a modality.", min=2)
    max_modality_tokens: int = _f(128, "Truncate each modality block to at most this many tokens.", min=1)
    max_probe_tokens: int = _f(4096, "Refuse probes longer than this many tokens (prefixes included).", min=8)
    batch_size: int = _f(16, "Probes per forward/backward batch (rounded up to a multiple of element_group).",
                         min=1)
    # --- layer-wise signal (section 2)
    standardize: bool = _f(True, "Standardise base and specialist points together per (specialist, "
                           "modality, layer) before SWD (StandardScaler, as in the reference code).")
    n_projections: int = _f(1024, "Random projections of the sliced Wasserstein distance (shared by all sets).",
                            min=1)
    swd_p: float = _f(2.0, "Order p of the sliced Wasserstein distance.", min=1.0)
    first_delta: str = _f("raw", "Increment at the first block: 'diff' = D_1 - D_0 (paper text), "
                          "'raw' = D_1 itself (reference code).")
    other_modality_weight: float = _f(1.0, "Layer score s = z(own modality) + w * z(each other modality).")
    tau_layer: float = _f(0.5, "Temperature of the softmax across specialists for the layer coefficient "
                          "alpha (Eq. 2).", min=1e-6)
    # --- element-wise signal (section 3)
    element_signal: str = _f("mse", "Hidden-state distance whose gradient scores elements: 'frobenius' "
                             "= ||H_B - H_k||_F per sample (paper), 'mse' = mean squared difference "
                             "per unit (reference code).")
    element_modalities: str = _f("own", "Modalities whose tokens enter the element signal: 'all' (paper) "
                                 "or the specialist's 'own' modality (reference code).")
    element_group: int = _f(2, "Probes per gradient unit: the absolute value is taken of each unit's "
                            "gradient (1 = per-sample, paper; 2 = the reference code's mini-batch).", min=1)
    zscore_scope: str = _f("tensor", "Z-score of element scores within each 'layer' (paper) or within "
                           "each A/B 'tensor' (reference code).")
    tau_elem: float = _f(0.1, "Temperature of the softmax across specialists for the element "
                         "coefficient beta (Eq. 3).", min=1e-6)
    # --- combination (section 4)
    mode: str = _f("combined", "Coefficient used to merge: 'combined' alpha*beta (Eq. 4), 'layer' "
                   "alpha only, 'element' beta only (Table 3 ablation).")
    # --- run
    seed: int = _f(42, "Seed of every random choice: probe sampling, SWD projections.")
    device: str = _f("auto", "Torch device: auto picks cuda when present, else cpu.")
    dtype: str = _f("auto", "Model dtype: auto = bfloat16 on GPU, float32 on CPU.")
    token_layers: tuple[int, ...] = _f((-1,), "Blocks whose per-token hidden states are kept for the "
                                       "embedding maps (-1 = last block, 0 = input embeddings).")
    overridden: tuple[str, ...] = field(default=(), metadata={"help": "Fields set away from the preset.",
                                                              "internal": True})

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, preset: str = DEFAULT_PRESET, **overrides) -> "MethodConfig":
        if preset not in PRESETS:
            raise ESMError(f"Unknown preset {preset!r}.", fix=f"use one of {sorted(PRESETS)}.")
        overrides = {k: v for k, v in overrides.items() if k != "overridden"}  # recorded, not set
        names = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise ESMError(f"Unknown method setting(s) {bad}.",
                           fix=f"valid settings are {sorted(names - {'overridden'})}.")
        values = dict(PRESETS[preset])
        changed = []
        for k, v in overrides.items():
            if k == "token_layers" and v is not None:
                v = tuple(int(x) for x in v)
            if k in values and values[k] == v:
                continue
            if k not in values and v == cls.__dataclass_fields__[k].default:
                continue
            changed.append(k)
            values[k] = v
        return cls(preset=preset, overridden=tuple(sorted(changed)), **values)

    def replace(self, **changes) -> "MethodConfig":
        """A copy with some fields changed; the preset stays, the change is recorded."""
        current = {f.name: getattr(self, f.name) for f in fields(self)
                   if f.name not in ("preset", "overridden")}
        current.update(changes)
        preset = changes.get("preset", self.preset)
        if "preset" in changes:  # switching preset: keep only explicit overrides
            keep = {k: current[k] for k in self.overridden if k not in changes}
            keep.update({k: v for k, v in changes.items() if k != "preset"})
            return MethodConfig.from_preset(preset, **keep)
        current.pop("preset", None)
        return MethodConfig.from_preset(preset, **current)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in _CHOICES and v not in _CHOICES[f.name]:
                raise ESMError(f"Setting {f.name}={v!r} is not allowed.",
                               fix=f"choose one of {list(_CHOICES[f.name])}.")
            lo = f.metadata.get("min")
            if lo is not None and not (isinstance(v, (int, float)) and v >= lo):
                raise ESMError(f"Setting {f.name}={v!r} is out of range.", fix=f"use a number >= {lo}.")

    # ------------------------------------------------------------------ records
    def resolved(self) -> dict[str, Any]:
        """Every value, as the manifest records it."""
        d = dataclasses.asdict(self)
        d["token_layers"] = list(self.token_layers)
        d["overridden"] = list(self.overridden)
        return d

    def fingerprint(self, *fields_: str) -> str:
        """Stable hash of the given fields (all when none), for cache keys."""
        d = self.resolved()
        if fields_:
            d = {k: d[k] for k in fields_}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @staticmethod
    def help(name: str) -> str:
        return MethodConfig.__dataclass_fields__[name].metadata["help"]


# ---------------------------------------------------------------------------------------------
# The run: base, specialists, modalities.


@dataclass
class EncoderSpec:
    type: str = _f("text", "Encoder type from the registry: 'text' (LLM tokenizer + input embeddings), "
                   "'soft_token' (feature function + MLP from safetensors), or a registered plug-in.")
    path: str | None = _f(None, "Directory of the encoder's weights and encoder_config.json (soft_token).")
    options: dict = _f(None, "Extra keyword arguments for the encoder factory.")

    def __post_init__(self):
        if self.options is None:
            self.options = {}


@dataclass
class DataSpec:
    path: str = _f("", "CSV/TSV file holding the raw samples of this modality.")
    column: str = _f("", "Column with the raw sample (SMILES, sequence, gene list).")


@dataclass
class ModalitySpec:
    name: str = _f("", "Modality name (e.g. molecule, protein, cell).")
    prefix: str = _f("", "Text placed before the modality block in a probe, e.g. 'Molecule: '.")
    kind: str = _f("text", "Validator for raw inputs: smiles, protein, genes or text.")
    max_tokens: int | None = _f(None, "Cap on this modality's block length (tokens); the smaller of this and "
                                "the method's max_modality_tokens applies.")
    encoder: EncoderSpec = field(default_factory=EncoderSpec, metadata={"help": "How raw inputs become token embeddings."})
    data: DataSpec | None = field(default=None, metadata={"help": "Where probe samples come from."})


@dataclass
class SpecialistSpec:
    name: str = _f("", "Specialist name (used as the PEFT adapter name).")
    adapter: str = _f("", "Directory of a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors).")
    modality: str | None = _f(None, "The specialist's own modality (needed by element_modalities='own' "
                              "and the reference layer score).")


@dataclass
class RunSpec:
    base: str = _f("", "Base causal LM: a local directory (or a name already in the local HF cache).")
    specialists: list[SpecialistSpec] = field(default_factory=list, metadata={"help": "K >= 2 LoRA specialists."})
    modalities: list[ModalitySpec] = field(default_factory=list, metadata={"help": "Modalities of the probes, in probe order."})
    method: MethodConfig = field(default_factory=MethodConfig, metadata={"help": "ES-Merging settings."})
    trust_remote_code: bool = _f(False, "Allow custom model code from the base directory (off by default).")
    source: str | None = field(default=None, metadata={"help": "YAML file this spec was read from.", "internal": True})

    def validate(self) -> None:
        if not self.base:
            raise ESMError("The run names no base model.", fix="set 'base:' to a local model directory.")
        if len(self.specialists) < 2:
            raise ESMError(f"ES-Merging needs at least 2 specialists, the run has {len(self.specialists)}.",
                           fix="list two or more adapters under 'specialists:'.")
        names = [s.name for s in self.specialists]
        if len(set(names)) != len(names) or any(not n for n in names):
            raise ESMError(f"Specialist names must be unique and non-empty, got {names}.",
                           fix="give every specialist its own 'name:'.")
        mods = [m.name for m in self.modalities]
        if not mods:
            raise ESMError("The run names no modalities.", fix="list the probe modalities under 'modalities:'.")
        if len(set(mods)) != len(mods):
            raise ESMError(f"Modality names must be unique, got {mods}.", fix="rename the duplicates.")
        for s in self.specialists:
            if s.modality is not None and s.modality not in mods:
                raise ESMError(f"Specialist {s.name!r} names modality {s.modality!r}, which is not among "
                               f"the run's modalities {mods}.", fix="fix the specialist's 'modality:'.")
            if s.modality is None and (self.method.element_modalities == "own"):
                raise ESMError(f"Specialist {s.name!r} has no 'modality:', but element_modalities='own' "
                               "needs each specialist's own modality.",
                               fix="set 'modality:' for every specialist, or element_modalities: all.")


def _build(cls, data: Any, where: str):
    """Dataclass from a YAML mapping, refusing unknown keys with a message naming them."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ESMError(f"{where} must be a mapping, got {type(data).__name__}.")
    known = {f.name for f in fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ESMError(f"Unknown key(s) {unknown} in {where}.", fix=f"allowed keys: {sorted(known)}.")
    return data


def run_spec_from_dict(d: dict, base_dir: Path | None = None, source: str | None = None) -> RunSpec:
    """Build and validate a RunSpec from plain data; relative paths resolve against base_dir."""
    d = _build(RunSpec, d, "the run config")
    base_dir = Path(base_dir) if base_dir else Path.cwd()

    def path(p: str | None) -> str | None:
        if p in (None, ""):
            return p
        q = Path(str(p)).expanduser()
        return str(q if q.is_absolute() else (base_dir / q).resolve())

    def base_path(p: str) -> str:
        # a hub-style name ("org/model") that is not a local path stays as given
        q = Path(str(p)).expanduser()
        cand = q if q.is_absolute() else base_dir / q
        return str(cand.resolve()) if cand.exists() or q.is_absolute() or str(p).startswith(".") else str(p)

    specs = []
    for i, s in enumerate(d.get("specialists") or []):
        s = _build(SpecialistSpec, s, f"specialists[{i}]")
        specs.append(SpecialistSpec(name=str(s.get("name", "")), adapter=path(s.get("adapter", "")),
                                    modality=s.get("modality")))
    mods = []
    for i, m in enumerate(d.get("modalities") or []):
        m = _build(ModalitySpec, m, f"modalities[{i}]")
        enc = m.get("encoder") or {"type": "text"}
        if isinstance(enc, str):
            enc = {"type": enc}
        enc = _build(EncoderSpec, enc, f"modalities[{i}].encoder")
        data = m.get("data")
        if data is not None:
            data = _build(DataSpec, data, f"modalities[{i}].data")
            data = DataSpec(path=path(data.get("path", "")), column=str(data.get("column", "")))
        mods.append(ModalitySpec(name=str(m.get("name", "")), prefix=str(m.get("prefix", "")),
                                 kind=str(m.get("kind", "text")),
                                 max_tokens=int(m["max_tokens"]) if m.get("max_tokens") is not None else None,
                                 encoder=EncoderSpec(type=str(enc.get("type", "text")), path=path(enc.get("path")),
                                                     options=dict(enc.get("options") or {})),
                                 data=data))
    method = d.get("method") or {}
    if not isinstance(method, dict):
        raise ESMError("'method:' must be a mapping of settings.")
    method = dict(method)
    preset = method.pop("preset", DEFAULT_PRESET)
    spec = RunSpec(base=base_path(d.get("base", "")), specialists=specs, modalities=mods,
                   method=MethodConfig.from_preset(preset, **method),
                   trust_remote_code=bool(d.get("trust_remote_code", False)), source=source)
    spec.validate()
    return spec


def load_run_spec(path: str | Path, **method_overrides) -> RunSpec:
    """Read a YAML run config. ``method_overrides`` (e.g. seed from the CLI) win over the file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ESMError(f"Config file {str(p)!r} does not exist.", fix="pass the path of a YAML run config.")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ESMError(f"Config file {str(p)!r} is not valid YAML: {e}".splitlines()[0]) from None
    data = dict(data or {})
    if method_overrides:
        method = dict(data.get("method") or {})
        method.update({k: v for k, v in method_overrides.items() if v is not None})
        data["method"] = method
    return run_spec_from_dict(data, base_dir=p.parent, source=str(p.resolve()))


def run_spec_to_dict(spec: RunSpec) -> dict:
    """Plain data for the manifest and for saving a session."""
    d = dataclasses.asdict(spec)
    d["method"] = spec.method.resolved()
    return d
