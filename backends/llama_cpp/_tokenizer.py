"""The GGUF's own tokenizer, detokenizer, end-of-generation ids and chat template."""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import llama_cpp

from ssd_core import HandleError, InputError

from ._template import (
    DEFAULT_MAX_CHARS,
    DEFAULT_TIMEOUT_S,
    ChatTemplateError,
    TemplateRenderer,
    split_rendered,
)

__all__ = ["LlamaTokenizer"]

logger = logging.getLogger(__name__)

# llama_token_attr bits (llama.h).
_ATTR_UNKNOWN = 1 << 0
_ATTR_CONTROL = 1 << 3
_ATTR_RSTRIP = 1 << 6
_ATTR_LSTRIP = 1 << 7


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
    pointer and lock: calls are serialised with the model's, and after the model is
    freed every call raises :class:`~ssd_core.HandleError`.

    Special tokens: ``encode`` parses the text of control tokens (``<|im_start|>``) into
    their ids only when asked (``parse_special=True``, or the model's
    ``allow_special`` option); chat prompts from :meth:`encode_chat` parse the
    template's own control tokens but never the messages' text.
    """

    def __init__(
        self,
        vocab: Any,
        *,
        chat_template: str | None,
        owner: str,
        lock: threading.RLock | None = None,
        allow_special: bool = False,
        template_timeout_s: float = DEFAULT_TIMEOUT_S,
        template_max_chars: int = DEFAULT_MAX_CHARS,
    ) -> None:
        self._vocab = vocab
        self._owner = owner
        self._lock = lock if lock is not None else threading.RLock()
        self.allow_special = allow_special
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self._limits = (template_timeout_s, template_max_chars)
        self._renderer: TemplateRenderer | None = None
        self.chat_template = chat_template
        self.bos_token_id = _id_or_none(llama_cpp.llama_vocab_bos(vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        is_eog = llama_cpp.llama_vocab_is_eog
        eog = {t for t in range(self.vocab_size) if is_eog(vocab, t)}
        for special in (llama_cpp.llama_vocab_eos(vocab), llama_cpp.llama_vocab_eot(vocab)):
            if _id_or_none(special) is not None:
                eog.add(int(special))
        #: Every id that ends generation: EOS, EOT and the GGUF's other end-of-generation ids.
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(eog))
        self._specials: dict[str, tuple[int, int]] | None = None  # text -> (id, attr)
        self._special_re: re.Pattern[str] | None = None

    def _live(self) -> Any:
        if self._vocab is None:
            raise HandleError(f"{self._owner}: the model has been freed")
        return self._vocab

    def _release(self) -> None:
        # Called by the model's free(), under its lock.
        self._vocab = None

    # -- text <-> ids -------------------------------------------------------------------

    def encode(
        self, text: str, *, add_special_tokens: bool = True, parse_special: bool | None = None
    ) -> list[int]:
        """Tokenise ``text`` with the GGUF's tokenizer.

        Args:
            text: the text.
            add_special_tokens: prepend BOS where the model wants one.
            parse_special: map the text of control tokens (``<|im_start|>``) to their
                ids. ``None`` (default): the model's ``allow_special`` option (off unless
                asked), so user text cannot smuggle in control tokens.

        Returns:
            The token ids.
        """
        parse = self.allow_special if parse_special is None else parse_special
        data = text.encode("utf-8")
        with self._lock:
            vocab = self._live()
            cap = len(data) + 8
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(
                vocab, data, len(data), buf, cap, add_special_tokens, parse
            )
            if n < 0:
                cap = -n
                buf = (llama_cpp.llama_token * cap)()
                n = llama_cpp.llama_tokenize(
                    vocab, data, len(data), buf, cap, add_special_tokens, parse
                )
        return list(buf[:n])

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
        with self._lock:
            vocab = self._live()
            for _ in range(2):
                buf = ctypes.create_string_buffer(cap)
                n = llama_cpp.llama_detokenize(
                    vocab, arr, len(ids), buf, cap, False, render_special
                )
                if n >= 0:
                    return buf.raw[:n].decode("utf-8", errors="replace")
                cap = -n
        raise InputError(f"{self._owner}: detokenisation failed")  # pragma: no cover

    def token_text(self, token: int, *, special: bool = True) -> str:
        """The text piece of one token (special tokens rendered by default)."""
        with self._lock:
            return _piece(self._live(), int(token), special=special)

    # -- special tokens -----------------------------------------------------------------

    def special_tokens(self) -> dict[str, int]:
        """Text -> id of every token that ``parse_special`` turns on (control and
        unknown tokens), read from the vocabulary once."""
        return {text: tid for text, (tid, _) in self._special_table().items()}

    def _special_table(self) -> dict[str, tuple[int, int]]:
        if self._specials is None:
            with self._lock:
                vocab = self._live()
                table: dict[str, tuple[int, int]] = {}
                get_attr, get_text = llama_cpp.llama_vocab_get_attr, llama_cpp.llama_vocab_get_text
                for t in range(self.vocab_size):
                    attr = int(get_attr(vocab, t))
                    if attr & (_ATTR_CONTROL | _ATTR_UNKNOWN):
                        text = (get_text(vocab, t) or b"").decode("utf-8", errors="replace")
                        if text:
                            table.setdefault(text, (t, attr))
            self._specials = table
            longest_first = sorted(table, key=len, reverse=True)
            self._special_re = (
                re.compile("|".join(re.escape(t) for t in longest_first)) if table else None
            )
        return self._specials

    def _template_ids(self, text: str) -> list[tuple[str | int, int]]:
        """``text`` split at special-token texts: ``(text, 0)`` and ``(id, attr)`` items."""
        self._special_table()
        if self._special_re is None:
            return [(text, 0)]
        out: list[tuple[str | int, int]] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                out.append((text[pos : m.start()], 0))
            out.append(self._specials[m.group(0)])  # type: ignore[index]
            pos = m.end()
        if pos < len(text):
            out.append((text[pos:], 0))
        return out

    # -- chat ---------------------------------------------------------------------------

    def _variables(self, add_generation_prompt: bool) -> dict[str, Any]:
        def raise_exception(message: str) -> None:
            raise ChatTemplateError(f"{self._owner}: chat template error: {message}")

        bos = self.token_text(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self.token_text(self.eos_token_ids[0]) if self.eos_token_ids else ""
        return {
            "add_generation_prompt": add_generation_prompt,
            "bos_token": bos,
            "eos_token": eos,
            "raise_exception": raise_exception,
        }

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render chat ``messages`` with the GGUF's Jinja chat template.

        Rendering is sandboxed and limited in time and output size (see
        :mod:`backends.llama_cpp._template`). The result is *text*: tokenising it with
        ``parse_special=True`` would also parse control-token text inside the messages;
        :meth:`encode_chat` returns ids without that hazard.

        Args:
            messages: ``[{"role": "user", "content": "..."}, ...]``.
            add_generation_prompt: end with the assistant turn's header.

        Returns:
            The prompt text.

        Raises:
            ChatTemplateError: no chat template, a template error, or a limit hit (a
                ``ConfigError``).
        """
        renderer = self._need_template()
        return renderer.render(
            messages=[dict(m) for m in messages], **self._variables(add_generation_prompt)
        )

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        allow_special: bool | None = None,
    ) -> list[int]:
        """Token ids of ``messages`` rendered with the chat template.

        The template's own text is tokenised with control-token parsing on; the
        messages' ``content`` is tokenised as plain text, so ``<|im_start|>`` typed by a
        user stays text. For a message without such text the ids equal tokenising the
        rendered prompt with ``parse_special=True`` (what llama.cpp and HF tools do).

        Args:
            messages: ``[{"role": "user", "content": "..."}, ...]``.
            add_generation_prompt: end with the assistant turn's header.
            allow_special: parse control-token text inside the messages too (``None``:
                the model's ``allow_special`` option).

        Returns:
            The prompt ids (no extra BOS unless the template writes one).

        Raises:
            ChatTemplateError: as :meth:`apply_chat_template`; or a role or other
                non-content field holds special-token text; or the template rewrites
                the content of a message that holds special-token text.
        """
        allow = self.allow_special if allow_special is None else allow_special
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        if allow:
            return self.encode(text, add_special_tokens=False, parse_special=True)
        specials = self._special_table()
        msgs = [dict(m) for m in messages]
        pieces = split_rendered(
            self._need_template(),
            msgs,
            self._variables(add_generation_prompt),
            special_texts=list(specials),
        )
        user_has_special = any(
            t in c for m in msgs if isinstance(c := m.get("content"), str) for t in specials
        )
        if pieces is None or "".join(p for p, _ in pieces) != text:
            # The template rewrites the content (trims it, splits it...), so the markers do
            # not give back the rendered prompt. Without special text in the messages the
            # plain tokenisation is safe and exact; with it, keep the user text as given.
            if not user_has_special:
                return self.encode(text, add_special_tokens=False, parse_special=True)
            if pieces is None:
                raise ChatTemplateError(
                    f"{self._owner}: the chat template rewrites message content, and a message "
                    "contains special-token text; remove it, or pass allow_special=True to "
                    "parse it as control tokens"
                )
            logger.warning(
                "%s: the chat template rewrites message content; a message with special-token "
                "text is tokenised as given",
                self._owner,
            )
        return self._encode_pieces(pieces)

    def _encode_pieces(self, pieces: Sequence[tuple[str, bool]]) -> list[int]:
        # Fragments as llama.cpp's parse_special partition makes them: template text is
        # split at special-token texts; consecutive plain texts (template and user) are
        # tokenised together, without special parsing.
        frags: list[tuple[str | int, int]] = []
        for text, is_user in pieces:
            frags.extend([(text, 0)] if is_user else self._template_ids(text))
        merged: list[str | int] = []
        pending = ""
        for i, (item, attr) in enumerate(frags):
            if isinstance(item, str):
                pending += item
                continue
            if attr & _ATTR_LSTRIP:
                pending = pending.rstrip()
            if pending:
                merged.append(pending)
            pending = ""
            merged.append(item)
            if attr & _ATTR_RSTRIP and i + 1 < len(frags) and isinstance(frags[i + 1][0], str):
                frags[i + 1] = (str(frags[i + 1][0]).lstrip(), 0)
        if pending:
            merged.append(pending)
        ids: list[int] = []
        for item in merged:
            if isinstance(item, int):
                ids.append(item)
            else:
                ids.extend(self.encode(item, add_special_tokens=False, parse_special=False))
        return ids

    @property
    def chat_template(self) -> str | None:
        """Jinja chat template from the GGUF metadata (``tokenizer.chat_template``), or
        None. Setting it replaces the renderer (``None``: no chat template)."""
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        self._chat_template = template
        timeout_s, max_chars = self._limits
        self._renderer = (
            TemplateRenderer(template, owner=self._owner, timeout_s=timeout_s, max_chars=max_chars)
            if template
            else None
        )

    def _need_template(self) -> TemplateRenderer:
        if self._renderer is None:
            raise ChatTemplateError(f"{self._owner}: the GGUF has no tokenizer.chat_template")
        return self._renderer


def _id_or_none(token: int) -> int | None:
    return None if int(token) < 0 else int(token)
