"""Everything a user can set for an ES-Merging run: typed, ranged, with a help string per field.

Two presets settle the points where the paper's text and the authors' reference code differ
(docs/METHOD.md, "Two readings, two presets"): ``reference`` (the default; the authors' public
code) and ``paper`` (the text). A preset only fills in defaults; every field stays settable, and
:func:`MethodConfig.resolved` records the preset, every value and which ones were overridden.

    >>> cfg = MethodConfig.from_preset("paper", tau_layer=0.7)
    >>> cfg.tau_elem, cfg.tau_layer, cfg.overridden
    (0.5, 0.7, ('tau_layer',))

Every field has a type and a range, checked by pydantic (strict: ``true`` is no number, ``"False"``
is no boolean, ``32.7`` is no count). A wrong value is one :class:`ESMError` naming the setting,
the value (cut to ~200 characters) and what is allowed. Each method field also declares the stage a
change invalidates (:data:`STAGES`): ``probes`` draws a new probe set (and so needs a new pass),
``pass`` needs a new forward pass over the probes, ``swd``
re-derives the SWD from stored hidden states, ``derive`` re-derives from stored signals; the
pipeline and the app read that one declaration (:func:`fields_of_stage`).

The run as a whole (base model, specialists, modalities with their encoders and probe data) is a
:class:`RunSpec`, read from YAML by :func:`load_run_spec` (aliases that expand past a sane size are
refused); relative paths are taken relative to the YAML file. Names of specialists and modalities
are identifiers (letters, digits, ``_``, ``-``): they become adapter names, tensor keys and folders.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import reprlib
from dataclasses import field, fields
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from .errors import ESMError

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's text (docs/METHOD.md, sections 1-4 and the left column of "Two readings").
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
    # The authors' reference code (the right column of "Two readings").
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
MODALITY_KINDS = ("smiles", "protein", "genes", "text")

# What a change of a method setting invalidates (the pipeline's and the app's caches read this).
STAGES = ("probes", "pass", "swd", "derive", "none")

_MAX_MESSAGE_VALUE = 200  # characters of a user's value quoted in an error message
MAX_CONFIG_BYTES = 4 * 2**20
MAX_YAML_NODES = 100_000  # values a config may expand to (YAML aliases included)

_STRICT = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=False)
_FLOAT_RE = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


def _number_text(v):
    # YAML 1.1 reads "1e-3" as text; accept a plainly written number for a float setting
    if isinstance(v, str) and _FLOAT_RE.match(v):
        return float(v)
    return v


def Int(lo: int, hi: int):
    return Annotated[int, Field(strict=True, ge=lo, le=hi)]


def Float(lo: float, hi: float):
    return Annotated[float, BeforeValidator(_number_text), Field(strict=True, ge=lo, le=hi, allow_inf_nan=False)]


Bool = Annotated[bool, Field(strict=True)]
Text = Annotated[str, Field(strict=True, max_length=100_000)]
# Names become PEFT adapter names, tensor keys and folder names: identifiers only.
NAME_RULE = "letters (Unicode letters too), digits, '_' and '-', at most 64 characters"
Name = Annotated[str, Field(strict=True, min_length=1, max_length=64, pattern=r"^\w[\w-]*$")]


def _f(default, help, stage: str = "none", **kw):
    assert stage in STAGES
    return field(default=default, metadata={"help": help, "stage": stage, **kw})


def short_repr(value: Any, limit: int = _MAX_MESSAGE_VALUE) -> str:
    """repr of a user's value for a message: bounded in depth and length, never the whole of a huge value."""
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 8, 8, 8, 8
    r.maxstring, r.maxother, r.maxlong = limit, limit, 60
    s = r.repr(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


@dataclass(config=_STRICT)
class MethodConfig:
    """Hyper-parameters of ES-Merging (docs/METHOD.md sections 1-4 and 6)."""

    preset: Literal["paper", "reference"] = _f(
        DEFAULT_PRESET, "Named preset that fills the defaults: 'reference' (the authors' public code) or "
        "'paper' (the paper's text).")
    # --- probes (section 1)
    layout: Literal["joint", "separate"] = _f(
        "joint", "Probe layout: 'joint' = probe i holds the i-th sample of every modality; 'separate' = one "
        "modality per probe.", "probes")
    probes_per_modality: Int(1, 100_000) = _f(
        330, "Samples drawn per modality (seeded). Joint layout: this many probes.", "probes")
    min_probes: Int(2, 100_000) = _f(
        8, "Refuse to run when fewer valid samples than this remain in a modality.", "probes")
    max_modality_tokens: Int(1, 1_000_000) = _f(
        128, "Truncate each modality block to at most this many tokens.", "probes")
    max_probe_tokens: Int(8, 10_000_000) = _f(
        4096, "Refuse probes longer than this many tokens (prefixes included).", "probes")
    batch_size: Int(1, 4096) = _f(
        16, "Probes per forward/backward batch (rounded up to a multiple of element_group).", "pass")
    # --- layer-wise signal (section 2)
    standardize: Bool = _f(
        True, "Standardise base and specialist points together per (specialist, modality, layer) before SWD "
        "(StandardScaler, as in the reference code).", "swd")
    n_projections: Int(1, 16_384) = _f(
        1024, "Random projections of the sliced Wasserstein distance (shared by all sets).", "swd")
    swd_p: Float(1.0, 32.0) = _f(2.0, "Order p of the sliced Wasserstein distance.", "swd")
    first_delta: Literal["diff", "raw"] = _f(
        "raw", "Increment at the first block: 'diff' = D_1 - D_0 (paper text), 'raw' = D_1 itself (reference "
        "code).", "derive")
    other_modality_weight: Float(-1000.0, 1000.0) = _f(
        1.0, "Layer score s = z(own modality) + w * z(each other modality).", "derive")
    tau_layer: Float(1e-6, 1e6) = _f(
        0.5, "Temperature of the softmax across specialists for the layer coefficient alpha (Eq. 2).", "derive")
    # --- element-wise signal (section 3)
    element_signal: Literal["frobenius", "mse"] = _f(
        "mse", "Hidden-state distance whose gradient scores elements: 'frobenius' = ||H_B - H_k||_F per sample "
        "(paper), 'mse' = mean squared difference per unit (reference code).", "pass")
    element_modalities: Literal["all", "own"] = _f(
        "own", "Modalities whose tokens enter the element signal: 'all' (paper) or the specialist's 'own' "
        "modality (reference code).", "pass")
    element_group: Int(1, 4096) = _f(
        2, "Probes per gradient unit: the absolute value is taken of each unit's gradient (1 = per-sample, "
        "paper; 2 = the reference code's mini-batch).", "pass")
    zscore_scope: Literal["layer", "tensor"] = _f(
        "tensor", "Z-score of element scores within each 'layer' (paper) or within each A/B 'tensor' "
        "(reference code).", "derive")
    tau_elem: Float(1e-6, 1e6) = _f(
        0.1, "Temperature of the softmax across specialists for the element coefficient beta (Eq. 3). The "
        "reference preset's 0.1 is the authors' code's default; the paper's text says 0.5.", "derive")
    # --- combination (section 4)
    mode: Literal["combined", "layer", "element"] = _f(
        "combined", "Coefficient used to merge: 'combined' alpha*beta (Eq. 4), 'layer' alpha only, 'element' "
        "beta only (Table 3 ablation).", "derive")
    # --- run
    seed: Int(0, 2**32 - 1) = _f(42, "Seed of every random choice: probe sampling, SWD projections.", "probes")
    device: Literal["auto", "cpu", "cuda", "mps"] = _f(
        "auto", "Torch device: auto picks cuda when present, else cpu.", "pass")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = _f(
        "auto", "Model dtype: auto = bfloat16 on GPU, float32 on CPU.", "pass")
    token_layers: Annotated[tuple[Int(-1, 10_000), ...], Field(min_length=1, max_length=64)] = _f(
        (-1,), "Blocks whose per-token hidden states are kept for the embedding maps (-1 = last block, "
        "0 = input embeddings).", "pass")
    overridden: tuple[str, ...] = field(default=(), metadata={"help": "Fields set away from the preset.",
                                                              "internal": True, "stage": "none"})

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, preset: str = DEFAULT_PRESET, **overrides) -> "MethodConfig":
        if preset not in PRESETS:
            raise ESMError(f"Unknown preset {short_repr(preset)}.", fix=f"use one of {sorted(PRESETS)}.")
        overrides = {k: v for k, v in overrides.items() if k != "overridden"}  # recorded, not set
        names = {f.name for f in fields(cls)}
        bad = sorted(str(k) for k in set(overrides) - names)
        if bad:
            raise ESMError(f"Unknown method setting(s) {short_repr(bad)}.",
                           fix=f"valid settings are {sorted(names - {'overridden'})}.")
        values = dict(PRESETS[preset])
        changed = []
        for k, v in overrides.items():
            if k in values and type(values[k]) is type(v) and values[k] == v:
                continue
            if k not in values and _same_default(cls, k, v):
                continue
            changed.append(k)
            values[k] = v
        with explained("the method settings"):
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


