"""A character-level tokenizer for the toy base.

Built with the ``tokenizers`` library (a WordLevel model whose vocabulary is one
token per character, a pre-tokenizer that isolates every character and a Fuse
decoder) and wrapped as ``transformers.PreTrainedTokenizerFast``; saved with
``save_pretrained`` so ``AutoTokenizer.from_pretrained(dir)`` loads it.

Vocabulary: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, then ``"\\n"`` and the
95 printable ASCII characters (space to ``~``): every character the synthetic
suite (and ordinary English/Python) uses.  Encoding adds ``<s>`` in front.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))


def build_char_tokenizer(chars: str = CHARS):
    """A ``PreTrainedTokenizerFast`` with one token per character of ``chars``."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )
    return fast


def save_char_tokenizer(out_dir: str | Path, chars: str = CHARS):
    tok = build_char_tokenizer(chars)
    tok.save_pretrained(str(out_dir))
    return tok
