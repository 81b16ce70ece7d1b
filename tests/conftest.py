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
    from esm_core.runspec import ModalitySpec

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
    from esm_core.config import MethodConfig
    from esm_core.runspec import RunSpec, SpecialistSpec

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


ZOO_RUN = ROOT / "assets" / "zoo" / "run.yaml"


def write_run_yaml(d: Path, world, *, molecules=None, proteins=None, cells=None, method=None) -> Path:
    """Write the tiny world's run config (probe CSVs + run.yaml) into d; returns the run.yaml path.

    Callers may load the YAML, edit it (e.g. a soft-token encoder) and write it back."""
    import yaml

    d = Path(d)
    (d / "mol.csv").write_text("smiles\n" + "\n".join(MOLECULES if molecules is None else molecules) + "\n")
    (d / "prot.tsv").write_text("id\tseq\n" + "\n".join(
        f"p{i}\t{s}" for i, s in enumerate(PROTEINS if proteins is None else proteins)) + "\n")
    (d / "cell.csv").write_text("genes\n" + "\n".join(CELLS if cells is None else cells) + "\n")
    mods = [("molecule", "Molecule: ", "smiles", "mol.csv", "smiles"),
            ("protein", "Protein: ", "protein", "prot.tsv", "seq"), ("cell", "Cell: ", "genes", "cell.csv", "genes")]
    cfg = dict(base=str(world["base"]),
               specialists=[dict(name=n, adapter=str(world["adapters"][n]), modality=m)
                            for n, m in [("mol", "molecule"), ("prot", "protein"), ("cell", "cell")]],
               modalities=[dict(name=n, prefix=p, kind=k, data=dict(path=f, column=c)) for n, p, k, f, c in mods],
               method=dict(method or dict(probes_per_modality=12, batch_size=4)))
    (d / "run.yaml").write_text(yaml.safe_dump(cfg))
    return d / "run.yaml"


@pytest.fixture(scope="session")
def app_run_yaml(world, tmp_path_factory):
    """The run config the app starts on: the committed demo zoo, else the tiny world written out."""
    if ZOO_RUN.is_file():
        return ZOO_RUN
    return write_run_yaml(tmp_path_factory.mktemp("app_world"), world)


@pytest.fixture
def app_env(monkeypatch, world, app_run_yaml):
    """Environment for AppTest: the demo spec and the allowed roots."""
    monkeypatch.setenv("ESM_ALLOWED_ROOTS", os.pathsep.join([str(app_run_yaml.parent), str(world["dir"])]))
    if app_run_yaml == ZOO_RUN:
        monkeypatch.delenv("ESM_DEMO_SPEC", raising=False)
    else:
        monkeypatch.setenv("ESM_DEMO_SPEC", str(app_run_yaml))
    return app_run_yaml
