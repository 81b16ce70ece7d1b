"""A run: the base, the K specialists, the modalities (encoder, probe data) and the method settings.

Read from YAML by :func:`load_run_spec` (relative paths are relative to the YAML file), from plain
data by :func:`run_spec_from_dict` (the app's forms, session files), written back by
:func:`run_spec_to_dict` (manifests). Names of specialists and modalities are identifiers
(letters, digits, ``_``, ``-``): they become adapter names, tensor keys and folder names.
``trust_remote_code`` is on only for a YAML boolean ``true``. :meth:`RunSpec.input_paths` lists
every path the run reads, which an output must never touch (esm_core/io.py).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import Field
from pydantic.dataclasses import dataclass

from esm_core.config import DEFAULT_PRESET, MethodConfig
from esm_core.errors import ESMError
from esm_core.schema import _STRICT, NAME_RULE, Bool, Int, Name, _mapping, explained, read_yaml, setting, short_repr

MODALITY_KINDS = ("smiles", "protein", "genes", "text")


# ---------------------------------------------------------------------------------------------
# The run: base, specialists, modalities.

Path_ = Annotated[str, Field(strict=True, min_length=1, max_length=4096)]
ENCODER_FILE_OPTIONS = ("esm", "projector", "file")  # encoder options that name files (esm_core/bio_encoders.py)


@dataclass(config=_STRICT)
class EncoderSpec:
    type: Name = setting("text", "Encoder type from the registry: 'text' (LLM tokenizer + input embeddings), "
                    "'soft_token' (feature function + MLP from safetensors), 'esm2' (a local ESM2 model + projector), "
                    "'precomputed' (soft tokens by sample id from safetensors), or a registered plug-in.", rule=NAME_RULE)
    path: Optional[Path_] = setting(None, "Directory of the encoder's files (soft_token, esm2, precomputed); it "
                                    "travels with a merged model.")
    options: Optional[dict[str, Any]] = setting(None, "Extra keyword arguments for the encoder factory.")

    def __post_init__(self):
        if self.options is None:
            self.options = {}


@dataclass(config=_STRICT)
class DataSpec:
    path: Path_ = setting(..., "CSV/TSV file holding the raw samples of this modality.")
    column: Annotated[str, Field(strict=True, min_length=1, max_length=1000)] = setting(
        ..., "Column with the raw sample (SMILES, sequence, gene list).")


@dataclass(config=_STRICT)
class ModalitySpec:
    name: Name = setting(..., "Modality name (e.g. molecule, protein, cell): " + NAME_RULE + ".", rule=NAME_RULE)
    prefix: Annotated[str, Field(strict=True, max_length=1000)] = setting(
        "", "Text placed before the modality block in a probe, e.g. 'Molecule: '.")
    kind: Literal["smiles", "protein", "genes", "text"] = setting(
        "text", "Validator for raw inputs: smiles, protein, genes or text.")
    max_tokens: Optional[Int(1, 1_000_000)] = setting(
        None, "Cap on this modality's block length (tokens); the smaller of this and the method's "
        "max_modality_tokens applies.")
    encoder: EncoderSpec = field(default_factory=EncoderSpec,
                                 metadata={"help": "How raw inputs become token embeddings."})
    data: Optional[DataSpec] = field(default=None, metadata={"help": "Where probe samples come from."})


@dataclass(config=_STRICT)
class SpecialistSpec:
    name: Name = setting(..., "Specialist name (the PEFT adapter name): " + NAME_RULE + ".", rule=NAME_RULE)
    adapter: Path_ = setting(..., "Directory of a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors).")
    modality: Optional[Name] = setting(None, "The specialist's own modality (needed by element_modalities='own' "
                                  "and the reference layer score).", rule=NAME_RULE)


@dataclass(config=_STRICT)
class RunSpec:
    base: Path_ = setting(..., "Base causal LM: a local model directory.")
    specialists: list[SpecialistSpec] = field(default_factory=list, metadata={"help": "K >= 2 LoRA specialists."})
    modalities: list[ModalitySpec] = field(default_factory=list,
                                           metadata={"help": "Modalities of the probes, in probe order."})
    method: MethodConfig = field(default_factory=MethodConfig, metadata={"help": "ES-Merging settings."})
    trust_remote_code: Bool = setting(False, "Run custom model code from the base directory: only a YAML boolean "
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

    @staticmethod
    def encoder_files(m: "ModalitySpec") -> list[tuple[str, str]]:
        """(path, role) of the files an encoder's options name (esm2's model and projector, precomputed's
        token file); relative ones are relative to the encoder's path."""
        out = []
        for key in ENCODER_FILE_OPTIONS:
            v = (m.encoder.options or {}).get(key)
            if isinstance(v, str) and v:
                q = Path(v).expanduser()
                if not q.is_absolute() and m.encoder.path:
                    q = Path(m.encoder.path) / q
                out.append((str(q), f"encoder {key} of modality {m.name!r}"))
        return out

    def input_paths(self) -> list[tuple[str, str]]:
        """(path, role) of every file or directory this run reads: what an output must never touch."""
        out = [(self.base, "base model")]
        out += [(s.adapter, f"adapter of specialist {s.name!r}") for s in self.specialists]
        for m in self.modalities:
            if m.encoder.path:
                out.append((m.encoder.path, f"encoder of modality {m.name!r}"))
            out += self.encoder_files(m)
            if m.data is not None and m.data.path:
                out.append((m.data.path, f"probe data of modality {m.name!r}"))
        if self.source:
            out.append((self.source, "run config"))
        return out


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


_PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]*>")


def _refuse_placeholders(data, p: Path, where: str = "") -> None:
    """A template's ``<MODELS>``-style placeholders left in: name the first one and where it is."""
    if isinstance(data, dict):
        for k, v in data.items():
            _refuse_placeholders(v, p, f"{where}.{k}" if where else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            _refuse_placeholders(v, p, f"{where}[{i}]")
    elif isinstance(data, str) and (m := _PLACEHOLDER.search(data)):
        raise ESMError(f"Config file {str(p)!r}: {where} still holds the template placeholder {m.group(0)} "
                       f"({data[:120]!r}).", fix=f"replace {m.group(0)} with the folder on this machine.")


def load_run_spec(path: str | Path, **method_overrides) -> RunSpec:
    """Read a YAML run config. ``method_overrides`` (e.g. seed from the CLI) win over the file."""
    p = Path(path)
    data = dict(_mapping(read_yaml(p), f"config file {str(p)!r}"))
    _refuse_placeholders(data, p)
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
