"""The Model protocol on llama.cpp's low-level API.

Theory of operation: one llama.cpp context holds every handle of one model. A handle
is an int (never reused) mapped to a llama.cpp sequence id, a *slot* (reused after
close). ``truncate`` and ``close`` are ``llama_memory_seq_rm``; ``fork`` is
``llama_memory_seq_cp``. Two KV layouts (``LlamaOptions.kv_layout``):

* per_sequence (default in batch-invariant mode): each slot owns a stream of ``n_ctx``
  cells. With one sequence per stream, cells stay in position order (a truncation
  frees the tail and the next tokens refill it), so logits depend only on the tokens.
  Forking copies the whole stream (llama.cpp only copies full streams across streams),
  then drops the child's tail. Slots cost memory, so the context starts with
  ``n_seq`` of them (default 1) and grows by doubling up to ``n_seq_max`` when a
  handle needs one: a new context is built and every open sequence's KV state is
  copied into it with ``llama_state_seq_get/set_data`` (bit for bit).
* unified: one pool; ``seq_cp`` tags the parent's cells with the child's id, so
  branches share their prefix. Cells freed by truncate/close are reused by later
  tokens out of position order, and llama.cpp's attention then rounds differently
  (measured: up to ~3e-2 in logits with flash attention on the test model). All
  ``n_seq_max`` slots exist from the start (they cost no cells).

``extend`` packs every request into as few ``llama_decode`` calls as the
batch-invariance setting allows, asks for logits on the appended tokens only, and
copies the rows out at once (the next decode overwrites the buffer).

Threads: every public method takes the model's lock, so one model may be called from
several threads (two ``generate`` calls, or one model as both target and draft under
the threaded driver); the calls run one at a time. ``llama_decode`` releases the GIL,
so two *different* models still overlap.

Failures: a Python-side :class:`~backends._handles.HandleTable` mirrors each handle's
tokens, so every check (unknown handle, vocabulary, capacity) happens before calling
into C; a call that fails partway (a decode error, an interrupt) rolls back what it
did, so no handle or slot outlives a failed call.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import llama_cpp
import numpy as np

from ssd_core import (
    BackendContractError,
    CapacityError,
    ConfigError,
    Handle,
    HandleError,
    LatencyModel,
)

from .._handles import HandleTable
from . import _logs
from ._batch import Batch, LogitsView
from ._memory import available_bytes, fmt_bytes, kv_bytes_per_cell
from ._options import FLASH_ATTN, LlamaOptions
from ._tokenizer import LlamaTokenizer

__all__ = ["LlamaCppModel"]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def _locked(method: F) -> F:
    @functools.wraps(method)
    def wrapper(self: LlamaCppModel, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class _Native:
    """The C objects of one model; the finaliser frees whatever it holds then."""

    def __init__(self) -> None:
        self.model: Any = None
        self.ctx: Any = None
        self.verbose = False

    def free(self) -> None:
        if self.ctx is not None:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            llama_cpp.llama_model_free(self.model)
            self.model = None
        if self.verbose:
            _logs.verbose_model(-1)
            self.verbose = False


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
        """Load ``path``; prefer :meth:`from_gguf`, which validates its arguments.

        Raises:
            ConfigError: the file is not a loadable GGUF, or the KV cache the options ask
                for would not fit in the memory this process may still allocate.
        """
        self.options = options
        self.path = path
        self.name = name or path.stem
        self._lock = threading.RLock()
        _logs.install()
        native = self._native = _Native()
        self._finalizer = weakref.finalize(self, native.free)
        if options.verbose:
            _logs.verbose_model(+1)
            native.verbose = True
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = options.n_gpu_layers
        mparams.use_extra_bufts = options.extra_bufts
        _logs.recent(clear=True)
        native.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not native.model:
            native.free()
            said = _logs.recent()
            raise ConfigError(
                f"llama.cpp could not load {str(path)!r} (not a valid GGUF?)"
                + (f": {said}" if said else "")
            )
        #: Bytes one KV cell takes (all layers, f16 K and V), from the model's metadata.
        self.kv_bytes_per_cell = kv_bytes_per_cell(native.model)
        self._slots = 0
        try:
            self._check_memory(options.initial_slots, error=ConfigError)
            native.ctx = self._new_context(options.initial_slots, error=ConfigError)
        except BaseException:
            native.free()
            raise
        self._slots = options.initial_slots
        self._mem = llama_cpp.llama_get_memory(native.ctx)
        chunk = max(options.decode_chunk, options.prefill_chunk)
        self._batch = Batch(chunk)
        self._logits_view: LogitsView | None = None
        #: Protocol capability: the most handles open at once (one llama.cpp sequence each).
        self.max_handles = options.n_seq_max
        self._free_seqs = list(range(self._slots - 1, -1, -1))  # pop() hands out the lowest
        self._seq: dict[int, int] = {}
        #: handle -> how many of its first tokens ``open`` prefilled (for regrowth).
        self._prefilled: dict[int, int] = {}
        vocab = llama_cpp.llama_model_get_vocab(native.model)
        template = llama_cpp.llama_model_chat_template(native.model, None)
        self.tokenizer = LlamaTokenizer(
            vocab,
            chat_template=template.decode("utf-8", errors="replace") if template else None,
            owner=self.name,
            lock=self._lock,
            allow_special=options.allow_special,
        )
        self.vocab_size = self.tokenizer.vocab_size
        self._logits_view = LogitsView(self.vocab_size, chunk)
        self._no_rows = np.empty((0, self.vocab_size), dtype=np.float32)
        self.context_size: int | None = options.n_ctx
        #: Declared costs (seconds, an estimate from the model's size): what the core's
        #: speculation policy plans with (``SSDConfig(cost="declared")``) and what the
        #: simulated driver charges. Deterministic, so runs stay reproducible per seed.
        self.latency = declared_latency(
            int(llama_cpp.llama_model_n_params(native.model)),
            threads=options.n_threads,
            offloaded=options.n_gpu_layers != 0,
        )
        self._table = HandleTable(
            owner=self.name, vocab_size=self.vocab_size, context_size=options.n_ctx
        )
        logger.info(
            "loaded %s: vocab %d, n_ctx %d, %d sequence slot(s) of at most %d, %d KV cells "
            "(%s), decode chunk %d, prefill chunk %d, flash_attn %s",
            path,
            self.vocab_size,
            options.n_ctx,
            self._slots,
            options.n_seq_max,
            options.kv_cells,
            fmt_bytes(options.kv_cells * self.kv_bytes_per_cell),
            options.decode_chunk,
            options.prefill_chunk,
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
                ``kv_size``, ``n_seq_max``, ``n_seq``, ``n_gpu_layers``, ``flash_attn``,
                ``batch_invariant``, ``invariant_batch``, ``n_batch``,
                ``prefill_batch``, ``allow_special``, ``extra_bufts``, ``verbose``).

        Returns:
            The loaded model.

        Raises:
            ConfigError: the file is missing or not loadable, an option is invalid, or
                the KV cache would not fit in memory.
        """
        path = Path(path).expanduser()
        if path.is_dir():
            raise ConfigError(f"{str(path)!r} is a directory, not a GGUF file")
        if not path.is_file():
            raise ConfigError(f"GGUF file {str(path)!r} does not exist")
        return cls(path, LlamaOptions.from_mapping(options, strict=True), name=name)

    # -- contexts and slots ---------------------------------------------------------

    def _check_memory(self, slots: int, *, error: type[Exception]) -> None:
        """Refuse a context of ``slots`` slots whose KV cache exceeds available memory."""
        cells = self.options.kv_cells_for(slots)
        need = cells * self.kv_bytes_per_cell
        room = available_bytes()
        if room is not None and need > room:
            layout = (
                f"kv_size={self.options.kv_size or cells} cells"
                if self.options.unified
                else f"n_ctx={self.options.n_ctx} x {slots} sequence slot(s) = {cells:,} cells"
            )
            raise error(
                f"{self.name}: the KV cache for {layout} needs {fmt_bytes(need)} "
                f"({self.kv_bytes_per_cell:,} bytes a cell), but only {fmt_bytes(room)} "
                "of memory is available; lower n_ctx"
                + (" or kv_size" if self.options.unified else " or n_seq_max (n_seq)")
            )

    def _new_context(self, slots: int, *, error: type[Exception]) -> Any:
        opts = self.options
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = opts.kv_cells_for(slots)
        # llama.cpp asserts n_batch >= n_seq_max (its output buffer holds a row per
        # sequence); the compute buffers are sized for n_ubatch tokens.
        cparams.n_batch = cparams.n_ubatch = max(opts.ubatch, slots)
        cparams.n_seq_max = slots
        cparams.n_threads = opts.n_threads
        cparams.n_threads_batch = opts.n_threads
        cparams.flash_attn_type = FLASH_ATTN[opts.flash_attn]
        cparams.kv_unified = opts.unified
        cparams.no_perf = True
        _logs.recent(clear=True)
        ctx = llama_cpp.llama_init_from_model(self._native.model, cparams)
        if not ctx:
            said = _logs.recent()
            raise error(
                f"llama.cpp could not create a context for {self.name} with "
                f"{cparams.n_ctx:,} KV cells (n_ctx={opts.n_ctx}, {slots} sequence slot(s), "
                f"{'unified' if opts.unified else 'per_sequence'} layout)"
                + (f": {said}" if said else "")
            )
        return ctx

    def _take_slot(self) -> int:
        if not self._free_seqs:
            if self._slots >= self.options.n_seq_max:
                raise CapacityError(
                    f"{self.name}: all {len(self._seq)} sequences are in use "
                    f"(n_seq_max={self.options.n_seq_max})"
                )
            self._grow(min(self.options.n_seq_max, 2 * self._slots))
        return self._free_seqs.pop()

    def _give_slot(self, seq: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)
        self._free_seqs.append(seq)
        self._free_seqs.sort(reverse=True)

    def _grow(self, slots: int) -> None:
        """Move every open sequence into a new context of ``slots`` slots.

        llama.cpp cannot load one sequence's saved state into a context with another
        number of streams, so the open sequences are decoded again from their tokens,
        in the same chunks as the first time (the prompt part with the prefill chunk,
        the rest with the decode chunk). In batch-invariant mode every KV value depends
        only on the tokens, so the copies are bit-identical.
        """
        self._check_memory(slots, error=CapacityError)
        new = self._new_context(slots, error=CapacityError)
        old = self._native.ctx
        self._native.ctx, self._mem = new, llama_cpp.llama_get_memory(new)
        assert self._logits_view is not None
        self._logits_view.reset()
        try:
            for handle, seq in self._seq.items():
                toks = self._table.tokens(handle)
                k = self._prefilled[handle]
                if k:
                    self._decode(
                        [(seq, 0, toks[:k])], want_logits=False, chunk=self.options.prefill_chunk
                    )
                if len(toks) > k:
                    self._decode(
                        [(seq, k, toks[k:])], want_logits=False, chunk=self.options.decode_chunk
                    )
        except BaseException:
            self._native.ctx, self._mem = old, llama_cpp.llama_get_memory(old)
            self._logits_view.reset()
            llama_cpp.llama_free(new)
            raise
        llama_cpp.llama_free(old)
        self._free_seqs.extend(range(self._slots, slots))
        self._free_seqs.sort(reverse=True)
        logger.info(
            "%s: grew from %d to %d sequence slots (%s of KV cache)",
            self.name,
            self._slots,
            slots,
            fmt_bytes(self.options.kv_cells_for(slots) * self.kv_bytes_per_cell),
        )
        self._slots = slots

    @property
    def slots(self) -> int:
        """Sequence slots the current llama.cpp context has (grows up to ``n_seq_max``)."""
        return self._slots

    @property
    def free_slots(self) -> int:
        """Slots not held by an open handle (tests use it to prove nothing leaks)."""
        with self._lock:
            return len(self._free_seqs)

    # -- lifetime -------------------------------------------------------------------

    @_locked
    def free(self) -> None:
        """Free the llama.cpp context and model; every handle becomes invalid. Idempotent.

        Waits for a call running in another thread to finish first."""
        self._finalizer()
        self.tokenizer._release()
        for handle in self._table.handles():
            self._table.close(handle)
        self._seq.clear()
        self._prefilled.clear()

    @property
    def freed(self) -> bool:
        """Whether :meth:`free` has run."""
        return self._native.ctx is None

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def _live(self) -> Any:
        ctx = self._native.ctx
        if ctx is None:
            raise HandleError(f"{self.name}: the model has been freed")
        return ctx

    # -- the Model protocol -----------------------------------------------------------

    @_locked
    def open(self, tokens: Sequence[int]) -> Handle:
        """Make a handle holding ``tokens`` (prefill without logits; may be empty).

        Raises:
            InputError: a token id outside the vocabulary.
            CapacityError: the prompt exceeds ``context_size``, all ``n_seq_max``
                sequences are in use, the slots cannot grow (memory), or the KV cache
                is full.
        """
        self._live()
        toks = self._table.check_tokens(tokens)
        if len(toks) > self.options.n_ctx:
            raise CapacityError(
                f"{self.name}: prompt of {len(toks)} tokens exceeds context size {self.options.n_ctx}"
            )
        seq = self._take_slot()
        try:
            if toks:
                self._decode([(seq, 0, toks)], want_logits=False, chunk=self.options.prefill_chunk)
            handle = self._table.open(toks)
        except BaseException:
            self._give_slot(seq)
            raise
        self._seq[handle] = seq
        self._prefilled[handle] = len(toks)
        return handle

    @_locked
    def extend(self, requests: Sequence[tuple[Handle, Sequence[int]]]) -> np.ndarray:
        """Append tokens to several handles and return one float32 logits row per token.

        Raises:
            HandleError: an unknown or closed handle.
            InputError: a token id outside the vocabulary, an empty token list, or a
                handle named twice.
            CapacityError: a handle would exceed ``context_size``, or the KV cache is full
                (nothing is appended then).
            BackendContractError: ``llama_decode`` failed, or returned NaN or +inf.
        """
        self._live()
        news = self._table.check_extend(requests)
        work = [
            (self._seq[h], len(self._table.tokens(h)), new)  # type: ignore[index]
            for (h, _), new in zip(requests, news, strict=True)
        ]
        rows = self._decode(work, want_logits=True, chunk=self.options.decode_chunk)
        for (h, _), new in zip(requests, news, strict=True):
            self._table.tokens(h).extend(new)
        return rows

    @_locked
    def fork(self, handle: Handle, length: int) -> Handle:
        """A new handle sharing the first ``length`` tokens of ``handle`` (KV cells shared).

        Raises:
            HandleError: unknown handle or ``length`` out of range.
            CapacityError: all ``n_seq_max`` sequences are in use.
        """
        self._live()
        self._table.check_length(handle, length)
        seq = self._take_slot()
        src = self._seq[handle]  # type: ignore[index]
        try:
            if length and self.options.unified:
                llama_cpp.llama_memory_seq_cp(self._mem, src, seq, 0, length)
            elif length:
                # Across streams llama.cpp copies whole streams only (it asserts otherwise).
                llama_cpp.llama_memory_seq_cp(self._mem, src, seq, -1, -1)
                llama_cpp.llama_memory_seq_rm(self._mem, seq, length, -1)
            child = self._table.fork(handle, length)
        except BaseException:
            self._give_slot(seq)
            raise
        self._seq[child] = seq
        self._prefilled[child] = min(self._prefilled[handle], length)  # type: ignore[index]
        return child

    @_locked
    def truncate(self, handle: Handle, length: int) -> None:
        """Keep the first ``length`` tokens of ``handle``.

        Raises:
            HandleError: unknown handle or ``length`` out of range.
        """
        self._live()
        self._table.check_length(handle, length)
        if not llama_cpp.llama_memory_seq_rm(self._mem, self._seq[handle], length, -1):  # type: ignore[index]
            raise BackendContractError(f"{self.name}: llama_memory_seq_rm refused a truncation")
        self._table.truncate(handle, length)
        self._prefilled[handle] = min(self._prefilled[handle], length)  # type: ignore[index]

    @_locked
    def close(self, handle: Handle) -> None:
        """Free ``handle`` and its sequence slot (which a later open or fork reuses).

        Raises:
            HandleError: unknown or already closed handle.
        """
        self._live()
        self._table.close(handle)
        del self._prefilled[handle]  # type: ignore[arg-type]
        self._give_slot(self._seq.pop(handle))  # type: ignore[call-overload]

    # -- introspection ----------------------------------------------------------------

    @property
    def open_handles(self) -> int:
        """How many handles are open (tests use it to prove nothing leaks)."""
        return len(self._table)

    @_locked
    def tokens(self, handle: Handle) -> list[int]:
        """A copy of the tokens ``handle`` holds."""
        return list(self._table.tokens(handle))

    @_locked
    def kv_length(self, handle: Handle) -> int:
        """How many positions llama.cpp holds for ``handle`` (its max position + 1)."""
        self._live()
        self._table.tokens(handle)
        return int(llama_cpp.llama_memory_seq_pos_max(self._mem, self._seq[handle])) + 1  # type: ignore[index]

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        allow_special: bool | None = None,
    ) -> list[int]:
        """Token ids of ``messages`` rendered with the GGUF's chat template; see
        :meth:`LlamaTokenizer.encode_chat` (the template's control tokens are parsed,
        the messages' text never is unless ``allow_special``).

        Args:
            messages: ``[{"role": "user", "content": "..."}, ...]``.
            add_generation_prompt: end with the assistant turn's header.
            allow_special: parse control-token text inside the messages (``None``: the
                ``allow_special`` option).

        Returns:
            The prompt ids (no extra BOS unless the template writes one).

        Raises:
            ChatTemplateError: no chat template, a template error or limit (a
                ``ConfigError``).
        """
        return self.tokenizer.encode_chat(
            messages, add_generation_prompt=add_generation_prompt, allow_special=allow_special
        )

    @_locked
    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as text (``general.name``, ``llama.block_count``...)."""
        self._live()
        return _meta_str(self._native.model, key)

    def __repr__(self) -> str:
        state = "freed" if self.freed else f"{self.open_handles} handles"
        return f"LlamaCppModel(name={self.name!r}, vocab_size={self.vocab_size}, {state})"

    # -- decoding ---------------------------------------------------------------------

    def _check_rc(self, rc: int, n: int) -> None:
        if rc == 1:
            raise CapacityError(
                f"{self.name}: no free KV cells ({self.options.kv_cells_for(self._slots)} "
                f"in all, layout {'unified' if self.options.unified else 'per_sequence'});"
                " raise kv_size or close handles"
            )
        if rc != 0:
            raise BackendContractError(f"{self.name}: llama_decode returned {rc} for {n} tokens")

    def _decode(
        self, work: Sequence[tuple[int, int, Sequence[int]]], *, want_logits: bool, chunk: int
    ) -> np.ndarray:
        """Decode ``(seq, first position, tokens)`` items in chunks of at most ``chunk``
        tokens; roll every item back to its first position on failure."""
        ctx, batch, view = self._native.ctx, self._batch, self._logits_view
        assert view is not None
        if len(work) == 1 and len(work[0][2]) == 1:  # one token: plain decoding's hot path
            seq0, pos0, toks0 = work[0]
            n = 1
            try:
                batch.set_one(toks0[0], pos0, seq0, want_logits=want_logits)
                self._check_rc(llama_cpp.llama_decode(ctx, batch.struct), 1)
                out = view.rows(ctx, 1).copy() if want_logits else self._no_rows
            except BaseException:
                llama_cpp.llama_memory_seq_rm(self._mem, seq0, pos0, -1)
                raise
        else:
            if len(work) == 1:
                seq0, pos0, toks0 = work[0]
                tokens = np.asarray(toks0, dtype=np.int32)
                pos = np.arange(pos0, pos0 + len(tokens), dtype=np.int32)
                seqs = np.full(len(tokens), seq0, dtype=np.int32)
            else:
                lengths = [len(t) for _, _, t in work]
                tokens = np.fromiter((t for _, _, ts in work for t in ts), np.int32, sum(lengths))
                pos = np.concatenate([np.arange(p, p + len(t), dtype=np.int32) for _, p, t in work])
                seqs = np.repeat(np.array([s for s, _, _ in work], dtype=np.int32), lengths)
            n = len(tokens)
            out = np.empty((n if want_logits else 0, self.vocab_size), dtype=np.float32)
            try:
                for start in range(0, n, chunk):
                    end = min(n, start + chunk)
                    batch.fill(
                        tokens[start:end], pos[start:end], seqs[start:end], want_logits=want_logits
                    )
                    self._check_rc(llama_cpp.llama_decode(ctx, batch.struct), end - start)
                    if want_logits:
                        out[start:end] = view.rows(ctx, end - start)
            except BaseException:
                for seq, p, _ in work:
                    llama_cpp.llama_memory_seq_rm(self._mem, seq, p, -1)
                raise
        if want_logits and n:
            top = out.max()  # NaN anywhere makes it NaN; +inf anywhere makes it +inf
            if np.isnan(top) or top == np.inf:
                for seq, p, _ in work:
                    llama_cpp.llama_memory_seq_rm(self._mem, seq, p, -1)
                raise BackendContractError(f"{self.name}: llama.cpp returned NaN or +inf logits")
        return out


def declared_latency(n_params: int, *, threads: int, offloaded: bool) -> LatencyModel:
    """What one call costs, estimated from the model's size (no timing: the same model
    and options always declare the same figures).

    On a CPU a pass is compute-bound: every row pays about ``2 * n_params`` flops, and a
    call's fixed part is about 0.27 of a row (measured with SmolLM2-135M Q4_1 on this
    project's machines: one row 11.0 ms, five rows 45.6 ms at 1 thread, so a row is
    8.65 ms): a row is taken as ``2 * n_params / (threads * 3.1e10)`` seconds. Several
    tokens of one sequence in a pass (a prompt, or catching a draft up with a verified
    speculation) cost about a third of that each (7 tokens in 18.5 ms, measured the
    same way). Offloaded to a GPU a pass is memory-bound: the call dominates and a row
    adds about 5 % of it.
    """
    row = 2.0 * n_params / (max(threads, 1) * 3.1e10)
    if offloaded:
        return LatencyModel(per_call=row, per_token=0.05 * row, prefill_per_token=0.05 * row)
    return LatencyModel(per_call=0.27 * row, per_token=row, prefill_per_token=row / 3)
