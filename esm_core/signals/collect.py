"""The one pass over the probes that yields every embedding-space signal (docs/METHOD.md sections 1-3).

Per batch: one no-grad forward of the base (adapters disabled) captures H^B; then for each
specialist one forward with block inputs detached captures H^k and, block by block as the forward
goes (block streaming), one backward per element-signal modality of that block's loss gives the
unit-wise absolute gradients of the block's LoRA factors (grads.PerUnitAbsGrad). So the autograd
graph of one block exists at a time, whatever the depth; the batch's block outputs (no graph) are
kept for pooling. The base forward is shared by all specialists, the model exists once, and no
step loops over samples.

    sig = compute_signals(sset, batcher, cfg, progress=print_progress)
    sig.states.pooled["molecule"]    # [K+1, L+1, N, d]: base first, then the specialists
    sig.scores["molecule"][key]      # g^k for one LoRA factor (raw, before z-scoring)
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from esm_core.adapters import LoraKey
from esm_core.probes import ProbeBatcher
from esm_core.progress import ProgressFn
from esm_core.signals.grads import PerUnitAbsGrad
from esm_core.states import StateCollector, forward_blocks

_TINY = 1e-30  # floor under squared norms: d||x||/dx := 0 at x = 0


@dataclass
class Signals:
    states: "object"  # probe.HiddenStates: base + K specialists
    scores: dict[str, dict[LoraKey, torch.Tensor]] | None  # specialist -> key -> raw g (None: layer mode)
    timings: dict[str, float] = field(default_factory=dict)
    n_units: int = 0


def element_modalities(sset, cfg, name: str) -> list[str]:
    if cfg.element_modalities == "own":
        return [sset.modality_of(name)]
    return None  # all


def layer_losses(h: torch.Tensor, base_h: torch.Tensor, masks: dict, mods: list[str], cfg,
                 unit: torch.Tensor) -> list[torch.Tensor]:
    """The element-signal loss of ONE block, one scalar per modality (the loss of a modality is the sum
    of these over blocks, and block l's parameters see only block l's term: inputs are detached).

    frobenius: loss_{m,l} = sum_i ||H^k_{m,l}(i) - H^B_{m,l}(i)||_F           (paper, per sample)
    mse:       loss_{m,l} = sum_units mean_{tokens of m in unit, dims} (H^k - H^B)^2
               (reference code: the mean squared difference of a mini-batch)
    ``h``/``base_h`` [b, e, d] and the masks cover the same first e positions.
    """
    losses = []
    d = h.shape[-1]
    acc = torch.promote_types(h.dtype, torch.float32)  # float32, or float64 for float64 models
    for m in mods:
        mask = masks[m]
        if not bool(mask.any()):
            continue
        diff = (h.to(acc) - base_h.to(acc)) * mask.unsqueeze(-1).to(acc)
        sq = diff.pow(2).sum(dim=(1, 2))  # [b]
        if cfg.element_signal == "frobenius":
            per_sample = sq.clamp_min(_TINY).sqrt()
        else:
            ntok = mask.sum(1).to(acc)  # [b]
            valid = unit >= 0
            n_units = int(unit.max()) + 1 if bool(valid.any()) else 0
            tok_unit = torch.zeros(n_units, device=ntok.device, dtype=acc).index_add_(
                0, unit[valid].to(ntok.device), ntok[valid])
            denom = torch.where(valid.to(ntok.device), tok_unit[unit.clamp_min(0).to(ntok.device)],
                                torch.ones_like(ntok))
            w = torch.where(denom > 0, 1.0 / (denom.clamp_min(1) * d), torch.zeros_like(denom))
            per_sample = sq * w
        losses.append(per_sample.sum())
    return losses


def last_block_norm(sset):
    """The decoder's final norm (RMSNorm for LLaMA): the base's weights, applied position-wise."""
    decoder = sset.lm.get_decoder() if hasattr(sset.lm, "get_decoder") else sset.lm
    norm = getattr(decoder, "norm", None)
    if norm is None:
        from esm_core.errors import ESMError

        raise ESMError("element_last_block=final_norm needs the decoder's final norm, and this model has none "
                       "(no `norm` on its decoder).", fix="set element_last_block to block_output.")
    return norm


def units_for(batch_indices: list[int], group: int) -> tuple[torch.Tensor, int]:
    """Unit of each sample in a batch (units = consecutive probes in groups of `group`, global order),
    numbered 0..U-1 in order of first appearance in the batch."""
    local: dict[int, int] = {}
    ids = [local.setdefault(i // group, len(local)) for i in batch_indices]
    return torch.tensor(ids, dtype=torch.long), len(local)


def unit_batches(lengths: list[int], group: int, batch_size: int) -> list[list[int]]:
    """Batches of whole units, units sorted by length so that padding is small (order does not change
    any sum over units)."""
    n = len(lengths)
    units = [list(range(s, min(n, s + group))) for s in range(0, n, group)]
    order = sorted(range(len(units)), key=lambda u: (max(lengths[i] for i in units[u]), u))
    per = max(1, batch_size // group)
    return [[i for u in order[s:s + per] for i in units[u]] for s in range(0, len(order), per)]


def grad_prefix(batch, mods: list[str]) -> int:
    """Positions after the last token of the element-signal modalities need no gradient."""
    ends = [int(batch.masks[m].any(0).nonzero().max()) + 1 for m in mods if bool(batch.masks[m].any())]
    return max(ends) if ends else 0


def compute_signals(sset, batcher: ProbeBatcher, cfg, *, need_element: bool = True,
                    progress: ProgressFn | None = None, n_groups: int | None = None) -> Signals:
    """Hidden states of base and specialists, and (unless need_element=False) raw element scores.
    ``n_groups``: scores kept per group of units ([G, *shape]; unit u in group u % G)."""
    t0 = time.perf_counter()
    names = list(sset.names)
    col = StateCollector(["base", *names], batcher.probes, sset.num_layers, sset.hidden_size, cfg.token_layers)
    group = max(1, int(cfg.element_group))
    bs = -(-int(cfg.batch_size) // group) * group  # a multiple of the unit size
    chunks = unit_batches(batcher.lengths, group, bs)
    steps = len(chunks) * (1 + len(names))
    done, t_fwd, t_bwd, units = 0, 0.0, 0.0, 0
    mods_of = {n: (element_modalities(sset, cfg, n) or batcher.probes.modalities) for n in names}
    L = sset.num_layers
    final_norm = last_block_norm(sset) if getattr(cfg, "element_last_block", "block_output") == "final_norm" else None

    with contextlib.ExitStack() as stack:
        stack.enter_context(sset.exclusive("estimation"))  # hooks and grad flags live on the shared model
        grads = {}
        if need_element:
            for n in names:
                grads[n] = stack.enter_context(PerUnitAbsGrad(sset, n, n_groups=n_groups))
        for idx in chunks:
            batch = batcher.batch(idx)
            unit, n_units = units_for(idx, group)
            units += n_units
            global_units = list(dict.fromkeys(i // group for i in idx))  # in the order of units_for's ids
            group_of_unit = torch.tensor([u % n_groups for u in global_units]) if n_groups else None
            ts = time.perf_counter()
            with torch.no_grad(), sset.use(None):
                base_outs = forward_blocks(sset, batch)
            col.add("base", batch, base_outs)
            t_fwd += time.perf_counter() - ts
            done += 1
            if progress:
                progress("base forward", done / steps)
            for n in names:
                with sset.use(n):
                    if need_element:
                        ts = time.perf_counter()
                        gr = grads[n]
                        gr.arm()
                        gr.set_units(unit, n_units, group_of_unit)
                        e = grad_prefix(batch, mods_of[n]) or batch.inputs_embeds.shape[1]
                        masks = {m: batch.masks[m][:, :e] for m in mods_of[n]}
                        clock = {"bwd": 0.0}

                        def backward_now(l, h, gr=gr, masks=masks, e=e, mods=mods_of[n], clock=clock):
                            # block streaming: this block's loss and backward now, then its graph is freed
                            tb = time.perf_counter()
                            hb = base_outs[l + 1][:, :e]
                            h = h[:, :e]
                            if final_norm is not None and l == L - 1:  # the authors' output_hidden_states[L]
                                h, hb = final_norm(h), final_norm(hb)
                            losses = layer_losses(h, hb, masks, mods, cfg, unit)
                            for i, loss in enumerate(losses):
                                torch.autograd.grad(loss, gr.params, retain_graph=i < len(losses) - 1,
                                                    allow_unused=True)
                            clock["bwd"] += time.perf_counter() - tb

                        with torch.enable_grad():
                            outs = forward_blocks(sset, batch, detach_inputs=True, grad_prefix=e,
                                                  on_block=backward_now)
                        col.add(n, batch, outs)
                        del outs
                        t_bwd += clock["bwd"]
                        t_fwd += time.perf_counter() - ts - clock["bwd"]
                    else:
                        ts = time.perf_counter()
                        with torch.no_grad():
                            col.add(n, batch, forward_blocks(sset, batch))
                        t_fwd += time.perf_counter() - ts
                done += 1
                if progress:
                    progress(f"specialist {n}", done / steps)
        scores = ({n: {k: v.detach().float().cpu() for k, v in grads[n].scores.items()} for n in names}
                  if need_element else None)
    timings = dict(forward_s=t_fwd, backward_s=t_bwd, signals_total_s=time.perf_counter() - t0)
    return Signals(col.result(), scores, timings, units)
