"""Base compatibility of specialists, judged from config files only (no weights are loaded).

All specialists of one ES-Merging run share one base (docs/METHOD.md section 9: LLaMA-3.1-8B-Instruct
for Mol-LLaMA, Prot2Text-V2 and the cell model). Before anything heavy, this module reads each
side's ``config.json`` (a composite config such as ``{"llm_config": {...}}`` is searched one level
down) and the tokenizer files when present, and compares: architecture family (``model_type``),
hidden size, number of blocks, attention heads and KV heads, head size, intermediate size and
vocabulary. A difference in any of them refuses the specialist with the reason
(``model_type qwen2 vs llama``). A LARGER vocabulary (tokens the specialist added, such as
Mol-LLaMA's ``<mol>``: 128257 vs 128256) is a note, not a refusal: the LoRA adapts the blocks'
linear layers, never the embeddings, so it applies to the base as it is; only inputs that use the
added tokens need the specialist's own tokenizer and embedding rows.

    verdicts = check_bases("models/llama-3.1-8b", {"mol": "imports/mol", "cell": "models/cell"})
    for v in verdicts: print(v.summary())
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open

from esm_core.adapters import ADAPTER_WEIGHTS, LoraKey, parse_peft_key
from esm_core.errors import ESMError
from esm_core.importing.sources import read_json

CONFIG_CAP = 4 * 2**20  # config.json and tokenizer_config.json
TOKENIZER_CAP = 64 * 2**20  # tokenizer.json (LLaMA-3's is about 9 MB)
REPORT = "import_report.json"  # an imported folder records its source's base here (esm_core/importing)

# The sub-configs a composite (multimodal) config keeps its language model under, tried in this order.
SUB_CONFIGS = ("text_config", "llm_config", "language_config", "llm", "text_model", "decoder")

# What each LLaMA-family projection maps: (input width, output width) from the base facts.
_IO = {
    "q_proj": lambda f: (f.hidden_size, f.heads * f.head_dim),
    "k_proj": lambda f: (f.hidden_size, f.kv_heads * f.head_dim),
    "v_proj": lambda f: (f.hidden_size, f.kv_heads * f.head_dim),
    "o_proj": lambda f: (f.heads * f.head_dim, f.hidden_size),
    "gate_proj": lambda f: (f.hidden_size, f.intermediate_size),
    "up_proj": lambda f: (f.hidden_size, f.intermediate_size),
    "down_proj": lambda f: (f.intermediate_size, f.hidden_size),
}


@dataclass
class BaseFacts:
    """What a config.json (and the tokenizer files next to it) say about a model's base."""

    path: str
    model_type: str
    hidden_size: int
    num_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tokenizer_size: int | None = None  # max token id + 1 in the tokenizer files, when present
    added_tokens: dict[int, str] = field(default_factory=dict)  # id -> text of every added token
    where: str = "config.json"

    def describe(self) -> str:
        return (f"{self.model_type}, {self.num_layers} blocks, width {self.hidden_size}, {self.heads} heads / "
                f"{self.kv_heads} KV heads, intermediate {self.intermediate_size}, vocabulary {self.vocab_size}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["added_tokens"] = {str(k): v for k, v in self.added_tokens.items()}
        return d

    @staticmethod
    def from_json(d: dict) -> "BaseFacts":
        d = dict(d)
        d["added_tokens"] = {int(k): str(v) for k, v in (d.get("added_tokens") or {}).items()}
        return BaseFacts(**d)


@dataclass
class CompatVerdict:
    """Whether one specialist's base is the run's base: reasons refuse it, notes only inform."""

    name: str
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    facts: BaseFacts | None = None

    @property
    def ok(self) -> bool:
        return not self.reasons

    def summary(self) -> str:
        if self.reasons:
            return f"{self.name!r} was trained on another base: {'; '.join(self.reasons)}."
        head = f"{self.name!r} fits the base" + (f" ({self.facts.describe()})" if self.facts else "")
        return head + "." + "".join(f" Note: {n}" for n in self.notes)

    def raise_if_refused(self, base: str) -> None:
        if self.reasons:
            raise ESMError(f"Specialist {self.name!r} was trained on another base than {base!r}: "
                           f"{'; '.join(self.reasons)}.",
                           fix="use specialists of one base; ES-Merging merges adapters of the same base only.")

    def to_json(self) -> dict:
        return dict(name=self.name, ok=self.ok, reasons=self.reasons, notes=self.notes,
                    facts=self.facts.to_json() if self.facts else None)


def _language_config(cfg: dict) -> tuple[dict, str]:
    """The config of the language model: the file itself, or a sub-config of a composite one."""
    if "hidden_size" in cfg and "num_hidden_layers" in cfg:
        return cfg, "config.json"
    subs = [k for k in SUB_CONFIGS if isinstance(cfg.get(k), dict)]
    subs += [k for k, v in cfg.items() if isinstance(v, dict) and k not in subs]
    for k in subs:
        if "hidden_size" in cfg[k] and "num_hidden_layers" in cfg[k]:
            return cfg[k], f"config.json -> {k}"
    return cfg, "config.json"


def _tokenizer_tokens(d: Path, what: str) -> tuple[int | None, dict[int, str]]:
    """(max token id + 1, added tokens by id) from tokenizer.json / tokenizer_config.json / added_tokens.json."""
    ids: set[int] = set()
    added: dict[int, str] = {}
    tj = d / "tokenizer.json"
    if tj.is_file():
        t = read_json(tj, what, TOKENIZER_CAP)
        vocab = (t.get("model") or {}).get("vocab") if isinstance(t, dict) else None
        if isinstance(vocab, dict):
            ids.update(int(v) for v in vocab.values() if isinstance(v, int))
        elif isinstance(vocab, list):
            ids.update(range(len(vocab)))
        for a in (t.get("added_tokens") or []) if isinstance(t, dict) else []:
            if isinstance(a, dict) and isinstance(a.get("id"), int):
                added[a["id"]] = str(a.get("content", ""))
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        c = read_json(tc, what, CONFIG_CAP)
        for k, v in ((c.get("added_tokens_decoder") or {}) if isinstance(c, dict) else {}).items():
            if str(k).isdigit() and isinstance(v, dict):
                added.setdefault(int(k), str(v.get("content", "")))
    at = d / "added_tokens.json"
    if at.is_file():
        a = read_json(at, what, CONFIG_CAP)
        for text, i in (a.items() if isinstance(a, dict) else []):
            if isinstance(i, int):
                added.setdefault(i, str(text))
    ids.update(added)
    return (max(ids) + 1 if ids else None), added


def read_base_facts(path: str | Path, what: str = "Base", *, strict: bool = True) -> BaseFacts | None:
    """The base facts of a model folder (or of a config.json file); None when it has no config.json, and
    (``strict=False``) when its config.json describes no language model.

    A folder written by :func:`esm_core.importing.import_specialist` answers with its source's facts."""
    p = Path(path)
    if p.is_file() and p.name == "config.json":
        p = p.parent
    if not p.is_dir():
        raise ESMError(f"{what}: {str(p)!r} is not a directory.", fix="point at a local model folder.")
    cj = p / "config.json"
    if not cj.is_file():
        rep = p / REPORT
        if rep.is_file():
            d = read_json(rep, what, CONFIG_CAP)
            if isinstance(d, dict) and isinstance(d.get("source_base"), dict):
                try:
                    return BaseFacts.from_json(d["source_base"])
                except TypeError:
                    return None
        return None
    raw = read_json(cj, what, CONFIG_CAP)
    if not isinstance(raw, dict):
        raise ESMError(f"{what}: {str(cj)!r} does not hold a JSON object.", fix="point at the model's own config.json.")
    cfg, where = _language_config(raw)
    missing = [k for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "vocab_size") if not isinstance(cfg.get(k), (int, str))]
    if missing and not strict:
        return None
    if missing:
        raise ESMError(f"{what}: {str(cj)!r} does not describe a transformer language model (no "
                       f"{', '.join(missing)}).", fix="point at the folder of the model's language model.")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        tok_size, added = _tokenizer_tokens(p, what)
        return BaseFacts(path=str(p), model_type=str(cfg["model_type"]), hidden_size=hidden,
                         num_layers=int(cfg["num_hidden_layers"]), heads=heads,
                         kv_heads=int(cfg.get("num_key_value_heads") or heads),
                         head_dim=int(cfg.get("head_dim") or hidden // max(heads, 1)),
                         intermediate_size=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]),
                         tokenizer_size=tok_size, added_tokens=added, where=where)
    except (TypeError, ValueError) as e:
        raise ESMError(f"{what}: {str(cj)!r} holds a non-numeric size ({e}).",
                       fix="point at the model's own config.json.") from None


