"""Merge baselines: hand-made tensors, invariants, equality with stock PEFT, learned methods on the tiny world."""

from __future__ import annotations

import math

import pytest
import torch

from esm_core.adapters import LoraKey
from esm_core.errors import Cancelled, ESMError
from esm_core.merging.base import MergeContext, weighted_sum
from esm_core.merging.methods import _ops
from esm_core.merging.methods.emr import task_factors
from esm_core.merging.methods.pcb import pcb_scores, pcb_weights
from esm_core.merging.registry import get_method, list_methods

QA, QB = LoraKey(0, "self_attn.q_proj", "A"), LoraKey(0, "self_attn.q_proj", "B")
BASELINES = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "emr", "pcb", "consensus", "adamerging", "finetune"]


def hand_ctx(a: list[list[float]], b: list[list[float]] | None = None, names=None, seed: int = 0) -> MergeContext:
    """One module; specialist k's A factor is the row vector a[k] ([1, n]), its B factor b[k] as a column."""
    names = names or [f"s{i}" for i in range(len(a))]
    b = b if b is not None else [[0.0] * len(a[0]) for _ in a]
    tensors = {n: {QA: torch.tensor([ak], dtype=torch.float32), QB: torch.tensor([bk], dtype=torch.float32).T}
               for n, ak, bk in zip(names, a, b)}
    return MergeContext(names=list(names), tensors=tensors, seed=seed)


def rand_ctx(K=3, shape_a=(4, 24), shape_b=(24, 4), seed=0, names=None) -> MergeContext:
    g = torch.Generator().manual_seed(seed)
    names = names or [f"s{i}" for i in range(K)]
    keys = {QA: shape_a, QB: shape_b, LoraKey(1, "mlp.up_proj", "A"): shape_a, LoraKey(1, "mlp.up_proj", "B"): shape_b}
    tensors = {n: {k: torch.randn(s, generator=g) for k, s in keys.items()} for n in names}
    return MergeContext(names=list(names), tensors=tensors, seed=seed)


def A(out):
    return out.tensors[QA][0]


# ------------------------------------------------------------------------------------ registry
def test_every_baseline_is_registered_with_paper_and_widget_metadata():
    reg = {m.name: m for m in list_methods()}
    for name in BASELINES:
        m = reg[name]
        assert m.pretty and m.paper and m.url.startswith("https://") and m.summary
        for p in m.params:
            assert p.kind in ("float", "int", "bool", "choice", "str") and p.help
            if p.kind == "choice":
                assert p.default in p.choices
        assert m.resolve_params({}) == {p.name: p.default for p in m.params}  # defaults are valid
    assert reg["adamerging"].needs == reg["finetune"].needs == frozenset({"model", "data"})
    # every module docstring cites the formula it implements
    import importlib

    for mod in ("task_arithmetic", "ties", "dare", "emr", "pcb", "consensus", "adamerging", "finetune"):
        doc = importlib.import_module(f"esm_core.merging.methods.{mod}").__doc__
        assert doc and "=" in doc and len(doc) > 300


@pytest.mark.parametrize("method,params,needle", [
    ("ties", {"density": 1.5}, "density"),
    ("dare_linear", {"drop_rate": 1.0}, "drop_rate"),
    ("pcb", {"variant": "code"}, "variant"),
    ("task_arithmetic", {"weights": "1,2"}, "weights"),
    ("task_arithmetic", {"weights": "s0=1,zz=2,s2=1"}, "zz"),
    ("task_arithmetic", {"weights": "1,x,2"}, "weights"),
    ("task_arithmetic", {"weights": "nan,1,1"}, "weights"),
    ("task_arithmetic", {"weights": "s0=1,s1=2"}, "s2"),
    ("consensus", {"min_agreement": 4}, "min_agreement"),
    ("emr", {"serve": "task"}, "task"),
    ("emr", {"serve": "task", "task": "nobody"}, "task"),
    ("emr", {"serve": "mean", "task": "s0"}, "task"),
    ("ties", {"bogus": 1}, "bogus"),
])
def test_bad_parameters_raise_esmerror_naming_the_parameter(method, params, needle):
    with pytest.raises(ESMError) as e:
        get_method(method).run(rand_ctx(), params)
    assert needle in str(e.value)


