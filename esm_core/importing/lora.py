"""Sorting a source's tensors for an import, checking its LoRA factors, and the adapter config written.

Every key of a source is put in one of three places:

- **converted**: the LoRA factors of the language model's blocks, renamed to stock PEFT keys
  ``base_model.model.model.layers.N.<module>.lora_A.weight`` (whatever prefix, wrapper or
  ``.default`` infix the source used; :func:`esm_core.adapters.parse_peft_key` reads them);
- **kept** (``extra_weights.safetensors``, keys unchanged): ``modules_to_save`` (``adapter.fc1``),
  components outside the language model (graph encoders, a Q-Former, a projector such as
  ``llm_proj``), LoRA factors outside the language model's blocks;
- **left out**: the language model's own weights inside a full checkpoint (block weights,
  ``base_layer``, embeddings, ``lm_head``, norms) and PEFT's ``original_module`` copies.

When LoRA factors sit under several block lists (a LoRA'd Q-Former next to the LLM), the language
model is the list under ``model.layers`` (then: the one with the most factors).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from esm_core.adapters import LoraKey, _pattern_value, parse_peft_key
from esm_core.errors import ESMError

LEFT_LLM = "language-model weights (the base's own, inside the checkpoint)"
LEFT_ORIGINAL = "original copies of modules_to_save (base weights)"
BASE_PARTS = {"embed_tokens", "lm_head", "norm", "rotary_emb", "wte", "wpe", "ln_f", "final_layernorm",
              "embed_out", "tok_embeddings", "output"}
_LORA_BIAS = re.compile(r"\.lora_B(\.[^.]+)?\.bias$")


@dataclass
class KeyPlan:
    """Where each key of a source goes (see the module doc)."""

    lora: dict[LoraKey, str] = field(default_factory=dict)  # canonical key -> source key
    stock: dict[LoraKey, str] = field(default_factory=dict)  # canonical key -> stock PEFT key
    inner: dict[tuple[int, str], str] = field(default_factory=dict)  # (block, module) -> path in the base
    outer: dict[tuple[int, str], str] = field(default_factory=dict)  # (block, module) -> path in the source
    head: str = ""  # the source's block list, e.g. llm.base_model.model.model.layers
    kept: dict[str, list[str]] = field(default_factory=dict)  # group -> source keys
    left: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _head_of(key: str, lk: LoraKey) -> str:
    return key[:key.rfind(f".{lk.layer}.{lk.module}.lora_{lk.ab}")]


def _llm_root(head: str) -> str:
    """The prefix of every key of the language model, from its block list: llm.base_model.model.model.layers
    -> 'llm.'; base_model.model.model.layers -> '' (the whole file)."""
    r = head.rsplit(".", 1)[0] if "." in head else ""
    for tail in ("model", "transformer", "base_model.model"):
        if r == tail:
            r = ""
        elif r.endswith("." + tail):
            r = r[: -len(tail) - 1]
    return r + "." if r else ""


def _stem(head: str) -> str:
    token = head.rsplit(".", 1)[-1]
    if token == "layers":
        return "model.layers"
    if token == "h":
        return "transformer.h"
    return ".".join(head.split(".")[-2:])


def _strip(rel: str) -> str:
    while True:
        for p in ("base_model.model.", "model."):
            if rel.startswith(p):
                rel = rel[len(p):]
                break
        else:
            return rel


def _component(key: str) -> str:
    return _strip(key).split(".", 1)[0]


def plan_keys(keys: list[str], *, what: str, modules_to_save=(), keep_others: bool = False) -> KeyPlan:
    """Sort the keys (names only; nothing is loaded). keep_others: non-LoRA tensors are adapter tensors
    (a PEFT folder), never base weights."""
    parsed, loraish, rest = {}, [], []
    for k in keys:
        if "lora_magnitude_vector" in k:
            raise ESMError(f"{what} is a DoRA adapter ({k}), whose magnitude vectors cannot be merged element-wise.",
                           fix="import plain LoRA specialists.")
        if _LORA_BIAS.search(k):
            raise ESMError(f"{what} trains LoRA biases ({k}), which are not merged.",
                           fix="import adapters trained without lora_bias.")
        p = parse_peft_key(k)
        if p is not None:
            parsed[k] = p[0]
        elif ".lora_" in k:
            loraish.append(k)
        else:
            rest.append(k)
    if not parsed:
        ex = ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")
        raise ESMError(f"{what} holds no LoRA tensors: none of its {len(keys)} tensors is a lora_A/lora_B weight of "
                       f"a transformer block ({ex or 'no tensors at all'}).",
                       fix="point at the specialist's LoRA (a full fine-tune or an already merged model has none).")
    heads = Counter(_head_of(k, lk) for k, lk in parsed.items())
    ranked = sorted(heads.items(), key=lambda h: (h[0].endswith("model.layers"), h[1]), reverse=True)
    if len(ranked) > 1 and (ranked[0][0].endswith("model.layers"), ranked[0][1]) == \
            (ranked[1][0].endswith("model.layers"), ranked[1][1]):
        raise ESMError(f"{what} holds LoRA factors under several block lists ({', '.join(h for h, _ in ranked[:3])}); "
                       "which one is the language model is not clear.",
                       fix="import a source whose LoRA factors belong to one language model.")
    plan = KeyPlan(head=ranked[0][0])
    root, stem = _llm_root(plan.head), _stem(plan.head)
    names = [str(n) for n in (modules_to_save or [])]
    for k, lk in parsed.items():
        if _head_of(k, lk) != plan.head:
            loraish.append(k)  # e.g. a LoRA'd Q-Former
            continue
        if lk in plan.lora:
            raise ESMError(f"{what} holds two tensors for {lk}: {plan.lora[lk]} and {k}.",
                           fix="import a source with one adapter (one adapter name).")
        plan.lora[lk] = k
        inner = f"{stem}.{lk.layer}.{lk.module}"
        plan.inner[(lk.layer, lk.module)] = inner
        plan.outer[(lk.layer, lk.module)] = k[:k.rfind(".lora_")]
        plan.stock[lk] = f"base_model.model.{inner}.lora_{lk.ab}.weight"
    for k in loraish:
        where = _head_of(k, parsed[k]) if k in parsed else k[:k.find(".lora_")]
        plan.kept.setdefault(f"LoRA outside the language model's blocks: {where}", []).append(k)
    for k in rest:
        dotted = "." + k
        mts = next((n for n in names if f".{n}." in dotted), None)
        if mts is None and ".modules_to_save." in k:
            pre = k.split(".modules_to_save.", 1)[0]
            mts = _strip(pre[len(root):] if pre.startswith(root) else pre)
        if ".original_module." in k:
            plan.left.setdefault(LEFT_ORIGINAL, []).append(k)
        elif mts:
            plan.kept.setdefault(f"modules_to_save: {mts}", []).append(k)
        elif not keep_others and k.startswith(root) and (k.startswith(plan.head + ".") or ".base_layer." in k
                                                        or _component(k[len(root):]) in BASE_PARTS):
            plan.left.setdefault(LEFT_LLM, []).append(k)
        else:
            plan.kept.setdefault(f"component: {_component(k)}", []).append(k)
    if any(g.startswith("modules_to_save") for g in plan.kept):
        mods = sorted({g.split(": ", 1)[1] for g in plan.kept if g.startswith("modules_to_save")})
        plan.notes.append(f"modules_to_save ({', '.join(mods)}) are fully trained modules: kept in "
                          "extra_weights.safetensors, not in the adapter (merging them is not ES-Merging's job, and "
                          "vLLM refuses adapters that carry them); the written adapter_config.json lists none.")
    if loraish:
        plan.notes.append(f"{len(loraish)} LoRA tensor(s) outside the language model's blocks (e.g. {loraish[0]}) are "
                          "kept in extra_weights.safetensors; they are not part of the merged adapter.")
    return plan


def check_factors(tensors: dict[LoraKey, torch.Tensor], what: str) -> None:
    """Pairs present, 2-D, ranks that agree between A and B, finite values."""
    for layer, module in sorted({(k.layer, k.module) for k in tensors}):
        for ab in "AB":
            if LoraKey(layer, module, ab) not in tensors:
                raise ESMError(f"{what}: module layers.{layer}.{module} has a lora_{'B' if ab == 'A' else 'A'} "
                               f"tensor but no lora_{ab}.", fix="import the complete adapter (both LoRA factors).")
        a, b = tensors[LoraKey(layer, module, "A")], tensors[LoraKey(layer, module, "B")]
        if a.ndim != 2 or b.ndim != 2:
            raise ESMError(f"{what}: layers.{layer}.{module} has factors of shapes {tuple(a.shape)} and "
                           f"{tuple(b.shape)}; only linear-layer LoRA (2-D factors) is supported.",
                           fix="import a LoRA on linear layers.")
        if a.shape[0] != b.shape[1]:
            raise ESMError(f"{what}: at layers.{layer}.{module} lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                           f"disagree on the rank ({a.shape[0]} vs {b.shape[1]}).",
                           fix="import the factors saved together (lora_A and lora_B of one adapter).")
    for k, t in sorted(tensors.items()):
        if not t.is_floating_point():
            raise ESMError(f"{what}: {k} holds {t.dtype} values, not floating point.", fix="import the LoRA weights.")
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ESMError(f"{what}: tensor {k} holds {bad} NaN/Inf value(s).",
                           fix="retrain or repair the specialist; merging would spread the NaNs.")


@dataclass
class Scaling:
    """r, alpha and where each came from; per-module patterns where they vary."""

    r: int
    alpha: float  # an int when whole, as PEFT writes it
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    rank_source: str
    alpha_source: str

    def value(self, r: int | None = None, alpha: float | None = None) -> float:
        r, alpha = r or self.r, self.alpha if alpha is None else alpha
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def resolve_scaling(tensors: dict[LoraKey, torch.Tensor], plan: KeyPlan, cfg: dict | None, *, rank: int | None,
                    alpha: float | None, what: str) -> Scaling:
    """r from the factors' shapes (a given --rank or config r must agree); alpha from the config or --alpha."""
    ranks = {(k.layer, k.module): int(t.shape[0]) for k, t in tensors.items() if k.ab == "A"}
    r = sorted(Counter(ranks.values()).items(), key=lambda x: (-x[1], -x[0]))[0][0]
    source = "inferred from the lora_A shapes"
    if cfg is not None and cfg.get("r") is not None:
        for m, rr in sorted(ranks.items()):
            said = int(_pattern_value(cfg.get("rank_pattern") or {}, plan.outer[m], int(cfg["r"])))
            if said != rr:
                raise ESMError(f"{what}: adapter_config.json says r={said} for layers.{m[0]}.{m[1]}, but its lora_A "
                               f"has rank {rr}.", fix="use the adapter_config.json saved with these weights.")
        source = "adapter_config.json (agrees with the lora_A shapes)"
    if rank is not None:
        m, rr = next(((m, rr) for m, rr in sorted(ranks.items()) if rr != rank), (None, None))
        if m is not None:
            shape = tuple(tensors[LoraKey(m[0], m[1], "A")].shape)
            raise ESMError(f"--rank {rank} disagrees with the LoRA factors of {what}: lora_A of layers.{m[0]}.{m[1]} "
                           f"has rank {rr} (shape {shape}).",
                           fix=f"drop --rank (the rank is read from the tensors) or pass --rank {rr}.")
        source = "--rank (agrees with the lora_A shapes)" if cfg is None or cfg.get("r") is None else source
    cfg_alpha = None if cfg is None else cfg.get("lora_alpha")
    if alpha is not None and (not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0):
        raise ESMError(f"--alpha {alpha!r} is not a positive number.", fix="pass the specialist's lora_alpha, e.g. "
                                                                           "--alpha 32.")
    if cfg_alpha is not None and alpha is not None and float(cfg_alpha) != float(alpha):
        raise ESMError(f"--alpha {alpha:g} disagrees with {what}'s adapter_config.json (lora_alpha={cfg_alpha}).",
                       fix="drop --alpha: the adapter's own config says it.")
    if cfg_alpha is None and alpha is None:
        raise ESMError(f"{what}: no adapter_config.json says lora_alpha, and the scaling alpha/r cannot be read from "
                       f"the tensors (r={r} can).",
                       fix="pass --alpha with the value the specialist was trained with (Mol-LLaMA: --alpha 32 for "
                           "r=8; Prot2Text-V2: alpha = 2r).")
    try:
        a = float(cfg_alpha if cfg_alpha is not None else alpha)
    except (TypeError, ValueError):
        a = math.nan
    if not math.isfinite(a) or a <= 0:
        raise ESMError(f"{what}: adapter_config.json has lora_alpha={cfg_alpha!r}.", fix="use a positive lora_alpha.")
    a_src = "adapter_config.json" if cfg_alpha is not None else "--alpha"
    rank_pattern = {plan.inner[m]: rr for m, rr in sorted(ranks.items()) if rr != r}
    alpha_pattern = {}
    if cfg is not None and cfg.get("alpha_pattern"):
        for m in sorted(ranks):
            am = float(_pattern_value(cfg["alpha_pattern"], plan.outer[m], a))
            if am != a:
                alpha_pattern[plan.inner[m]] = am
    rs = bool(cfg.get("use_rslora")) if cfg is not None else False
    return Scaling(r, int(a) if a.is_integer() else a, rs, rank_pattern, alpha_pattern, source, a_src)


def adapter_config(plan: KeyPlan, sc: Scaling, *, n_layers: int | None, base_path: str, task_type: str | None) -> dict:
    """A stock PEFT LoRA config that targets exactly the modules the factors adapt (no modules_to_save)."""
    mods = sorted({m for _, m in plan.inner})
    layers = sorted({layer for layer, _ in plan.inner})
    full = {(layer, m) for layer in layers for m in mods} == set(plan.inner)
    short = [m.rsplit(".", 1)[-1] for m in mods]
    cfg = dict(peft_type="LORA", task_type=task_type or "CAUSAL_LM", r=sc.r, lora_alpha=sc.alpha,
               use_rslora=sc.use_rslora, rank_pattern=sc.rank_pattern, alpha_pattern=sc.alpha_pattern,
               lora_dropout=0.0, bias="none", fan_in_fan_out=False, use_dora=False, modules_to_save=None,
               init_lora_weights=True, inference_mode=True, base_model_name_or_path=base_path or None)
    if full:
        cfg["target_modules"] = short if len(set(short)) == len(short) else mods
        if n_layers is None or layers != list(range(n_layers)):
            cfg["layers_to_transform"] = layers
    else:
        cfg["target_modules"] = sorted(plan.inner.values())
    return cfg
