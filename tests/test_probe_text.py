"""probe_text: how the text around the modality blocks is tokenised (docs/METHOD.md sections 1 and 5).

The oracle is a transcription of the authors' embedding construction: build the prompt string
"Molecule: ...\\nProtein: ...\\nCell: ..." as the user turn of the chat template, tokenise it ONCE,
and find each modality's tokens from the character offsets. On a word-level BPE (the zoo's), the
old segment-wise tokenisation split the first word of a block ("\\nCell: " ended in a lone space token
and "FTL" became 'F','T','L'); both modes now tokenise a block with the text before it.
"""

from pathlib import Path

import pytest
import torch

from esm_core.config import MethodConfig
from esm_core.encoders import TextEncoder
from esm_core.errors import ESMError
from esm_core.probes import ProbeBatcher, build_probes
from esm_core.runspec import ModalitySpec

ZOO_BASE = Path(__file__).resolve().parents[1] / "assets" / "zoo" / "base"
GENES = ["FTL KRAS TP53 MYC", "CD3E CD4 IL7R FTL", "ALB APOA1 FTL TTR"]
PROTS = ["MKTAYIAKQR", "GSHMLEDPVA", "MADEEKLPPG"]
MOLS = ["CCO", "c1ccccc1O", "CC(=O)Oc1ccccc1C(=O)O"]


class _Sset:
    """What the batcher reads of a SpecialistSet: tokenizer, input embeddings, the LM's config."""

    def __init__(self, tok):
        self.tokenizer = tok
        torch.manual_seed(0)
        self.model = torch.nn.Module()
        self._emb = torch.nn.Embedding(len(tok), 8)

        class _LM:
            config = type("C", (), {"max_position_embeddings": 4096})()
        self.lm = _LM()
        self.model.get_input_embeddings = lambda: self._emb


@pytest.fixture(scope="module")
def zoo_tok():
    from transformers import AutoTokenizer
    if not (ZOO_BASE / "tokenizer.json").is_file():
        pytest.skip("the demo zoo is not built")
    return AutoTokenizer.from_pretrained(ZOO_BASE, local_files_only=True)


def _batcher(tok, mode, separator=None, max_tokens=None):
    sset = _Sset(tok)
    mods = [ModalitySpec("molecule", "Molecule: ", "smiles"), ModalitySpec("protein", "Protein: ", "protein"),
            ModalitySpec("cell", "Cell: ", "genes")]
    cfg = MethodConfig.from_preset("reference", probes_per_modality=3, min_probes=2, probe_text=mode)
    probes = build_probes({"molecule": MOLS, "protein": PROTS, "cell": GENES}, mods, cfg)
    emb = sset.model.get_input_embeddings()
    encs = {"molecule": TextEncoder(tok, emb, max_tokens), "protein": TextEncoder(tok, emb, max_tokens, separator),
            "cell": TextEncoder(tok, emb, max_tokens)}
    return ProbeBatcher(sset, encs, probes, cfg), probes


def _authors(tok, probes, i, separator=None):
    """Transcription: the templated prompt tokenised once; spans = tokens overlapping each block's characters."""
    content, where = "", {}
    for j, (m, s) in enumerate(probes.probes[i]):
        raw = probes.samples[m][s]
        body = separator.join(raw) if (separator and m == "protein") else raw
        content += ("\n" if j else "") + probes.prefixes[m]
        where[m] = (len(content), len(content) + len(body))
        content += body
    full = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    shift = full.index(content)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    spans = {}
    for m, (a, b) in where.items():
        hit = [t for t, (x, y) in enumerate(enc["offset_mapping"]) if x < b + shift and y > a + shift]
        spans[m] = (hit[0], hit[-1] + 1)
    return list(enc["input_ids"]), spans


@pytest.mark.parametrize("separator", [None, " "])
def test_chat_template_probes_equal_the_authors_tokenisation(zoo_tok, separator):
    b, probes = _batcher(zoo_tok, "chat_template", separator)
    batch = b.batch([0, 1, 2])
    emb = b.embed.weight
    for row in range(3):
        ids, spans = _authors(zoo_tok, probes, row, separator)
        n = int(batch.attention_mask[row].sum())
        assert n == len(ids) == b.lengths[row]
        assert torch.equal(batch.inputs_embeds[row, :n], emb[torch.tensor(ids)])
        for j, m in enumerate(probes.modalities):
            assert tuple(batch.spans[row, j].tolist()) == spans[m]


@pytest.mark.parametrize("mode", ["segments", "chat_template"])
def test_no_split_first_token(zoo_tok, mode):
    """The first gene is one token with its leading space, and no lone-space token precedes a block."""
    b, probes = _batcher(zoo_tok, mode)
    for i in range(probes.n_probes):
        pieces = b.pieces(i)
        for k, (m, ids, toks) in enumerate(pieces):
            if m is None:
                continue
            raw = probes.samples[m][probes.probes[i][[mm for mm, _ in probes.probes[i]].index(m)][1]]
            assert "".join(toks) == " " + raw  # the block's tokens spell the block, the prefix's space joined to it
            before = pieces[k - 1][2]
            assert before[-1].strip() != "" and not before[-1].endswith(" ")
            alone = zoo_tok(raw.split()[0], add_special_tokens=False)["input_ids"]
            joined = zoo_tok(" " + raw.split()[0], add_special_tokens=False)["input_ids"]
            assert ids[:len(joined)] == joined
            if m == "cell" and raw.startswith("FTL"):
                assert len(joined) == 1 and len(alone) > 1  # the artefact this fixes: 'F','T','L'


def test_segments_and_chat_template_differ_only_around_the_blocks(zoo_tok):
    seg, probes = _batcher(zoo_tok, "segments")
    chat, _ = _batcher(zoo_tok, "chat_template")
    for i in range(probes.n_probes):
        a = [(m, x) for m, x in seg.layout(i) if m is not None]
        c = [(m, x) for m, x in chat.layout(i) if m is not None]
        assert a == c  # the blocks' ids are the same; the templates around them differ
        assert zoo_tok.decode(chat.layout(i)[0][1]).startswith("<s>User: Molecule:")
        assert zoo_tok.decode(seg.layout(i)[0][1]).startswith("<s>Molecule:")


def test_block_cap_keeps_the_first_tokens(zoo_tok):
    b, probes = _batcher(zoo_tok, "chat_template", " ", max_tokens=4)
    for i in range(probes.n_probes):
        toks = b.tokens(i)
        assert sum(m == "protein" for _, m in toks) == 4
        assert "".join(t for t, m in toks if m == "protein").replace(" ", "") == probes.samples["protein"][i][:4]
        assert "".join(t for t, m in toks if m is None).endswith("\nAssistant:")


def test_chat_template_needs_a_template(zoo_tok):
    tok = zoo_tok.__class__.from_pretrained(ZOO_BASE, local_files_only=True)
    tok.chat_template = None
    with pytest.raises(ESMError, match="no chat template") as ei:
        _batcher(tok, "chat_template")
    assert "probe_text: segments" in str(ei.value)
    b, _ = _batcher(tok, "segments")  # segments needs none
    assert b.lengths


def test_presets_choose_the_probe_text():
    assert MethodConfig.from_preset("reference").probe_text == "chat_template"
    assert MethodConfig.from_preset("paper").probe_text == "segments"
