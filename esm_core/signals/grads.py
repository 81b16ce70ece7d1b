"""Per-sample (per-unit) absolute gradients of LoRA factors, by hooks and einsum, in one backward.

docs/METHOD.md section 3, step 2: g^k_{l,j} = sum over units of |d loss_unit / d theta^k_{l,j}|, the
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

from esm_core.adapters import LoraKey


class PerUnitAbsGrad:
    """Accumulates sum_units |grad| for every LoRA factor of one adapter.

    Usage per batch: activate the adapter, ``arm()``, ``set_units(unit_of_sample, n_units)``, run a
    forward of the adapter's model,
    then one or more ``torch.autograd.grad`` calls; each backward adds its unit-wise |grad|.
    """

    def __init__(self, sset, name: str, keys: list[LoraKey] | None = None, accumulate_dtype=None,
                 n_groups: int | None = None):
        """``n_groups``: keep the sums per group of units, scores [G, *shape] (for the bootstrap of
        esm_core/analysis/stability.py); their sum over groups is the usual score."""
        self.n_groups = n_groups
        self._group = None
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
            shape = lin.weight.shape if self.n_groups is None else (self.n_groups, *lin.weight.shape)
            self.scores[k] = torch.zeros(shape, dtype=self._dtype, device=lin.weight.device)
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

    def set_units(self, unit_of_sample: torch.Tensor, n_units: int, group_of_unit: torch.Tensor | None = None) -> None:
        """unit_of_sample: [b] long, the unit each sample of the batch belongs to (-1 = ignore).
        group_of_unit: [n_units] long, when the scores are kept per group of units (``n_groups``)."""
        self._unit = unit_of_sample
        self._n_units = n_units
        self._group = group_of_unit

    # ---------------------------------------------------------------- hooks
    def _forward_hook(self, key: LoraKey):
        def hook(module, args, output):
            x = args[0].detach()
            if output.requires_grad:
                output.register_hook(self._grad_hook(key, x))
        return hook

    def _grad_hook(self, key: LoraKey, x: torch.Tensor):
        def hook(g: torch.Tensor):
            if self.n_groups is None:
                self.scores[key] += self.unit_grads(g, x).abs().sum(0)
            else:
                self.scores[key].index_add_(0, self._group.to(g.device), self.unit_grads(g, x).abs())
            return None
        return hook

    def unit_grads(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[U, out, in] weight gradient of each unit, from output grads g [b,T,out] and inputs x [b,T,in].

        Units of equal size that tile the batch in order are summed inside one bmm (no per-sample
        tensor is formed); otherwise per-sample gradients are formed and added into their units.
        """
        dt = self._dtype
        unit = self._unit.to(g.device)
        b = g.shape[0]
        U = self._n_units
        if U and b % U == 0 and bool((unit == torch.arange(b, device=unit.device) // (b // U)).all()):
            gs = g.reshape(U, -1, g.shape[-1]).to(dt)
            xs = x.reshape(U, -1, x.shape[-1]).to(dt)
            return torch.bmm(gs.transpose(1, 2), xs)
        g3 = g.reshape(b, -1, g.shape[-1]).to(dt)
        x3 = x.reshape(b, -1, x.shape[-1]).to(dt)
        per = torch.bmm(g3.transpose(1, 2), x3)
        keep = unit >= 0
        return per.new_zeros((U, *per.shape[1:])).index_add_(0, unit[keep], per[keep])
