"""A BPE tokenizer for the zoo, trained with the `tokenizers` library on the zoo's own corpus.

Pre-tokenization keeps a word's leading space with the word (" CD74", " Yes") and isolates
newlines, so that a gene symbol, a label or a field name becomes one token when it is frequent
enough, and the label scored after "Final answer:" (" Yes") is the same token as in the examples.
Proteins and SMILES carry no spaces: BPE learns their frequent k-mers. Saved as a standard
``PreTrainedTokenizerFast`` so that ``AutoTokenizer.from_pretrained(zoo_dir / "base")`` loads it.

    tok = train_tokenizer(lines, vocab_size=8192)
    tok.save_pretrained(out_dir)
"""

from __future__ import annotations

from typing import Iterable

from esm_core.tiny import PLAIN_CHAT_TEMPLATE

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PRETOKENIZE = r" ?[^\s]+|\n|[^\S\n]+"


def train_tokenizer(lines: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2):
    """Train a byte-free character BPE on the given text lines; returns a PreTrainedTokenizerFast."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated")
    tk.decoder = decoders.Fuse()
    alphabet = list(string.ascii_letters + string.digits + string.punctuation + " \n")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIALS),
                                  initial_alphabet=alphabet, show_progress=False, limit_alphabet=len(alphabet) + 64)
    tk.train_from_iterator(lines, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", clean_up_tokenization_spaces=False)
    tok.chat_template = PLAIN_CHAT_TEMPLATE  # the reference preset's probe_text=chat_template uses it
    return tok
