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

import random
from dataclasses import dataclass, field
from typing import Iterator

import torch

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
    """Turns probes into padded input embeddings with modality spans (right padding)."""

    def __init__(self, sset, encoders: dict, probes: ProbeSet, cfg, check_length: bool = True):
        self.sset = sset
        self.encoders = encoders
        self.probes = probes
        self.cfg = cfg
        self.embed = sset.model.get_input_embeddings()
        tok = sset.tokenizer
        self.bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        self._prefix_ids = {}
        for j, m in enumerate(probes.modalities):
            for first in (True, False):
                text = (probes.prefixes[m] if first else "\n" + probes.prefixes[m])
                self._prefix_ids[(m, first)] = list(tok(text, add_special_tokens=False)["input_ids"]) if text else []
        self.truncated = {m: 0 for m in probes.modalities}
        for m in probes.modalities:
            enc = encoders[m]
            if hasattr(enc, "truncated"):
                self.truncated[m] = sum(bool(enc.truncated(s)) for s in probes.samples[m])
        self.lengths = [self._length(i) for i in range(probes.n_probes)]
        if check_length:
            self._check_lengths()

    def _block_len(self, m: str, sample: str) -> int:
        enc = self.encoders[m]
        if hasattr(enc, "n_tokens"):
            n = enc.n_tokens
            return n(sample) if callable(n) else int(n)
        return len(enc.tokens(sample))

    def _length(self, i: int) -> int:
        n = len(self.bos)
        for j, (m, s) in enumerate(self.probes.probes[i]):
            n += len(self._prefix_ids[(m, j == 0)]) + self._block_len(m, self.probes.samples[m][s])
        return n

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
    def pieces(self, i: int) -> list[tuple[str | None, torch.Tensor | list[int], list[str]]]:
        """(modality or None, token ids or embeddings, display tokens) for probe i, in order."""
        tok = self.sset.tokenizer
        out: list = []
        if self.bos:
            out.append((None, self.bos, [tok.decode(self.bos)]))
        for j, (m, s) in enumerate(self.probes.probes[i]):
            ids = self._prefix_ids[(m, j == 0)]
            if ids:
                out.append((None, ids, [tok.decode([t]) for t in ids]))
            raw = self.probes.samples[m][s]
            out.append((m, raw, self.encoders[m].tokens(raw)))
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
            if self.bos:
                parts.append(self._ids_embed(self.bos))
                pos += len(self.bos)
            for j, (m, s) in enumerate(self.probes.probes[i]):
                ids = self._prefix_ids[(m, j == 0)]
                if ids:
                    parts.append(self._ids_embed(ids))
                    pos += len(ids)
                e = blocks[(b, m)].to(device=dev, dtype=dtype)
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
