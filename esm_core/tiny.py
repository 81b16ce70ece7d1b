"""Tiny random LLaMA bases, tokenizers and LoRA adapters built in code (tests, benchmarks, demos).

Nothing is downloaded: the tokenizer is a character-level BPE made from a fixed alphabet, the base
is a ``LlamaForCausalLM`` with random weights, adapters are PEFT LoRA adapters with random factors.

    base = build_tiny_base(tmp / "base", layers=2, hidden=64)
    make_lora_adapter(base, tmp / "mol", seed=1, r=4)
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from esm_core.models import prepare_transformers, source_of

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
# A plain chat template for the tokenizers built here (the zoo's too): "<s>User: ...\nAssistant:".
PLAIN_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n"
                       "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


def char_tokenizer(alphabet: str | None = None):
    """A PreTrainedTokenizerFast that splits text into single characters."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    alphabet = alphabet or (string.ascii_letters + string.digits + string.punctuation + " \n")
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for c in alphabet:
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = PLAIN_CHAT_TEMPLATE
    return tok


def build_tiny_base(out_dir: str | Path, *, layers: int = 2, hidden: int = 64, intermediate: int | None = None,
                    heads: int = 4, kv_heads: int | None = None, seed: int = 0, tokenizer=None,
                    max_positions: int = 2048) -> Path:
    """Save a random LlamaForCausalLM and its tokenizer to out_dir; returns the directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tok = tokenizer or char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                      max_position_embeddings=max_positions, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_lora_adapter(base_dir: str | Path, out_dir: str | Path, *, seed: int, r: int = 4, alpha: float = 8,
                      targets=ALL_TARGETS, scale: float = 0.1, use_rslora: bool = False,
                      layers_to_transform=None) -> Path:
    """Save a PEFT LoRA adapter with random A and B (scale sets their size) on the given base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    prepare_transformers()
    folder, extra = source_of(str(base_dir))  # a model folder, or a .gguf file
    base = AutoModelForCausalLM.from_pretrained(folder, **extra)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                     use_rslora=use_rslora, layers_to_transform=layers_to_transform, lora_dropout=0.0)
    pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    out = Path(out_dir)
    pm.save_pretrained(out)
    return out
