"""A character-level tokenizer for the embedded arithmetic task.

Every printable ASCII character (``" "`` to ``"~"``) and ``"\\n"`` is one token; decoding concatenates
tokens without separators. Special tokens: ``<pad>`` (id 0), ``<bos>`` (1), ``<eos>`` (2), ``<unk>`` (3).
No special tokens are added automatically: callers append ``<eos>`` to completions themselves.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")
"""Special tokens, in id order."""

CHARACTERS: str = "\n" + "".join(chr(c) for c in range(32, 127))
"""The ordinary characters, in id order after the special tokens."""


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer.

    Returns:
        A fast tokenizer with ``len(SPECIAL_TOKENS) + len(CHARACTERS)`` tokens whose pad/bos/eos/unk are set.
        It round-trips through ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    # A BPE model with no merges and no pre-tokenizer maps each character to its own token.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=1024,
    )
    return tokenizer
