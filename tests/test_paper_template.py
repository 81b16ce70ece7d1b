"""assets/configs/paper-llama31-8b.yaml: the paper's setting as a template the user fills in."""

from __future__ import annotations

import pytest

from esm_core.errors import ESMError
from esm_core.paths import ASSETS
from esm_core.runspec import load_run_spec

TEMPLATE = ASSETS / "configs" / "paper-llama31-8b.yaml"


def test_the_template_unfilled_is_refused_naming_the_placeholder():
    with pytest.raises(ESMError) as e:
        load_run_spec(TEMPLATE)
    assert "base still holds the template placeholder <MODELS>" in str(e.value)
    assert "replace <MODELS>" in e.value.fix


def test_the_template_filled_in_is_the_papers_setting(tmp_path):
    text = TEMPLATE.read_text().replace("<MODELS>", str(tmp_path / "models")).replace("<WORK>", str(tmp_path / "work"))
    (tmp_path / "run.yaml").write_text(text)
    spec = load_run_spec(tmp_path / "run.yaml")
    assert [s.modality for s in spec.specialists] == ["molecule", "protein", "cell"]
    assert [m.encoder.type for m in spec.modalities] == ["precomputed", "esm2", "text"]
    assert spec.method.preset == "reference" and spec.method.probes_per_modality == 330
    assert spec.base == str(tmp_path / "models" / "Meta-Llama-3.1-8B-Instruct")
    assert spec.modalities[1].encoder.options["hidden"] == 2048  # Prot2Text-V2's projector width


def test_a_placeholder_deep_in_the_file_is_named_by_its_place(tmp_path):
    text = TEMPLATE.read_text().replace("<MODELS>", str(tmp_path)).replace("<WORK>/probes/cells.csv", "<DATA>/c.csv")
    text = text.replace("<WORK>", str(tmp_path))
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ESMError, match=r"modalities\[2\]\.data\.path still holds the template placeholder <DATA>"):
        load_run_spec(tmp_path / "run.yaml")
