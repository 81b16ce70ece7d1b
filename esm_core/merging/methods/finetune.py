"""Average + task fine-tuning: start from the averaged adapter and fine-tune it on a task's training rows.

The reference point the ES-Merging paper compares against (its Table 4 cost comparison): LoRA
fine-tuning (Hu et al., ICLR 2022) of the merged adapter, initialised at the average of the
specialists' factors (theta = (1/K) sum_k theta^k per factor, the ``average`` method), on labelled
prompts. Loss: the language-model negative log-likelihood of the tokens of " " + answer after each
prompt (the prompt itself is not trained on), averaged over the answer tokens of a batch. AdamW
(no weight decay by default) updates the A and B factors directly; the base and the specialists
are frozen. The model stays in eval mode (no LoRA dropout), so a seed fixes the run. Progress is
reported each step; the temporary adapter is removed afterwards.

The result is a trained adapter, not a combination of the specialists: it has no Eq. 1
coefficients (``MergeOutput.coefficients`` is None).
"""

from __future__ import annotations

import torch

from esm_core.merging.base import MergeMethod, MergeOutput, Param
from esm_core.merging.methods._learn import Batches, Work, answer_nll, prepare, require_prompts, temporary_adapter


def mean_nll(ov, factors, items, batch_size: int, tick=None) -> float:
    with torch.no_grad():
        tot, n = 0.0, 0
        for s in range(0, len(items), batch_size):
            l, c = answer_nll(ov, factors, items[s:s + batch_size])
            tot, n = tot + float(l), n + c
            if tick:
                tick()
    return tot / max(1, n)


def _run(ctx, params) -> MergeOutput:
    prompts = require_prompts(ctx, "finetune", answers=True)
    items = prepare(ctx, prompts, answers=True)
    factors = {k: ctx.stacked(k).mean(0).clone().requires_grad_(True) for k in ctx.keys}
    opt = torch.optim.AdamW(list(factors.values()), lr=params["lr"], weight_decay=params["weight_decay"])
    batches = Batches(items, params["batch_size"], ctx.seed)
    steps = params["steps"]
    trace = []
    work = Work(ctx, "Fine-tuning", steps, len(items), params["batch_size"])
    with temporary_adapter(ctx, factors, "finetune") as ov, torch.enable_grad():
        before = mean_nll(ov, factors, items, params["batch_size"], tick=work.eval_tick)
        for step in range(steps):
            batch = [items[i] for i in batches.next()]
            nll, n = answer_nll(ov, factors, batch)
            loss = nll / n
            opt.zero_grad()
            loss.backward()
            opt.step()
            trace.append(loss.item())
            work.step(f"loss {loss.item():.4f} (initial mean {before:.4f})")
        after = mean_nll(ov, factors, items, params["batch_size"], tick=work.eval_tick)
    tensors = {k: v.detach().clone() for k, v in factors.items()}
    info = {"loss_before": before, "loss_after": after, "loss_trace": trace, "n_prompts": len(items),
            "init": "average"}
    return MergeOutput(tensors, coefficients=None, info=info)


METHOD = MergeMethod(
    name="finetune",
    pretty="Average + task fine-tuning",
    paper="Hu et al. (2022). LoRA: Low-Rank Adaptation of Large Language Models. ICLR 2022 (fine-tuning of the "
          "averaged adapter, the task fine-tuning reference of Lee, Kim, Hwang 2026).",
    url="https://arxiv.org/abs/2106.09685",
    params=(
        Param("steps", 100, "Optimisation steps.", kind="int", min=1, max=1000000),
        Param("lr", 1e-4, "AdamW learning rate.", min=1e-8, max=10.0),
        Param("batch_size", 8, "Prompts per task per step.", kind="int", min=1, max=4096),
        Param("weight_decay", 0.0, "AdamW weight decay.", min=0.0, max=1.0),
    ),
    fn=_run,
    needs=frozenset({"model", "data"}),
    summary="The average of the specialists, then LoRA fine-tuning on labelled task prompts.",
)
