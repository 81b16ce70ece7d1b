"""What a set of specialists is made of, and whether they can be merged: tables and a verdict.

The Specialists page of the workbench shows these; nothing here needs Streamlit or loads model
weights. The verdict runs the engine's own checks (``specialists.read_adapter``,
``check_adapters_agree``, ``check_adapter_fits_base``) one by one and records each outcome instead
of stopping at the first refusal, so a user sees every problem at once:

    v = check_specialists([("molecule", "zoo/molecule"), ("protein", "zoo/protein")], base="zoo/base")
    v.ok, [c.name for c in v.checks if not c.ok]
    rows = adapter_rows(list(v.adapters.values()))                  # rank, alpha, scaling, ...
    blocks, modules, norms = delta_norm_matrix(v.adapters["molecule"])   # ||scaling * B @ A||_F

"Fits the base" is checked against the base's module tree built on the meta device from its
config.json, so an 8B base costs no memory and no weight reading. Different ``lora_alpha`` across
specialists is allowed: the merge folds each adapter's scaling into its B factor (see
``merge.prepare_tensors``), and the verdict says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from esm_core.adapters import AdapterWeights, check_adapters_agree, read_adapter
from esm_core.encoders import SoftTokenEncoder, encoder_types
from esm_core.errors import ESMError
from esm_core.models import check_adapter_fits_base, find_decoder_layers, prepare_transformers, source_of


@dataclass
class Check:
    """One compatibility check: its outcome and, when it failed, the cause and the fix."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None


@dataclass
class Verdict:
    checks: list[Check] = field(default_factory=list)
    adapters: dict[str, AdapterWeights] = field(default_factory=dict)
    folded: bool = False  # scalings differ: folded into B when merging
    num_layers: int | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def summary(self) -> str:
        n = len(self.adapters)
        if not self.ok:
            return (f"Not mergeable: {len(self.failures)} of {len(self.checks)} checks failed "
                    f"({', '.join(c.name for c in self.failures)}).")
        s = f"Compatible: the {n} specialists can be merged element by element."
        if self.folded:
            s += (" Their LoRA scalings (alpha/r) differ, which is allowed: each adapter's scaling is folded "
                  "into its B factor before merging and the merged adapter has scaling 1.")
        return s

    def table(self) -> list[dict]:
        return [dict(check=c.name, result="pass" if c.ok else "FAIL", detail=c.detail, fix=c.fix or "")
                for c in self.checks]


def _run(checks: list[Check], name: str, fn, ok_detail: str) -> bool:
    try:
        fn()
    except ESMError as e:
        checks.append(Check(name, False, e.reason, e.fix))
        return False
    checks.append(Check(name, True, ok_detail))
    return True


# ------------------------------------------------------------------------------------ base
def base_skeleton(base: str, trust_remote_code: bool = False):
    """The base model's module tree on the meta device (no weights read), from its config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    prepare_transformers()
    folder, extra = source_of(base)
    p = Path(base)
    if not extra and not p.is_dir():
        raise ESMError(f"Base model {base!r} is not a directory.",
                       fix="point the base at a local model directory (or a .gguf file).")
    if not extra and not list(p.glob("*.safetensors")):
        raise ESMError(f"Base model {base!r} has no .safetensors weights (pickle checkpoints are never loaded).",
                       fix="convert the base to safetensors.")
    try:
        cfg = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code, **extra)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "trust_remote_code" in str(e):
            raise ESMError(f"Base model {base!r} needs custom code: {msg}",
                           fix="tick 'trust remote code' only if you trust that directory.") from None
        raise ESMError(f"Cannot read base model {base!r}: {msg}",
                       fix="point the base at a local transformers causal-LM directory (config.json, "
                           "tokenizer, safetensors).") from None
    return model


def scalings_differ(adapters: list[AdapterWeights]) -> tuple[bool, dict[str, float]]:
    """Whether merging folds the scalings into B (same rule as merge.prepare_tensors), and each
    adapter's scaling at its first module."""
    modules = adapters[0].modules()
    sc = {a.name: {m: a.scaling_for(*m) for m in modules} for a in adapters}
    ref = sc[adapters[0].name]
    differ = any(abs(sc[a.name][m] - ref[m]) > 1e-12 * max(1.0, abs(ref[m])) for a in adapters for m in modules)
    return differ, {a.name: sc[a.name][modules[0]] for a in adapters}