def _same_default(cls, name: str, v) -> bool:
    d = cls.__dataclass_fields__[name].default
    if name == "token_layers" and isinstance(v, (list, tuple)):
        return tuple(v) == d
    return type(v) is type(d) and v == d


def fields_of_stage(*stages: str) -> frozenset[str]:
    """Method settings whose change invalidates one of the given stages (see STAGES)."""
    bad = set(stages) - set(STAGES)
    if bad:
        raise ValueError(f"unknown stage(s) {sorted(bad)}")
    return frozenset(f.name for f in fields(MethodConfig) if f.metadata.get("stage") in stages)


def changed_fields(a: MethodConfig, b: MethodConfig) -> set[str]:
    return {f.name for f in fields(MethodConfig) if f.name not in ("preset", "overridden")
            and getattr(a, f.name) != getattr(b, f.name)}


def stage_of_change(a: MethodConfig, b: MethodConfig) -> str:
    """The earliest stage a change from a to b invalidates: 'probes', 'pass', 'swd', 'derive' or 'none'."""
    ch = changed_fields(a, b)
    for stage in STAGES[:-1]:
        if ch & fields_of_stage(stage):
            return stage
    return "none"


# ------------------------------------------------------------------ validation errors -> ESMError
def _allowed(cls, name: str) -> str:
    """What a field accepts, in words, from its pydantic declaration."""
    info = getattr(cls, "__pydantic_fields__", {}).get(name)
    if info is None:
        return "see the settings list (python -m esm_core settings)"
    return _describe_type(info.annotation, info.metadata)


