"""The Model protocol on llama.cpp's low-level API.

Theory of operation: one llama.cpp context holds every handle of one model. A handle
is an int (never reused) mapped to a llama.cpp sequence id (reused after close).
``truncate`` and ``close`` are ``llama_memory_seq_rm``; ``fork`` is
``llama_memory_seq_cp``. Two KV layouts (``LlamaOptions.kv_layout``):

* per_sequence (default in batch-invariant mode): each sequence id owns a stream of
  ``n_ctx`` cells. With one sequence per stream, cells stay in position order (a
  truncation frees the tail and the next tokens refill it), so logits depend only on
  the tokens. Forking copies the whole stream (llama.cpp only copies full streams
  across streams), then drops the child's tail.
* unified: one pool; ``seq_cp`` tags the parent's cells with the child's id, so
  branches share their prefix. Cells freed by truncate/close are reused by later
  tokens out of position order, and llama.cpp's attention then rounds differently
  (measured: up to ~3e-2 in logits with flash attention on the test model). ``extend`` packs every request into as few ``llama_decode``
calls as the batch-invariance setting allows, asks for logits on the appended tokens
only, and copies each row out at once (the next decode overwrites the buffer).

A Python-side :class:`~backends._handles.HandleTable` mirrors each handle's tokens, so
every check (unknown handle, vocabulary, capacity) happens before calling into C.
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from ssd_core import BackendContractError, CapacityError, ConfigError, Handle, HandleError

from .._handles import HandleTable
from ._options import FLASH_ATTN, LlamaOptions
from ._tokenizer import LlamaTokenizer

__all__ = ["LlamaCppModel"]

logger = logging.getLogger(__name__)


def _free_native(model: Any, ctx: Any, batch: Any) -> None:
    # Runs once, from free() or from the finaliser if the user forgot to free.
    if batch is not None:
        llama_cpp.llama_batch_free(batch)
    if ctx is not None:
        llama_cpp.llama_free(ctx)
    if model is not None:
        llama_cpp.llama_model_free(model)


def _meta_str(model: Any, key: str) -> str | None:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    if n < 0:
        return None
    if n >= len(buf):
        buf = ctypes.create_string_buffer(n + 1)
        llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return str(buf.value.decode("utf-8", errors="replace"))


class LlamaCppModel:
    """A GGUF model served by llama.cpp, implementing :class:`ssd_core.Model`.

    Build one with :meth:`from_gguf`; free it with :meth:`free` or a ``with`` block.
    (``close(handle)`` is the protocol's per-handle close.)
    """

    def __init__(self, path: Path, options: LlamaOptions, *, name: str | None = None) -> None:
        """Load ``path``; prefer :meth:`from_gguf`, which validates its arguments."""
        self.options = options
        self.path = path
        self.name = name or path.stem
        if not options.verbose:
            from llama_cpp import _logger  # llama-cpp-python's own switch for C logs

            _logger.set_verbose(False)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = options.n_gpu_layers
        mparams.use_extra_bufts = options.extra_bufts
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise ConfigError(f"llama.cpp could not load {str(path)!r} (not a valid GGUF?)")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = options.kv_cells
        cparams.n_batch = max(options.n_batch, options.decode_chunk)
        cparams.n_ubatch = cparams.n_batch
        cparams.n_seq_max = options.n_seq_max
        cparams.n_threads = options.n_threads
        cparams.n_threads_batch = options.n_threads
        cparams.flash_attn_type = FLASH_ATTN[options.flash_attn]
        cparams.kv_unified = options.unified
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise ConfigError(
                f"llama.cpp could not create a context for {self.name} with {options}"
            )
        self._chunk = options.decode_chunk
        batch = llama_cpp.llama_batch_init(self._chunk, 0, 1)
        self._model, self._ctx, self._batch = model, ctx, batch
        self._finalizer = weakref.finalize(self, _free_native, model, ctx, batch)
        self._mem = llama_cpp.llama_get_memory(ctx)
        n_seq = int(llama_cpp.llama_n_seq_max(ctx))
        #: Protocol capability: the most handles open at once (one llama.cpp sequence each).
        self.max_handles = n_seq
        self._free_seqs = list(range(n_seq - 1, -1, -1))  # pop() hands out the lowest id
        self._seq: dict[int, int] = {}
        vocab = llama_cpp.llama_model_get_vocab(model)
        template = llama_cpp.llama_model_chat_template(model, None)
        self.tokenizer = LlamaTokenizer(
            vocab, chat_template=template.decode() if template else None, owner=self.name
        )
        self.vocab_size = self.tokenizer.vocab_size
        self.context_size: int | None = options.n_ctx
        self._table = HandleTable(
            owner=self.name, vocab_size=self.vocab_size, context_size=options.n_ctx
        )
        logger.info(
            "loaded %s: vocab %d, n_ctx %d, %d KV cells, %d sequences, chunk %d, flash_attn %s",
            path,
            self.vocab_size,
            options.n_ctx,
            options.kv_cells,
            n_seq,
            self._chunk,
            options.flash_attn,
        )

    # -- constructors ---------------------------------------------------------------

    @classmethod
    def from_gguf(
        cls, path: str | Path, *, name: str | None = None, **options: Any
    ) -> LlamaCppModel:
        """Load a GGUF file.

        Args:
            path: the ``.gguf`` file.
            name: the model's name in reports (default: the file name's stem).
            **options: :class:`LlamaOptions` fields (``n_threads``, ``n_ctx``,
                ``kv_size``, ``n_seq_max``, ``n_gpu_layers``, ``flash_attn``,
                ``batch_invariant``, ``invariant_batch``, ``n_batch``, ``verbose``).

        Returns:
            The loaded model.

        Raises:
            ConfigError: the file is missing or not loadable, or an option is invalid.
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"GGUF file {str(path)!r} does not exist")
        return cls(path, LlamaOptions.from_mapping(options, strict=True), name=name)

    # -- lifetime -------------------------------------------------------------------

    def free(self) -> None:
        """Free the llama.cpp context and model; every handle becomes invalid. Idempotent."""
        self._finalizer()
        self._model = self._ctx = self._batch = None
        for handle in self._table.handles():
            self._table.close(handle)
        self._seq.clear()

    @property
    def freed(self) -> bool:
        """Whether :meth:`free` has run."""
        return self._ctx is None

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def _live(self) -> None:
        if self._ctx is None:
            raise HandleError(f"{self.name}: the model has been freed")

    # -- the Model protocol -----------------------------------------------------------

    def open(self, tokens: Sequence[int]) -> Handle:
        """Make a handle holding ``tokens`` (prefill without logits; may be empty).

        Raises:
            InputError: a token id outside the vocabulary.
            CapacityError: the prompt exceeds ``context_size``, or all ``n_seq_max``
                sequences are in use, or the KV cache is full.
        """
        self._live()
        if not self._free_seqs:
            raise CapacityError(
                f"{self.name}: all {len(self._seq)} sequences are in use "
                f"(n_seq_max={self.options.n_seq_max})"
            )
        handle = self._table.open(tokens)
        seq = self._free_seqs.pop()
        self._seq[handle] = seq
        toks = self._table.tokens(handle)
        if toks:
            try:
                self._decode([(seq, 0, toks)], want_logits=False)
            except BaseException:
                self.close(handle)
                raise
        return handle

    def extend(self, requests: Sequence[tuple[Handle, Sequence[int]]]) -> np.ndarray:
        """Append tokens to several handles and return one float32 logits row per token.

        Raises:
            HandleError: an unknown or closed handle.
            InputError: a token id outside the vocabulary, an empty token list, or a
                handle named twice.
            CapacityError: a handle would exceed ``context_size``, or the KV cache is full
                (nothing is appended then).
            BackendContractError: ``llama_decode`` failed.
        """
        self._live()
        news = self._table.check_extend(requests)
        work = [
            (self._seq[h], len(self._table.tokens(h)), new)  # type: ignore[index]
            for (h, _), new in zip(requests, news, strict=True)
        ]
        rows = self._decode(work, want_logits=True)
        for (h, _), new in zip(requests, news, strict=True):
            self._table.tokens(h).extend(new)
        return rows

    def fork(self, handle: Handle, length: int) -> Handle:
        """A new handle sharing the first ``length`` tokens of ``handle`` (KV cells shared).

        Raises:
            HandleError: unknown handle or ``length`` out of range.
            CapacityError: all ``n_seq_max`` sequences are in use.
        """
        self._live()
        self._table.check_length(handle, length)
        if not self._free_seqs:
            raise CapacityError(
                f"{self.name}: all {len(self._seq)} sequences are in use "
                f"(n_seq_max={self.options.n_seq_max})"
            )
        child = self._table.fork(handle, length)
        seq = self._free_seqs.pop()
        self._seq[child] = seq
        src = self._seq[handle]  # type: ignore[index]
        if length and self.options.unified:
            llama_cpp.llama_memory_seq_cp(self._mem, src, seq, 0, length)
        elif length:
            # Across streams llama.cpp copies whole streams only (it asserts otherwise).
            llama_cpp.llama_memory_seq_cp(self._mem, src, seq, -1, -1)
            llama_cpp.llama_memory_seq_rm(self._mem, seq, length, -1)
        return child

    def truncate(self, handle: Handle, length: int) -> None:
        """Keep the first ``length`` tokens of ``handle``.

        Raises:
            HandleError: unknown handle or ``length`` out of range.
        """
        self._live()
        self._table.truncate(handle, length)
        if not llama_cpp.llama_memory_seq_rm(self._mem, self._seq[handle], length, -1):  # type: ignore[index]
            raise BackendContractError(f"{self.name}: llama_memory_seq_rm refused a truncation")

    def close(self, handle: Handle) -> None:
        """Free ``handle`` and its sequence id (which a later open or fork reuses).

        Raises:
            HandleError: unknown or already closed handle.
        """
        self._live()
        self._table.close(handle)
        seq = self._seq.pop(handle)  # type: ignore[call-overload]
        llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)
        self._free_seqs.append(seq)
        self._free_seqs.sort(reverse=True)

    # -- introspection ----------------------------------------------------------------

    @property
    def open_handles(self) -> int:
        """How many handles are open (tests use it to prove nothing leaks)."""
        return len(self._table)

    def tokens(self, handle: Handle) -> list[int]:
        """A copy of the tokens ``handle`` holds."""
        return list(self._table.tokens(handle))

    def kv_length(self, handle: Handle) -> int:
        """How many positions llama.cpp holds for ``handle`` (its max position + 1)."""
        self._live()
        self._table.tokens(handle)
        return int(llama_cpp.llama_memory_seq_pos_max(self._mem, self._seq[handle])) + 1  # type: ignore[index]

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of ``messages`` rendered with the GGUF's chat template.

        Args:
            messages: ``[{"role": "user", "content": "..."}, ...]``.
            add_generation_prompt: end with the assistant turn's header.

        Returns:
            The prompt ids (special tokens of the template parsed; no extra BOS
            unless the template writes one).

        Raises:
            ConfigError: the GGUF has no chat template.
        """
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as text (``general.name``, ``llama.block_count``...)."""
        self._live()
        return _meta_str(self._model, key)

    def __repr__(self) -> str:
        state = "freed" if self._ctx is None else f"{self.open_handles} handles"
        return f"LlamaCppModel(name={self.name!r}, vocab_size={self.vocab_size}, {state})"

    # -- decoding ---------------------------------------------------------------------

    def _decode(
        self, work: Sequence[tuple[int, int, Sequence[int]]], *, want_logits: bool
    ) -> np.ndarray:
        """Decode ``(seq, first position, tokens)`` items in chunks; roll back on failure."""
        flat = [(seq, pos + j, t) for seq, pos, toks in work for j, t in enumerate(toks)]
        out = np.empty((len(flat) if want_logits else 0, self.vocab_size), dtype=np.float32)
        batch = self._batch
        try:
            for start in range(0, len(flat), self._chunk):
                part = flat[start : start + self._chunk]
                for i, (seq, pos, tok) in enumerate(part):
                    batch.token[i] = tok
                    batch.pos[i] = pos
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = want_logits
                batch.n_tokens = len(part)
                rc = llama_cpp.llama_decode(self._ctx, batch)
                if rc == 1:
                    raise CapacityError(
                        f"{self.name}: no free KV cells ({self.options.kv_cells} in all, "
                        f"layout {'unified' if self.options.unified else 'per_sequence'}); "
                        "raise kv_size or close handles"
                    )
                if rc != 0:
                    raise BackendContractError(
                        f"{self.name}: llama_decode returned {rc} for {len(part)} tokens"
                    )
                if want_logits:
                    for i in range(len(part)):
                        ptr = llama_cpp.llama_get_logits_ith(self._ctx, i)
                        if not ptr:
                            raise BackendContractError(f"{self.name}: no logits for row {i}")
                        out[start + i] = np.ctypeslib.as_array(ptr, shape=(self.vocab_size,))
        except BaseException:
            for seq, pos, _ in work:
                llama_cpp.llama_memory_seq_rm(self._mem, seq, pos, -1)
            raise
        if want_logits and not np.isfinite(out).all():
            raise BackendContractError(f"{self.name}: llama.cpp returned non-finite logits")
        return out
