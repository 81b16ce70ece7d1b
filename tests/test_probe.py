"""Probes: validation, spans, padding, block-output hooks, length refusals; encoders and plug-ins."""

import numpy as np
import pytest
import torch
from conftest import SAMPLES, make_spec, modality_specs

from esm_core.config import MethodConfig
from esm_core.encoders import SoftTokenEncoder, SoftTokenProjector, morgan_fingerprint, register_encoder
from esm_core.errors import ESMError
from esm_core.pipeline import Workspace
from esm_core.probes import build_probes
from esm_core.runspec import EncoderSpec
from esm_core.samples import validate
from esm_core.states import BlockCapture, forward_blocks


def test_validators_report_reasons():
    rep = validate(["CCO", "C1CC", "", "c1ccccc1", None], "smiles")
    assert rep.values == ["CCO", "c1ccccc1"] and rep.rows == [0, 3]
    assert [r for r, _, _ in rep.bad] == [1, 2, 4]
    assert "RDKit" in rep.bad[0][2] and "empty" in rep.bad[1][2] and "missing" in rep.bad[2][2]
    rep = validate(["mkta yiak", "MKJL", "ACD1"], "protein")
    assert rep.values == ["MKTAYIAK"]
    assert "'J' at position 3" in rep.bad[0][2]
    rep = validate(["CD3E, CD4;IL7R", "  ", "CD3E <b>"], "genes")
    assert rep.values == ["CD3E CD4 IL7R"] and len(rep.bad) == 2


def test_too_few_valid_samples_is_refused():
    cfg = MethodConfig.from_preset("reference", probes_per_modality=10, min_probes=4)
    raw = dict(SAMPLES, molecule=["CCO", "xx(", "C1CC", "CCN"])
    with pytest.raises(ESMError) as ei:
        build_probes(raw, modality_specs(), cfg)
    msg = str(ei.value)
    assert "'molecule'" in msg and "only 2 of 4" in msg and "row 1" in msg


def test_joint_and_separate_layouts():
    raw = dict(SAMPLES, cell=SAMPLES["cell"][:9])
    cfg = MethodConfig.from_preset("reference", probes_per_modality=12)
    joint = build_probes(raw, modality_specs(), cfg)
    assert joint.n_probes == 9 and joint.probes[0] == [("molecule", 0), ("protein", 0), ("cell", 0)]
    sep = build_probes(raw, modality_specs(), cfg.replace(layout="separate"))
    assert sep.n_probes == 12 + 12 + 9 and sep.probes[-1] == [("cell", 8)]
    # seeded sampling: same seed same draw, other seed other draw
    a = build_probes(SAMPLES, modality_specs(), cfg.replace(probes_per_modality=5))
    b = build_probes(SAMPLES, modality_specs(), cfg.replace(probes_per_modality=5))
    c = build_probes(SAMPLES, modality_specs(), cfg.replace(probes_per_modality=5, seed=1))
    assert a.samples == b.samples and a.samples != c.samples


def test_spans_hold_the_encoder_tokens(workspace):
    b = workspace.batcher()
    batch = b.batch([0, 1, 2])
    for j, m in enumerate(workspace.probes.modalities):
        for row, i in enumerate([0, 1, 2]):
            st, en = batch.spans[row, j].tolist()
            raw = workspace.probes.samples[m][i]
            enc = workspace.encoders[m].encode(raw)
            assert torch.equal(batch.inputs_embeds[row, st:en], enc)
            assert int(batch.masks[m][row].sum()) == en - st
    toks = b.tokens(0)
    assert "".join(t for t, m in toks if m == "protein") == workspace.probes.samples["protein"][0]
    # the reference preset wraps the probe in the tokenizer's chat template (docs/METHOD.md section 5)
    assert "".join(t for t, m in toks if m is None) == "<s>User: Molecule: \nProtein: \nCell: \nAssistant:"
    # right padding does not change the real tokens' states
    full = forward_blocks(workspace.sset, batch)
    single = forward_blocks(workspace.sset, b.batch([1]))
    n = int(batch.attention_mask[1].sum())
    assert torch.allclose(full[-1][1, :n], single[-1][0, :n], atol=1e-5)


def test_block_hooks_equal_hidden_states_but_the_last(workspace):
    """Hooks give block outputs; HF's last hidden state has the final norm applied (docs/METHOD.md section 1)."""
    sset = workspace.sset
    batch = workspace.batcher().batch([0, 1])
    with torch.no_grad(), sset.use("mol"):
        ours = forward_blocks(sset, batch)
        hf = sset.lm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                     output_hidden_states=True).hidden_states
    L = sset.num_layers
    assert len(ours) == len(hf) == L + 1
    for l in range(L):
        assert torch.allclose(ours[l], hf[l], atol=1e-6)
    assert not torch.allclose(ours[L], hf[L], atol=1e-3)
    assert torch.allclose(sset.lm.model.norm(ours[L]), hf[L], atol=1e-5)