# ------------------------------------------------------------------------------------ verdict
def check_specialists(specialists: list[tuple[str, str]], base: str | None = None, *,
                      trust_remote_code: bool = False, base_model=None,
                      encoders: list[tuple[str, object]] | None = None) -> Verdict:
    """Run every compatibility check the engine makes, recording each outcome.

    specialists: (name, adapter directory) pairs. base: the base model directory (its module tree is
    built on the meta device), or base_model: an already built model. encoders: optional
    (modality, config.EncoderSpec) pairs whose type and files are checked against the base.
    """
    v = Verdict()
    checks = v.checks
    _run(checks, "at least 2 specialists",
         lambda: _need(len(specialists) >= 2, f"ES-Merging needs at least 2 specialists, got {len(specialists)}.",
                       "add another adapter."),
         f"{len(specialists)} specialists")
    for name, path in specialists:
        def read(name=name, path=path):
            v.adapters[name] = read_adapter(path, name)
        _run(checks, f"{name}: PEFT LoRA adapter, finite weights", read,
             "adapter_config.json is LoRA (no DoRA, LoRA bias or modules_to_save), adapter_model.safetensors "
             "holds A/B pairs of block modules, every value finite")
    ads = [v.adapters[n] for n, _ in specialists if n in v.adapters]
    if len(ads) == len(specialists) and len(ads) >= 2:
        if _run(checks, "same target modules", lambda: check_adapters_agree(ads, same_rank=False),
                f"{len(ads[0].modules())} (block, module) pairs in every adapter"):
            _run(checks, "same rank and shapes", lambda: check_adapters_agree(ads, same_rank=True),
                 f"rank {ads[0].rank} and identical factor shapes in every adapter")
        v.folded, sc = scalings_differ(ads)
        detail = ", ".join(f"{n}: {s:g}" for n, s in sc.items())
        checks.append(Check("scaling alpha/r", True,
                            (f"differs ({detail}); allowed: folded into each B factor when merging, the merged "
                             "adapter has scaling 1") if v.folded else f"shared ({detail})"))
    if base_model is None and base:
        try:
            base_model = base_skeleton(base, trust_remote_code)
        except ESMError as e:
            checks.append(Check("base model readable", False, e.reason, e.fix))
    if base_model is not None:
        try:
            v.num_layers = len(find_decoder_layers(base_model))
        except ESMError as e:
            checks.append(Check("base model readable", False, e.reason, e.fix))
            return v
        checks.append(Check("base model readable", True,
                            f"{type(base_model).__name__}, {v.num_layers} blocks, hidden size "
                            f"{getattr(base_model.config, 'hidden_size', '?')}"))
        for a in ads:
            _run(checks, f"{a.name}: fits the base", lambda a=a: check_adapter_fits_base(a, base_model, v.num_layers),
                 "every adapted module exists in the base with matching shapes")
        for mod, enc in encoders or []:
            _run(checks, f"encoder of {mod}", lambda enc=enc: check_encoder(enc, base_model),
                 f"type {enc.type!r}" + (f" at {enc.path}" if enc.path else ""))
    return v


def check_encoder(enc, base_model) -> None:
    """An encoder spec's type is registered; a soft-token encoder's files load and fit the base."""

    if enc.type not in encoder_types():
        raise ESMError(f"Unknown encoder type {enc.type!r}.",
                       fix=f"use one of {encoder_types()} or register a plug-in with register_encoder.")
    if enc.type == "soft_token":
        SoftTokenEncoder.load(enc.path, expect_d_model=int(base_model.config.hidden_size))


def _need(cond: bool, msg: str, fix: str) -> None:
    if not cond:
        raise ESMError(msg, fix=fix)


# ------------------------------------------------------------------------------------ tables
def adapter_rows(adapters: list[AdapterWeights], modalities: dict[str, str | None] | None = None) -> list[dict]:
    """One row per adapter: rank, alpha, scaling, target modules, blocks, parameters."""
    rows = []
    for a in adapters:
        mods = a.modules()
        sc = sorted({round(a.scaling_for(*m), 10) for m in mods})
        ranks = sorted({int(a.tensors[k].shape[0]) for k in a.tensors if k.ab == "A"})
        rows.append(dict(
            specialist=a.name,
            modality=(modalities or {}).get(a.name),
            rank=a.rank if ranks == [a.rank] else "/".join(map(str, ranks)),
            alpha=a.alpha,
            scaling=f"{sc[0]:g}" if len(sc) == 1 else f"{sc[0]:g}..{sc[-1]:g}",
            rslora=bool(a.config.get("use_rslora", False)),
            target_modules=", ".join(sorted({m.rsplit(".", 1)[-1] for _, m in mods}, key=_module_order)),
            blocks=len({l for l, _ in mods}),
            parameters=a.num_parameters(),
            dtype=str(next(iter(a.tensors.values())).dtype).replace("torch.", ""),
            path=a.path,
        ))
    return rows


def delta_norm_matrix(ad: AdapterWeights) -> tuple[list[int], list[str], np.ndarray]:
    """Blocks x modules matrix of ||scaling * B @ A||_F (NaN where a module is not adapted)."""
    norms = ad.delta_norms()
    blocks = sorted({l for l, _ in norms})
    modules = sorted({m for _, m in norms}, key=_module_order)
    out = np.full((len(blocks), len(modules)), np.nan, dtype=np.float64)
    for (l, m), v in norms.items():
        out[blocks.index(l), modules.index(m)] = v
    return blocks, modules, out


_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _module_order(m: str):
    short = m.rsplit(".", 1)[-1]
    return (_ORDER.index(short) if short in _ORDER else len(_ORDER), m)
