"""Tokenizers: the built-in character tokenizer (built in code, no files) or a local Hugging Face directory."""

from __future__ import annotations

import os
import string
from typing import Optional

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
DEFAULT_CHARS = string.digits + string.ascii_lowercase + " +-*=:?.,"
#: a chat template for :func:`char_tokenizer` over ``DEFAULT_CHARS`` (tests and benches of multi-turn
#: episodes): one character per role, ``<eos>`` ends a turn
CHAR_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] + ':' + m['content'] + '<eos>' }}{% endfor %}"
                      "{% if add_generation_prompt %}{{ 'a:' }}{% endif %}")


def char_tokenizer(chars: str = DEFAULT_CHARS) -> PreTrainedTokenizerFast:
    """One token per character of ``chars`` plus ``<pad>`` (0), ``<eos>`` (1) and ``<unk>`` (2).

    Decoding joins characters back without spaces; padding is on the left (for generation).
    """
    if len(set(chars)) != len(chars):
        raise ValueError(f"char_tokenizer: chars={chars!r} has repeated characters; accepted: distinct characters")
    vocab = {PAD: 0, EOS: 1, UNK: 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )


def load_tokenizer(name_or_path: str = "char", chars: Optional[str] = None) -> PreTrainedTokenizerBase:
    """``"char"`` gives :func:`char_tokenizer` (over ``chars`` if given); anything else must be a
    built-in model name or a local Hugging Face directory (no hub access). A tokenizer without a pad token pads with EOS."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"tokenizer={name_or_path!r} is invalid; accepted: 'char' or the path of a Hugging Face "
                        "model/tokenizer directory")
    name_or_path = os.fspath(name_or_path)
    if chars is not None and (not isinstance(chars, str) or not chars):
        raise ValueError(f"tokenizer_chars={chars!r} is invalid; accepted: None or a non-empty string of distinct "
                         "characters")
    if name_or_path == "char":
        return char_tokenizer(chars) if chars else char_tokenizer()
    if chars is not None:
        raise ValueError(f"tokenizer_chars={chars!r} is invalid with tokenizer={name_or_path!r}; accepted: None "
                         "(the characters are only for tokenizer='char')")
    from lightrft_lightning import pretrained

    if pretrained.is_builtin(name_or_path):
        name_or_path = pretrained.resolve(name_or_path)
    if not os.path.isdir(name_or_path):
        raise ValueError(f"tokenizer={name_or_path!r} is neither 'char', a built-in model name "
                         f"({', '.join(pretrained.BUILTIN)}) nor a local directory; accepted: one of those or the "
                         "path of a Hugging Face model/tokenizer directory")
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, padding_side="left")
    except (OSError, ValueError) as err:
        raise ValueError(f"tokenizer={name_or_path!r} cannot be loaded by AutoTokenizer ({type(err).__name__}); "
                         "accepted: a directory with a Hugging Face tokenizer (tokenizer.json or "
                         "tokenizer_config.json with its vocabulary files)") from err
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer={name_or_path!r} has neither a pad nor an eos token; accepted: a tokenizer "
                             "with a pad_token or an eos_token")
        tok.pad_token = tok.eos_token
    return tok
