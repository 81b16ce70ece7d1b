"""Encoders for real modalities: ESM-2 + a Prot2Text-V2 projector (``esm2``), and soft tokens computed
elsewhere (``precomputed``); listed in the registry of esm_core/encoders.py (which imports this one).

Paths. An encoder's ``path:`` (resolved against the run config, copied with a merged model, guarded
as an input by the output policy) is the encoder's directory. Path options (``esm``, ``projector``,
``file``) are absolute or relative to it; without a ``path:`` they must be absolute.

``esm2`` -- transformers ``EsmModel`` from a local folder (``local_files_only=True``, safetensors
weights only, never remote code), then Prot2Text-V2's projector per position: ``fc1: esm_width ->
hidden`` (2048 in Prot2Text-V2; read from the weights), GELU, ``fc2: hidden -> llm_width``, GELU,
L2-normalised (unit rows). One LLM position per ESM token: ``<cls>``, one per residue, ``<eos>``.
BOS/EOS are KEPT: Prot2Text-V2 puts one placeholder per ESM token under the attention mask,
specials included (its collator counts ``attention_mask.sum()``), so its projector and LLM were
trained with them; a block is ``residues + 2`` positions. Options:

- ``esm``: the ESM-2 folder (``config.json`` with ``model_type: esm``, ``model.safetensors`` or its
  sharded index, ``vocab.txt``); default ``<path>/esm``;
- ``projector``: safetensors with ``fc1.weight``, ``fc1.bias``, ``fc2.weight``, ``fc2.bias`` or
  Prot2Text-V2's ``adapter.fc1.weight``... (other keys ignored: the whole checkpoint may be named),
  PEFT ``modules_to_save`` names included (the importer's ``extra_weights.safetensors`` of a
  Prot2Text-V2 training checkpoint); default ``<path>/projector.safetensors``;
- ``hidden``: the projector's inner width, checked against the weights when given;
- ``max_residues``: residues kept from the start (default 1021, Prot2Text-V2's); the probe cap
  ``max_tokens`` (set by the workspace from max_modality_tokens; specials counted) applies on top,
  to probes and prompts alike;
- ``device``, ``dtype``: where ESM and the projector run; default the LLM's.

Inputs go through the ``protein`` validator (esm_core/samples.py: whitespace dropped, upper case,
amino-acid letters only); anything else is refused with the reason.

``precomputed`` -- soft tokens from one safetensors file keyed by sample id: how a modality whose
encoder needs its own environment (Mol-LLaMA's 8 query tokens from Uni-Mol + torch_geometric) is
brought in. File format: **one tensor per sample, named by the sample id**, each ``[n_tokens,
width]``, a float dtype, ``width`` = the LLM's hidden size, finite; metadata is free::

    safetensors.torch.save_file({sample_id: tokens[i] for i, sample_id in enumerate(ids)}, "tokens.safetensors")

Options: ``file`` (default ``<path>/tokens.safetensors``), ``n_tokens`` (when given, every tensor
has this many rows, e.g. 8), ``label`` (display tokens ``<label0>``..., default ``tok``), ``device``,
``dtype``. The probe data column holds the sample ids, modality ``kind: text`` (that validator keeps
any non-empty id, stripped; ids are looked up stripped). Names, dtypes and shapes are checked when
the file is opened; an id's presence and values when first used -- for probes, when the probe
batcher is built (it counts every block's tokens), before any forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import EsmModel, EsmTokenizer

from esm_core.errors import ESMError
from esm_core.samples import VALIDATORS

PROT2TEXT_MAX_RESIDUES = 1021
ESM_BATCH = 8  # sequences per ESM forward in encode_many
_CACHE_LIMIT = 4096  # precomputed blocks kept in memory
_FLOATS = {"F16", "BF16", "F32", "F64"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------ shared helpers
def _options(spec, defaults: dict) -> dict:
    """The spec's options over the defaults; an unknown option is refused (a typo would be ignored)."""
    opts = dict(spec.options or {})
    unknown = sorted(set(opts) - set(defaults))
    if unknown:
        raise ESMError(f"Unknown option(s) {unknown} for the {spec.type!r} encoder.",
                       fix=f"use only {sorted(defaults)}.")
    return {**defaults, **opts}


