"""The Tokenizer protocol over a Hugging Face tokenizer."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["HFTokenizer"]


class HFTokenizer:
    """Wraps a transformers tokenizer as an :class:`ssd_core.Tokenizer`.

    Args:
        tokenizer: a ``PreTrainedTokenizer(Fast)``.
        extra_eos: further end-of-sequence ids (e.g. from ``generation_config``).
    """

    def __init__(self, tokenizer: Any, extra_eos: Iterable[int] = ()) -> None:
        self._tok = tokenizer
        eos: list[int] = []
        for value in (getattr(tokenizer, "eos_token_id", None), *extra_eos):
            if value is not None and int(value) not in eos:
                eos.append(int(value))
        self.eos_token_ids: tuple[int, ...] = tuple(eos)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Tokenise ``text``.

        Returns:
            The token ids (BOS prepended only where the tokenizer's config asks for it).
        """
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    @property
    def has_chat_template(self) -> bool:
        """Whether the tokenizer carries a chat template."""
        return bool(getattr(self._tok, "chat_template", None))

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` rendered by the model's chat template, ready for the
        assistant's reply."""
        out = self._tok.apply_chat_template(
            list(messages), tokenize=True, add_generation_prompt=True
        )
        if isinstance(out, dict) or hasattr(out, "input_ids"):  # BatchEncoding in some versions
            out = out["input_ids"]
        return [int(t) for t in out]

    def decode(self, tokens: Sequence[int]) -> str:
        """Detokenise ``tokens``; special tokens are kept as text."""
        return str(self._tok.decode([int(t) for t in tokens]))