@pytest.mark.parametrize("text,expected", [("", [1, 1, 1]), ("1,0.5,2", [1, 0.5, 2]), ("s2=3, s0=1; s1=2", [1, 2, 3])])
def test_parse_weights(text, expected):
    assert _ops.parse_weights(text, ["s0", "s1", "s2"]).tolist() == expected


# ------------------------------------------------------------------------------------ task arithmetic
def test_task_arithmetic_scales_the_weighted_sum_of_each_factor():
    ctx = rand_ctx(K=2)
    out = get_method("task_arithmetic").run(ctx, {"scaling": 0.5, "weights": "1,3"})
    for k in ctx.keys:
        want = 0.5 * (ctx.tensors["s0"][k] + 3 * ctx.tensors["s1"][k])
        torch.testing.assert_close(out.tensors[k], want)
        assert out.coefficients[k].shape == (2, *want.shape)
        assert torch.allclose(out.coefficients[k][1], torch.full(want.shape, 1.5))
    # doubling the scaling doubles A and B, i.e. quadruples the update B A
    out2 = get_method("task_arithmetic").run(ctx, {"scaling": 1.0, "weights": "1,3"})
    torch.testing.assert_close(out2.tensors[QB] @ out2.tensors[QA], 4 * (out.tensors[QB] @ out.tensors[QA]))


def test_task_arithmetic_density_keeps_the_largest_magnitudes_of_each_specialist():
    ctx = hand_ctx([[1.0, -5.0, 2.0, 0.5], [-3.0, 0.1, 0.2, 4.0]])
    out = get_method("task_arithmetic").run(ctx, {"scaling": 1.0, "density": 0.5})
    assert A(out).tolist() == [-3.0 + 0.0, -5.0, 2.0, 4.0]  # s0 keeps -5, 2; s1 keeps -3, 4
    out = get_method("task_arithmetic").run(ctx, {"scaling": 1.0, "density": 0.25})
    assert A(out).tolist() == [0.0, -5.0, 0.0, 4.0]
    assert out.info["kept_fraction"] == pytest.approx(2 / 8)  # B factors are all zeros: int(0.25*4)=1 kept each


# ------------------------------------------------------------------------------------ TIES
TIES_A = [[3.0, -1.0, 0.5, -4.0], [2.0, -2.5, 1.0, 1.0], [1.5, 0.1, -3.0, 2.0]]
# trim to 2 of 4: s0 -> [3, 0, 0, -4], s1 -> [2, -2.5, 0, 0], s2 -> [0, 0, -3, 2]


@pytest.mark.parametrize("sign_method,expected", [
    ("total", [2.5, -2.5, -3.0, -4.0]),  # entry 3: sum -2 elects '-', only s0's -4 agrees
    ("frequency", [2.5, -2.5, -3.0, 2.0]),  # entry 3: one '-' one '+' -> tie -> '+', s2's 2 agrees
])
def test_ties_trims_elects_signs_and_averages_the_agreeing(sign_method, expected):
    ctx = hand_ctx(TIES_A)
    out = get_method("ties").run(ctx, {"density": 0.5, "scaling": 1.0, "sign_method": sign_method})
    assert A(out).tolist() == pytest.approx(expected)
    # entry 0: s0 and s1 agree -> coefficient 1/2 each, trimmed s2 gets 0
    assert out.coefficients[QA][:, 0, 0].tolist() == pytest.approx([0.5, 0.5, 0.0])
    out2 = get_method("ties").run(ctx, {"density": 0.5, "scaling": 2.0, "sign_method": sign_method})
    torch.testing.assert_close(A(out2), 2 * A(out))


def test_ties_model_scope_trims_over_the_whole_adapter():
    # A entries are large, B entries small: a global trim keeps only A entries
    ctx = hand_ctx([[5.0, 4.0, 3.0, 2.0]] * 2, b=[[0.1, 0.2, 0.3, 0.4]] * 2)
    tensor_scope = get_method("ties").run(ctx, {"density": 0.5, "scaling": 1.0})
    model_scope = get_method("ties").run(ctx, {"density": 0.5, "scaling": 1.0, "trim_scope": "model"})
    assert (tensor_scope.tensors[QB] != 0).sum() == 2 and (model_scope.tensors[QB] != 0).sum() == 0
    assert A(model_scope).tolist() == [5.0, 4.0, 3.0, 2.0]


