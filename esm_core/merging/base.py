"""What every merge method shares: its parameters, the context it gets, the output it returns, and
Eq. 1 (docs/METHOD.md section 0): merged factor = sum_k lambda^k * factor^k, element by element,
for the A and the B factors separately.

    ctx = MergeContext.from_specialists(sset, es_result=res)     # factors in float32, scalings folded
    out = get_method("ties").run(ctx, {"density": 0.2})            # esm_core.merging.registry

Adapters with different ``lora_alpha`` are allowed: each adapter's scaling is folded into its B
before merging and the merged adapter is written with scaling 1 (the manifest says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from esm_core.adapters import AdapterWeights, LoraKey, merged_config
from esm_core.answering.prompts import Prompt
from esm_core.errors import ESMError
from esm_core.merging import space
from esm_core.merging.space import MERGE_SPACES
from esm_core.models import SpecialistSet
from esm_core.pipeline import ESResult, Workspace
from esm_core.progress import ProgressFn
from esm_core.schema import short_repr


@dataclass(frozen=True)
class Param:
    """A merge-method parameter, described well enough to build a widget and a CLI flag."""

    name: str
    default: Any
    help: str
    kind: str = "float"  # float | int | bool | choice | str
    choices: tuple = ()
    min: float | None = None
    max: float | None = None


@dataclass
class MergeContext:
    """What a merge method may use. ``tensors`` hold each specialist's factors (scaling folded if needed)."""

    names: list[str]
    tensors: dict[str, dict[LoraKey, torch.Tensor]]
    sset: SpecialistSet | None = None  # for methods that run the model (AdaMerging, fine-tuning)
    workspace: Workspace | None = None  # probe samples and encoders
    es_result: ESResult | None = None  # for ES-Merging
    data: list[Prompt] | None = None  # training prompts, for methods that learn from examples
    seed: int = 0
    progress: ProgressFn | None = None
    folded: bool = False
    scalings: dict[str, float] = field(default_factory=dict)
    space: str = "factors"  # merge_space: "factors" (Eq. 1) or "delta" (esm_core/merging/space.py)
    delta_rank: int = 0  # rank of a delta-space merge (0 = the sum of the input ranks)

    @property
    def keys(self) -> list[LoraKey]:
        return sorted(self.tensors[self.names[0]])

    def stacked(self, key: LoraKey) -> torch.Tensor:
        """[K, *shape] float32 stack of one factor across specialists."""
        return torch.stack([self.tensors[n][key].float() for n in self.names])

    @classmethod
    def from_specialists(cls, sset, *, config=None, **kw) -> "MergeContext":
        """``config``: a MethodConfig whose merge_space and delta_rank the merge follows."""
        tensors, folded, scalings = prepare_tensors([sset.adapters[n] for n in sset.names])
        if config is not None:
            kw.setdefault("space", config.merge_space)
            kw.setdefault("delta_rank", config.delta_rank)
        return cls(names=list(sset.names), tensors=tensors, sset=sset, folded=folded, scalings=scalings, **kw)

    def scaling(self, name: str, layer: int, module: str) -> float:
        """The factor PEFT applies to specialist ``name``'s B A at a module (1 where folded into B)."""
        if self.folded:
            return 1.0
        if self.sset is not None:
            return float(self.sset.adapters[name].scaling_for(layer, module))
        return float(self.scalings.get(name, 1.0))


@dataclass
class MergeOutput:
    tensors: dict[LoraKey, torch.Tensor]  # merged factors
    coefficients: dict[LoraKey, torch.Tensor] | None = None  # [K, *shape] per-element weights, if any
    info: dict = field(default_factory=dict)
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # saved into coefficients.safetensors
    rank: int | None = None  # the merged adapter's rank when it differs from the specialists' (delta space)
    scaling_one: bool = False  # the factors carry every scaling: write the adapter with scaling 1

    def adapter_config(self, template: AdapterWeights, base_path: str | None, folded: bool) -> dict:
        """adapter_config.json of this merge (stock PEFT): the template's, with this merge's rank and scaling."""
        return merged_config(template, base_path, folded or self.scaling_one, rank=self.rank)