def _path_option(spec, name: str, value) -> Path:
    """An option naming a file or folder: absolute, or relative to the encoder's directory ``path:``."""
    if not isinstance(value, str) or not value:
        raise ESMError(f"Encoder {spec.type!r}: option {name}={value!r} is not a path.",
                       fix=f"give {name}: as a file or folder path.")
    if spec.path and not Path(spec.path).is_dir():
        raise ESMError(f"Encoder {spec.type!r}: path {spec.path!r} is not a directory (it is copied with a "
                       "merged model).", fix=f"set path: to the folder holding the files and name them with {name}:.")
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    if not spec.path:
        raise ESMError(f"Encoder {spec.type!r}: option {name}={value!r} is relative and the encoder has no "
                       "'path:' to resolve it against.", fix=f"give an absolute {name}:, or set the encoder's "
                       "path: to the directory that holds it.")
    return Path(spec.path) / p


def _int_option(spec, name: str, value, low: int = 1) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ESMError(f"Encoder {spec.type!r}: option {name}={value!r} is not a whole number >= {low}.",
                       fix=f"set {name}: to a whole number >= {low}.")
    return value


def _device_dtype(spec, opts: dict, sset) -> tuple[torch.device, torch.dtype]:
    dtype = sset.dtype if opts["dtype"] is None else _DTYPES.get(opts["dtype"])
    if dtype is None:
        raise ESMError(f"Encoder {spec.type!r}: dtype {opts['dtype']!r} is not one of {sorted(_DTYPES)}.",
                       fix="choose one of those, or leave dtype out to follow the LLM's.")
    try:
        device = torch.device(sset.device if opts["device"] is None else opts["device"])
    except (RuntimeError, TypeError):
        raise ESMError(f"Encoder {spec.type!r}: device {opts['device']!r} is not a torch device.",
                       fix="use e.g. cpu or cuda:0, or leave device out to follow the LLM's.") from None
    return device, dtype


def open_safetensors(path: Path, role: str):
    """A safe_open handle on ``path`` (a ``role`` such as "projector file"); clear errors for a missing
    file, a pickle / torch.save file and anything else that is not safetensors. Nothing is unpickled."""
    if not path.is_file():
        raise ESMError(f"The {role} {str(path)!r} does not exist.",
                       fix="check the path (relative to the encoder's path:).")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        why = str(e).splitlines()[0]
    with open(path, "rb") as fh:  # only when safetensors refused it: name a pickle as such
        head = fh.read(4)
    if head == b"PK\x03\x04" or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5):  # zip / pickle
        raise ESMError(f"The {role} {str(path)!r} is a pickle / torch.save file; only safetensors files are read "
                       "(a pickle can run code).", fix="re-save the tensors with safetensors.torch.save_file.")
    raise ESMError(f"The {role} {str(path)!r} is not a safetensors file ({why}).",
                   fix="write it with safetensors.torch.save_file.")


