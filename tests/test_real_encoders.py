"""Encoders for real modalities (esm_core/bio_encoders.py) behind the registry of esm_core/encoders.py.

- ``esm2``: a tiny EsmModel (hidden 16, 2 layers, the ESM alphabet) saved with save_pretrained and a
  random Prot2Text-V2-shaped projector; blocks [<cls>, residues, <eos>] of unit rows, deterministic,
  equal to the formula; an estimation and prompt answering with the protein modality on it;
- ``precomputed``: soft tokens keyed by sample id; an estimation with the molecule modality on it;
- bad projectors, ESM folders, options, inputs and token files refused with the input and the fix.

Nothing is downloaded.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import SAMPLES, make_spec
from safetensors.torch import save_file
from transformers import EsmConfig, EsmModel, EsmTokenizer

from esm_core.answering.answerer import Answerer
from esm_core.answering.batched import BatchedAnswerer
from esm_core.answering.prompts import Item, Prompt
from esm_core.encoders import build_encoder, encoder_types
from esm_core.errors import ESMError
from esm_core.pipeline import Workspace, estimate
from esm_core.runspec import EncoderSpec, ModalitySpec

ESM_ALPHABET = ["<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO", ".", "-", "<null_1>", "<mask>"]
ESM_W, PROJ_H, LLM_W = 16, 24, 32  # ESM hidden, projector inner width, the world's LLM hidden size
SSET = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, hidden_size=LLM_W)  # what factories read
IDS = [f"m{i}" for i in range(16)]


def save_esm(folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    cfg = EsmConfig(vocab_size=len(ESM_ALPHABET), hidden_size=ESM_W, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=1026, pad_token_id=1, mask_token_id=32,
                    position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False)
    EsmModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(ESM_ALPHABET) + "\n")
    EsmTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def projector_tensors(esm_w=ESM_W, hidden=PROJ_H, out=LLM_W, prefix="", seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = {"fc1.weight": torch.randn(hidden, esm_w, generator=g) / esm_w ** 0.5,
         "fc1.bias": torch.randn(hidden, generator=g),
         "fc2.weight": torch.randn(out, hidden, generator=g) / hidden ** 0.5,
         "fc2.bias": torch.randn(out, generator=g)}
    return {prefix + k: v for k, v in t.items()}


@pytest.fixture(scope="module")
def esm_dir(tmp_path_factory) -> Path:
    """An encoder directory: esm/ (the tiny ESM-2) and projector.safetensors (the defaults)."""
    d = tmp_path_factory.mktemp("esm2_encoder")
    save_esm(d / "esm")
    save_file(projector_tensors(), str(d / "projector.safetensors"))
    return d


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory) -> Path:
    """A precomputed encoder directory: tokens.safetensors with 8 query tokens per molecule id."""
    d = tmp_path_factory.mktemp("precomputed")
    g = torch.Generator().manual_seed(3)
    save_file({i: torch.randn(8, LLM_W, generator=g) * 0.05 for i in IDS}, str(d / "tokens.safetensors"),
              metadata={"encoder": "Mol-LLaMA query tokens (test stand-in)"})
    return d


def with_encoder(spec, name: str, enc: EncoderSpec, kind: str | None = None):
    spec.modalities = [ModalitySpec(m.name, m.prefix, kind or m.kind, m.max_tokens, enc) if m.name == name else m
                       for m in spec.modalities]
    return spec


# ------------------------------------------------------------------------------------ esm2
def test_both_encoders_are_in_the_registry():
    assert {"text", "soft_token", "esm2", "precomputed"} <= set(encoder_types())


def test_esm2_block_shape_unit_rows_deterministic(esm_dir):
    enc = build_encoder(EncoderSpec("esm2", str(esm_dir)), SSET)
    e = enc.encode("MKTAYIAK")
    assert e.shape == (8 + 2, LLM_W) and enc.n_tokens("MKTAYIAK") == 10
    assert torch.allclose(e.norm(dim=-1), torch.ones(10), atol=1e-5)
    assert torch.equal(e, enc.encode("MKTAYIAK"))
    assert torch.equal(e, enc.encode(" mkta yiak\n"))  # the protein validator cleans the input
    assert enc.tokens("MKTAYIAK") == ["<cls>", *"MKTAYIAK", "<eos>"]
    many = enc.encode_many(["MKTAYIAK", "ACDEFGHIKLMNPQRSTVWY", "MK"])  # one padded ESM batch
    assert [m.shape[0] for m in many] == [10, 22, 4]
    assert torch.allclose(many[0], e, atol=1e-5)
    assert not any(p.requires_grad for p in enc.model.parameters())


def test_esm2_equals_the_prot2text_formula(esm_dir):
    enc = build_encoder(EncoderSpec("esm2", str(esm_dir)), SSET)
    tok = EsmTokenizer.from_pretrained(str(esm_dir / "esm"))
    esm = EsmModel.from_pretrained(str(esm_dir / "esm"), add_pooling_layer=False).eval()
    p = projector_tensors()
    with torch.no_grad():
        h = esm(**tok("MALWMRLL", return_tensors="pt")).last_hidden_state[0]
        g = torch.nn.functional.gelu
        z = g(g(h @ p["fc1.weight"].T + p["fc1.bias"]) @ p["fc2.weight"].T + p["fc2.bias"])
    assert torch.allclose(enc.encode("MALWMRLL"), z / z.norm(dim=-1, keepdim=True), atol=1e-5)


def test_esm2_reads_prot2text_names_and_truncates(esm_dir, tmp_path):
    # the whole Prot2Text-V2 checkpoint may be named: adapter.* taken, everything else ignored
    extra = {"adapter.ln1.weight": torch.ones(PROJ_H), "llama_decoder.lm_head.weight": torch.zeros(4, 4)}
    save_file({**projector_tensors(prefix="adapter."), **extra}, str(tmp_path / "p2t.safetensors"))
    plain = build_encoder(EncoderSpec("esm2", str(esm_dir)), SSET)
    p2t = build_encoder(EncoderSpec("esm2", str(esm_dir), {"projector": str(tmp_path / "p2t.safetensors"),
                                                           "hidden": PROJ_H}), SSET)
    assert torch.equal(plain.encode("MKKLLPTA"), p2t.encode("MKKLLPTA"))
    # the importer's extra_weights.safetensors of a Prot2Text-V2 training checkpoint (PEFT modules_to_save)
    peft_names = {"base_model.model.{}.modules_to_save.default.{}".format(*k.rsplit(".", 1)): v
                  for k, v in projector_tensors(prefix="adapter.").items()}
    originals = {f"base_model.model.adapter.fc1.original_module.{n}": torch.zeros(1) for n in ("weight", "bias")}
    save_file({**peft_names, **originals}, str(tmp_path / "extra_weights.safetensors"))
    imported = build_encoder(EncoderSpec("esm2", str(esm_dir), {"projector": str(tmp_path / "extra_weights.safetensors")}),
                             SSET)
    assert torch.equal(plain.encode("MKKLLPTA"), imported.encode("MKKLLPTA"))
    short = build_encoder(EncoderSpec("esm2", str(esm_dir), {"max_residues": 5}), SSET)
    assert short.encode("MKKLLPTA").shape[0] == 7 and short.truncated("MKKLLPTA") and not short.truncated("MKK")
    short.max_tokens = 4  # the probe cap (a workspace sets it), specials counted
    assert short.n_tokens("MKKLLPTA") == 4 and short.tokens("MKKLLPTA") == ["<cls>", "M", "K", "<eos>"]


def test_estimation_and_answering_with_a_protein_on_esm2(world, esm_dir):
    spec = with_encoder(make_spec(world), "protein", EncoderSpec("esm2", str(esm_dir)))
    ws = Workspace.from_spec(spec, samples=SAMPLES)
    res = estimate(ws)
    assert torch.isfinite(res.layer.alpha).all()
    assert all(torch.isfinite(v).all() for v in res.lam.values())
    b = ws.batcher()
    j = ws.probes.modalities.index("protein")
    batch = b.batch([0])
    st, en = batch.spans[0, j].tolist()
    raw = ws.probes.samples["protein"][ws.probes.probes[0][j][1]]
    assert en - st == len(raw) + 2 and next(t for t, m in b.tokens(0) if m == "protein") == "<cls>"
    assert torch.allclose(batch.inputs_embeds[0, st:en], ws.encoders["protein"].encode(raw), atol=1e-6)

    prompt = Prompt(["Protein: ", Item("protein", "MKTAYIAKQRQISFVKSHFSRQ"), "\nHas tryptophan? Final answer:"],
                    ["Yes", "No"])
    qa = Answerer(ws.sset, ws.encoders)
    lp = qa.label_logprobs([prompt], adapter="prot")
    assert lp.shape == (1, 2) and torch.isfinite(lp).all()
    assert isinstance(qa.generate([prompt], adapter=None, max_new_tokens=3)[0], str)
    fast = BatchedAnswerer(ws.sset, ws.encoders).run([prompt, prompt], adapter="prot", generate=False)
    assert torch.allclose(fast.logprobs[0], lp[0], atol=1e-4)


def _esm_case(tmp: Path, esm_dir: Path, case: str):
    """(EncoderSpec, raw to encode or None) for one bad esm2 set-up."""
    def proj(**kw):
        save_file(projector_tensors(**kw), str(tmp / "p.safetensors"))
        return str(tmp / "p.safetensors")

    esm = str(esm_dir / "esm")
    if case == "no_safetensors":
        d = tmp / "binonly"
        d.mkdir()
        (d / "config.json").write_text((esm_dir / "esm" / "config.json").read_text())
        (d / "vocab.txt").write_text("\n".join(ESM_ALPHABET))
        (d / "pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))
        esm = str(d)
    if case == "not_esm":
        d = tmp / "llama"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": ESM_W}))
        esm = str(d)
    options = {
        "in_width": lambda: dict(esm=esm, projector=proj(esm_w=20)),
        "out_width": lambda: dict(esm=esm, projector=proj(out=48)),
        "inner_width": lambda: dict(esm=esm, projector=proj(), hidden=2048),
        "nan_projector": lambda: dict(esm=esm, projector=proj()),
        "no_projector": lambda: dict(esm=esm, projector=str(tmp / "missing.safetensors")),
        "pickle_projector": lambda: dict(esm=esm, projector=str(tmp / "p.pt")),
        "no_folder": lambda: dict(esm=str(tmp / "nowhere"), projector=proj()),
        "no_safetensors": lambda: dict(esm=esm, projector=proj()),
        "not_esm": lambda: dict(esm=esm, projector=proj()),
        "relative_without_path": lambda: dict(esm="esm"),
        "unknown_option": lambda: dict(esm=esm, projector=proj(), max_residue=9),
        "bad_dtype": lambda: dict(esm=esm, projector=proj(), dtype="float8"),
        "non_protein": lambda: dict(esm=esm, projector=proj()),
    }[case]()
    if case == "nan_projector":
        t = projector_tensors()
        t["fc2.bias"][3] = float("nan")
        save_file(t, options["projector"])
    if case == "pickle_projector":
        torch.save(projector_tensors(), str(tmp / "p.pt"))
    return EncoderSpec("esm2", None, options), ("CC(=O)O" if case == "non_protein" else None)


@pytest.mark.parametrize("case, expected", [
    ("in_width", "takes 20-wide inputs but ESM folder"),
    ("out_width", "makes 48-wide tokens but the base model's hidden size is 32"),
    ("inner_width", "inner width 24, not the configured hidden=2048"),
    ("nan_projector", "NaN or infinite"),
    ("no_projector", "does not exist"),
    ("pickle_projector", "pickle / torch.save file"),
    ("no_folder", "ESM folder"),
    ("no_safetensors", "has no model.safetensors"),
    ("not_esm", "'llama' model, not an ESM one"),
    ("relative_without_path", "is relative and the encoder has no 'path:'"),
    ("unknown_option", "Unknown option(s) ['max_residue']"),
    ("bad_dtype", "dtype 'float8'"),
    ("non_protein", "not a protein sequence"),
])
def test_bad_esm2_set_ups_are_refused(tmp_path, esm_dir, case, expected):
    spec, raw = _esm_case(tmp_path, esm_dir, case)
    with pytest.raises(ESMError) as ei:
        enc = build_encoder(spec, SSET)
        enc.encode(raw)
    assert expected in str(ei.value) and ei.value.fix, str(ei.value)


# ------------------------------------------------------------------------------------ precomputed
def test_precomputed_tokens_by_id(tokens_dir):
    enc = build_encoder(EncoderSpec("precomputed", str(tokens_dir), {"n_tokens": 8, "label": "q"}), SSET)
    assert enc.sample_ids == sorted(IDS) and enc.n_tokens("m3") == 8
    assert enc.tokens("m3") == [f"<q{i}>" for i in range(8)]
    assert enc.encode(" m3 ").shape == (8, LLM_W)  # ids are matched stripped, like the text validator keeps them
    enc.check(IDS)


def test_estimation_with_a_molecule_on_precomputed_tokens(world, tokens_dir):
    spec = with_encoder(make_spec(world), "molecule", EncoderSpec("precomputed", str(tokens_dir), {"n_tokens": 8}),
                        kind="text")
    ws = Workspace.from_spec(spec, samples=dict(SAMPLES, molecule=IDS))
    res = estimate(ws)
    assert torch.isfinite(res.layer.alpha).all()
    b = ws.batcher()
    batch = b.batch([0])
    st, en = batch.spans[0, 0].tolist()
    assert en - st == 8
    stored = ws.encoders["molecule"].encode(ws.probes.samples["molecule"][0])
    assert torch.allclose(batch.inputs_embeds[0, st:en], stored)


def test_a_probe_id_missing_from_the_file_is_refused_when_probes_are_built(world, tokens_dir):
    spec = with_encoder(make_spec(world), "molecule", EncoderSpec("precomputed", str(tokens_dir)), kind="text")
    ws = Workspace.from_spec(spec, samples=dict(SAMPLES, molecule=IDS[:11] + ["m99"]))  # 12 drawn: all of them
    with pytest.raises(ESMError) as ei:
        ws.batcher()
    assert "'m99' is not in the precomputed token file" in str(ei.value) and "probe data" in ei.value.fix


def _write_tokens(d: Path, case: str) -> tuple[dict, list[str]]:
    """Write one bad token file into d; (options, ids to check)."""
    good = {i: torch.zeros(8, LLM_W) for i in IDS[:4]}
    f = str(d / "tokens.safetensors")
    if case == "missing_id":
        save_file(good, f)
        return {}, IDS[:4] + ["m7", "m9"]
    if case == "wrong_width":
        save_file(dict(good, m2=torch.zeros(8, 48)), f)
    elif case == "nan":
        bad = torch.zeros(8, LLM_W)
        bad[5, 7] = float("nan")
        save_file(dict(good, m1=bad), f)
    elif case == "token_count":
        save_file(dict(good, m3=torch.zeros(6, LLM_W)), f)
        return {"n_tokens": 8}, IDS[:4]
    elif case == "int_dtype":
        save_file(dict(good, m0=torch.zeros(8, LLM_W, dtype=torch.int64)), f)
    elif case == "not_2d":
        save_file(dict(good, m0=torch.zeros(1, 8, LLM_W)), f)
    elif case == "not_safetensors":
        Path(f).write_text("id,token\nm0,0.1\n")
    elif case == "pickle":
        Path(f).write_bytes(pickle.dumps({k: v.numpy() for k, v in good.items()}))
    elif case == "torch_save":
        torch.save(good, f)
    elif case == "absent":
        pass
    return {}, IDS[:4]


@pytest.mark.parametrize("case, expected", [
    ("missing_id", "2 sample id(s) are not in the precomputed token file"),
    ("wrong_width", "sample 'm2' has 48-wide tokens but the base model's hidden size is 32"),
    ("nan", "sample 'm1' holds NaN or infinite values"),
    ("token_count", "sample 'm3' has 6 tokens, not the configured n_tokens=8"),
    ("int_dtype", "is of dtype I64, not a float"),
    ("not_2d", "has shape [1, 8, 32], not [n_tokens, width]"),
    ("not_safetensors", "is not a safetensors file"),
    ("pickle", "is a pickle / torch.save file"),
    ("torch_save", "is a pickle / torch.save file"),
    ("absent", "does not exist"),
])
def test_bad_token_files_are_refused(tmp_path, case, expected):
    options, ids = _write_tokens(tmp_path, case)
    with pytest.raises(ESMError) as ei:
        build_encoder(EncoderSpec("precomputed", str(tmp_path), options), SSET).check(ids)
    assert expected in str(ei.value) and ei.value.fix, str(ei.value)
    if case == "missing_id":
        assert "['m7', 'm9']" in str(ei.value)


@pytest.mark.parametrize("options, path_is_file, expected", [
    ({"n_tokens": 0}, False, "n_tokens=0 is not a whole number >= 1"),
    ({"label": "<q>"}, False, "label='<q>' is not a short name"),
    ({"file": "tokens.safetensors"}, True, "is not a directory"),
    ({"width": 32}, False, "Unknown option(s) ['width']"),
])
def test_bad_precomputed_options_are_refused(tokens_dir, options, path_is_file, expected):
    path = tokens_dir / "tokens.safetensors" if path_is_file else tokens_dir
    with pytest.raises(ESMError) as ei:
        build_encoder(EncoderSpec("precomputed", str(path), options), SSET)
    assert expected in str(ei.value), str(ei.value)