def _describe_type(ann, metadata=()) -> str:
    import typing

    lo = hi = None
    for m in metadata or ():
        lo = getattr(m, "ge", lo) if getattr(m, "ge", None) is not None else lo
        hi = getattr(m, "le", hi) if getattr(m, "le", None) is not None else hi
    origin = typing.get_origin(ann)
    if origin is Annotated:
        base, *meta = typing.get_args(ann)
        inner = []
        for m in meta:
            inner.extend(getattr(m, "metadata", []) or [])
            inner.append(m)
        return _describe_type(base, list(metadata or ()) + inner)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(ann))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(ann) if a is not Ellipsis]
        return "a list of " + (_describe_type(args[0]).replace("a whole number", "whole numbers") if args else "values")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        return (_describe_type(args[0], metadata) if args else "nothing") + " (or nothing)"
    if ann is bool:
        return "true or false (an unquoted YAML boolean)"
    rng = ""
    if lo is not None and hi is not None:
        rng = f" from {lo:g} to {hi:g}" if isinstance(lo, float) or isinstance(hi, float) else f" from {lo} to {hi}"
    elif lo is not None:
        rng = f" >= {lo}"
    if ann is int:
        return "a whole number" + rng
    if ann is float:
        return "a finite number" + rng
    if ann is str:
        return "text"
    if ann is dict or origin is dict:
        return "a mapping"
    return getattr(ann, "__name__", str(ann))