# ------------------------------------------------------------------------------------ esm2
class EsmProjector(nn.Module):
    """Prot2Text-V2's modality adapter: fc1, GELU, fc2, GELU, L2-normalise each position."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [..., in_dim] -> [..., out_dim], unit rows
        g = nn.functional.gelu
        return nn.functional.normalize(g(self.fc2(g(self.fc1(h)))), p=2, dim=-1)


_PROJ_KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def read_projector(path: Path, *, esm_width: int, llm_width: int, hidden: int | None = None,
                   esm_folder: str = "the ESM model") -> EsmProjector:
    """The projector in ``path`` (plain or ``adapter.``-prefixed names), checked against both widths."""
    f = open_safetensors(path, "projector file")
    # PEFT's base_model.model.adapter.fc1.modules_to_save.default.weight -> adapter.fc1.weight
    names: dict[str, str] = {}
    for k in f.keys():
        plain = k.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
        if ".original_module." not in k:
            names.setdefault(plain, k)
    found = [p for p in ("", "adapter.") if all(p + k in names for k in _PROJ_KEYS)]
    if len(found) != 1:
        what = "both plain and 'adapter.' names" if found else f"tensors {sorted(names)[:6]}"
        raise ESMError(f"Projector file {str(path)!r} holds {what}; it needs exactly one set of "
                       f"{list(_PROJ_KEYS)} (or Prot2Text-V2's adapter.fc1.weight ...).",
                       fix="point projector: at the projector weights.")
    sd = {k: f.get_tensor(names[found[0] + k]) for k in _PROJ_KEYS}
    w1, b1, w2, b2 = (sd[k] for k in _PROJ_KEYS)
    if w1.ndim != 2 or w2.ndim != 2 or b1.shape != (w1.shape[0],) or b2.shape != (w2.shape[0],) \
            or w2.shape[1] != w1.shape[0]:
        raise ESMError(f"Projector file {str(path)!r}: shapes fc1 {list(w1.shape)}+{list(b1.shape)}, fc2 "
                       f"{list(w2.shape)}+{list(b2.shape)} do not chain as Linear, GELU, Linear.",
                       fix="export fc1/fc2 of one trained projector.")
    if w1.shape[1] != esm_width:
        raise ESMError(f"Projector file {str(path)!r} takes {w1.shape[1]}-wide inputs but {esm_folder} has hidden "
                       f"size {esm_width}.", fix="use the ESM checkpoint the projector was trained on "
                       "(esm2_t33_650M_UR50D: 1280, esm2_t36_3B_UR50D: 2560).")
    if w2.shape[0] != llm_width:
        raise ESMError(f"Projector file {str(path)!r} makes {w2.shape[0]}-wide tokens but the base model's hidden "
                       f"size is {llm_width}.", fix="use the projector trained for this base.")
    if hidden is not None and w1.shape[0] != hidden:
        raise ESMError(f"Projector file {str(path)!r} has inner width {w1.shape[0]}, not the configured "
                       f"hidden={hidden}.", fix="fix the hidden: option or leave it out.")
    bad = [k for k, t in sd.items() if not torch.isfinite(t).all()]
    if bad:
        raise ESMError(f"Projector file {str(path)!r}: {bad} hold NaN or infinite values.",
                       fix="export the weights of a trained projector.")
    pr = EsmProjector(w1.shape[1], w1.shape[0], w2.shape[0])
    pr.load_state_dict(sd)
    return pr


def check_esm_folder(folder: Path) -> dict:
    """config.json of a local ESM folder with safetensors weights and a vocabulary; clear errors otherwise."""
    if not folder.is_dir():
        raise ESMError(f"ESM folder {str(folder)!r} does not exist.",
                       fix="set esm: to a local ESM-2 folder (config.json, model.safetensors, vocab.txt).")
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ESMError(f"ESM folder {str(folder)!r}: config.json cannot be read ({type(e).__name__}).",
                       fix="use a folder written by save_pretrained (config.json, model.safetensors).") from None
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    if kind != "esm":
        raise ESMError(f"ESM folder {str(folder)!r} holds a {kind!r} model, not an ESM one.",
                       fix="point esm: at an ESM-2 checkpoint (model_type: esm).")
    if not any((folder / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        raise ESMError(f"ESM folder {str(folder)!r} has no model.safetensors; pickled weights (pytorch_model.bin) "
                       "are never read.", fix="use the checkpoint's safetensors files (the facebook/esm2_* "
                       "repositories ship model.safetensors).")
    if not (folder / "vocab.txt").is_file():
        raise ESMError(f"ESM folder {str(folder)!r} lacks vocab.txt (the ESM tokenizer).",
                       fix="copy the checkpoint's vocab.txt into it.")
    return cfg


class Esm2Encoder:
    """ESM-2 + projector: a protein sequence -> [<cls>, residues..., <eos>] unit-norm token embeddings."""

    def __init__(self, tokenizer, model, projector: EsmProjector, max_residues: int = PROT2TEXT_MAX_RESIDUES):
        self.tokenizer, self.model, self.projector = tokenizer, model, projector
        self.max_residues = int(max_residues)
        self.max_tokens: int | None = None  # the probe cap, specials counted (set by the workspace)
        self._clean: dict[str, str] = {}

    def residue_cap(self) -> int:
        cap = self.max_residues
        return min(cap, max(1, self.max_tokens - 2)) if self.max_tokens else cap

    def sequence(self, raw: str) -> str:
        """The checked, cleaned sequence (whitespace dropped, upper case); non-protein input is refused."""
        seq = self._clean.get(raw)
        if seq is None:
            seq, why = VALIDATORS["protein"](str(raw))
            if why:
                raise ESMError(f"The esm2 encoder got {str(raw)[:40]!r}, which is not a protein sequence ({why}).",
                               fix="give amino-acid one-letter sequences (set the modality's kind: protein so "
                               "bad probe rows are skipped).")
            self._clean[raw] = seq
        return seq

    def ids(self, raw: str) -> list[int]:
        seq = self.sequence(raw)[: self.residue_cap()]
        ids = list(self.tokenizer(seq)["input_ids"])
        if len(ids) != len(seq) + 2:
            raise ESMError(f"The ESM tokenizer made {len(ids)} tokens of {len(seq)} residues, not one per residue "
                           "plus <cls> and <eos>.", fix="use the ESM-2 checkpoint's own vocab.txt.")
        return ids

    def n_tokens(self, raw: str) -> int:
        return min(len(self.sequence(raw)), self.residue_cap()) + 2

    def truncated(self, raw: str) -> bool:
        return len(self.sequence(raw)) > self.residue_cap()

    def tokens(self, raw: str) -> list[str]:
        return list(self.tokenizer.convert_ids_to_tokens(self.ids(raw)))

    def encode(self, raw: str) -> torch.Tensor:
        return self.encode_many([raw])[0]

    @torch.no_grad()
    def encode_many(self, raws: list[str]) -> list[torch.Tensor]:
        """[n_i, llm_width] per sample: ESM in right-padded batches, the projector per position."""
        ids = [self.ids(r) for r in raws]
        dev = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        out: list[torch.Tensor] = []
        for s in range(0, len(ids), ESM_BATCH):
            chunk = ids[s:s + ESM_BATCH]
            x = nn.utils.rnn.pad_sequence([torch.tensor(t) for t in chunk], batch_first=True, padding_value=pad)
            lens = torch.tensor([len(t) for t in chunk])
            mask = (torch.arange(x.shape[1]) < lens[:, None]).long()
            h = self.model(input_ids=x.to(dev), attention_mask=mask.to(dev)).last_hidden_state
            p = next(self.projector.parameters())
            z = self.projector(h.to(p.device, p.dtype))
            out.extend(z[b, :len(t)] for b, t in enumerate(chunk))
        return out


def make_esm2(spec, sset) -> Esm2Encoder:
    """Registry factory: the ``esm2`` encoder for a runspec.EncoderSpec on a SpecialistSet."""
    opts = _options(spec, dict(esm="esm", projector="projector.safetensors", hidden=None,
                               max_residues=PROT2TEXT_MAX_RESIDUES, device=None, dtype=None))
    folder = _path_option(spec, "esm", opts["esm"])
    proj_file = _path_option(spec, "projector", opts["projector"])
    max_res = _int_option(spec, "max_residues", opts["max_residues"]) or PROT2TEXT_MAX_RESIDUES
    device, dtype = _device_dtype(spec, opts, sset)
    cfg = check_esm_folder(folder)
    pr = read_projector(proj_file, esm_width=int(cfg.get("hidden_size", -1)), llm_width=sset.hidden_size,
                        hidden=_int_option(spec, "hidden", opts["hidden"]), esm_folder=f"ESM folder {str(folder)!r}")
    tok = EsmTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = EsmModel.from_pretrained(str(folder), add_pooling_layer=False, local_files_only=True,
                                     trust_remote_code=False, use_safetensors=True, dtype=dtype)
    for m in (model, pr):
        m.to(device=device, dtype=dtype).eval()
        for p in m.parameters():
            p.requires_grad_(False)
    return Esm2Encoder(tok, model, pr, max_res)


# ------------------------------------------------------------------------------------ precomputed
class PrecomputedEncoder:
    """Soft tokens looked up by sample id in a safetensors file (format: the module docstring)."""

    def __init__(self, path: Path, handle, shapes: dict[str, tuple[int, int]], *, device="cpu",
                 dtype=torch.float32, label: str = "tok"):
        self.path = Path(path)
        self._f = handle
        self.shapes = shapes
        self.device, self.dtype, self.label = torch.device(device), dtype, label
        self._cache: dict[str, torch.Tensor] = {}

    @classmethod
    def open(cls, path: str | Path, *, width: int, n_tokens: int | None = None, device="cpu",
             dtype=torch.float32, label: str = "tok") -> PrecomputedEncoder:
        """Open and check the file's header: float tensors [n, width], n == n_tokens when given."""
        p = Path(path)
        f = open_safetensors(p, "precomputed token file")
        shapes = {}
        for k in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
            sl = f.get_slice(k)
            shape, dt = tuple(sl.get_shape()), sl.get_dtype()
            where = f"Precomputed token file {str(p)!r}: sample {k!r}"
            if k != k.strip() or not k:
                raise ESMError(f"{where} has an empty name or surrounding whitespace; sample ids are matched "
                               "stripped.", fix="name each tensor by its stripped sample id.")
            if dt not in _FLOATS:
                raise ESMError(f"{where} is of dtype {dt}, not a float.", fix="save float tensors.")
            if len(shape) != 2 or shape[0] < 1:
                raise ESMError(f"{where} has shape {list(shape)}, not [n_tokens, width] with n_tokens >= 1.",
                               fix="save one 2-D tensor [n_tokens, width] per sample.")
            if shape[1] != width:
                raise ESMError(f"{where} has {shape[1]}-wide tokens but the base model's hidden size is {width}.",
                               fix="compute the tokens with the encoder and projector trained for this base.")
            if n_tokens is not None and shape[0] != n_tokens:
                raise ESMError(f"{where} has {shape[0]} tokens, not the configured n_tokens={n_tokens}.",
                               fix="give every sample the same number of tokens, or fix n_tokens:.")
            shapes[k] = shape
        if not shapes:
            raise ESMError(f"Precomputed token file {str(p)!r} holds no tensors.",
                           fix="save one tensor per sample, named by its id.")
        return cls(p, f, shapes, device=device, dtype=dtype, label=label)

    @property
    def sample_ids(self) -> list[str]:
        return sorted(self.shapes)

    def block(self, raw: str) -> torch.Tensor:
        """The stored [n, width] tokens of sample id ``raw`` (stripped), checked finite; clear error if absent."""
        sid = str(raw).strip()
        t = self._cache.get(sid)
        if t is not None:
            return t
        if sid not in self.shapes:
            some = ", ".join(repr(k) for k in self.sample_ids[:3])
            raise ESMError(f"Sample id {sid[:80]!r} is not in the precomputed token file {str(self.path)!r} "
                           f"({len(self.shapes)} ids, e.g. {some}).", fix="compute that sample's tokens and add "
                           "them to the file, or drop the row from the probe data (its column holds sample ids).")
        t = self._f.get_tensor(sid)
        if not torch.isfinite(t).all():
            raise ESMError(f"Precomputed token file {str(self.path)!r}: sample {sid!r} holds NaN or infinite values.",
                           fix="recompute that sample's tokens.")
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.pop(next(iter(self._cache)))
        self._cache[sid] = t
        return t

    def check(self, ids) -> None:
        """Every id present (all missing ones named at once) and its values finite."""
        missing = sorted({str(i).strip() for i in ids} - set(self.shapes))
        if missing:
            raise ESMError(f"{len(missing)} sample id(s) are not in the precomputed token file "
                           f"{str(self.path)!r}: {missing[:5]}.",
                           fix="add their tokens to the file, or drop those rows from the probe data.")
        for i in ids:
            self.block(i)

    def n_tokens(self, raw: str) -> int:
        return int(self.block(raw).shape[0])

    def tokens(self, raw: str) -> list[str]:
        return [f"<{self.label}{i}>" for i in range(self.n_tokens(raw))]

    def encode(self, raw: str) -> torch.Tensor:
        return self.block(raw).to(self.device, self.dtype)


def make_precomputed(spec, sset) -> PrecomputedEncoder:
    """Registry factory: the ``precomputed`` encoder for a runspec.EncoderSpec on a SpecialistSet."""
    opts = _options(spec, dict(file="tokens.safetensors", n_tokens=None, label="tok", device=None, dtype=None))
    path = _path_option(spec, "file", opts["file"])
    label = opts["label"]
    if not isinstance(label, str) or not label.isidentifier():
        raise ESMError(f"Encoder 'precomputed': label={label!r} is not a short name.", fix="use e.g. label: q.")
    device, dtype = _device_dtype(spec, opts, sset)
    n = _int_option(spec, "n_tokens", opts["n_tokens"])
    return PrecomputedEncoder.open(path, width=sset.hidden_size, n_tokens=n, device=device, dtype=dtype, label=label)
