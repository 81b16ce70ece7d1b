"""Per-sample (per-unit) absolute gradients of LoRA factors, by hooks and einsum, in one backward.

METHOD.md section 3, step 2: g^k_{l,j} = sum over units of |d loss_unit / d theta^k_{l,j}|, the
absolute value taken per unit (a (modality, probe) pair in the paper, a mini-batch of probes in the
reference code) before summing. Doing this with one backward per probe is slow; here one backward of
the whole batch suffices, because samples in a batch do not interact: for a LoRA pair

    u = A x,   v = B u,   y = W x + s * v

the per-sample weight gradients are sums over that sample's tokens of outer products,

    dA_b = sum_t (dL/du)_{b,t} x_{b,t}^T ,    dB_b = sum_t (dL/dv)_{b,t} u_{b,t}^T

(the scaling s is already in dL/dv). Forward hooks keep x and u, tensor hooks on u and v receive
dL/du and dL/dv during backward, and the per-sample gradients are summed into units, made absolute
and accumulated. ``tests/test_grads.py`` checks the result against a plain loop of single-sample
backward passes.
"""

from __future__ import annotations

import torch

from .specialists import LoraKey


class PerUnitAbsGrad:
    """Accumulates sum_units |grad| for every LoRA factor of one adapter.

    Usage per batch: activate the adapter, ``arm()``, ``set_units(unit_of_sample, n_units)``, run a
    forward of the adapter's model,
    then one or more ``torch.autograd.grad`` calls; each backward adds its unit-wise |grad|.
    """

    def __init__(self, sset, name: str, keys: list[LoraKey] | None = None, accumulate_dtype=None):
        self.sset = sset
        self.name = name
        self.keys = keys or sset.lora_keys
        self.scores: dict[LoraKey, torch.Tensor] = {}
        self._saved: dict[LoraKey, torch.Tensor] = {}
        self._handles = []
        self._unit: torch.Tensor | None = None
        self._n_units = 0
        # float32 accumulation unless the model itself runs in float64
        self._dtype = accumulate_dtype or (torch.float64 if sset.dtype == torch.float64 else torch.float32)
        self.params: list[torch.nn.Parameter] = []

    # ---------------------------------------------------------------- life cycle
    def __enter__(self):
        modules = {}
        for k in self.keys:
            a, b, _ = self.sset.lora_layer(self.name, k)
            lin = a if k.ab == "A" else b
            modules[k] = lin
            self.scores[k] = torch.zeros(lin.weight.shape, dtype=self._dtype, device=lin.weight.device)
            self.params.append(lin.weight)
            self._handles.append(lin.register_forward_hook(self._forward_hook(k)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p in self.params:
            p.requires_grad_(False)
        self._saved.clear()

    def arm(self) -> None:
        """Make this adapter's factors require grad (switching adapters in PEFT resets the flag)."""
        for p in self.params:
            p.requires_grad_(True)

    def set_units(self, unit_of_sample: torch.Tensor, n_units: int) -> None:
        """unit_of_sample: [b] long, the unit each sample of the batch belongs to (-1 = ignore)."""
        self._unit = unit_of_sample
        self._n_units = n_units

    # ---------------------------------------------------------------- hooks
    def _forward_hook(self, key: LoraKey):
        def hook(module, args, output):
            x = args[0].detach()
            if output.requires_grad:
                output.register_hook(self._grad_hook(key, x))
        return hook

    def _grad_hook(self, key: LoraKey, x: torch.Tensor):
        def hook(g: torch.Tensor):
            # per-sample weight gradient of a Linear: [b, out, in] = sum_t g[b,t,:] (x) x[b,t,:]
            g3 = g.reshape(g.shape[0], -1, g.shape[-1])
            x3 = x.reshape(x.shape[0], -1, x.shape[-1])
            per = torch.bmm(g3.transpose(1, 2).to(self._dtype), x3.to(self._dtype))
            unit = self._unit.to(per.device)
            keep = unit >= 0
            if not bool(keep.all()):
                per, unit = per[keep], unit[keep]
            if self._n_units == per.shape[0] and bool((unit == torch.arange(per.shape[0], device=unit.device)).all()):
                agg = per  # one sample per unit
            else:
                agg = per.new_zeros((self._n_units, *per.shape[1:])).index_add_(0, unit, per)
            self.scores[key] += agg.abs().sum(0)
            return None
        return hook
