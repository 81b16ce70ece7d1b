"""Shared fixtures: tiny random LLaMA bases and LoRA adapters built in code (nothing downloaded)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

MOLECULES = ["CCO", "c1ccccc1", "CC(=O)O", "CCN", "CCCC", "O=C=O", "CC(C)O", "CCl", "CBr", "C#N", "CCOC",
             "NCCO", "c1ccncc1", "CC(=O)N", "OCCO", "CCS"]
PROTEINS = ["MKTAYIAK", "MALWMRLL", "MKKLLPTA", "ACDEFGHIK", "MMMMKVLA", "PPPPKKGA", "GGSGGSAA", "WWYYFFKL",
            "MKAAALVV", "KRKRKRAA", "MNNQQLLA", "LLLLIVGA", "MSTNPKPQ", "MAHHHHHH", "MDEKLLRR", "MQRSTVWY"]
CELLS = ["CD3E CD4 IL7R", "MS4A1 CD79A", "LYZ CST3", "NKG7 GNLY", "PPBP PF4", "FCGR3A MS4A7", "CD8A CD8B",
         "HBB HBA1", "IL7R CCR7", "GZMB PRF1", "CCR7 SELL", "S100A8 S100A9", "CD14 LYZ", "FCER1A CST3",
         "CD79B MS4A1", "GNLY NKG7"]
SAMPLES = {"molecule": MOLECULES, "protein": PROTEINS, "cell": CELLS}


def modality_specs():
    from esm_core.config import ModalitySpec

    return [ModalitySpec("molecule", "Molecule: ", "smiles"), ModalitySpec("protein", "Protein: ", "protein"),
            ModalitySpec("cell", "Cell: ", "genes")]


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A 2-block hidden-32 LLaMA with three rank-4 adapters on all 7 modules (+ extras for refusals)."""
    from esm_core.tiny import build_tiny_base, make_lora_adapter

    d = tmp_path_factory.mktemp("world")
    base = build_tiny_base(d / "base", layers=2, hidden=32, intermediate=48, heads=4, kv_heads=2, seed=0)
    ad = {}
    for i, n in enumerate(["mol", "prot", "cell"]):
        ad[n] = make_lora_adapter(base, d / n, seed=i + 1, r=4, alpha=8, scale=0.2)
    return {"dir": d, "base": base, "adapters": ad}


def make_spec(world, names=("mol", "prot", "cell"), mods=("molecule", "protein", "cell"), preset="reference",
              adapters=None, **method):
    from esm_core.config import MethodConfig, RunSpec, SpecialistSpec

    adapters = adapters or world["adapters"]
    method.setdefault("probes_per_modality", 12)
    method.setdefault("batch_size", 4)
    return RunSpec(base=str(world["base"]),
                   specialists=[SpecialistSpec(n, str(adapters[n]), m) for n, m in zip(names, mods)],
                   modalities=modality_specs(), method=MethodConfig.from_preset(preset, **method))


@pytest.fixture(scope="session")
def workspace(world):
    from esm_core.pipeline import Workspace

    return Workspace.from_spec(make_spec(world), samples=SAMPLES)