def _loc_text(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or "[" in str(part) or str(part).startswith(("Literal", "tuple")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def _field_class(root, loc: tuple):
    """The dataclass declaring the last field of loc, walking nested specs from root."""
    cls = root
    for part in loc[:-1]:
        info = getattr(cls, "__pydantic_fields__", {}).get(part) if isinstance(part, str) else None
        if info is None:
            continue
        cls = _first_dataclass(info.annotation) or cls
    return cls


def _first_dataclass(t):
    import typing

    if dataclasses.is_dataclass(t):
        return t
    for a in typing.get_args(t) or ():
        d = _first_dataclass(a)
        if d is not None:
            return d
    return None


def validation_message(e: ValidationError, root, where: str) -> ESMError:
    """One ESMError for a pydantic error: the setting, the value (short) and what is allowed."""
    errs = e.errors(include_url=False)
    first = errs[0]
    loc = tuple(first.get("loc") or ())
    name = _loc_text(loc)
    typ = first.get("type", "")
    more = f" ({len(errs) - 1} more problem(s) after this one)" if len(errs) > 1 else ""
    if typ in ("unexpected_keyword_argument", "extra_forbidden"):
        cls = _field_class(root, loc)
        known = sorted(f.name for f in fields(cls) if not f.metadata.get("internal")) if dataclasses.is_dataclass(cls) else []
        same = [str(x["loc"][-1]) for x in errs if x.get("type") == typ and tuple(x["loc"])[:-1] == loc[:-1]]
        parent = _loc_text(loc[:-1])
        return ESMError(f"Unknown key(s) {short_repr(same)} in {parent or where}.", fix=f"allowed keys: {known}.")
    if typ == "missing_argument" or typ == "missing":
        return ESMError(f"{where}: {name!r} is missing{more}.", fix=f"set {name!r}.")
    field_name = next((p for p in reversed(loc) if isinstance(p, str) and not p.startswith(("function", "Literal"))
                       and "[" not in p), name)
    cls = _field_class(root, loc)
    allowed = _allowed(cls, field_name)
    f = getattr(cls, "__dataclass_fields__", {}).get(field_name)
    if typ.startswith("string_") and f is not None and f.metadata.get("rule"):
        allowed = f.metadata["rule"]
    value = short_repr(first.get("input"))
    verdict = "is out of range" if typ in ("greater_than_equal", "less_than_equal", "greater_than", "less_than") \
        else "is not allowed"
    return ESMError(f"Setting {name}={value} in {where} {verdict}: it must be {allowed}{more}.",
                    fix=f"set {name} to {allowed}.")


class explained:
    """Context manager: a pydantic ValidationError raised inside becomes one ESMError."""

    def __init__(self, where: str, root=None):
        self.where, self.root = where, root

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        if typ is not None and issubclass(typ, ValidationError):
            root = self.root or _root_of(e)
            raise validation_message(e, root, self.where) from None
        return False


def _root_of(e: ValidationError):
    return globals().get(e.title, MethodConfig)


# ---------------------------------------------------------------------------------------------
# The run: base, specialists, modalities.

Path_ = Annotated[str, Field(strict=True, min_length=1, max_length=4096)]


@dataclass(config=_STRICT)
class EncoderSpec:
    type: Name = _f("text", "Encoder type from the registry: 'text' (LLM tokenizer + input embeddings), "
                    "'soft_token' (feature function + MLP from safetensors), or a registered plug-in.", rule=NAME_RULE)
    path: Optional[Path_] = _f(None, "Directory of the encoder's weights and encoder_config.json (soft_token).")
    options: Optional[dict[str, Any]] = _f(None, "Extra keyword arguments for the encoder factory.")

    def __post_init__(self):
        if self.options is None:
            self.options = {}


@dataclass(config=_STRICT)
class DataSpec:
    path: Path_ = _f(..., "CSV/TSV file holding the raw samples of this modality.")
    column: Annotated[str, Field(strict=True, min_length=1, max_length=1000)] = _f(
        ..., "Column with the raw sample (SMILES, sequence, gene list).")


@dataclass(config=_STRICT)
class ModalitySpec:
    name: Name = _f(..., "Modality name (e.g. molecule, protein, cell): " + NAME_RULE + ".", rule=NAME_RULE)
    prefix: Annotated[str, Field(strict=True, max_length=1000)] = _f(
        "", "Text placed before the modality block in a probe, e.g. 'Molecule: '.")
    kind: Literal["smiles", "protein", "genes", "text"] = _f(
        "text", "Validator for raw inputs: smiles, protein, genes or text.")
    max_tokens: Optional[Int(1, 1_000_000)] = _f(
        None, "Cap on this modality's block length (tokens); the smaller of this and the method's "
        "max_modality_tokens applies.")
    encoder: EncoderSpec = field(default_factory=EncoderSpec,
                                 metadata={"help": "How raw inputs become token embeddings."})
    data: Optional[DataSpec] = field(default=None, metadata={"help": "Where probe samples come from."})


@dataclass(config=_STRICT)
class SpecialistSpec:
    name: Name = _f(..., "Specialist name (the PEFT adapter name): " + NAME_RULE + ".", rule=NAME_RULE)
    adapter: Path_ = _f(..., "Directory of a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors).")
    modality: Optional[Name] = _f(None, "The specialist's own modality (needed by element_modalities='own' "
                                  "and the reference layer score).", rule=NAME_RULE)


@dataclass(config=_STRICT)
class RunSpec:
    base: Path_ = _f(..., "Base causal LM: a local model directory.")
    specialists: list[SpecialistSpec] = field(default_factory=list, metadata={"help": "K >= 2 LoRA specialists."})
    modalities: list[ModalitySpec] = field(default_factory=list,
                                           metadata={"help": "Modalities of the probes, in probe order."})
    method: MethodConfig = field(default_factory=MethodConfig, metadata={"help": "ES-Merging settings."})
    trust_remote_code: Bool = _f(False, "Run custom model code from the base directory: only a YAML boolean "
                                 "true enables it (off by default).")
    source: Optional[str] = field(default=None, metadata={"help": "YAML file this spec was read from.",
                                                          "internal": True})

    def validate(self) -> None:
        if len(self.specialists) < 2:
            raise ESMError(f"ES-Merging needs at least 2 specialists, the run has {len(self.specialists)}.",
                           fix="list two or more adapters under 'specialists:'.")
        names = [s.name for s in self.specialists]
        if len(set(names)) != len(names):
            raise ESMError(f"Specialist names must be unique, got {short_repr(names)}.",
                           fix="give every specialist its own 'name:'.")
        if "base" in names:
            raise ESMError("A specialist is named 'base', the name of the base model.",
                           fix="rename that specialist.")
        mods = [m.name for m in self.modalities]
        if not mods:
            raise ESMError("The run names no modalities.", fix="list the probe modalities under 'modalities:'.")
        if len(set(mods)) != len(mods):
            raise ESMError(f"Modality names must be unique, got {short_repr(mods)}.", fix="rename the duplicates.")
        for s in self.specialists:
            if s.modality is not None and s.modality not in mods:
                raise ESMError(f"Specialist {s.name!r} names modality {s.modality!r}, which is not among "
                               f"the run's modalities {mods}.", fix="fix the specialist's 'modality:'.")
            if s.modality is None and (self.method.element_modalities == "own"):
                raise ESMError(f"Specialist {s.name!r} has no 'modality:', but element_modalities='own' "
                               "needs each specialist's own modality.",
                               fix="set 'modality:' for every specialist, or element_modalities: all.")

    def input_paths(self) -> list[tuple[str, str]]:
        """(path, role) of every file or directory this run reads: what an output must never touch."""
        out = [(self.base, "base model")]
        out += [(s.adapter, f"adapter of specialist {s.name!r}") for s in self.specialists]
        for m in self.modalities:
            if m.encoder.path:
                out.append((m.encoder.path, f"encoder of modality {m.name!r}"))
            if m.data is not None and m.data.path:
                out.append((m.data.path, f"probe data of modality {m.name!r}"))
        if self.source:
            out.append((self.source, "run config"))
        return out


def _mapping(data: Any, where: str) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ESMError(f"{where} must be a mapping, got {type(data).__name__} {short_repr(data)}.",
                       fix=f"write {where} as 'key: value' lines.")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ESMError(f"{where} has a key that is not text: {short_repr(bad[0])}.", fix="write keys as plain names.")
    return data


def run_spec_from_dict(d: dict, base_dir: Path | None = None, source: str | None = None) -> RunSpec:
    """Build and validate a RunSpec from plain data; relative paths resolve against base_dir."""
    d = dict(_mapping(d, "the run config"))
    base_dir = Path(base_dir) if base_dir else Path.cwd()

    def path(p):
        if not isinstance(p, str) or p == "":
            return p  # the schema names the mistake
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base_dir / q).resolve())

    method = dict(_mapping(d.pop("method", None), "'method:'"))
    preset = method.pop("preset", DEFAULT_PRESET)
    specs = []
    for i, s in enumerate(d.pop("specialists", None) or []):
        s = dict(_mapping(s, f"specialists[{i}]"))
        if "adapter" in s:
            s["adapter"] = path(s["adapter"])
        specs.append(s)
    mods = []
    for i, m in enumerate(d.pop("modalities", None) or []):
        m = dict(_mapping(m, f"modalities[{i}]"))
        enc = m.get("encoder")
        enc = {"type": enc} if isinstance(enc, str) else dict(_mapping(enc, f"modalities[{i}].encoder"))
        if isinstance(enc.get("path"), str):
            enc["path"] = path(enc["path"]) if enc["path"] else None
        m["encoder"] = enc
        if m.get("data") is not None:
            data = dict(_mapping(m["data"], f"modalities[{i}].data"))
            if "path" in data:
                data["path"] = path(data["path"])
            m["data"] = data
        mods.append(m)
    if isinstance(d.get("base"), str) and d["base"]:
        d["base"] = path(d["base"])
    cfg = MethodConfig.from_preset(preset, **method)
    d.pop("source", None)
    with explained("the run config", RunSpec):
        spec = RunSpec(**d, specialists=specs, modalities=mods, method=cfg, source=source)
    spec.validate()
    return spec


