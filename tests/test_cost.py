"""The cost estimate: FLOPs counted from a real model's parameters, the paper's 8B figure, the manifest."""

from __future__ import annotations

import pytest
import torch

from esm_core.cost import estimate_cost


def test_forward_flops_match_twice_the_block_parameters_plus_attention():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=100)
    model = LlamaForCausalLM(cfg)
    linear = sum(m.weight.numel() for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear))
    T = 50
    est = estimate_cost(cfg, n_specialists=3, rank=0, n_targets=7, n_probes=10, mean_tokens=T, batch_size=4,
                        dtype_bytes=4, peak_flops=1e12)
    assert est.forward_flops_per_token == pytest.approx(2 * linear + cfg.num_hidden_layers * 2 * T * 64)
    assert est.flops == pytest.approx(7 * 10 * T * est.forward_flops_per_token)  # base + 3 x (fwd + bwd)
    assert est.ideal_seconds == pytest.approx(est.flops / 1e12)


def test_the_papers_8b_setting_costs_about_1p4e16_flop():
    llama31_8b = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256)
    est = estimate_cost(llama31_8b, n_specialists=3, rank=8, n_targets=7, n_probes=330, mean_tokens=450,
                        batch_size=16, dtype_bytes=2, peak_flops=989e12)
    assert 1.3e16 < est.flops < 1.6e16  # docs/METHOD.md section 9: ~1.4e16 FLOP, ~14 s at peak
    assert 13 < est.ideal_seconds < 16
    assert 15e9 < est.weight_bytes < 17e9  # 8.0e9 parameters in bf16
    assert "FLOP" in est.summary() and "at least" in est.summary()


def test_an_estimation_records_its_estimate_beside_its_measured_time(workspace):
    from esm_core.pipeline import estimate

    res = estimate(workspace)
    assert res.cost["flops"] > 0 and res.cost["peak_flops"] > 0
    assert res.cost["ideal_seconds"] <= res.timings["estimate_total_s"]  # a lower bound


GiB = 2**30


@pytest.mark.parametrize("weights,free,want", [
    (10 * GiB, [80 * GiB], None),                           # fits one GPU: loaded there whole
    (100 * GiB, [80 * GiB, 80 * GiB], {0: 64 * GiB, 1: 64 * GiB}),  # spread with accelerate's device_map
    (140 * GiB, [141 * GiB], None),                         # 70B in bf16 on one 141 GB device: no room left
])
def test_the_base_goes_where_it_fits(weights, free, want):
    from esm_core.errors import ESMError
    from esm_core.models import plan_devices

    dev = torch.device("cuda", 0)
    if weights > 0.8 * sum(free):
        with pytest.raises(ESMError, match="GiB for its weights"):
            plan_devices(weights, dev, free=free)
        return
    assert plan_devices(weights, dev, free=free) == want


def test_the_cpu_is_never_planned_across_devices():
    from esm_core.models import plan_devices

    assert plan_devices(1e15, torch.device("cpu")) is None


def test_dry_run_prints_the_estimate_and_writes_nothing(world, tmp_path, capsys):
    import yaml
    from conftest import SAMPLES, make_spec

    from esm_core.cli import main as cli
    from esm_core.runspec import run_spec_to_dict

    cfg = run_spec_to_dict(make_spec(world))
    cfg.pop("source", None)
    for m in cfg["modalities"]:
        (tmp_path / f"{m['name']}.csv").write_text("raw\n" + "\n".join(SAMPLES[m["name"]]) + "\n")
        m["data"] = {"path": str(tmp_path / f"{m['name']}.csv"), "column": "raw"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli(["coefficients", "--config", str(tmp_path / "run.yaml"), "--dry-run", "--no-progress"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("estimate: "))
    assert "FLOP" in line and "at least" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before
