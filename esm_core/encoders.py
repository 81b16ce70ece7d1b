"""Modality encoders: raw input (SMILES, sequence, gene list) -> n token embeddings in R^d.

docs/METHOD.md section 0: a modality encoder E_m maps a raw input to token embeddings that are spliced
into the probe. The SAME encoder feeds the base and every specialist, so differences downstream come
from the adapters alone.

Built in, listed in one explicit table (``_ENCODERS`` at the bottom; this module imports the
implementations, nothing registers itself by being imported):
- ``text``: the LLM's own tokenizer + input embeddings (how the paper feeds a modality a model does
  not natively support, and how a text-only specialist such as Cell-o1 sees cells);
- ``soft_token``: a feature function (e.g. an RDKit Morgan fingerprint) followed by a small MLP
  loaded from safetensors, giving a fixed number of tokens (like Mol-LLaMA's query tokens);
- ``esm2``: an ESM-2 protein language model + Prot2Text-V2's projector, one token per residue
  (esm_core/bio_encoders.py);
- ``precomputed``: soft tokens computed elsewhere (Mol-LLaMA's query tokens from Uni-Mol), read
  from a safetensors file keyed by sample id (esm_core/bio_encoders.py).

A plug-in of your own is added at run time by an explicit call:

    from esm_core.encoders import register_encoder
    register_encoder("graph")(make)   # make(spec, sset) -> encoder with .encode(raw) -> Tensor[n, d]
                                      # and .tokens(raw) -> list[str]; spec: runspec.EncoderSpec

Feature functions for soft-token encoders are added likewise with ``register_feature``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from esm_core import chem
from esm_core.bio_encoders import make_esm2, make_precomputed
from esm_core.errors import ESMError

ENCODER_CONFIG = "encoder_config.json"
ENCODER_WEIGHTS = "encoder.safetensors"


@runtime_checkable
class ModalityEncoder(Protocol):
    """What the probe builder needs from an encoder."""

    def encode(self, raw: str) -> torch.Tensor:  # [n, d] token embeddings
        ...

    def tokens(self, raw: str) -> list[str]:  # n display labels, for the tokenised-probe view
        ...


# ------------------------------------------------------------------------------------ registries
# The built-in tables are filled at the bottom of this module, after the implementations.
def register_encoder(name: str):
    def deco(factory):
        _ENCODERS[name] = factory
        return factory
    return deco


def register_feature(name: str):
    def deco(fn):
        _FEATURES[name] = fn
        return fn
    return deco


def encoder_types() -> list[str]:
    return sorted(_ENCODERS)


def feature_types() -> list[str]:
    return sorted(_FEATURES)


def build_encoder(spec, sset) -> ModalityEncoder:
    """Encoder for a config.EncoderSpec on the given SpecialistSet."""
    factory = _ENCODERS.get(spec.type)
    if factory is None:
        raise ESMError(f"Unknown encoder type {spec.type!r}.",
                       fix=f"use one of {encoder_types()} or register a plug-in with register_encoder.")
    return factory(spec, sset)


# ------------------------------------------------------------------------------------ text
def separated(raw: str, separator: str | None) -> str:
    """The text a text encoder tokenizes: raw, or its characters joined by separator ("MKT" -> "M K T")."""
    return separator.join(raw) if separator else raw


class TextEncoder:
    """Tokenize with the LLM's tokenizer, look up the LLM's input embeddings.

    separator: join the raw string's characters with it before tokenizing (``" "``: one token per
    residue, the convention of ProtBert/ProtT5 inputs; option ``separator`` of a ``text`` encoder).
    """

    def __init__(self, tokenizer, embedding: nn.Embedding, max_tokens: int | None = None,
                 separator: str | None = None):
        self.tokenizer = tokenizer
        self.embedding = embedding
        self.max_tokens = max_tokens
        self.separator = separator
        self._cache: dict[str, list[int]] = {}

    def ids(self, raw: str) -> list[int]:
        ids = self._cache.get(raw)
        if ids is None:
            ids = list(self.tokenizer(separated(raw, self.separator), add_special_tokens=False)["input_ids"])
            self._cache[raw] = ids
        return ids[: self.max_tokens] if self.max_tokens else ids

    def encode(self, raw: str) -> torch.Tensor:
        ids = torch.tensor(self.ids(raw), dtype=torch.long, device=self.embedding.weight.device)
        with torch.no_grad():
            return self.embedding(ids)

    def tokens(self, raw: str) -> list[str]:
        return [self.tokenizer.decode([i]) for i in self.ids(raw)]

    def text_of(self, raw: str) -> str:
        """The block as text in the probe: the probe builder tokenises it together with its surroundings
        (esm_core/probes.py), so its first token is the one running text would give."""
        return separated(raw, self.separator)

    def n_tokens(self, raw: str) -> int:
        return len(self.ids(raw))

    def truncated(self, raw: str) -> bool:
        self.ids(raw)
        return bool(self.max_tokens) and len(self._cache[raw]) > self.max_tokens


def _make_text(spec, sset):
    sep = spec.options.get("separator")
    if sep is not None and not isinstance(sep, str):
        raise ESMError(f"Text encoder option separator={sep!r} is not a string.", fix='use e.g. separator: " ".')
    return TextEncoder(sset.tokenizer, sset.model.get_input_embeddings(), spec.options.get("max_tokens"), sep)


# ------------------------------------------------------------------------------------ features
def morgan_fingerprint(raw: str, radius: int = 2, n_bits: int = 2048, counts: bool = False) -> np.ndarray:
    """RDKit Morgan fingerprint of a SMILES as a float vector (bits, or log1p counts)."""
    v = np.asarray(chem.fingerprint_array(raw, int(radius), int(n_bits), counts), dtype=np.float32)
    return np.log1p(v) if counts else v


_AA = "ACDEFGHIKLMNPQRSTVWY"


def aa_composition(raw: str, dipeptides: bool = True) -> np.ndarray:
    """Amino-acid (and dipeptide) composition of a protein sequence: a cheap ESM stand-in."""
    seq = "".join(c for c in raw.upper() if c in _AA)
    idx = {a: i for i, a in enumerate(_AA)}
    v = np.zeros(20 + (400 if dipeptides else 0), dtype=np.float32)
    for c in seq:
        v[idx[c]] += 1
    if seq:
        v[:20] /= len(seq)
    if dipeptides and len(seq) > 1:
        for a, b in zip(seq, seq[1:]):
            v[20 + idx[a] * 20 + idx[b]] += 1
        v[20:] /= len(seq) - 1
    return v


# ------------------------------------------------------------------------------------ soft tokens
class SoftTokenProjector(nn.Module):
    """Feature vector -> n_tokens x d_model soft tokens: Linear, GELU, Linear."""

    def __init__(self, in_dim: int, hidden: int, n_tokens: int, d_model: int):
        super().__init__()
        self.n_tokens, self.d_model = n_tokens, d_model
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, n_tokens * d_model)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # [b, F] -> [b, n, d]
        h = torch.nn.functional.gelu(self.fc1(feats))
        return self.fc2(h).view(feats.shape[0], self.n_tokens, self.d_model)


class SoftTokenEncoder:
    """A registered feature function followed by a SoftTokenProjector."""

    def __init__(self, feature: str, feature_args: dict, projector: SoftTokenProjector, label: str = "tok"):
        if feature not in _FEATURES:
            raise ESMError(f"Unknown feature function {feature!r} in a soft-token encoder.",
                           fix=f"use one of {feature_types()} or register one with register_feature.")
        self.feature = feature
        self.feature_args = dict(feature_args)
        self.projector = projector
        self.label = label
        self._feats: dict[str, np.ndarray] = {}

    @property
    def n_tokens(self) -> int:
        return self.projector.n_tokens

    def features(self, raw: str) -> np.ndarray:
        f = self._feats.get(raw)
        if f is None:
            f = _FEATURES[self.feature](raw, **self.feature_args)
            self._feats[raw] = f
        return f

    def encode(self, raw: str) -> torch.Tensor:
        return self.encode_many([raw])[0]

    def encode_many(self, raws: list[str]) -> torch.Tensor:
        p = next(self.projector.parameters())
        x = torch.from_numpy(np.stack([self.features(r) for r in raws])).to(p.device, p.dtype)
        with torch.no_grad():
            return self.projector(x)

    def tokens(self, raw: str) -> list[str]:
        return [f"<{self.label}{i}>" for i in range(self.n_tokens)]

    # ---------------------------------------------------------------- files
    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        pr = self.projector
        cfg = dict(type="soft_token", feature=self.feature, feature_args=self.feature_args, label=self.label,
                   in_dim=pr.fc1.in_features, hidden=pr.fc1.out_features, n_tokens=pr.n_tokens,
                   d_model=pr.d_model)
        (d / ENCODER_CONFIG).write_text(json.dumps(cfg, indent=2))
        save_file({k: v.detach().cpu().contiguous().float() for k, v in pr.state_dict().items()},
                  str(d / ENCODER_WEIGHTS))

    @classmethod
    def load(cls, directory: str | Path, *, device="cpu", dtype=torch.float32,
             expect_d_model: int | None = None) -> "SoftTokenEncoder":
        d = Path(directory) if directory else None
        if d is None or not (d / ENCODER_CONFIG).is_file() or not (d / ENCODER_WEIGHTS).is_file():
            raise ESMError(f"Soft-token encoder directory {str(directory)!r} lacks {ENCODER_CONFIG} or "
                           f"{ENCODER_WEIGHTS}.", fix="point the encoder 'path:' at a saved soft-token encoder.")
        cfg = json.loads((d / ENCODER_CONFIG).read_text())
        try:
            pr = SoftTokenProjector(int(cfg["in_dim"]), int(cfg["hidden"]), int(cfg["n_tokens"]),
                                    int(cfg["d_model"]))
        except KeyError as e:
            raise ESMError(f"Soft-token encoder {str(d)!r}: {ENCODER_CONFIG} lacks field {e}.") from None
        if expect_d_model is not None and pr.d_model != expect_d_model:
            raise ESMError(f"Soft-token encoder {str(d)!r} makes {pr.d_model}-dim tokens but the base model's "
                           f"hidden size is {expect_d_model}.", fix="use the encoder trained for this base.")
        sd = load_file(str(d / ENCODER_WEIGHTS))
        try:
            pr.load_state_dict(sd)
        except RuntimeError as e:
            raise ESMError(f"Soft-token encoder {str(d)!r}: weights do not match its config "
                           f"({str(e).splitlines()[0]}).") from None
        pr.to(device=device, dtype=dtype).eval()
        for p in pr.parameters():
            p.requires_grad_(False)
        return cls(cfg.get("feature", "morgan"), cfg.get("feature_args", {}), pr, cfg.get("label", "tok"))


def _make_soft(spec, sset):
    return SoftTokenEncoder.load(spec.path, device=sset.device, dtype=sset.dtype, expect_d_model=sset.hidden_size)


# ------------------------------------------------------------------------------------ the tables
_ENCODERS: dict[str, Callable] = {
    "text": _make_text,
    "soft_token": _make_soft,
    "esm2": make_esm2,
    "precomputed": make_precomputed,
}
_FEATURES: dict[str, Callable[..., np.ndarray]] = {
    "morgan": morgan_fingerprint,
    "aa_composition": aa_composition,
}
