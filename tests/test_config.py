"""Config: presets, overrides, validation, YAML reading with relative paths."""

import pytest
import yaml

from esm_core.config import PRESETS, MethodConfig
from esm_core.errors import ESMError
from esm_core.runspec import load_run_spec


def test_presets_fill_the_method_table():
    ref, pap = MethodConfig.from_preset("reference"), MethodConfig.from_preset("paper")
    assert MethodConfig().preset == "reference"  # the default preset
    assert (ref.tau_layer, ref.tau_elem, ref.zscore_scope, ref.element_group) == (0.5, 0.1, "tensor", 2)
    assert (pap.tau_layer, pap.tau_elem, pap.zscore_scope, pap.element_group) == (1.0, 0.5, "layer", 1)
    assert ref.standardize and not pap.standardize
    assert (ref.first_delta, pap.first_delta) == ("raw", "diff")
    assert (ref.element_signal, pap.element_signal) == ("mse", "frobenius")
    assert (ref.probes_per_modality, pap.probes_per_modality) == (330, 110)
    for p in PRESETS.values():
        assert p["n_projections"] == 1024 and p["swd_p"] == 2.0


def test_overrides_are_recorded_and_replace_keeps_them():
    cfg = MethodConfig.from_preset("paper", tau_layer=0.7, seed=3, tau_elem=0.5)
    assert cfg.overridden == ("seed", "tau_layer")  # tau_elem equals the preset: not an override
    r = cfg.resolved()
    assert r["preset"] == "paper" and r["tau_layer"] == 0.7 and r["overridden"] == ["seed", "tau_layer"]
    sw = cfg.replace(preset="reference")
    assert sw.preset == "reference" and sw.tau_layer == 0.7 and sw.tau_elem == 0.1 and sw.seed == 3
    assert cfg.fingerprint() != sw.fingerprint()
    assert cfg.fingerprint("n_projections") == sw.fingerprint("n_projections")


@pytest.mark.parametrize("kw,words", [
    ({"tau_elem": 0}, "out of range"),
    ({"mode": "both"}, "not allowed"),
    ({"zscore_scope": "global"}, "not allowed"),
    ({"n_projections": 0}, "out of range"),
    ({"colour": "red"}, "Unknown method setting"),
])
def test_bad_settings_name_the_field(kw, words):
    with pytest.raises(ESMError) as ei:
        MethodConfig.from_preset("reference", **kw)
    assert words in str(ei.value) and list(kw)[0] in str(ei.value)


def test_yaml_paths_are_relative_to_the_file(tmp_path):
    sub = tmp_path / "cfg"
    sub.mkdir()
    (sub / "run.yaml").write_text(yaml.safe_dump({
        "base": "../models/base",
        "specialists": [{"name": "a", "adapter": "ad/a", "modality": "molecule"},
                        {"name": "b", "adapter": "/abs/b", "modality": "molecule"}],
        "modalities": [{"name": "molecule", "prefix": "Molecule: ", "kind": "smiles", "max_tokens": 12,
                        "encoder": "text", "data": {"path": "mols.csv", "column": "smiles"}}],
        "method": {"preset": "paper", "tau_elem": 0.2},
    }))
    spec = load_run_spec(sub / "run.yaml", seed=9)
    assert spec.base == str((tmp_path / "models" / "base").resolve())
    assert spec.specialists[0].adapter == str((sub / "ad" / "a").resolve())
    assert spec.specialists[1].adapter == "/abs/b"
    assert spec.modalities[0].data.path == str((sub / "mols.csv").resolve())
    assert spec.modalities[0].encoder.type == "text" and spec.modalities[0].max_tokens == 12
    assert spec.method.preset == "paper" and spec.method.tau_elem == 0.2 and spec.method.seed == 9


def test_spec_validation_messages(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"base": "b", "specialists": [{"name": "a", "adapter": "x"},
                                                               {"name": "a", "adapter": "y"}],
                                 "modalities": [{"name": "m"}], "method": {"element_modalities": "all"}}))
    with pytest.raises(ESMError, match="unique"):
        load_run_spec(p)
    p.write_text(yaml.safe_dump({"base": "b", "specialists": [{"name": "a", "adapter": "x"},
                                                               {"name": "c", "adapter": "y"}],
                                 "modalities": [{"name": "m"}]}))
    with pytest.raises(ESMError, match="own modality"):
        load_run_spec(p)  # reference preset reads each specialist's own modality
    p.write_text("base: [unclosed\n")
    with pytest.raises(ESMError, match="not valid YAML"):
        load_run_spec(p)
