"""The GGUF's own tokenizer, detokenizer, end-of-generation ids and chat template."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import llama_cpp

from ssd_core import ConfigError, InputError

__all__ = ["LlamaTokenizer"]

logger = logging.getLogger(__name__)


def _piece(vocab: Any, token: int, *, special: bool) -> str:
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")


class LlamaTokenizer:
    """Text <-> ids with the vocabulary stored in a GGUF (implements ``ssd_core.Tokenizer``).

    Built by :class:`~backends.llama_cpp.LlamaCppModel`; it borrows the model's vocab
    pointer, so it is valid only while the model is loaded.
    """

    def __init__(self, vocab: Any, *, chat_template: str | None, owner: str) -> None:
        self._vocab = vocab
        self._owner = owner
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(vocab))
        #: Jinja chat template from the GGUF metadata (``tokenizer.chat_template``), or None.
        self.chat_template = chat_template
        self.bos_token_id = _id_or_none(llama_cpp.llama_vocab_bos(vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        eog = {t for t in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, t)}
        for special in (llama_cpp.llama_vocab_eos(vocab), llama_cpp.llama_vocab_eot(vocab)):
            if _id_or_none(special) is not None:
                eog.add(int(special))
        #: Every id that ends generation: EOS, EOT and the GGUF's other end-of-generation ids.
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(eog))

    def encode(
        self, text: str, *, add_special_tokens: bool = True, parse_special: bool = True
    ) -> list[int]:
        """Tokenise ``text`` with the GGUF's tokenizer.

        Args:
            text: the text.
            add_special_tokens: prepend BOS where the model wants one.
            parse_special: map the text of special tokens (``<|im_start|>``) to their
                ids, as chat templates need.

        Returns:
            The token ids.
        """
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(
            self._vocab, data, len(data), buf, cap, add_special_tokens, parse_special
        )
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(
                self._vocab, data, len(data), buf, cap, add_special_tokens, parse_special
            )
        return [int(t) for t in buf[:n]]

    def decode(self, tokens: Sequence[int], *, render_special: bool = False) -> str:
        """Detokenise ``tokens``; special tokens are dropped unless ``render_special``.

        Raises:
            InputError: an id outside the vocabulary.
        """
        ids = [int(t) for t in tokens]
        for t in ids:
            if not 0 <= t < self.vocab_size:
                raise InputError(f"{self._owner}: token id {t} is outside [0, {self.vocab_size})")
        if not ids:
            return ""
        arr = (llama_cpp.llama_token * len(ids))(*ids)
        cap = 8 * len(ids) + 32
        for _ in range(2):
            buf = ctypes.create_string_buffer(cap)
            n = llama_cpp.llama_detokenize(
                self._vocab, arr, len(ids), buf, cap, False, render_special
            )
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            cap = -n
        raise InputError(f"{self._owner}: detokenisation failed")  # pragma: no cover

    def token_text(self, token: int, *, special: bool = True) -> str:
        """The text piece of one token (special tokens rendered by default)."""
        return _piece(self._vocab, int(token), special=special)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render chat ``messages`` with the GGUF's Jinja chat template.

        Args:
            messages: ``[{"role": "user", "content": "..."}, ...]``.
            add_generation_prompt: end with the assistant turn's header.

        Returns:
            The prompt text; tokenise it with ``encode(text, add_special_tokens=False)``
            when the template already writes BOS.

        Raises:
            ConfigError: the GGUF has no chat template, or ``jinja2`` is not installed.
        """
        if not self.chat_template:
            raise ConfigError(f"{self._owner}: the GGUF has no tokenizer.chat_template")
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as exc:  # pragma: no cover - jinja2 ships with llama-cpp-python
            raise ConfigError("apply_chat_template needs jinja2 (pip install jinja2)") from exc

        def raise_exception(message: str) -> None:
            raise ConfigError(f"{self._owner}: chat template error: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(self.chat_template)
        bos = self.token_text(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self.token_text(self.eos_token_ids[0]) if self.eos_token_ids else ""
        return template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos,
            eos_token=eos,
            raise_exception=raise_exception,
        )


def _id_or_none(token: int) -> int | None:
    return None if int(token) < 0 else int(token)
