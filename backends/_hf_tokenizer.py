"""Hugging Face tokenizers for the backends that have none of their own (torch, onnxruntime).

:class:`HFTokenizer` wraps a transformers tokenizer as an :class:`ssd_core.Tokenizer`;
:func:`load_hf_tokenizer` reads one from a model folder or a GGUF file and, when it
cannot, says why in one line (no tokenizer files at all, a SentencePiece model without
the ``sentencepiece`` package, ...) instead of transformers' generic "needs
sentencepiece or tiktoken" text.

End of generation: ``eos_token_ids`` holds the tokenizer's EOS, the ids a
``generation_config`` lists, and the special tokens llama.cpp also treats as end of
generation (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ...; the same rule as
``llama_vocab_is_eog``), so a chat model's reply ends, and is rendered, the same way on
every backend.

transformers is imported only when a tokenizer is loaded.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

from ssd_core import ConfigError

__all__ = [
    "EOG_TEXTS",
    "HFTokenizer",
    "end_of_generation_ids",
    "find_tokenizer_files",
    "generation_eos_ids",
    "load_hf_tokenizer",
]

_log = logging.getLogger(__name__)

#: Special-token texts that end generation, after llama.cpp's vocabulary loader (its
#: end-of-turn texts, and the fill-in-the-middle pad/repo/separator tokens it adds to
#: the end-of-generation set). Only tokens the tokenizer marks as special count.
EOG_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<|fim_pad|>",
        "<fim-pad>",
        "<|repo_name|>",
        "<fim-repo>",
        "<REPO>",
        "<reponame>",
        "<|file_sep|>",
    }
)

#: Files from which transformers can build a tokenizer, by kind.
_TOKENIZER_FILES = {
    "tokenizer.json": "a tokenizers-library tokenizer",
    "tokenizer.model": "a SentencePiece (or tiktoken) model",
    "vocab.json": "a BPE vocabulary (with merges.txt)",
    "vocab.txt": "a WordPiece vocabulary",
    "tokenizer.tiktoken": "a tiktoken model",
}


def _special_ids(tokenizer: Any) -> dict[str, int]:
    """Text -> id of every token the tokenizer marks as special."""
    out: dict[str, int] = {}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for tid, tok in dict(decoder).items():
        if getattr(tok, "special", False):
            out[str(getattr(tok, "content", tok))] = int(tid)
    for text in getattr(tokenizer, "all_special_tokens", None) or ():
        if text not in out:
            tid = tokenizer.convert_tokens_to_ids(text)
            if isinstance(tid, int) and tid >= 0:
                out[str(text)] = tid
    return out


def end_of_generation_ids(tokenizer: Any, extra: Iterable[int] = ()) -> tuple[int, ...]:
    """The ids that end generation: EOS, ``extra`` (e.g. ``generation_config``'s) and the
    special tokens named in :data:`EOG_TEXTS`, sorted.

    Args:
        tokenizer: a transformers tokenizer.
        extra: further ids.
    """
    ids: set[int] = set()
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    ids.update(int(t) for t in extra if t is not None)
    try:
        specials = _special_ids(tokenizer)
    except Exception as exc:  # a tokenizer object without the usual tables: keep EOS only
        _log.debug("no special-token table on %s: %s", type(tokenizer).__name__, exc)
        specials = {}
    ids.update(tid for text, tid in specials.items() if text in EOG_TEXTS)
    return tuple(sorted(ids))


class HFTokenizer:
    """Wraps a transformers tokenizer as an :class:`ssd_core.Tokenizer`.

    Args:
        tokenizer: a ``PreTrainedTokenizer(Fast)`` (or transformers 5's ``TokenizersBackend``).
        extra_eos: further end-of-generation ids (e.g. from ``generation_config``).

    Attributes:
        eos_token_ids: see :func:`end_of_generation_ids`.
        hf: the wrapped transformers tokenizer (e.g. to ``save_pretrained`` it).
    """

    def __init__(self, tokenizer: Any, extra_eos: Iterable[int] = ()) -> None:
        self.hf = tokenizer
        self.eos_token_ids: tuple[int, ...] = end_of_generation_ids(tokenizer, extra_eos)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Tokenise ``text``.

        Returns:
            The token ids (BOS prepended only where the tokenizer's config asks for it).
        """
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    @property
    def has_chat_template(self) -> bool:
        """Whether the tokenizer carries a chat template."""
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` rendered by the model's chat template, ready for the
        assistant's reply."""
        out = self.hf.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):  # BatchEncoding in some versions
            out = out["input_ids"]
        return [int(t) for t in out]

    def decode(self, tokens: Sequence[int]) -> str:
        """Detokenise ``tokens``; special tokens are kept as text."""
        return str(self.hf.decode([int(t) for t in tokens]))


def find_tokenizer_files(folder: str) -> list[str]:
    """The tokenizer files present in ``folder`` (names from ``_TOKENIZER_FILES``, and
    ``*.tiktoken``)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(n for n in names if n in _TOKENIZER_FILES or n.endswith(".tiktoken"))


def generation_eos_ids(folder: str) -> list[int]:
    """``eos_token_id`` of ``folder/generation_config.json`` (an int or a list), or ``[]``."""
    try:
        with open(os.path.join(folder, "generation_config.json"), encoding="utf-8") as f:
            value = json.load(f).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value or () if isinstance(v, int)]


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def load_hf_tokenizer(path: str, *, owner: str = "tokenizer") -> HFTokenizer:
    """Read the tokenizer of a model folder or a GGUF file.

    Args:
        path: a folder holding tokenizer files (``tokenizer.json``, ``tokenizer.model``,
            ``vocab.json`` + ``merges.txt``, ...), a ``.gguf`` file (its embedded
            tokenizer, converted by transformers; needs ``gguf``), or a tokenizer file
            inside a folder (the folder is read).
        owner: who asks, for messages (e.g. ``"torch backend"``).

    Returns:
        The wrapped tokenizer; ``eos_token_ids`` also includes the folder's
        ``generation_config.json`` end ids.

    Raises:
        ConfigError: naming the real cause -- no such path, no tokenizer files in the
            folder (listing what was looked for), a package the files need
            (``transformers``, ``sentencepiece``, ``gguf``, ``tiktoken``), or
            transformers' own error for files it cannot read.
    """
    if not os.path.exists(path):
        raise ConfigError(f"{owner}: no tokenizer at {path!r} (no such file or folder)")
    gguf_file = None
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            path, gguf_file = os.path.split(os.path.abspath(path))
        else:
            path = os.path.dirname(os.path.abspath(path))
    if _missing("transformers"):
        raise ConfigError(
            f"{owner}: reading the tokenizer in {path!r} needs transformers "
            "(pip install transformers)"
        )
    if gguf_file is not None:
        if _missing("gguf"):
            raise ConfigError(
                f"{owner}: reading the tokenizer of {gguf_file} needs the gguf package "
                "(pip install gguf)"
            )
    else:
        files = find_tokenizer_files(path)
        if not files:
            looked = ", ".join(n for n in _TOKENIZER_FILES if n != "tokenizer.tiktoken")
            raise ConfigError(
                f"{owner}: {path!r} has no tokenizer files (looked for {looked}, *.tiktoken): "
                "save the model's tokenizer there (tokenizer.save_pretrained(folder)), point "
                "to one with tokenizer=PATH, or give prompts as token ids"
            )
        if "tokenizer.json" not in files:
            if files == ["tokenizer.model"] and _missing("sentencepiece"):
                raise ConfigError(
                    f"{owner}: {path!r} has only tokenizer.model (a SentencePiece model) and no "
                    "tokenizer.json; reading it needs sentencepiece (pip install "
                    "sentencepiece), or save a tokenizer.json there"
                )
            if any(f.endswith(".tiktoken") for f in files) and _missing("tiktoken"):
                raise ConfigError(
                    f"{owner}: {path!r} has a tiktoken model and no tokenizer.json; reading it "
                    "needs tiktoken (pip install tiktoken)"
                )
    from transformers import AutoTokenizer

    extra: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    where = os.path.join(path, gguf_file) if gguf_file else path
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, **extra)
    except (OSError, ValueError, TypeError, KeyError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{owner}: transformers cannot read the tokenizer in {where!r}: {first}"
        ) from exc
    return HFTokenizer(tok, generation_eos_ids(path) if gguf_file is None else ())