@dataclass(frozen=True)
class MergeMethod:
    name: str
    pretty: str
    paper: str
    url: str
    params: tuple[Param, ...]
    fn: Callable[[MergeContext, dict], MergeOutput]
    needs: frozenset = frozenset()  # "es" (ES coefficients), "model", "data"
    summary: str = ""

    def resolve_params(self, given: dict | None) -> dict:
        given = dict(given or {})
        names = {p.name for p in self.params}
        bad = sorted(set(given) - names)
        if bad:
            raise ESMError(f"Merge method {self.name!r} has no parameter(s) {bad}.",
                           fix=f"its parameters are {sorted(names) or 'none'}.")
        out = {}
        for p in self.params:
            v = given.get(p.name, p.default)
            out[p.name] = self._check_param(p, v)
        return out

    def _check_param(self, p: Param, v):
        def bad(what: str):
            return ESMError(f"Parameter {p.name}={short_repr(v)} of {self.name!r} is not {what}.",
                            fix=f"give {p.name} {what} ({p.help})")

        if p.kind == "float":
            if isinstance(v, str):
                try:
                    v = float(v)
                except ValueError:
                    raise bad("a number") from None
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise bad("a number")
            v = float(v)
            if v != v or v in (float("inf"), float("-inf")):
                raise bad("a finite number")
        elif p.kind == "int":
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad("a whole number")
        elif p.kind == "bool":
            if not isinstance(v, bool):
                raise bad("true or false")
        elif p.kind == "choice":
            if v not in p.choices:
                raise ESMError(f"Parameter {p.name}={short_repr(v)} of {self.name!r} is not allowed.",
                               fix=f"choose one of {list(p.choices)}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)  # e.g. --param weights=1 (YAML reads a number)
        elif not isinstance(v, str):
            raise bad("text")
        if p.min is not None and v < p.min or p.max is not None and v > p.max:
            lo = "-inf" if p.min is None else p.min
            hi = "inf" if p.max is None else p.max
            raise ESMError(f"Parameter {p.name}={short_repr(v)} of {self.name!r} is out of range [{lo}, {hi}].",
                           fix=f"choose a value between {lo} and {hi} ({p.help})")
        return v

    def run(self, ctx: MergeContext, params: dict | None = None) -> MergeOutput:
        resolved = self.resolve_params(params)
        if "es" in self.needs and ctx.es_result is None:
            raise ESMError(f"Merge method {self.name!r} needs ES coefficients.",
                           fix="run the coefficient estimation first.")
        if "model" in self.needs and ctx.sset is None:
            raise ESMError(f"Merge method {self.name!r} needs the loaded models.")
        if "data" in self.needs and not ctx.data:
            raise ESMError(f"Merge method {self.name!r} learns from task data, and none was given.",
                           fix="pick a task (app: Merge page; CLI: `compare`) whose training rows it can use.")
        if ctx.space not in MERGE_SPACES:
            raise ESMError(f"Merge space {short_repr(ctx.space)} is not one of {list(MERGE_SPACES)}.",
                           fix="set merge_space to factors or delta.")
        out = self._delta(ctx, resolved) if ctx.space == "delta" else self._call(ctx, resolved)
        out.info.setdefault("method", self.name)
        out.info.setdefault("params", resolved)
        for k, t in out.tensors.items():
            if not torch.isfinite(t).all():
                raise ESMError(f"Merge method {self.name!r} produced NaN/Inf at {k}.",
                               fix="check its parameters (e.g. a zero density or temperature).")
        return out

    def _call(self, ctx: MergeContext, resolved: dict) -> MergeOutput:
        if "model" in self.needs:  # learned merges train on the shared model: hold it for the whole run
            with ctx.sset.exclusive(f"{self.pretty} merge"):
                return self.fn(ctx, resolved)
        return self.fn(ctx, resolved)

    def _delta(self, ctx: MergeContext, resolved: dict) -> MergeOutput:
        """The merge in the space of updates (esm_core/merging/space.py): tensor methods combine the
        updates s_k B_k A_k; coefficient methods (ES, learned weights) carry their coefficients over by
        the stated rule; a method that trains factors contributes its own update. Then truncated SVD."""
        dW = space.deltas(ctx.tensors, ctx.scaling)
        lam = None
        if self.needs & {"es", "model"}:
            fo = self._call(ctx, resolved)
            if fo.coefficients is not None:
                shapes = {k: tuple(v.shape) for k, v in ctx.tensors[ctx.names[0]].items()}
                lam = space.delta_coefficients(fo.coefficients, shapes)
                merged = space.combine_deltas(lam, dW, ctx.names)
            else:
                merged = {k: ctx.scaling(ctx.names[0], k.layer, k.module) * v
                          for k, v in space.product(fo.tensors).items()}
        else:
            fo = self._call(replace(ctx, tensors=dW), resolved)
            merged, lam = fo.tensors, fo.coefficients
        ranks = {}
        for k, v in ctx.tensors[ctx.names[0]].items():
            if k.ab == "A":
                ranks[(k.layer, k.module)] = sum(ctx.tensors[n][k].shape[0] for n in ctx.names)
        rank = ctx.delta_rank or max(ranks.values())
        factors, residual = space.refactorise(merged, rank)
        extra = dict(fo.extra_tensors)
        if lam is not None:
            extra.update({f"delta_lambda/{k}": v.float() for k, v in lam.items()})
        extra["delta_residual"] = torch.tensor(list(residual.values()))
        info = dict(fo.info, space="delta", rank=rank, residual_max=max(residual.values()),
                    residual_mean=sum(residual.values()) / len(residual))
        return MergeOutput(factors, coefficients=None, info=info, extra_tensors=extra, rank=rank, scaling_one=True)


# ------------------------------------------------------------------------------------ tensors
def prepare_tensors(adapters: list[AdapterWeights]) -> tuple[dict[str, dict[LoraKey, torch.Tensor]], bool, dict]:
    """Per-specialist factors in float32; scalings folded into B when they differ across adapters."""
    keys = sorted(adapters[0].tensors)
    modules = sorted({(k.layer, k.module) for k in keys})
    sc = {a.name: {m: a.scaling_for(*m) for m in modules} for a in adapters}
    ref = sc[adapters[0].name]
    folded = any(abs(sc[a.name][m] - ref[m]) > 1e-12 * max(1.0, abs(ref[m])) for a in adapters for m in modules)
    out = {}
    for a in adapters:
        t = {}
        for k in keys:
            v = a.tensors[k].float()
            if folded and k.ab == "B":
                v = v * sc[a.name][(k.layer, k.module)]
            t[k] = v
        out[a.name] = t
    scalings = {a.name: sc[a.name][modules[0]] for a in adapters}
    return out, folded, scalings


def weighted_sum(ctx: MergeContext, lam: dict[LoraKey, torch.Tensor]) -> dict[LoraKey, torch.Tensor]:
    """Eq. 1: merged[key] = sum_k lam[key][k] * theta_k[key] (lam broadcastable to [K, *shape])."""
    out = {}
    for k in ctx.keys:
        w = lam[k].float()
        st = ctx.stacked(k)
        while w.ndim < st.ndim:
            w = w.unsqueeze(-1)
        out[k] = (w * st).sum(0)
    return out