def compare_bases(base: BaseFacts, other: BaseFacts, name: str) -> CompatVerdict:
    """The verdict for one specialist whose source names its base (``other``) against the run's ``base``."""
    v = CompatVerdict(name, facts=other)
    for label, a, b in [("model_type", other.model_type, base.model_type),
                        ("hidden size", other.hidden_size, base.hidden_size),
                        ("blocks", other.num_layers, base.num_layers),
                        ("attention heads", other.heads, base.heads),
                        ("KV heads", other.kv_heads, base.kv_heads),
                        ("head size", other.head_dim, base.head_dim),
                        ("intermediate size", other.intermediate_size, base.intermediate_size)]:
        if a != b:
            v.reasons.append(f"{label} {a} vs {b}")
    if other.vocab_size < base.vocab_size:
        v.reasons.append(f"vocabulary {other.vocab_size} vs {base.vocab_size} (a smaller vocabulary is another "
                         "tokenizer)")
    elif other.vocab_size > base.vocab_size:
        extra = [t for i, t in sorted(other.added_tokens.items()) if i >= base.vocab_size]
        names = f" ({', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''})" if extra else ""
        v.notes.append(f"vocabulary {other.vocab_size} vs {base.vocab_size}: the specialist added "
                       f"{other.vocab_size - base.vocab_size} token(s){names}. Not refused: the LoRA adapts the "
                       "blocks' linear layers, not the embeddings, so it applies to the base as is; inputs that "
                       "use the added tokens need the specialist's tokenizer and embedding rows, which are not "
                       "part of the adapter.")
    if other.tokenizer_size and base.tokenizer_size and other.tokenizer_size != base.tokenizer_size \
            and other.vocab_size == base.vocab_size:
        v.notes.append(f"the tokenizers hold {other.tokenizer_size} vs {base.tokenizer_size} tokens while the "
                       "embeddings have the same size; check that the specialist's prompts use the base's tokens.")
    return v


