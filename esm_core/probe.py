"""Probe inputs and the batched forward that captures every block's output (METHOD.md section 1).

A probe is a short text prefix naming each modality followed by its token block:

    P_i = [BOS ; T_mol ; X_mol(i) ; T_prot ; X_prot(i) ; T_cell ; X_cell(i)]

Layout "joint": probe i holds the i-th sample of every modality; "separate": one modality per
probe. The token span of every modality block is kept so that its rows can be cut out of the hidden
states. Hidden states are the OUTPUTS of the transformer blocks, captured with forward hooks (not
``output_hidden_states``, whose last entry has the final norm applied); l = 0 is the input
embeddings.

    probes = build_probes({"molecule": smiles, ...}, modality_specs, cfg)
    batcher = ProbeBatcher(sset, encoders, probes, cfg)
    states = collect_hidden_states(sset, batcher, [None, *sset.names])
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .errors import Cancelled, ESMError
from .samples import SampleReport, validate

ProgressFn = Callable[[str, float], None]


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


# ------------------------------------------------------------------------------------ capture
class BlockCapture:
    """Forward hooks on every transformer block: keep each block's output (the residual stream).

    With ``detach_inputs=True`` the input of every block is detached as it enters, so that the
    output of block l depends on the parameters of block l only: one backward of sum_l d_l then
    gives d d_l / d theta_l for every l at once (METHOD.md section 3, step 2).
    """

    def __init__(self, blocks, detach_inputs: bool = False):
        self.blocks = blocks
        self.detach_inputs = detach_inputs
        self.outputs: list[torch.Tensor | None] = [None] * len(blocks)
        self._handles = []

    def __enter__(self):
        for l, blk in enumerate(self.blocks):
            self._handles.append(blk.register_forward_hook(self._out_hook(l)))
            if self.detach_inputs:
                self._handles.append(blk.register_forward_pre_hook(self._detach_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _out_hook(self, l: int):
        def hook(module, args, output):
            self.outputs[l] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    @staticmethod
    def _detach_hook(module, args, kwargs):
        if args:
            return (args[0].detach(), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = kwargs["hidden_states"].detach()
            return args, kwargs
        return None


def forward_blocks(sset, batch: Batch, detach_inputs: bool = False, grad_prefix: int | None = None) -> list[torch.Tensor]:
    """[input embeddings, block 1 output, ..., block L output] for the currently active model.

    ``grad_prefix=e``: only positions < e need gradients (the tokens whose distances are
    differentiated end there). The prefix runs with autograd and a KV cache, the rest continues from
    that cache without building a graph; outputs are identical, the backward covers the prefix only.
    """
    # The decoder without its LM head: block outputs are all we need, the vocabulary projection is not.
    decoder = sset.lm.get_decoder() if hasattr(sset.lm, "get_decoder") else sset.lm
    x, mask = batch.inputs_embeds, batch.attention_mask
    T = x.shape[1]
    with BlockCapture(sset.blocks, detach_inputs=detach_inputs) as cap:
        if grad_prefix is None or not 0 < grad_prefix < T or not torch.is_grad_enabled():
            decoder(inputs_embeds=x, attention_mask=mask, use_cache=False)
            return [x, *cap.outputs]
        e = int(grad_prefix)
        out = decoder(inputs_embeds=x[:, :e], attention_mask=mask[:, :e], use_cache=True)
        first = list(cap.outputs)
        with torch.no_grad():
            decoder(inputs_embeds=x[:, e:], attention_mask=mask, past_key_values=out.past_key_values,
                    use_cache=True)
        second = list(cap.outputs)
    return [x, *(torch.cat([a, b], dim=1) for a, b in zip(first, second))]


# ------------------------------------------------------------------------------------ states
@dataclass
class HiddenStates:
    """Hidden states of several models on one probe set.

    pooled[m]: [n_models, L+1, N_m, d] mean over modality-m tokens per probe (l = 0: inputs).
    tokens[l][m]: [n_models, n_tok, d] per-token rows of modality m at block l (token_layers only);
    token_sample[m]: [n_tok] index of the sample each token row belongs to.
    """

    models: list[str]
    modalities: list[str]
    pooled: dict[str, torch.Tensor]
    tokens: dict[int, dict[str, torch.Tensor]]
    token_sample: dict[str, torch.Tensor]
    num_layers: int

    def model_index(self, name: str) -> int:
        return self.models.index(name)


class StateCollector:
    """Accumulates pooled and per-token states batch by batch for a list of models."""

    def __init__(self, models: list[str], probes: ProbeSet, num_layers: int, hidden: int, token_layers):
        self.models = models
        self.probes = probes
        self.L = num_layers
        self.token_layers = sorted({(l if l >= 0 else num_layers + 1 + l) for l in token_layers})
        for l in self.token_layers:
            if not 0 <= l <= num_layers:
                raise ESMError(f"token_layers holds {l}, outside 0..{num_layers}.",
                               fix="use block indices between 0 and the number of blocks (or -1).")
        K = len(models)
        self.pooled = {m: torch.zeros(K, num_layers + 1, probes.n_samples(m), hidden) for m in probes.modalities}
        self._tok: dict[tuple[int, str, int], list[torch.Tensor]] = {}
        self._tok_sample: dict[str, list[torch.Tensor]] = {m: [] for m in probes.modalities}

    def add(self, model: str, batch: Batch, outs: list[torch.Tensor]) -> None:
        k = self.models.index(model)
        first = k == 0
        for j, m in enumerate(self.probes.modalities):
            sel = [(b, s) for b, i in enumerate(batch.indices) for (mm, s) in self.probes.probes[i] if mm == m]
            if not sel:
                continue
            mask = batch.masks[m].float()  # [b, T]
            cnt = mask.sum(1).clamp_min(1)
            bidx = torch.tensor([b for b, _ in sel])
            sidx = torch.tensor([s for _, s in sel])
            for l, h in enumerate(outs):
                hm = (h.detach().float() * mask.unsqueeze(-1)).sum(1) / cnt.unsqueeze(-1)
                self.pooled[m][k, l, sidx] = hm[bidx.to(hm.device)].cpu()
                if l in self.token_layers:
                    rows = h.detach().float()[batch.masks[m]]  # [n_tok_in_batch, d], row-major over (b, t)
                    self._tok.setdefault((k, m, l), []).append(rows.cpu())
            if first:
                per_b = batch.masks[m].sum(1).cpu()
                sample_of_b = torch.full((len(batch.indices),), -1, dtype=torch.long)
                sample_of_b[bidx] = sidx
                self._tok_sample[m].append(torch.repeat_interleave(sample_of_b, per_b))

    def result(self) -> HiddenStates:
        tokens: dict[int, dict[str, torch.Tensor]] = {}
        for l in self.token_layers:
            tokens[l] = {}
            for m in self.probes.modalities:
                per_model = [torch.cat(self._tok.get((k, m, l), [torch.zeros(0)])) for k in range(len(self.models))]
                if all(t.numel() for t in per_model):
                    tokens[l][m] = torch.stack(per_model)
        ts = {m: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for m, v in self._tok_sample.items()}
        return HiddenStates(list(self.models), list(self.probes.modalities), self.pooled, tokens, ts, self.L)


def collect_hidden_states(sset, batcher: ProbeBatcher, models: list[str | None], *, batch_size: int = 16,
                          token_layers=(-1,), progress: ProgressFn | None = None) -> HiddenStates:
    """No-grad forward of each model (None = base) over all probes; returns pooled and token states."""
    names = ["base" if m is None else m for m in models]
    col = StateCollector(names, batcher.probes, sset.num_layers, sset.hidden_size, token_layers)
    chunks = list(batcher.batches(batch_size))
    total = len(chunks) * len(models)
    done = 0
    with torch.no_grad():
        for idx in chunks:
            batch = batcher.batch(idx)
            for name, m in zip(names, models):
                with sset.use(m):
                    col.add(name, batch, forward_blocks(sset, batch))
                done += 1
                if progress:
                    progress(f"hidden states: {name}", done / total)
    return col.result()


__all__ = ["ProbeSet", "ProbeBatcher", "Batch", "BlockCapture", "HiddenStates", "StateCollector",
           "build_probes", "sample_modality", "forward_blocks", "collect_hidden_states", "Cancelled"]
