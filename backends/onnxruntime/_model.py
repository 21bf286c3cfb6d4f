"""OrtModel: the Model protocol over an ONNX decoder graph run by onnxruntime.

Theory of operation. Each handle holds its token list (a :class:`HandleTable`) and, for
graphs with a KV cache, the cache of a *prefix* of those tokens: one read-only numpy
array per ``past_key_values`` input, ``[kv_heads, n_cached, head_dim]``. ``open`` only
records tokens (the protocol returns no logits there); the first ``extend`` runs the
uncached tokens and the new ones in one call and keeps the rows for the new ones. Cache
arrays are never written in place -- every run produces fresh ``present`` arrays -- so
``fork`` and ``truncate`` are zero-copy slices and handles stay independent.

Batched extends either run one session call per handle (``batching="sequential"``,
bit-identical to separate calls) or one padded call (``"padded"``: the past left-padded,
the new tokens right-padded, an attention mask hiding the padding, explicit position
ids). Graphs without a cache recompute the whole context on every extend.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ssd_core import BackendContractError, CapacityError, ConfigError, Handle, Tokenizer

from .._handles import HandleTable
from ._providers import CUDA, ProviderChoice, create_session
from ._runner import BoundRunner, PlainRunner
from ._signature import GraphSignature, read_signature

__all__ = ["BATCHING", "OrtModel"]

_log = logging.getLogger(__name__)

#: Batching strategies for extends over several handles. ``"auto"`` is ``"padded"``
#: (measured 4x faster than per-handle calls for 24 x 1-token extends on the CPU, see
#: docs/onnxruntime.md) unless the graph cannot take a padding mask.
BATCHING = ("auto", "padded", "sequential")

KV = tuple[np.ndarray, ...]


class OrtModel:
    """A decoder-only ONNX graph as a :class:`~ssd_core.Model`.

    Build one with :meth:`from_file` (or from a session with the constructor). See
    ``docs/onnxruntime.md`` for the graph signature it expects.

    Attributes:
        name: from the constructor, else the graph metadata ``name``, else the file name.
        vocab_size: the logits' last dimension.
        context_size: tokens one handle may hold (``None``: unbounded).
        provider: the execution provider that really runs the graph.
        providers: :class:`ProviderChoice` -- what was asked for and what is active.
        io_binding: whether runs go through an IOBinding.
        batching: the resolved batching strategy (``"padded"`` or ``"sequential"``).
        signature: the graph's :class:`GraphSignature`.
    """

    tokenizer: Tokenizer | None = None

    def __init__(
        self,
        session: Any,
        *,
        choice: ProviderChoice | None = None,
        name: str = "onnxruntime",
        vocab_size: int | None = None,
        context_size: int | None = None,
        batching: str = "auto",
        io_binding: bool | None = None,
        device_id: int = 0,
        max_handles: int | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        """Wrap an existing ``onnxruntime.InferenceSession``.

        Args:
            session: the session.
            choice: provider choice record; read from the session when ``None``.
            name: model name for messages and reports.
            vocab_size: overrides the graph's static logits width (needed when it is
                dynamic; otherwise must agree with it).
            context_size: most tokens per handle, or ``None``.
            batching: one of :data:`BATCHING`.
            io_binding: run through an IOBinding; ``None`` means "when on CUDA".
            device_id: device ordinal for the IOBinding on CUDA.
            max_handles: most live handles, or ``None``.
            tokenizer: a :class:`~ssd_core.Tokenizer` for text prompts, or ``None``.

        Raises:
            ConfigError: unknown batching, a graph that does not follow the signature,
                or an unknown / inconsistent vocabulary size.
        """
        if batching not in BATCHING:
            raise ConfigError(f"batching must be one of {BATCHING}, got {batching!r}")
        if context_size is not None and context_size < 1:
            raise ConfigError(f"context_size must be >= 1 or None, got {context_size}")
        if max_handles is not None and max_handles < 1:
            raise ConfigError(f"max_handles must be >= 1 or None, got {max_handles}")
        self._session = session
        self.providers = choice or ProviderChoice(
            requested=tuple(session.get_providers()), active=tuple(session.get_providers())
        )
        self.provider = self.providers.provider
        self.signature: GraphSignature = read_signature(session)
        if vocab_size is None:
            vocab_size = self.signature.vocab_size
        elif self.signature.vocab_size not in (None, vocab_size):
            raise ConfigError(
                f"vocab_size {vocab_size} disagrees with the graph's logits width {self.signature.vocab_size}"
            )
        if vocab_size is None or vocab_size < 1:
            raise ConfigError("the graph's vocabulary size is dynamic: pass vocab_size=")
        self.name = name
        self.vocab_size = int(vocab_size)
        self.context_size = context_size
        self.max_handles = max_handles
        self.tokenizer = tokenizer
        on_cuda = self.provider == CUDA
        if batching == "auto":
            batching = "padded"
        sig = self.signature
        if batching == "padded" and sig.has_cache and not (sig.has_mask and sig.has_positions):
            # a left-padded past needs a mask to hide it and explicit positions after it
            _log.info(
                "%s: graph lacks attention_mask or position_ids; using sequential batching", name
            )
            batching = "sequential"
        self.batching = batching
        self.io_binding = on_cuda if io_binding is None else bool(io_binding)
        self._run: Callable[[dict[str, np.ndarray], Sequence[str]], list[np.ndarray]] = (
            BoundRunner(session, device_type="cuda" if on_cuda else "cpu", device_id=device_id)
            if self.io_binding
            else PlainRunner(session)
        )
        self._table = HandleTable(owner=name, vocab_size=self.vocab_size, context_size=context_size)
        self._kv: dict[Handle, KV] = {}
        self._outputs = self.signature.output_names()

    # -- construction ----------------------------------------------------------------

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
        name: str | None = None,
        context_size: int | None = None,
        vocab_size: int | None = None,
        batching: str = "auto",
        io_binding: bool | None = None,
        threads: int | None = None,
        spinning: bool | None = None,
        max_handles: int | None = None,
        tokenizer: Tokenizer | None = None,
        available: Callable[[], Sequence[str]] | None = None,
        session_factory: Callable[..., Any] | None = None,
    ) -> OrtModel:
        """Load an ``.onnx`` decoder graph.

        Args:
            path: the ``.onnx`` file.
            providers: execution providers in preference order (names or
                ``(name, options)`` pairs); ``None`` tries CUDA then CPU and keeps what
                actually loads (see :func:`~backends.onnxruntime.create_session`).
            name: model name; default: graph metadata ``name``, else the file stem.
            context_size: most tokens per handle; default: graph metadata
                ``context_size``, else unbounded.
            vocab_size: needed only when the logits width is dynamic.
            batching: one of :data:`BATCHING`.
            io_binding: force the IOBinding path on or off (default: on for CUDA).
            threads: ``intra_op_num_threads`` for the session (default: onnxruntime's).
            spinning: let idle intra-op threads busy-wait (``None``: onnxruntime's
                default, which spins). Turn it off when cores are shared, e.g. draft
                and target on one CPU under the threaded driver (measured below).
            max_handles: most live handles, or ``None``.
            tokenizer: a :class:`~ssd_core.Tokenizer` for text prompts, or ``None``.
            available: test hook replacing ``onnxruntime.get_available_providers``.
            session_factory: test hook replacing ``onnxruntime.InferenceSession``.

        Returns:
            The model.

        Raises:
            ConfigError: missing file, unusable providers, or a graph that does not
                follow the documented signature.
        """
        import onnxruntime

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError(f"ONNX model file not found: {path}")
        options = onnxruntime.SessionOptions()
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"threads must be >= 1, got {threads}")
            options.intra_op_num_threads = threads
        if spinning is not None:
            options.add_session_config_entry(
                "session.intra_op.allow_spinning", "1" if spinning else "0"
            )
        kwargs: dict[str, Any] = {"providers": providers, "session_options": options}
        if available is not None:
            kwargs["available"] = available
        if session_factory is not None:
            kwargs["factory"] = session_factory
        session, choice = create_session(path, **kwargs)
        meta = dict(session.get_modelmeta().custom_metadata_map or {})
        if name is None:
            name = meta.get("name") or os.path.splitext(os.path.basename(path))[0]
        if context_size is None and meta.get("context_size", "").isdigit():
            context_size = int(meta["context_size"])
        device_id = 0
        for p in providers or ():
            if not isinstance(p, str) and p[0] == CUDA:
                device_id = int(p[1].get("device_id", 0))
        return cls(
            session,
            choice=choice,
            name=name,
            vocab_size=vocab_size,
            context_size=context_size,
            batching=batching,
            io_binding=io_binding,
            device_id=device_id,
            max_handles=max_handles,
            tokenizer=tokenizer,
        )

    # -- the Model protocol ----------------------------------------------------------

    def open(self, tokens: Sequence[int]) -> Handle:
        """Make a handle holding ``tokens`` (may be empty); computes nothing yet.

        Raises:
            InputError: a token outside the vocabulary.
            CapacityError: too many tokens or handles.
        """
        self._check_handle_room()
        handle = self._table.open(tokens)
        self._kv[handle] = self._empty_kv()
        return handle

    def extend(self, requests: Sequence[tuple[Handle, Sequence[int]]]) -> np.ndarray:
        """Append tokens to handles and return one raw-logits row per appended token.

        Args:
            requests: ``(handle, tokens)`` pairs; each handle at most once, tokens non-empty.

        Returns:
            A ``float32`` (``float64`` for double graphs) array of shape
            ``(sum(len(tokens)), vocab_size)``, rows in request order.

        Raises:
            HandleError: an unknown or closed handle.
            InputError: empty or out-of-vocabulary tokens, a handle twice.
            CapacityError: a handle would exceed ``context_size``.
            BackendContractError: the graph returned NaN/+inf or a wrong shape
                (no handle is changed then).
        """
        news = self._table.check_extend(requests)
        if not news:
            return np.zeros((0, self.vocab_size), dtype=np.float32)
        handles = [h for h, _ in requests]
        jobs = []
        for h, new in zip(handles, news, strict=True):
            toks = self._table.tokens(h)
            cached = self._cached(h)
            jobs.append((toks[cached:] + new, cached, len(new), self._kv[h]))
        if len(jobs) > 1 and self.batching == "padded":
            results = self._run_padded(jobs)
        else:
            results = [self._run_one(job) for job in jobs]
        logits = np.concatenate([r[0] for r in results], axis=0)
        if logits.dtype not in (np.float32, np.float64):
            logits = logits.astype(np.float32)
        self._check_logits(logits, handles)
        for h, new, (_, kv) in zip(handles, news, results, strict=True):
            self._table.tokens(h).extend(new)
            self._kv[h] = kv
        return logits

    def fork(self, handle: Handle, length: int) -> Handle:
        """A new handle holding the first ``length`` tokens of ``handle`` (zero-copy).

        Raises:
            HandleError: unknown handle or ``length`` out of range.
            CapacityError: too many handles.
        """
        self._table.check_length(handle, length)
        self._check_handle_room()
        child = self._table.fork(handle, length)
        self._kv[child] = self._slice(self._kv[handle], length)
        return child

    def truncate(self, handle: Handle, length: int) -> None:
        """Keep the first ``length`` tokens of ``handle``.

        Raises:
            HandleError: unknown handle or ``length`` out of range.
        """
        self._table.truncate(handle, length)
        self._kv[handle] = self._slice(self._kv[handle], length)

    def close(self, handle: Handle) -> None:
        """Free ``handle``.

        Raises:
            HandleError: unknown or already closed handle.
        """
        self._table.close(handle)
        del self._kv[handle]

    # -- introspection ---------------------------------------------------------------

    def tokens(self, handle: Handle) -> list[int]:
        """A copy of the tokens ``handle`` holds (tests, debugging)."""
        return list(self._table.tokens(handle))

    def cached_length(self, handle: Handle) -> int:
        """How many of the handle's tokens have their KV state computed."""
        self._table.tokens(handle)
        return self._cached(handle)

    @property
    def open_handles(self) -> int:
        """How many handles are open."""
        return len(self._table)

    def __repr__(self) -> str:
        return (
            f"OrtModel(name={self.name!r}, vocab_size={self.vocab_size}, provider={self.provider!r}, "
            f"kv_cache={self.signature.has_cache}, batching={self.batching!r})"
        )

    # -- internals -------------------------------------------------------------------

    def _check_handle_room(self) -> None:
        if self.max_handles is not None and len(self._table) >= self.max_handles:
            raise CapacityError(f"{self.name}: {self.max_handles} handles are already open")

    def _empty_kv(self) -> KV:
        sig = self.signature
        if not sig.has_cache:
            return ()
        empty: np.ndarray = np.zeros((sig.kv_heads, 0, sig.head_dim), dtype=sig.kv_dtype)
        empty.setflags(write=False)
        return (empty,) * len(sig.past_names)

    def _cached(self, handle: Handle) -> int:
        kv = self._kv[handle]
        return int(kv[0].shape[1]) if kv else 0

    @staticmethod
    def _slice(kv: KV, length: int) -> KV:
        return tuple(a[:, :length] for a in kv) if kv and kv[0].shape[1] > length else kv

    def _feeds(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: Sequence[np.ndarray]
    ) -> dict[str, np.ndarray]:
        sig = self.signature
        feeds: dict[str, np.ndarray] = {"input_ids": ids.astype(sig.ids_dtype, copy=False)}
        if sig.has_mask:
            feeds["attention_mask"] = mask.astype(sig.mask_dtype, copy=False)
        if sig.has_positions:
            feeds["position_ids"] = pos.astype(sig.ids_dtype, copy=False)
        feeds.update(zip(sig.past_names, past, strict=True))
        return feeds

    def _run_one(self, job: tuple[list[int], int, int, KV]) -> tuple[np.ndarray, KV]:
        run_toks, cached, n_new, kv = job
        if not self.signature.has_cache:  # recompute the whole context
            return self._run_padded([job])[0]
        t = len(run_toks)
        ids = np.asarray(run_toks, dtype=np.int64)[None]
        mask = np.ones((1, cached + t), dtype=np.int64)
        pos = np.arange(cached, cached + t, dtype=np.int64)[None]
        out = self._run(self._feeds(ids, mask, pos, [a[None] for a in kv]), self._outputs)
        self._check_shape(out[0], (1, t))
        present = tuple(self._freeze(p[0]) for p in out[1:])
        return out[0][0, t - n_new :], present

    def _run_padded(
        self, jobs: Sequence[tuple[list[int], int, int, KV]]
    ) -> list[tuple[np.ndarray, KV]]:
        sig = self.signature
        if not sig.has_cache:  # the full context, right-padded; causal masking hides the pad
            full = [job[0] for job in jobs]  # nothing is cached: the whole context
            b, t = len(full), max(len(f) for f in full)
            ids = np.zeros((b, t), dtype=np.int64)
            mask = np.zeros((b, t), dtype=np.int64)
            for i, f in enumerate(full):
                ids[i, : len(f)] = f
                mask[i, : len(f)] = 1
            pos = np.broadcast_to(np.arange(t, dtype=np.int64), (b, t))
            out = self._run(self._feeds(ids, mask, pos, []), self._outputs)
            self._check_shape(out[0], (b, t))
            return [
                (out[0][i, len(f) - job[2] : len(f)], ())
                for i, (f, job) in enumerate(zip(full, jobs, strict=True))
            ]
        b = len(jobs)
        p = max(job[1] for job in jobs)
        t = max(len(job[0]) for job in jobs)
        ids = np.zeros((b, t), dtype=np.int64)
        mask = np.zeros((b, p + t), dtype=np.int64)
        pos = np.zeros((b, t), dtype=np.int64)
        past: list[np.ndarray] = [
            np.zeros((b, sig.kv_heads, p, sig.head_dim), dtype=sig.kv_dtype) for _ in sig.past_names
        ]
        for i, (run_toks, cached, _, kv) in enumerate(jobs):
            n = len(run_toks)
            ids[i, :n] = run_toks
            mask[i, p - cached : p + n] = 1
            pos[i, :n] = np.arange(cached, cached + n)
            for buf, a in zip(past, kv, strict=True):
                buf[i, :, p - cached :] = a
        out = self._run(self._feeds(ids, mask, pos, past), self._outputs)
        self._check_shape(out[0], (b, t))
        results = []
        for i, (run_toks, cached, n_new, _) in enumerate(jobs):
            n = len(run_toks)
            kv = tuple(
                self._freeze(np.ascontiguousarray(x[i, :, p - cached : p + n])) for x in out[1:]
            )
            results.append((out[0][i, n - n_new : n], kv))
        return results

    @staticmethod
    def _freeze(a: np.ndarray) -> np.ndarray:
        a.setflags(write=False)
        return a

    def _check_shape(self, logits: np.ndarray, lead: tuple[int, int]) -> None:
        if logits.ndim != 3 or logits.shape[:2] != lead or logits.shape[2] != self.vocab_size:
            raise BackendContractError(
                f"{self.name}: graph returned logits of shape {logits.shape}, "
                f"expected {(*lead, self.vocab_size)}"
            )

    def _check_logits(self, logits: np.ndarray, handles: Sequence[Handle]) -> None:
        if np.isnan(logits).any() or np.isposinf(logits).any():
            raise BackendContractError(
                f"{self.name}: NaN or +inf logits for an extend of handles {list(handles)}"
            )
