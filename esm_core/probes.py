"""Probe inputs (docs/METHOD.md section 1): samples per modality -> probes -> padded batches.

A probe is a short text prefix naming each modality followed by its token block:

    P_i = [BOS ; T_mol ; X_mol(i) ; T_prot ; X_prot(i) ; T_cell ; X_cell(i)]

Layout "joint": probe i holds the i-th sample of every modality; "separate": one modality per
probe. Samples are drawn (seeded) before they are validated, so a huge file costs only what is
drawn. The token span of every modality block is kept so that its rows can be cut out of the
hidden states (esm_core/states.py).

    probes = build_probes({"molecule": smiles, ...}, modality_specs, cfg)
    batcher = ProbeBatcher(sset, encoders, probes, cfg)
    batch = batcher.batch([0, 1, 2])         # input embeddings, attention mask, modality spans
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Iterator

import torch

from esm_core.config import fields_of_stage
from esm_core.errors import ESMError
from esm_core.progress import ProgressFn
from esm_core.samples import SampleReport, validate


# ------------------------------------------------------------------------------------ probes
@dataclass
class ProbeSet:
    """Which samples go into which probe; the raw samples and what was skipped."""

    modalities: list[str]
    prefixes: dict[str, str]
    samples: dict[str, list[str]]  # chosen, validated raw samples per modality
    sample_rows: dict[str, list[int]]  # their rows in the source list/file
    reports: dict[str, SampleReport]
    layout: str
    probes: list[list[tuple[str, int]]]  # per probe: [(modality, sample index), ...] in order

    @property
    def n_probes(self) -> int:
        return len(self.probes)

    def n_samples(self, modality: str) -> int:
        return len(self.samples[modality])

    def summary(self) -> dict:
        """Per modality: samples used, valid and bad among the examined rows, rows examined and given."""
        return {m: dict(used=len(self.samples[m]), valid=len(self.reports[m].values), bad=len(self.reports[m].bad),
                        examined=self.reports[m].n_examined, total=self.reports[m].n_total)
                for m in self.modalities}


def _draw_order(n_rows: int, n: int, rng: random.Random) -> Iterator[int]:
    """Row indices in a seeded random order, drawn lazily: first the n rows ``rng.sample`` picks (so a
    file without bad rows gives the draw that validating every row first gave), then the other rows
    shuffled one step at a time (Fisher-Yates), only as far as they are needed."""
    first = rng.sample(range(n_rows), min(n, n_rows))
    yield from first
    taken = set(first)
    rest = [i for i in range(n_rows) if i not in taken]
    for j in range(len(rest)):
        k = rng.randrange(j, len(rest))
        rest[j], rest[k] = rest[k], rest[j]
        yield rest[j]


def sample_modality(raws: list, kind: str, n: int, seed: int, min_count: int, name: str,
                    progress: ProgressFn | None = None) -> tuple[SampleReport, list[int]]:
    """Draw n valid samples (seeded) and refuse when fewer than min_count are valid.

    Only drawn rows are validated: rows are examined in a seeded random order until enough are valid
    or every row was examined, so a huge file costs the validation of a few rows. Returns the report
    of the examined rows and the indices (into ``report.values``) of the samples to use.
    """
    rng = random.Random(f"{seed}:{name}")
    want = max(n, min_count)

    def step(valid: int, examined: int) -> None:
        progress(f"checking {name} samples: {valid} valid of {examined} drawn",
                 max(valid / want, examined / max(len(raws), 1)))

    rep = validate(raws, kind, order=_draw_order(len(raws), want, rng), want=want,
                   progress=step if progress else None)
    if len(rep.values) < min_count:
        reasons = "; ".join(f"row {r}: {why}" for r, _, why in rep.bad[:3])
        raise ESMError(f"Modality {name!r}: only {len(rep.values)} of {rep.n_total} samples are valid "
                       f"({len(rep.bad)} bad{': ' + reasons if reasons else ''}), fewer than the "
                       f"{min_count} needed.", fix="supply more valid samples or lower min_probes.")
    if progress:
        progress(f"{name}: {len(rep.values)} valid of {rep.n_examined} rows checked ({rep.n_total} given)", 1.0)
    idx = list(range(len(rep.values)))
    if n < len(idx):  # min_count > n: more were validated than are used
        idx = sorted(rng.sample(idx, n))
    return rep, idx


def build_probes(raw: dict[str, list], modalities, cfg, progress: ProgressFn | None = None) -> ProbeSet:
    """Probe set from raw samples per modality (config.ModalitySpec list, config.MethodConfig)."""
    names = [m.name for m in modalities]
    missing = [n for n in names if n not in raw]
    if missing:
        raise ESMError(f"No probe samples for modality {missing}.", fix="give samples for every modality.")
    reports, samples, rows = {}, {}, {}
    for j, m in enumerate(modalities):
        part = None if progress is None else (lambda msg, f, j=j: progress(msg, (j + f) / len(modalities)))
        rep, idx = sample_modality(list(raw[m.name]), m.kind, cfg.probes_per_modality, cfg.seed,
                                   cfg.min_probes, m.name, part)
        reports[m.name] = rep
        samples[m.name] = [rep.values[i] for i in idx]
        rows[m.name] = [rep.rows[i] for i in idx]
    if cfg.layout == "joint":
        n = min(len(v) for v in samples.values())
        for k in names:
            samples[k], rows[k] = samples[k][:n], rows[k][:n]
        probes = [[(k, i) for k in names] for i in range(n)]
    else:
        probes = [[(k, i)] for k in names for i in range(len(samples[k]))]
    return ProbeSet(names, {m.name: m.prefix for m in modalities}, samples, rows, reports, cfg.layout, probes)


# ------------------------------------------------------------------------------------ batches
@dataclass
class Batch:
    indices: list[int]  # probe indices
    inputs_embeds: torch.Tensor  # [b, T, d]
    attention_mask: torch.Tensor  # [b, T]
    spans: torch.Tensor  # [b, M, 2] (start, end) of each modality block; (-1, -1) when absent
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> [b, T] bool


class ProbeBatcher:
    """Turns probes into padded input embeddings with modality spans (right padding).

    How the text around the modality blocks is tokenised is ``cfg.probe_text``:

    - ``segments``: BOS, then per modality its prefix and block. A text-encoded block is tokenised
      TOGETHER with its prefix (one string, spans from character offsets), so a prefix's trailing
      space joins the block's first word as the tokenizer would join it in running text; a
      soft-token block (SMILES -> query tokens, ESM-2, ...) follows its separately tokenised prefix.
    - ``chat_template``: the whole probe ("Molecule: ...\nProtein: ...\nCell: ...") is the user turn
      of the tokenizer's chat template and every run of text between soft-token blocks is tokenised
      as ONE string (the authors' code tokenises the templated prompt once); spans from offsets.

    A token belongs to a modality's block when its characters overlap the block's text; a block
    longer than the encoder's ``max_tokens`` keeps its first tokens and the rest are left out.
    """

    def __init__(self, sset, encoders: dict, probes: ProbeSet, cfg, check_length: bool = True):
        self.sset = sset
        self.encoders = encoders
        self.probes = probes
        self.cfg = cfg
        self.embed = sset.model.get_input_embeddings()
        self.tokenizer = tok = sset.tokenizer
        self.mode = getattr(cfg, "probe_text", "segments")
        self.bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        if self.mode == "chat_template":
            self._head, self._tail = _template_around(tok)
        if any(_is_text(e) for e in encoders.values()) or self.mode == "chat_template":
            _require_offsets(tok)
        self.truncated = {m: 0 for m in probes.modalities}
        for m in probes.modalities:
            enc = encoders[m]
            if hasattr(enc, "truncated"):
                self.truncated[m] = sum(bool(enc.truncated(s)) for s in probes.samples[m])
        self._layouts: dict[int, list] = {}
        self.lengths = [self._length(i) for i in range(probes.n_probes)]
        if check_length:
            self._check_lengths()

    # ---------------------------------------------------------------- layout
    def _block_len(self, m: str, sample: str) -> int:
        enc = self.encoders[m]
        if hasattr(enc, "n_tokens"):
            n = enc.n_tokens
            return n(sample) if callable(n) else int(n)
        return len(enc.tokens(sample))

    def _tokenise_run(self, text: str, marks: list[tuple[str, int, int]]) -> list[tuple[str | None, list[int]]]:
        """Tokenise one string; group its tokens into (modality or None, ids) pieces by character marks."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        out: list[tuple[str | None, list[int]]] = []
        kept = {m: 0 for m, _, _ in marks}
        for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            lab = next((m for m, s0, s1 in marks if a < s1 and b > s0 and b > a), None)
            if lab is not None:
                cap = getattr(self.encoders[lab], "max_tokens", None)
                kept[lab] += 1
                if cap and kept[lab] > cap:
                    continue  # over the block's cap: left out
            if out and out[-1][0] == lab:
                out[-1][1].append(int(t))
            else:
                out.append((lab, [int(t)]))
        return out

    def layout(self, i: int) -> list[tuple[str | None, list[int] | str]]:
        """Probe i in order: (None, text ids), (m, text ids) of a text block, (m, raw) of a soft block."""
        got = self._layouts.get(i)
        if got is not None:
            return got
        parts = self.probes.probes[i]
        out: list = []
        if self.mode == "chat_template":
            text, marks = self._head, []
            for j, (m, s) in enumerate(parts):
                raw = self.probes.samples[m][s]
                text += ("\n" if j else "") + self.probes.prefixes[m]
                if _is_text(self.encoders[m]):
                    body = self.encoders[m].text_of(raw)
                    marks.append((m, len(text), len(text) + len(body)))
                    text += body
                else:  # a soft block ends the current run of text
                    out += self._tokenise_run(text, marks)
                    out.append((m, raw))
                    text, marks = "", []
            text += self._tail
            if text:
                out += self._tokenise_run(text, marks)
        else:
            if self.bos:
                out.append((None, list(self.bos)))
            for j, (m, s) in enumerate(parts):
                raw = self.probes.samples[m][s]
                prefix = ("\n" if j else "") + self.probes.prefixes[m]
                if _is_text(self.encoders[m]):
                    body = self.encoders[m].text_of(raw)
                    out += self._tokenise_run(prefix + body, [(m, len(prefix), len(prefix) + len(body))])
                else:
                    if prefix:
                        out += self._tokenise_run(prefix, [])
                    out.append((m, raw))
        merged: list = []
        for lab, x in out:  # neighbouring text pieces of the same label become one
            if merged and merged[-1][0] == lab and isinstance(x, list) and isinstance(merged[-1][1], list):
                merged[-1] = (lab, merged[-1][1] + x)
            elif not (isinstance(x, list) and not x):
                merged.append((lab, x))
        self._layouts[i] = merged
        return merged

    def _length(self, i: int) -> int:
        return sum(len(x) if isinstance(x, list) else self._block_len(m, x) for m, x in self.layout(i))

    def _check_lengths(self) -> None:
        limit = self.cfg.max_probe_tokens
        mpe = getattr(self.sset.lm.config, "max_position_embeddings", None)
        if mpe:
            limit = min(limit, int(mpe))
        for i, n in enumerate(self.lengths):
            if n > limit:
                parts = ", ".join(f"{m} #{self.probes.sample_rows[m][s]}" for m, s in self.probes.probes[i])
                raise ESMError(f"Probe {i} ({parts}) is {n} tokens long, over the limit of {limit} "
                               f"(max_probe_tokens / the model's max_position_embeddings).",
                               fix="lower max_modality_tokens or drop very long samples.")

    # ---------------------------------------------------------------- pieces
    def pieces(self, i: int) -> list[tuple[str | None, torch.Tensor | list[int] | str, list[str]]]:
        """(modality or None, token ids or raw soft-block input, display tokens) for probe i, in order."""
        tok = self.tokenizer
        out: list = []
        for m, x in self.layout(i):
            if isinstance(x, list):
                out.append((m, x, [tok.decode([t]) for t in x]))
            else:
                out.append((m, x, self.encoders[m].tokens(x)))
        return out

    def tokens(self, i: int) -> list[tuple[str, str | None]]:
        """Display form of probe i: (token, modality or None) per position (paper Fig. 4)."""
        return [(t, m) for m, _, toks in self.pieces(i) for t in toks]

    def batch(self, indices: list[int]) -> Batch:
        dev = self.embed.weight.device
        dtype = self.embed.weight.dtype
        M = len(self.probes.modalities)
        mpos = {m: j for j, m in enumerate(self.probes.modalities)}
        seqs, spans = [], torch.full((len(indices), M, 2), -1, dtype=torch.long)
        # encode modality blocks, batching encoders that can (soft tokens)
        blocks: dict[tuple[int, str], torch.Tensor] = {}
        for m in self.probes.modalities:
            enc = self.encoders[m]
            if _is_text(enc):
                continue  # text blocks come as ids from the layout
            want = [(b, self.probes.samples[m][s]) for b, i in enumerate(indices)
                    for (mm, s) in self.probes.probes[i] if mm == m]
            if not want:
                continue
            if hasattr(enc, "encode_many"):
                embs = enc.encode_many([r for _, r in want])
                for (b, _), e in zip(want, embs):
                    blocks[(b, m)] = e
            else:
                for b, r in want:
                    blocks[(b, m)] = enc.encode(r)
        for b, i in enumerate(indices):
            parts, pos = [], 0
            for m, x in self.layout(i):
                e = self._ids_embed(x) if isinstance(x, list) else blocks[(b, m)].to(device=dev, dtype=dtype)
                if m is not None:
                    spans[b, mpos[m]] = torch.tensor([pos, pos + e.shape[0]])
                parts.append(e)
                pos += e.shape[0]
            seqs.append(torch.cat(parts, dim=0))
        T = max(s.shape[0] for s in seqs)
        d = seqs[0].shape[1]
        x = torch.zeros(len(seqs), T, d, device=dev, dtype=dtype)
        mask = torch.zeros(len(seqs), T, device=dev, dtype=torch.long)
        for b, s in enumerate(seqs):
            x[b, : s.shape[0]] = s
            mask[b, : s.shape[0]] = 1
        ar = torch.arange(T)
        masks = {}
        for m, j in mpos.items():
            st, en = spans[:, j, 0:1], spans[:, j, 1:2]
            masks[m] = ((ar >= st) & (ar < en)).to(dev)
        return Batch(list(indices), x, mask, spans, masks)

    def _ids_embed(self, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.embed(torch.tensor(ids, dtype=torch.long, device=self.embed.weight.device))

    def batches(self, batch_size: int) -> Iterator[list[int]]:
        """Probe indices in batches of similar length (less padding); every probe once."""
        order = sorted(range(self.probes.n_probes), key=lambda i: (self.lengths[i], i))
        for s in range(0, len(order), batch_size):
            yield order[s:s + batch_size]


# ------------------------------------------------------------------------------------ text helpers
_SENTINEL = "\u2063ESM_PROBE\u2063"


def _is_text(enc) -> bool:
    """A text encoder places its block as text (``text_of``) that is tokenised with its surroundings."""
    return callable(getattr(enc, "text_of", None))


def _template_around(tok) -> tuple[str, str]:
    """The tokenizer's chat template around one user turn, as (text before, text after) the content."""
    if not getattr(tok, "chat_template", None):
        raise ESMError("probe_text=chat_template, but the base model's tokenizer has no chat template.",
                       fix="set probe_text: segments, or give the tokenizer a chat_template (tokenizer_config.json "
                           "or chat_template.jinja next to it).")
    full = tok.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                   add_generation_prompt=True)
    if full.count(_SENTINEL) != 1:
        raise ESMError("The tokenizer's chat template does not place the user's message once.",
                       fix="set probe_text: segments.")
    head, tail = full.split(_SENTINEL)
    return head, tail


def _require_offsets(tok) -> None:
    if not getattr(tok, "is_fast", False):
        raise ESMError(f"The tokenizer ({type(tok).__name__}) gives no character offsets, which probe spans need.",
                       fix="save the tokenizer as tokenizer.json (a fast tokenizer) next to the model.")


# ------------------------------------------------------------------------------------ caps per config
def probe_key(cfg) -> str:
    """What a config's probes and their batcher depend on (its probe-stage settings)."""
    return cfg.fingerprint(*sorted(fields_of_stage("probes", config=type(cfg))))


def modality_cap(m, cfg) -> int:
    """The token cap of a modality's block under cfg: max_modality_tokens, or the modality's own lower one."""
    return min(cfg.max_modality_tokens, m.max_tokens or cfg.max_modality_tokens)


def set_caps(encoders: dict, modalities, cfg) -> None:
    """Cap the encoders that take a cap (``max_tokens``) for cfg, in place: for encoders not yet shared."""
    for m in modalities:
        if hasattr(encoders[m.name], "max_tokens"):
            encoders[m.name].max_tokens = modality_cap(m, cfg)


def capped_encoders(encoders: dict, modalities, cfg) -> dict:
    """A view of the encoders capped for cfg: a shallow copy of each one that takes a cap (its weights and its
    caches of uncapped tokens are shared), the others as they are. The given encoders are not changed."""
    out = dict(encoders)
    for m in modalities:
        enc, cap = encoders[m.name], modality_cap(m, cfg)
        if hasattr(enc, "max_tokens") and enc.max_tokens != cap:
            out[m.name] = copy.copy(enc)
            out[m.name].max_tokens = cap
    return out
