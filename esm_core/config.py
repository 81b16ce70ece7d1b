"""ES-Merging's method settings: typed, ranged, with help, presets and the stage each invalidates.

Two presets settle the points where the paper's text and the authors' reference code differ
(docs/METHOD.md section 5): ``reference`` (the default; the authors' public code) and ``paper``
(the text). A preset only fills in defaults; every field stays settable, and
:meth:`MethodConfig.resolved` records the preset, every value and which ones were overridden.

    >>> cfg = MethodConfig.from_preset("paper", tau_layer=0.7)
    >>> cfg.tau_elem, cfg.tau_layer, cfg.overridden
    (0.5, 0.7, ('tau_layer',))

Every field is checked by pydantic (strict types, ranges, choices; esm_core/schema.py) and
declares the stage a change of it invalidates (:data:`STAGES`): ``probes`` draws a new probe set,
``pass`` needs a new forward pass, ``swd`` re-derives the SWD from stored hidden states,
``derive`` re-derives from stored signals. That declaration is the one rule the pipeline
(``pipeline.required_stage``) and the app's caches (``pass_key``) read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import field, fields
from typing import Annotated, Any, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from esm_core.errors import ESMError
from esm_core.schema import _STRICT, Bool, Float, Int, explained, setting, short_repr

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's text (docs/METHOD.md section 5, the `paper` column).
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
        swd_projections="shared",
        element_last_block="block_output",
        probe_text="segments",
    ),
    # The authors' reference code (docs/METHOD.md section 5, the `reference` column).
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
        swd_projections="per_pair_stream",
        element_last_block="final_norm",
        probe_text="chat_template",
    ),
}
DEFAULT_PRESET = "reference"


# What a change of a method setting invalidates (the pipeline's and the app's caches read this).
STAGES = ("probes", "pass", "swd", "derive", "none")


def _f(default, help: str, stage: str = "none", **kw):
    """A method setting: its default, its help, and the stage a change of it invalidates (STAGES)."""
    assert stage in STAGES, stage
    return setting(default, help, stage=stage, **kw)


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
    probe_text: Literal["segments", "chat_template"] = _f(
        "chat_template", "How the text around the modality blocks is tokenised: 'segments' = BOS, then each "
        "modality's prefix with its block (the paper's P_i), 'chat_template' = the whole probe as the user turn of "
        "the tokenizer's chat template, tokenised as one string (the authors' code). In both, a text block is "
        "tokenised together with the text before it, spans from character offsets.", "probes")
    batch_size: Int(1, 4096) = _f(
        16, "Probes per forward/backward batch (rounded up to a multiple of element_group).", "pass")
    # --- layer-wise signal (section 2)
    standardize: Bool = _f(
        True, "Standardise base and specialist points together per (specialist, modality, layer) before SWD "
        "(StandardScaler, as in the reference code).", "swd")
    n_projections: Int(1, 16_384) = _f(
        1024, "Random projections of the sliced Wasserstein distance.", "swd")
    swd_projections: Literal["shared", "per_pair_stream"] = _f(
        "per_pair_stream", "Which projections each SWD uses: 'shared' = one set for every (specialist, modality, "
        "layer) (comparable values; the paper's text says nothing else), 'per_pair_stream' = a fresh set for each "
        "(specialist, modality, block) drawn in that loop order from one numpy stream seeded with `seed` (the "
        "authors' code).", "swd")
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
    element_last_block: Literal["block_output", "final_norm"] = _f(
        "final_norm", "Hidden state of the LAST block in the element signal: 'block_output' (as every other block, "
        "and as the layer signal) or 'final_norm' = after the model's final RMSNorm (the authors' code reads "
        "output_hidden_states[L], which transformers returns normalised).", "pass")
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
    # --- merging (section 0)
    merge_space: Literal["factors", "delta"] = _f(
        "factors", "Where every merge method combines: 'factors' = A and B separately (Eq. 1; a specialist's own "
        "update survives with about lambda^2, plus cross terms B_j A_k), 'delta' = the updates s*B*A, "
        "re-factorised by truncated SVD (esm_core/merging/space.py).", "none")
    delta_rank: Int(0, 1_000_000) = _f(
        0, "Rank of the re-factorised merge in merge_space=delta (0 = the sum of the specialists' ranks: exact "
        "for a linear combination).", "none")
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
        with explained("the method settings", cls):
            return cls(preset=preset, overridden=tuple(sorted(changed)), **values)

    @classmethod
    def from_dict(cls, d: dict, where: str = "the method settings") -> "MethodConfig":
        """A config from plain data, e.g. resolved() read back from a manifest, a session or a cache key."""
        if not isinstance(d, dict):
            raise ESMError(f"{where} must be a mapping of settings, got {type(d).__name__}.",
                           fix="write the settings as 'name: value' pairs.")
        d = {k: v for k, v in d.items() if k != "overridden"}
        return cls.from_preset(d.pop("preset", DEFAULT_PRESET), **d)

    def replace(self, **changes) -> "MethodConfig":
        """A copy with some fields changed; the preset stays, the change is recorded."""
        current = {f.name: getattr(self, f.name) for f in fields(self)
                   if f.name not in ("preset", "overridden")}
        current.update(changes)
        preset = changes.get("preset", self.preset)
        if "preset" in changes:  # switching preset: keep only explicit overrides
            keep = {k: current[k] for k in self.overridden if k not in changes}
            keep.update({k: v for k, v in changes.items() if k != "preset"})
            return type(self).from_preset(preset, **keep)
        current.pop("preset", None)
        return type(self).from_preset(preset, **current)

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


def fields_of_stage(*stages: str, config: type = MethodConfig) -> frozenset[str]:
    """Method settings whose change invalidates one of the given stages (see STAGES). ``config``: the
    config class (a subclass with more settings declares their stages the same way)."""
    bad = set(stages) - set(STAGES)
    if bad:
        raise ValueError(f"unknown stage(s) {sorted(bad)}")
    return frozenset(f.name for f in fields(config) if f.metadata.get("stage") in stages)


def changed_fields(a: MethodConfig, b: MethodConfig) -> set[str]:
    return {f.name for f in fields(type(b)) if f.name not in ("preset", "overridden")
            and getattr(a, f.name, None) != getattr(b, f.name)}


def stage_of_change(a: MethodConfig, b: MethodConfig) -> str:
    """The earliest stage a change from a to b invalidates: 'probes', 'pass', 'swd', 'derive' or 'none'."""
    ch = changed_fields(a, b)
    for stage in STAGES[:-1]:
        if ch & fields_of_stage(stage, config=type(b)):
            return stage
    return "none"


def pass_key(cfg: MethodConfig) -> str:
    """Fingerprint of the settings that need a new pass over the probes (an estimation cache key)."""
    return cfg.fingerprint(*sorted(fields_of_stage("probes", "pass", config=type(cfg))))
