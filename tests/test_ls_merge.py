"""LS-Merge (esm_core/merging/methods/ls_merge.py): a transformer VAE over weight chunks, per merge."""

from __future__ import annotations

import math

import pytest
import torch

from esm_core.errors import ESMError
from esm_core.merging.base import MergeContext
from esm_core.merging.registry import get_method, list_methods

FAST = {"steps": 400}


@pytest.fixture(scope="module")
def ctx(world):
    from esm_core.models import SpecialistSet

    sset = SpecialistSet.load(str(world["base"]), {n: str(p) for n, p in world["adapters"].items()},
                              device="cpu", dtype="float32")
    return MergeContext.from_specialists(sset, seed=0)


def rel(a: dict, b: dict) -> float:
    num = sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in b)
    return math.sqrt(num / sum(float(b[k].float().pow(2).sum()) for k in b))


def test_it_is_in_the_registry_with_its_paper():
    m = get_method("ls_merge")
    assert m in list_methods() and "ICLR 2026" in m.paper and not m.needs


def test_a_single_adapter_is_reconstructed_closely(ctx):
    n = ctx.names[0]
    one = MergeContext(names=[n], tensors={n: ctx.tensors[n]}, seed=0)
    out = get_method("ls_merge").run(one, FAST)
    err = rel(out.tensors, ctx.tensors[n])
    assert err < 0.1, err
    assert err == pytest.approx(out.info["reconstruction_error"][n], rel=1e-5)
    assert out.info["loss_trace"][-1] < 0.05 * out.info["loss_trace"][0]


def test_merging_identical_adapters_returns_that_adapter_within_the_reconstruction_error(ctx):
    n = ctx.names[1]
    same = MergeContext(names=["a", "b", "c"], tensors={k: ctx.tensors[n] for k in ("a", "b", "c")}, seed=0)
    out = get_method("ls_merge").run(same, FAST)
    errs = out.info["reconstruction_error"]
    assert errs["a"] == pytest.approx(errs["b"]) == pytest.approx(errs["c"])
    assert rel(out.tensors, ctx.tensors[n]) == pytest.approx(errs["a"], rel=1e-4)  # the code of the one adapter
    assert errs["a"] < 0.1


def test_three_specialists_merge_between_them_and_are_seeded(ctx):
    a = get_method("ls_merge").run(ctx, {"steps": 60})
    b = get_method("ls_merge").run(ctx, {"steps": 60})
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    avg = {k: ctx.stacked(k).mean(0) for k in ctx.keys}
    assert rel(a.tensors, avg) < 1.0 and set(a.tensors) == set(ctx.keys)


@pytest.mark.parametrize("params,needle", [
    ({"chunk": 30, "token": 4}, "not a multiple of token"),
    ({"steps": 0}, "out of range"),
    ({"weights": "1,2"}, "3 specialists"),
])
def test_bad_parameters_are_refused(ctx, params, needle):
    with pytest.raises(ESMError, match=needle):
        get_method("ls_merge").run(ctx, dict(params))
