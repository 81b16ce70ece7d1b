"""Block streaming: each block's backward runs right after its forward, so one block's graph lives at a time.

The element signal is block-local (inputs detached), so the pass can differentiate block l as soon
as block l has run. Measured here exactly: the bytes autograd saves for backward (activations),
tracked through ``torch.autograd.graph.saved_tensors_hooks`` with a finaliser on each saved tensor,
so the peak is the most saved memory alive at once. The coefficients themselves are checked against
the per-unit loop oracle in tests/test_grads.py and the pipeline tests; here the scores of the
streamed pass equal a whole-graph pass computed in the test.
"""

from __future__ import annotations

import contextlib
import weakref

import pytest
import torch

from conftest import SAMPLES, modality_specs


class SavedBytes:
    """Live and peak bytes of tensors autograd keeps for backward."""

    def __init__(self):
        self.live = self.peak = 0

    def _drop(self, n: int) -> None:
        self.live -= n

    @contextlib.contextmanager
    def watch(self):
        class Held:
            def __init__(self, t):
                self.t = t

        def pack(t):
            held = Held(t)
            n = t.numel() * t.element_size()
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(held, self._drop, n)
            return held

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda held: held.t):
            yield self


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """An 8-block tiny LLaMA with two adapters: deep enough that one block is a small part of the graph."""
    from esm_core.config import MethodConfig
    from esm_core.pipeline import Workspace
    from esm_core.runspec import RunSpec, SpecialistSpec
    from esm_core.tiny import build_tiny_base, make_lora_adapter

    d = tmp_path_factory.mktemp("deep")
    base = build_tiny_base(d / "base", layers=8, hidden=32, intermediate=48, heads=4, kv_heads=2, seed=0)
    ads = {n: make_lora_adapter(base, d / n, seed=i + 1, r=4, alpha=8, scale=0.2) for i, n in enumerate(["a", "b"])}
    spec = RunSpec(base=str(base), specialists=[SpecialistSpec("a", str(ads["a"]), "molecule"),
                                                SpecialistSpec("b", str(ads["b"]), "protein")],
                   modalities=modality_specs(),
                   method=MethodConfig.from_preset("paper", probes_per_modality=8, batch_size=8))
    return Workspace.from_spec(spec, samples=SAMPLES)


def _whole_graph_scores(ws, name: str):
    """The pass before streaming, for one batch and one specialist: a forward of every block with the
    graph kept, then one backward per modality of the sum over blocks."""
    from esm_core.signals.collect import layer_losses
    from esm_core.signals.grads import PerUnitAbsGrad
    from esm_core.states import forward_blocks

    sset, cfg = ws.sset, ws.spec.method
    batch = ws.batcher(cfg).batch(list(range(8)))
    unit = torch.arange(8)
    mods = ws.probes.modalities
    with sset.exclusive("test"), PerUnitAbsGrad(sset, name) as gr:
        with torch.no_grad(), sset.use(None):
            base = forward_blocks(sset, batch)
        with sset.use(name), SavedBytes().watch() as saved:
            gr.arm()
            gr.set_units(unit, 8)
            with torch.enable_grad():
                outs = forward_blocks(sset, batch, detach_inputs=True)
                per_mod = [sum(ls) for ls in zip(*[layer_losses(outs[l], base[l], batch.masks, mods, cfg, unit)
                                                   for l in range(1, len(outs))])]
                for i, loss in enumerate(per_mod):
                    torch.autograd.grad(loss, gr.params, retain_graph=i < len(per_mod) - 1, allow_unused=True)
            del outs, per_mod
        return {k: v.clone() for k, v in gr.scores.items()}, saved.peak


def test_streamed_pass_equals_the_whole_graph_and_keeps_far_less_alive(deep):
    from esm_core.signals.collect import compute_signals

    cfg = deep.spec.method
    with SavedBytes().watch() as saved:
        sig = compute_signals(deep.sset, deep.batcher(cfg), cfg)
    whole, whole_peak = _whole_graph_scores(deep, "a")
    for k, v in whole.items():
        assert torch.allclose(sig.scores["a"][k], v.float(), rtol=1e-5, atol=1e-7), k
    L = deep.sset.num_layers
    # with 8 blocks the streamed pass keeps about one block's activations: far under the whole graph's
    assert saved.peak < whole_peak / 3, (saved.peak, whole_peak, L)