def shape_reasons(facts: BaseFacts, shapes: dict[LoraKey, tuple[int, ...]], limit: int = 3) -> list[str]:
    """Why LoRA factors of these shapes cannot sit on this base (blocks it lacks, widths that differ)."""
    out = []
    deep = sorted({k.layer for k in shapes if k.layer >= facts.num_layers})
    if deep:
        out.append(f"the adapter adapts block {deep[-1]}, the base has only {facts.num_layers} blocks")
    for k, s in sorted(shapes.items()):
        io = _IO.get(k.short)
        if io is None or len(s) != 2 or len(out) >= limit:
            continue
        fin, fout = io(facts)
        if (k.ab == "A" and s[1] != fin) or (k.ab == "B" and s[0] != fout):
            out.append(f"{k} has shape {tuple(s)}, the base's {k.short} maps {fin} -> {fout}")
    return out


def adapter_shapes(folder: Path) -> dict[LoraKey, tuple[int, ...]]:
    """Shapes of a PEFT folder's LoRA factors, read from the safetensors header (no tensor is loaded)."""
    f = folder / ADAPTER_WEIGHTS
    if not f.is_file():
        return {}
    out = {}
    try:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                parsed = parse_peft_key(key)
                if parsed:
                    out[parsed[0]] = tuple(st.get_slice(key).get_shape())
    except (SafetensorError, OSError) as e:
        raise ESMError(f"{str(f)!r} is not a readable safetensors file ({e}).",
                       fix="point at a PEFT adapter folder saved with safetensors.") from None
    return out


def check_bases(base: str | Path, specialists: dict[str, str | Path]) -> list[CompatVerdict]:
    """One verdict per specialist folder (PEFT folder, imported folder or checkpoint) against the base folder.

    The base must have a config.json. A specialist is judged by its own config.json (or, for an
    imported folder, its import report's record of the source's base) and by the shapes of its
    LoRA factors; a folder with neither gets a note that only loading can check it."""
    bf = read_base_facts(base, "Base")
    if bf is None:
        raise ESMError(f"Base {str(base)!r} has no config.json.", fix="point at the base model's folder.")
    out = []
    for name, path in specialists.items():
        facts = read_base_facts(path, f"Specialist {name!r}")
        v = compare_bases(bf, facts, name) if facts else CompatVerdict(name)
        shapes = adapter_shapes(Path(path))
        if v.ok:
            v.reasons += shape_reasons(bf, shapes)
        if facts is None and not shapes:
            v.notes.append("no config.json and no adapter weights to read: nothing to compare before loading.")
        elif facts is None:
            v.notes.append("no config.json: judged by the shapes of its LoRA factors only.")
        out.append(v)
    return out