def test_detach_hook_cuts_cross_layer_gradients(workspace):
    sset = workspace.sset
    batch = workspace.batcher().batch([0])
    x = batch.inputs_embeds.clone().requires_grad_(True)
    with sset.use(None), BlockCapture(sset.blocks, detach_inputs=True) as cap:
        sset.lm.model(inputs_embeds=x, attention_mask=batch.attention_mask)
    # with detached block inputs, no block output depends on the input embeddings
    assert not cap.outputs[-1].requires_grad
    with sset.use(None), BlockCapture(sset.blocks, detach_inputs=False) as cap2:
        sset.lm.model(inputs_embeds=x, attention_mask=batch.attention_mask)
    assert cap2.outputs[-1].requires_grad  # without detaching, it does


def test_too_long_probe_is_refused(world):
    spec = make_spec(world, max_probe_tokens=30)
    with pytest.raises(ESMError) as ei:
        Workspace.from_spec(spec, samples=SAMPLES).batcher()
    assert "over the limit of 30" in str(ei.value) and "max_modality_tokens" in str(ei.value)


def test_per_modality_token_caps(world):
    spec = make_spec(world, max_modality_tokens=6)
    spec.modalities[1].max_tokens = 3
    ws = Workspace.from_spec(spec, samples=SAMPLES)
    b = ws.batcher()
    toks = b.tokens(0)
    assert sum(m == "protein" for _, m in toks) == 3 and sum(m == "molecule" for _, m in toks) <= 6
    assert b.truncated["protein"] == 12


# ------------------------------------------------------------------------------------ encoders
def test_morgan_matches_rdkit():
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=512)
    ref = gen.GetFingerprintAsNumPy(Chem.MolFromSmiles("CC(=O)Oc1ccccc1C(=O)O"))
    assert np.array_equal(morgan_fingerprint("CC(=O)Oc1ccccc1C(=O)O", n_bits=512), ref.astype(np.float32))
    with pytest.raises(ESMError, match="cannot be parsed"):
        morgan_fingerprint("C1CC")


def test_soft_token_encoder_roundtrip_and_in_a_workspace(world, tmp_path):
    torch.manual_seed(0)
    enc = SoftTokenEncoder("morgan", {"n_bits": 256}, SoftTokenProjector(256, 16, 3, 32), label="mol")
    enc.save(tmp_path / "enc")
    back = SoftTokenEncoder.load(tmp_path / "enc")
    assert torch.allclose(back.encode("CCO"), enc.encode("CCO"))
    assert back.tokens("CCO") == ["<mol0>", "<mol1>", "<mol2>"]
    spec = make_spec(world)
    spec.modalities[0].encoder = EncoderSpec("soft_token", str(tmp_path / "enc"))
    ws = Workspace.from_spec(spec, samples=SAMPLES)
    batch = ws.batcher().batch([0])
    st, en = batch.spans[0, 0].tolist()
    assert en - st == 3
    with pytest.raises(ESMError, match="makes 32-dim tokens but the base model.s hidden size is 64"):
        SoftTokenEncoder.load(tmp_path / "enc", expect_d_model=64)
    with pytest.raises(ESMError, match="lacks"):
        SoftTokenEncoder.load(tmp_path)


def test_plugin_encoder_through_the_registry(world):
    class Reversed:
        """A user encoder: embeds the reversed string with the LLM's own embeddings."""

        def __init__(self, sset):
            self.sset = sset

        def encode(self, raw):
            ids = self.sset.tokenizer(raw[::-1], add_special_tokens=False)["input_ids"]
            return self.sset.model.get_input_embeddings()(torch.tensor(ids))

        def tokens(self, raw):
            return list(raw[::-1])

    register_encoder("reversed_test")(lambda spec, sset: Reversed(sset))
    spec = make_spec(world)
    spec.modalities[1].encoder = EncoderSpec("reversed_test")
    ws = Workspace.from_spec(spec, samples=SAMPLES)
    toks = ws.batcher().tokens(0)
    assert "".join(t for t, m in toks if m == "protein") == ws.probes.samples["protein"][0][::-1]
    spec.modalities[1].encoder = EncoderSpec("nope")
    with pytest.raises(ESMError, match="Unknown encoder type 'nope'"):
        Workspace.from_spec(spec, samples=SAMPLES)


def test_grad_prefix_split_forward_is_exact(workspace):
    """Prefix with autograd + suffix from the KV cache gives the same states and prefix gradients."""
    sset = workspace.sset
    batch = workspace.batcher().batch([0, 1, 2])
    e = int(batch.spans[:, 0, 1].max())  # end of the molecule blocks
    params = sset.parameters_of("mol")
    with sset.use("mol"):
        for p in params.values():
            p.requires_grad_(True)
        full = forward_blocks(sset, batch, detach_inputs=True)
        split = forward_blocks(sset, batch, detach_inputs=True, grad_prefix=e)
        for a, b in zip(full, split):
            assert torch.allclose(a, b, atol=1e-5)
        mask = batch.masks["molecule"]
        ga = torch.autograd.grad(sum(o[mask].pow(2).sum() for o in full[1:]), list(params.values()))
        gb = torch.autograd.grad(sum(o[mask].pow(2).sum() for o in split[1:]), list(params.values()))
        for p in params.values():
            p.requires_grad_(False)
    for a, b in zip(ga, gb):
        assert (a - b).norm() / a.norm() < 1e-5