# ------------------------------------------------------------------------------------ DARE
def test_dare_rescaling_keeps_the_expectation_and_the_seed_fixes_the_drops():
    ctx = rand_ctx(K=2, shape_a=(8, 16), shape_b=(16, 8))
    target = {k: ctx.tensors["s0"][k] + ctx.tensors["s1"][k] for k in ctx.keys}
    n = 300
    acc = {k: torch.zeros_like(v) for k, v in target.items()}
    acc_raw = {k: torch.zeros_like(v) for k, v in target.items()}
    for s in range(n):
        ctx.seed = s
        out = get_method("dare_linear").run(ctx, {"drop_rate": 0.5, "scaling": 1.0})
        raw = get_method("dare_linear").run(ctx, {"drop_rate": 0.5, "scaling": 1.0, "rescale": False})
        for k in ctx.keys:
            acc[k] += out.tensors[k] / n
            acc_raw[k] += raw.tensors[k] / n
        assert out.info["kept_fraction"] == pytest.approx(0.5, abs=0.1)
    for k in ctx.keys:
        scale = target[k].abs().mean()
        assert (acc[k] - target[k]).abs().mean() < 0.1 * scale  # unbiased with 1/(1-p)
        assert (acc_raw[k] - 0.5 * target[k]).abs().mean() < 0.1 * scale  # without it: shrunk by (1-p)
    ctx.seed = 11
    a = get_method("dare_ties").run(ctx, {"drop_rate": 0.7})
    b = get_method("dare_ties").run(ctx, {"drop_rate": 0.7})
    ctx.seed = 12
    c = get_method("dare_ties").run(ctx, {"drop_rate": 0.7})
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in ctx.keys)
    assert not all(torch.equal(a.tensors[k], c.tensors[k]) for k in ctx.keys)


def test_dare_without_drops_is_task_arithmetic_and_ties_without_trim():
    ctx = rand_ctx()
    lin = get_method("dare_linear").run(ctx, {"drop_rate": 0.0, "scaling": 0.7})
    ta = get_method("task_arithmetic").run(ctx, {"scaling": 0.7})
    dt = get_method("dare_ties").run(ctx, {"drop_rate": 0.0, "scaling": 1.0})
    ti = get_method("ties").run(ctx, {"density": 1.0, "scaling": 1.0})
    for k in ctx.keys:
        torch.testing.assert_close(lin.tensors[k], ta.tensors[k])
        torch.testing.assert_close(dt.tensors[k], ti.tensors[k])


# ------------------------------------------------------------------------------------ EMR
EMR_A = [[1.0, -2.0, 3.0, 0.0], [2.0, 1.0, -1.0, 0.0]]
EMR_B = [[4.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]]
# A: gamma = [+, -, +, +]; tau_uni = [2, -2, 3, 0]; M_s0 = [1, 1, 1, 0], M_s1 = [1, 0, 0, 0]
# B: gamma = [+, ...]; tau_uni = [4, 0, 0, 0]; M_s0 = [1, 0, 0, 0], M_s1 = [0, 0, 0, 0]


