"""Hidden states (docs/METHOD.md section 1): the outputs of every transformer block on the probes.

Hidden states are the OUTPUTS of the blocks, captured with forward hooks (not
``output_hidden_states``, whose last entry has the final norm applied); l = 0 is the input
embeddings. They are mean-pooled per modality for the layer signal and, for the blocks in
``token_layers``, kept per token for the embedding maps.

    states = collect_hidden_states(sset, batcher, [None, *sset.names])   # None = the base
    states.pooled["molecule"]                # [n_models, L+1, N, d]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esm_core.errors import ESMError
from esm_core.probes import Batch, ProbeBatcher, ProbeSet
from esm_core.progress import ProgressFn


# ------------------------------------------------------------------------------------ capture
class BlockCapture:
    """Forward hooks on every transformer block: keep each block's output (the residual stream).

    With ``detach_inputs=True`` the input of every block is detached as it enters, so that the
    output of block l depends on the parameters of block l only: one backward of sum_l d_l then
    gives d d_l / d theta_l for every l at once (docs/METHOD.md section 3, step 2).
    """

    def __init__(self, blocks, detach_inputs: bool = False, on_block=None):
        self.blocks = blocks
        self.detach_inputs = detach_inputs
        self.on_block = on_block  # called with (l, output of block l) as each block finishes
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
            h = output[0] if isinstance(output, (tuple, list)) else output
            if self.on_block is None:
                self.outputs[l] = h
                return None
            # streaming: the block's work is done here (e.g. its backward); what goes on is detached,
            # so this block's autograd graph is freed before the next block runs
            self.on_block(l, h)
            self.outputs[l] = h = h.detach()
            return (h, *output[1:]) if isinstance(output, (tuple, list)) else h
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


def forward_blocks(sset, batch: Batch, detach_inputs: bool = False, grad_prefix: int | None = None,
                   on_block=None) -> list[torch.Tensor]:
    """[input embeddings, block 1 output, ..., block L output] for the currently active model.

    ``grad_prefix=e``: only positions < e need gradients (the tokens whose distances are
    differentiated end there). The prefix runs with autograd and a KV cache, the rest continues from
    that cache without building a graph; outputs are identical, the backward covers the prefix only.

    ``on_block(l, h)`` (block streaming): called with block l's output (positions < e) as soon as the
    block has run, with the graph back to that block's parameters only (inputs are detached); the
    outputs are returned detached, so at most one block's graph exists at a time.
    """
    # The decoder without its LM head: block outputs are all we need, the vocabulary projection is not.
    decoder = sset.lm.get_decoder() if hasattr(sset.lm, "get_decoder") else sset.lm
    x, mask = batch.inputs_embeds, batch.attention_mask
    T = x.shape[1]
    with BlockCapture(sset.blocks, detach_inputs=detach_inputs, on_block=on_block) as cap:
        if grad_prefix is None or not 0 < grad_prefix < T or not torch.is_grad_enabled():
            decoder(inputs_embeds=x, attention_mask=mask, use_cache=False)
            return [x, *cap.outputs]
        e = int(grad_prefix)
        out = decoder(inputs_embeds=x[:, :e], attention_mask=mask[:, :e], use_cache=True)
        first = list(cap.outputs)
        cap.on_block = None  # the rest of the sequence needs no gradient
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