def _count_nodes(obj, limit: int) -> None:
    """Refuse a value that expands to more than ``limit`` nodes (YAML aliases share nodes: count each use)."""
    n = 0
    stack = [obj]
    while stack:
        o = stack.pop()
        n += 1
        if n > limit:
            raise ESMError(f"The config expands to more than {limit:,} values (YAML anchors and aliases "
                           "repeated inside each other?).", fix="write the config out plainly, without nested aliases.")
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)


def read_yaml(path: str | Path, what: str = "Config file") -> Any:
    """Parse a YAML file safely: size-capped, no Python objects, aliases that expand too far refused."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ESMError(f"{what} {str(p)!r} does not exist.", fix="pass the path of a YAML run config.")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ESMError(f"{what} {str(p)!r} is {p.stat().st_size // 2**20} MiB, over the "
                       f"{MAX_CONFIG_BYTES // 2**20} MiB a run config may have.", fix="pass a run config file.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ESMError(f"{what} {str(p)!r} is not UTF-8 text.", fix="save it as UTF-8.") from None
    return parse_yaml_text(text, f"{what} {str(p)!r}")


def parse_yaml_text(text: str, where: str) -> Any:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ESMError(f"{where} is not valid YAML: {short_repr(str(e).splitlines()[0])}",
                       fix="correct the YAML syntax at the line named.") from None
    except RecursionError:
        raise ESMError(f"{where} nests too deeply.", fix="write it out plainly.") from None
    _count_nodes(data, MAX_YAML_NODES)
    return data


def load_run_spec(path: str | Path, **method_overrides) -> RunSpec:
    """Read a YAML run config. ``method_overrides`` (e.g. seed from the CLI) win over the file."""
    p = Path(path)
    data = dict(_mapping(read_yaml(p), f"config file {str(p)!r}"))
    if method_overrides:
        method = dict(_mapping(data.get("method"), "'method:'"))
        method.update({k: v for k, v in method_overrides.items() if v is not None})
        data["method"] = method
    return run_spec_from_dict(data, base_dir=p.parent, source=str(p.resolve()))


def run_spec_to_dict(spec: RunSpec) -> dict:
    """Plain data for the manifest and for saving a session."""
    d = dataclasses.asdict(spec)
    d["method"] = spec.method.resolved()
    return d