def test_emr_elects_the_unified_vector_masks_and_rescalers():
    ctx = hand_ctx(EMR_A, EMR_B)
    out = get_method("emr").run(ctx, {"serve": "mean"})
    ex = out.extra_tensors
    assert ex[f"emr/unified/{QA}"].reshape(-1).tolist() == [2.0, -2.0, 3.0, 0.0]
    assert ex[f"emr/mask/s0/{QA}"].reshape(-1).tolist() == [1, 1, 1, 0]
    assert ex[f"emr/mask/s1/{QA}"].reshape(-1).tolist() == [1, 0, 0, 0]
    assert ex[f"emr/mask/s1/{QB}"].reshape(-1).tolist() == [0, 0, 0, 0]
    # r = sum|tau| / sum|M tau_uni| over the whole adapter: s0 (6+4)/(7+4), s1 (4+1)/(2+0)
    r0, r1 = 10 / 11, 5 / 2
    assert float(ex["emr/rescaler/s0"]) == pytest.approx(r0) and float(ex["emr/rescaler/s1"]) == pytest.approx(r1)
    uni = torch.tensor([2.0, -2.0, 3.0, 0.0])
    m0, m1 = torch.tensor([1.0, 1, 1, 0]), torch.tensor([1.0, 0, 0, 0])
    torch.testing.assert_close(A(out), 0.5 * (r0 * m0 + r1 * m1) * uni)
    task = get_method("emr").run(ctx, {"serve": "task", "task": "s1"})
    torch.testing.assert_close(A(task), r1 * m1 * uni)
    torch.testing.assert_close(A(get_method("emr").run(ctx, {"serve": "unified"})), uni)
    # the saved pieces rebuild each task's model
    masks = {n: {k: ex[f"emr/mask/{n}/{k}"] for k in ctx.keys} for n in ctx.names}
    uni_d = {k: ex[f"emr/unified/{k}"] for k in ctx.keys}
    res = {n: ex[f"emr/rescaler/{n}"] for n in ctx.names}
    rebuilt = task_factors(ctx.keys, uni_d, masks, res, "s1")
    for k in ctx.keys:
        torch.testing.assert_close(rebuilt[k], task.tensors[k])


def test_emr_per_factor_rescalers():
    out = get_method("emr").run(hand_ctx(EMR_A, EMR_B), {"rescale_scope": "tensor"})
    ex = out.extra_tensors
    assert float(ex[f"emr/rescaler/s0/{QA}"]) == pytest.approx(6 / 7)
    assert float(ex[f"emr/rescaler/s1/{QA}"]) == pytest.approx(2.0)
    assert float(ex[f"emr/rescaler/s0/{QB}"]) == pytest.approx(1.0)
    assert float(ex[f"emr/rescaler/s1/{QB}"]) == 0.0  # nothing under its mask


# ------------------------------------------------------------------------------------ PCB
def test_pcb_balancing_scores_follow_the_paper_equations():
    X = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    beta, _ = pcb_scores(X, "paper")
    e = math.e
    # task 1: intra = softmax(2 * Norm([1, 4])) = softmax([0, 2]); inter = softmax([0,1]) + softmax([1,0]) = [1, 1]
    intra1 = torch.tensor([1 / (1 + e**2), e**2 / (1 + e**2)])
    torch.testing.assert_close(beta[0], intra1)
    # task 2: intra = softmax([2, 0]); inter = 2 * softmax([1, 0])
    intra2 = torch.tensor([e**2 / (1 + e**2), 1 / (1 + e**2)])
    inter2 = 2 * torch.tensor([e / (1 + e), 1 / (1 + e)])
    torch.testing.assert_close(beta[1], intra2 * inter2)


@pytest.mark.parametrize("drop_ratio", [0.0, 0.3, 0.5, 0.9])
def test_pcb_drops_the_requested_fraction_per_specialist(drop_ratio):
    X = torch.randn(3, 200, generator=torch.Generator().manual_seed(1))
    beta, _ = pcb_scores(X, "paper")
    bh = pcb_weights(beta, drop_ratio, "paper")
    kept = 200 - int(drop_ratio * 200)
    assert (bh > 0).sum(1).tolist() == [kept] * 3
    # the kept entries are each specialist's highest scores, unchanged
    for i in range(3):
        top = beta[i].sort(descending=True).values[:kept]
        assert torch.equal(bh[i][bh[i] > 0].sort(descending=True).values, top)
    ref = pcb_weights(pcb_scores(X, "reference")[0], drop_ratio, "reference")
    assert ((ref > 0).sum(1) <= kept).all() and ((ref > 0).sum(1) >= kept - 1).all()  # weakest kept -> 0
    assert torch.allclose(ref.max(1).values, torch.ones(3)) and (ref >= 0).all() and (ref <= 1).all()


def test_pcb_merge_is_the_score_weighted_average_of_the_kept_entries():
    ctx = rand_ctx(K=3)
    out = get_method("pcb").run(ctx, {"drop_ratio": 0.5, "scaling": 1.0})
    for k in ctx.keys:
        lam = out.coefficients[k]
        s = lam.sum(0)
        assert torch.all((s.abs() < 1e-6) | ((s - 1).abs() < 1e-5))  # convex where anything is kept
        assert (lam >= 0).all()
        assert (lam > 0).reshape(3, -1).sum(1).tolist() == [lam[0].numel() // 2] * 3
    same = MergeContext(names=["a", "b"], tensors={"a": ctx.tensors["s0"], "b": ctx.tensors["s0"]})
    o = get_method("pcb").run(same, {"drop_ratio": 0.25, "scaling": 2.0})
    for k in ctx.keys:
        t = ctx.tensors["s0"][k]
        kept = o.tensors[k] != 0
        assert int(kept.sum()) == t.numel() - int(0.25 * t.numel())
        torch.testing.assert_close(o.tensors[k][kept], 2 * t[kept])


# ------------------------------------------------------------------------------------ consensus
CONS_A = [[1.0, 1.0, 1.0, 0.5], [1.0, 0.0, 1.0, -0.5], [1.0, 0.0, 0.0, 0.1]]
# with tall_lambda 0.6 the TALL masks select entries 0..3 by [0, 1, 2, 3] specialists


@pytest.mark.parametrize("kmin,expected", [
    (0, [3.0, 1.0, 2.0, 0.1]), (1, [0.0, 1.0, 2.0, 0.1]), (2, [0.0, 0.0, 2.0, 0.1]), (3, [0.0, 0.0, 0.0, 0.1])])
def test_consensus_removes_catastrophic_and_selfish_entries(kmin, expected):
    ctx = hand_ctx(CONS_A)
    out = get_method("consensus").run(ctx, {"tall_lambda": 0.6, "min_agreement": kmin, "scaling": 1.0})
    assert A(out).tolist() == pytest.approx(expected)
    tall = torch.stack([out.extra_tensors[f"consensus/tall/{n}/{QA}"].reshape(-1) for n in ctx.names])
    assert tall.tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    assert out.extra_tensors[f"consensus/mask/{QA}"].reshape(-1).tolist() == [float(c >= kmin) for c in (0, 1, 2, 3)]


def test_consensus_ties_base_is_ties_under_the_mask():
    ctx = rand_ctx()
    p = {"tall_lambda": 0.4, "min_agreement": 2, "scaling": 1.0, "density": 0.5}
    out = get_method("consensus").run(ctx, dict(p, base="ties"))
    ties = get_method("ties").run(ctx, {"density": 0.5, "scaling": 1.0})
    for k in ctx.keys:
        mask = out.extra_tensors[f"consensus/mask/{k}"]
        assert 0 < mask.mean() < 1
        torch.testing.assert_close(out.tensors[k], ties.tensors[k] * mask)


# ------------------------------------------------------------------------------------ invariants
STATIC = [("task_arithmetic", {}), ("ties", {}), ("dare_linear", {}), ("dare_ties", {}), ("emr", {}),
          ("pcb", {}), ("pcb", {"variant": "reference"}), ("consensus", {}), ("consensus", {"base": "ties"})]


@pytest.mark.parametrize("name,params", STATIC)
def test_static_methods_are_eq1_merges_deterministic_and_order_free(name, params):
    ctx = rand_ctx(seed=4)
    out = get_method(name).run(ctx, params)
    again = get_method(name).run(ctx, params)
    assert set(out.tensors) == set(ctx.keys)
    for k in ctx.keys:
        assert out.coefficients[k].shape == (3, *ctx.tensors["s0"][k].shape)
        assert torch.equal(out.tensors[k], again.tensors[k])
    torch.testing.assert_close(weighted_sum(ctx, out.coefficients), out.tensors)
    if not name.startswith("dare"):  # DARE's draws follow the specialist order by design
        perm = ["s2", "s0", "s1"]
        pctx = MergeContext(names=perm, tensors={n: ctx.tensors[n] for n in perm}, seed=ctx.seed)
        pout = get_method(name).run(pctx, params)
        for k in ctx.keys:
            torch.testing.assert_close(pout.tensors[k], out.tensors[k], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------ PEFT equality
def _peft_fns():
    from peft.utils import merge_utils as mu

    return mu


@pytest.mark.parametrize("combo,method,params", [
    ("task_arithmetic", "task_arithmetic", {}),
    ("magnitude_prune", "task_arithmetic", {"density": 0.4}),
    ("ties", "ties", {"density": 0.4}),
    ("ties_frequency", "ties", {"density": 0.4, "sign_method": "frequency"}),
    ("dare_linear", "dare_linear", {"drop_rate": 0.5}),
    ("dare_ties", "dare_ties", {"drop_rate": 0.75}),
    ("dare_ties_frequency", "dare_ties", {"drop_rate": 0.5, "sign_method": "frequency"}),
])
def test_equals_peft_merge_utils_on_the_same_tensors_weights_density_and_seed(combo, method, params):
    mu = _peft_fns()
    ctx = rand_ctx(K=3, shape_a=(6, 10), seed=2)
    ctx.tensors = {n: {QA: t[QA]} for n, t in ctx.tensors.items()}  # one factor: PEFT draws per tensor in list order
    ctx.seed = 123
    w = [0.5, 1.25, 2.0]
    tensors = [ctx.tensors[n][QA].clone() for n in ctx.names]
    wt = torch.tensor(w)
    density = params.get("density", 1 - params.get("drop_rate", 0.0))
    smeth = "frequency" if combo.endswith("frequency") else "total"
    torch.manual_seed(123)
    if combo == "task_arithmetic":
        ref = mu.task_arithmetic(tensors, wt)
    elif combo == "magnitude_prune":
        ref = mu.magnitude_prune(tensors, wt, density)
    elif combo.startswith("ties"):
        ref = mu.ties(tensors, wt, density, smeth)
    elif combo == "dare_linear":
        ref = mu.dare_linear(tensors, wt, density)
    else:
        ref = mu.dare_ties(tensors, wt, density, smeth)
    out = get_method(method).run(ctx, dict(params, scaling=1.0, weights=",".join(map(str, w))))
    torch.testing.assert_close(out.tensors[QA], ref, atol=1e-6, rtol=1e-6)


def test_building_blocks_equal_peft_merge_utils():
    mu = _peft_fns()
    g = torch.Generator().manual_seed(5)
    st = torch.randn(3, 7, 9, generator=g)
    for dens in (0.1, 0.33, 0.5, 0.9):
        torch.testing.assert_close(st[0] * _ops.magnitude_mask(st[0], dens), mu.magnitude_based_pruning(st[0], dens))
    for m in ("total", "frequency"):
        pruned = st * (st.abs() > 0.7)
        assert torch.equal(_ops.agree_mask(pruned, _ops.elect_sign(pruned, m)),
                           mu.calculate_majority_sign_mask(pruned, m))
        mask = mu.calculate_majority_sign_mask(pruned, m)
        ours = (_ops.disjoint_lambda(mask, torch.ones(3)) * pruned).sum(0)
        torch.testing.assert_close(ours, mu.disjoint_merge(pruned, mask))


@pytest.fixture(scope="module")
def peft_sset(world):
    """A private SpecialistSet (PEFT's add_weighted_adapter adds adapters to it)."""
    from esm_core.models import SpecialistSet

    return SpecialistSet.load(str(world["base"]), {n: str(p) for n, p in world["adapters"].items()},
                              device="cpu", dtype="float32")


@pytest.mark.parametrize("combo,method,params", [
    ("linear", "task_arithmetic", {}),
    ("magnitude_prune", "task_arithmetic", {"density": 0.5}),
    ("ties", "ties", {"density": 0.5}),
    ("dare_linear", "dare_linear", {"drop_rate": 0.5}),
    ("dare_ties", "dare_ties", {"drop_rate": 0.5}),
])
def test_equals_peft_add_weighted_adapter(peft_sset, monkeypatch, combo, method, params):
    """PEFT puts sqrt(w * s) on each of A and B (s = alpha/r; merged scaling 1); we put lambda_k = sqrt(w_k)
    on each factor and keep scaling s. So PEFT's factors = sqrt(s) * ours, and the updates B A agree."""
    import peft.tuners.lora.model as lora_model

    sset, seed, w, dens = peft_sset, 7, [0.5, 1.0, 2.0], 0.5
    orig = lora_model.LoraModel._generalized_task_arithmetic_weighted_adapter
    started = []

    def seeded(self, *a, **kw):  # seed torch's global RNG where PEFT starts drawing DARE masks
        if not started:
            torch.manual_seed(seed)
            started.append(True)
        return orig(self, *a, **kw)

    monkeypatch.setattr(lora_model.LoraModel, "_generalized_task_arithmetic_weighted_adapter", seeded)
    name = f"peft_{combo}"
    sset.model.add_weighted_adapter(sset.names, w, name, combination_type=combo, density=dens)
    ctx = MergeContext.from_specialists(sset, seed=seed)
    out = get_method(method).run(ctx, dict(params, scaling=1.0, weights=",".join(str(math.sqrt(x)) for x in w)))
    s = sset.scaling(sset.names[0], 0, "self_attn.q_proj")
    assert s == 2.0
    for k in ctx.keys:
        mod = sset.blocks[k.layer].get_submodule(k.module)
        theirs = (mod.lora_A if k.ab == "A" else mod.lora_B)[name].weight.detach()
        torch.testing.assert_close(math.sqrt(s) * out.tensors[k], theirs, atol=1e-6, rtol=1e-5)
        if k.ab == "A":
            torch.testing.assert_close(s * out.tensors[LoraKey(k.layer, k.module, "B")] @ out.tensors[k],
                                       mod.get_delta_weight(name), atol=1e-6, rtol=1e-5)
    if combo.startswith("dare"):  # really random: about half the entries dropped
        assert 0.3 < out.info["kept_fraction"] < 0.7


# ------------------------------------------------------------------------------------ learned methods
def synthetic_prompts(n=8, answers=True):
    from conftest import SAMPLES

    from esm_core.answering.prompts import Item, Prompt

    out = []
    for i in range(n):
        segs = ["System: decide.\nMolecule: ", Item("molecule", SAMPLES["molecule"][i]), "\nProtein: ",
                Item("protein", SAMPLES["protein"][i]), "\nCell: ", Item("cell", SAMPLES["cell"][i]), "\nFinal answer:"]
        out.append(Prompt(segs, ["Yes", "No"], answer=("Yes" if i % 2 else "No") if answers else None,
                          meta={"task": "dti" if i < n // 2 else "cell"}))
    return out


def _clean(sset):
    assert sset.extra_adapters == []
    assert sorted(sset.model.peft_config) == sorted(sset.names)


def _served(ws, ctx, out, fn):
    """Evaluate a merge result the way it is served: as an adapter on the one base copy."""
    from esm_core.adapters import merged_config

    sset = ws.sset
    sset.add_adapter("served_check", out.tensors, merged_config(sset.adapters[sset.names[0]], None, ctx.folded))
    try:
        return fn("served_check")
    finally:
        sset.remove_adapter("served_check")


def test_learned_methods_refuse_without_task_data(workspace):
    for name in ("adamerging", "finetune"):
        ctx = MergeContext.from_specialists(workspace.sset, workspace=workspace)
        with pytest.raises(ESMError) as e:
            get_method(name).run(ctx, {"steps": 1})
        assert "task data" in str(e.value) and "Fix:" in str(e.value)
    ctx = MergeContext.from_specialists(workspace.sset, workspace=workspace, data=synthetic_prompts(4, answers=False))
    with pytest.raises(ESMError, match="answer"):
        get_method("finetune").run(ctx, {"steps": 1})
    ctx = MergeContext.from_specialists(workspace.sset, workspace=None, data=synthetic_prompts(4))
    with pytest.raises(ESMError, match="encoders"):
        get_method("adamerging").run(ctx, {"steps": 1})
    with pytest.raises(ESMError, match="needs the loaded models"):
        get_method("adamerging").run(MergeContext(names=["a"], tensors={"a": {}}, data=synthetic_prompts(2)), {})
    _clean(workspace.sset)


def test_adamerging_lowers_entropy_with_valid_deterministic_coefficients(workspace):
    from esm_core.answering.answerer import Answerer

    prompts = synthetic_prompts(8, answers=False)
    seen = []
    ctx = MergeContext.from_specialists(workspace.sset, workspace=workspace, data=prompts, seed=3,
                                        progress=lambda m, f: seen.append(f))
    params = {"steps": 8, "lr": 0.05, "batch_size": 4}
    out = get_method("adamerging").run(ctx, params)
    info = out.info
    assert info["entropy_after"] < info["entropy_before"] - 1e-4
    lam = out.extra_tensors["adamerging/lambda"]
    assert lam.shape == (3, workspace.sset.num_layers)
    assert (lam >= 0).all() and (lam <= 1).all() and not torch.allclose(lam, torch.full_like(lam, 0.3))
    for k in ctx.keys:
        assert torch.equal(out.coefficients[k][:, 0, 0], lam[:, k.layer])
    assert seen[-1] == 1.0 and seen == sorted(seen) and len(seen) == 1 + 8 + 2 * 2  # start, steps, 2 evaluations
    _clean(workspace.sset)
    # the entropy the method reports is the served adapter's entropy (same scaling, same scoring)
    qa = Answerer(workspace.sset, workspace.encoders)
    lp = _served(workspace, ctx, out, lambda n: qa.label_logprobs(prompts, n))
    p = torch.softmax(lp, dim=1)
    assert float(-(p * p.log()).sum(1).mean()) == pytest.approx(info["entropy_after"], rel=1e-3, abs=1e-5)
    # same seed, same result; softmax constraint gives convex layer coefficients
    again = get_method("adamerging").run(ctx, params)
    assert torch.equal(again.extra_tensors["adamerging/lambda"], lam)
    soft = get_method("adamerging").run(ctx, dict(params, constraint="softmax", steps=5))
    torch.testing.assert_close(soft.extra_tensors["adamerging/lambda"].sum(0), torch.ones(workspace.sset.num_layers))
    assert soft.info["entropy_after"] < soft.info["entropy_before"]
    _clean(workspace.sset)


def test_adamerging_removes_its_adapter_when_cancelled(workspace):
    def cancel(msg, frac):
        if frac > 0.3:
            raise Cancelled()

    ctx = MergeContext.from_specialists(workspace.sset, workspace=workspace, data=synthetic_prompts(4, answers=False),
                                        progress=cancel)
    with pytest.raises(Cancelled):
        get_method("adamerging").run(ctx, {"steps": 5, "batch_size": 2})
    _clean(workspace.sset)


def test_finetune_lowers_the_answer_loss_of_the_served_adapter(workspace, tmp_path):
    from esm_core.answering.answerer import Answerer
    from esm_core.merging.output import write_merged

    prompts = synthetic_prompts(8)
    ctx = MergeContext.from_specialists(workspace.sset, workspace=workspace, data=prompts, seed=5)
    params = {"steps": 8, "lr": 0.02, "batch_size": 4}
    out = get_method("finetune").run(ctx, params)
    assert out.info["loss_after"] < out.info["loss_before"] - 0.05
    assert out.info["loss_trace"][-1] < out.info["loss_trace"][0]
    assert out.coefficients is None
    _clean(workspace.sset)
    # starts from the average; the served adapter gives the gold answers more probability than the average
    avg = get_method("average").run(ctx, {})
    assert any(not torch.allclose(out.tensors[k], avg.tensors[k]) for k in ctx.keys)
    qa = Answerer(workspace.sset, workspace.encoders)
    gold = torch.tensor([p.labels.index(p.answer) for p in prompts])

    def gold_logp(o):
        lp = _served(workspace, ctx, o, lambda n: qa.label_logprobs(prompts, n))
        return float(lp[torch.arange(len(prompts)), gold].mean())

    assert gold_logp(out) > gold_logp(avg) + 0.05
    again = get_method("finetune").run(ctx, params)
    assert all(torch.equal(again.tensors[k], out.tensors[k]) for k in ctx.keys)
    write_merged(tmp_path / "ft", out, workspace.sset, ctx=ctx)
    assert (tmp_path / "ft" / "adapter_model.safetensors").is_file()
    _clean(workspace.sset)


def test_mask_methods_save_their_masks_with_the_merged_adapter(workspace, tmp_path):
    from safetensors.torch import load_file

    ctx = MergeContext.from_specialists(workspace.sset, workspace=workspace)
    for name, prefix in (("emr", "emr/rescaler/mol"), ("consensus", "consensus/mask/")):
        out = get_method(name).run(ctx, {})
        d = write_merged_dir = tmp_path / name
        from esm_core.merging.output import write_merged

        write_merged(write_merged_dir, out, workspace.sset, ctx=ctx)
        saved = load_file(str(d / "coefficients.safetensors"))
        assert any(k.startswith(prefix) for k in saved)
        assert any(k.startswith("lambda/") for k in saved)
