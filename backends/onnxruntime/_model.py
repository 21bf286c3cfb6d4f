"""OrtModel: the Model protocol over an ONNX decoder graph run by onnxruntime.

Theory of operation. Each handle holds its token list (a :class:`HandleTable`) and, for
graphs with a KV cache, a reference to a KV *buffer* -- one array per
``past_key_values`` input, ``[B, kv_heads, S, head_dim]``, made by one earlier run and
shared by every handle that run produced -- plus its row ``b`` in it and a *slot mask*:
which of the ``S`` slots hold this handle's tokens (the graph signature hides a slot
whose ``attention_mask`` is 0, and positions come from ``position_ids``, so holes are
harmless). Buffers are never written after the run that made them, so

* ``fork(h, n)`` shares the parent's buffer and keeps the first ``n`` marked slots;
* ``truncate(h, n)`` unmarks slots: nothing moves;
* ``extend`` feeds the row as the past. One handle: the row itself (a contiguous view,
  no copy). Several handles that are exactly the rows of one buffer, in order (a batch
  that was extended together last time: AR at batch B, the target's verifications, the
  steps of a tree after its first): the buffer itself, no copy. Otherwise the marked
  slots of each row are gathered into a new left-padded batch (a device copy, counted in
  ``stats``), which also compacts rows with many unmarked slots. The graph's ``present``
  outputs become the new buffer.

Where the buffers live (:mod:`backends.onnxruntime._buffers`): with ``io_binding`` and
torch installed, torch tensors on the session's device -- one IOBinding, bound to their
data pointers, reused for the model's life; logits are handed back as torch tensors on
the device, so the core's math runs there. Without torch, numpy arrays on the host (on
CUDA, onnxruntime then copies the bound host buffers to the device and back each run).

Batched extends run one padded call (``"padded"``: pasts left-padded, new tokens
right-padded, the mask hiding both) or one call per handle (``"sequential"``, bit-
identical to separate calls). Graphs without a cache recompute the whole context on
every extend; graphs without ``attention_mask``/``position_ids`` are compacted before
use (they cannot skip unmarked slots).
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import numpy as np

from ssd_core import BackendContractError, CapacityError, ConfigError, Handle, Tokenizer

from .._handles import HandleTable
from ._buffers import Buffers, NumpyBuffers, TorchBuffers
from ._providers import CPU, CUDA, PREFERENCE, ProviderChoice, create_session
from ._runner import BoundRunner, Feed, Output, PlainRunner
from ._signature import GraphSignature, read_signature

__all__ = ["BATCHING", "OrtModel"]

_log = logging.getLogger(__name__)

#: Batching strategies for extends over several handles. ``"auto"`` is ``"padded"``
#: (measured 4x faster than per-handle calls for 24 x 1-token extends on the CPU, see
#: docs/onnxruntime.md) unless the graph cannot take a padding mask.
BATCHING = ("auto", "padded", "sequential")

#: On the device, compact a handle's row once it has more unmarked slots than this and
#: than its own tokens (host buffers are compacted whenever they have a hole: they are
#: copied to the device whole on every run).
_SLACK = 64


@attrs.define
class _KV:
    """One handle's view of a KV buffer."""

    buf: tuple[Any, ...]  # per past input, [B, H, S, D]; () when nothing is cached
    row: int
    valid: np.ndarray  # bool [S]: slots holding this handle's tokens, in position order
    length: int  # tokens cached (= valid.sum())


_EMPTY = _KV(buf=(), row=0, valid=np.zeros(0, dtype=bool), length=0)


def _torch_cuda() -> Any:
    """torch, if it is installed with a usable CUDA device; else ``None``."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def with_user_stream(
    providers: Sequence[str | tuple[str, dict[str, Any]]], make_stream: Callable[[int], Any]
) -> tuple[list[Any], Any]:
    """Give the CUDA provider a stream to run on (``user_compute_stream``).

    Args:
        providers: provider names or ``(name, options)`` pairs.
        make_stream: ``device_id -> stream`` with a ``cuda_stream`` handle (torch's).

    Returns:
        ``(providers with the CUDA entry's options extended, the stream or None)``.
    """
    out: list[Any] = []
    stream = None
    for p in providers:
        name, opts = (p, {}) if isinstance(p, str) else (p[0], dict(p[1]))
        if name == CUDA and stream is None and "user_compute_stream" not in opts:
            stream = make_stream(int(opts.get("device_id", 0)))
            opts["user_compute_stream"] = str(stream.cuda_stream)
            opts["has_user_compute_stream"] = "1"
            out.append((name, opts))
        else:
            out.append(p)
    return out, stream


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
        kv_on_device: KV and logits live in torch tensors on the session's device.
        batching: the resolved batching strategy (``"padded"`` or ``"sequential"``).
        signature: the graph's :class:`GraphSignature`.
        stats: counters -- ``calls``, ``runs``, ``kv_copied_bytes`` (gathers into a new
            batch), ``kv_zero_copy_runs`` (the past fed as is), ``upload_bytes``,
            ``logits_bytes``.
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
        kv_on_device: bool | None = None,
        device_id: int = 0,
        stream: Any = None,
        max_handles: int | None = None,
        tokenizer: Tokenizer | None = None,
        check_finite: bool | None = None,
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
            kv_on_device: keep KV and logits in torch tensors on the session's device
                (``None``: with ``io_binding`` when torch is installed). ``True`` on the
                CPU provider runs the same code with CPU tensors (tests).
            device_id: device ordinal for the IOBinding on CUDA.
            stream: the torch stream the CUDA provider runs on (``user_compute_stream``,
                see :meth:`from_file`); ``None``: order by synchronising instead.
            max_handles: most live handles, or ``None``.
            tokenizer: a :class:`~ssd_core.Tokenizer` for text prompts, or ``None``.
            check_finite: reject NaN/+inf logits here (default: for host logits; for
                logits on a device it would cost a host sync per call, and the core
                checks every logits array anyway).

        Raises:
            ConfigError: unknown batching, a graph that does not follow the signature,
                an unknown / inconsistent vocabulary size, or a bfloat16 graph without
                torch buffers.
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
        if kv_on_device is None:
            kv_on_device = self.io_binding and _torch_installed()
        if kv_on_device and not self.io_binding:
            raise ConfigError("kv_on_device needs io_binding")
        self.kv_on_device = bool(kv_on_device)
        self.check_finite = (not self.kv_on_device) if check_finite is None else check_finite
        buffers: Buffers
        if self.kv_on_device:
            buffers = TorchBuffers(f"cuda:{device_id}" if on_cuda else "cpu", stream=stream)
        else:
            buffers = NumpyBuffers()
            if on_cuda and self.io_binding:
                _log.info(
                    "%s: torch is not installed; KV caches stay on the host and are "
                    "copied to the device and back on every run",
                    name,
                )
        if "bfloat16" in (sig.kv_type, sig.logits_type) and not self.kv_on_device:
            raise ConfigError(f"{name}: bfloat16 graphs need kv_on_device (torch buffers)")
        if self.io_binding:
            run_options = None
            if stream is not None and on_cuda:
                import onnxruntime

                # ordered on the shared stream: no end-of-run host synchronisation
                run_options = onnxruntime.RunOptions()
                run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
            self._run: PlainRunner | BoundRunner = BoundRunner(
                session,
                buffers,
                run_options=run_options,
                sync_before_run=on_cuda and self.kv_on_device and stream is None,
            )
        else:
            self._run = PlainRunner(session)
        self._buf = self._run.buffers
        self._table = HandleTable(owner=name, vocab_size=self.vocab_size, context_size=context_size)
        self._kv: dict[Handle, _KV] = {}
        self.stats: collections.Counter[str] = collections.Counter()

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
        kv_on_device: bool | None = None,
        threads: int | None = None,
        spinning: bool | None = None,
        max_handles: int | None = None,
        tokenizer: Tokenizer | str | os.PathLike[str] | None = None,
        find_tokenizer: bool = True,
        check_finite: bool | None = None,
        engine_logs: bool = False,
        available: Callable[[], Sequence[str]] | None = None,
        session_factory: Callable[..., Any] | None = None,
    ) -> OrtModel:
        """Load an ``.onnx`` decoder graph.

        Args:
            path: the ``.onnx`` file, or a folder holding one (``model.onnx``, or its
                only ``.onnx`` file), e.g. what ``ssd export-onnx`` writes.
            providers: execution providers in preference order (names or
                ``(name, options)`` pairs); ``None`` tries CUDA then CPU and keeps what
                actually loads (see :func:`~backends.onnxruntime.create_session`).
            name: model name; default: graph metadata ``name``, else the file stem.
            context_size: most tokens per handle; default: graph metadata
                ``context_size``, else unbounded.
            vocab_size: needed only when the logits width is dynamic.
            batching: one of :data:`BATCHING`.
            io_binding: force the IOBinding path on or off (default: on for CUDA).
            kv_on_device: keep KV caches and logits in torch tensors on the device
                (default: with the IOBinding, when torch is installed). On CUDA the
                provider is then given a torch stream to run on (``user_compute_stream``),
                so torch's copies and onnxruntime's kernels are ordered without host syncs.
            threads: ``intra_op_num_threads`` for the session (default: onnxruntime's).
            spinning: let idle intra-op threads busy-wait (``None``: onnxruntime's
                default, which spins). Turn it off when cores are shared, e.g. draft
                and target on one CPU under the threaded driver (measured below).
            max_handles: most live handles, or ``None``.
            tokenizer: a :class:`~ssd_core.Tokenizer` for text prompts, or the path of
                a folder with tokenizer files or of a GGUF file to read one from (needs
                transformers; an error if it cannot be read).
            find_tokenizer: with no ``tokenizer``, read one from the graph's folder when
                it holds tokenizer files (``ssd export-onnx`` writes them there); if
                they cannot be read a warning says why and prompts are token ids.
            check_finite: see the constructor.
            engine_logs: let onnxruntime's own log lines through while the session is
                made (otherwise a CUDA provider that cannot load costs one warning).
            available: test hook replacing ``onnxruntime.get_available_providers``.
            session_factory: test hook replacing ``onnxruntime.InferenceSession``.

        Returns:
            The model.

        Raises:
            ConfigError: missing file, unusable providers, a graph that does not
                follow the documented signature, or a ``tokenizer`` path that cannot be
                read.
        """
        import onnxruntime

        path = _graph_path(os.fspath(path))
        tok = _tokenizer_for(path, tokenizer, find_tokenizer)
        options = onnxruntime.SessionOptions()
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"threads must be >= 1, got {threads}")
            options.intra_op_num_threads = threads
        if spinning is not None:
            options.add_session_config_entry(
                "session.intra_op.allow_spinning", "1" if spinning else "0"
            )
        stream = None
        torch = _torch_cuda() if kv_on_device is not False and io_binding is not False else None
        if torch is not None:
            listed = list(available() if available is not None else _listed())
            wanted = (
                providers
                if providers is not None
                else ([p for p in PREFERENCE if p in listed] or [CPU])
            )
            providers, stream = with_user_stream(
                wanted, lambda i: torch.cuda.Stream(device=torch.device("cuda", i))
            )
        kwargs: dict[str, Any] = {
            "providers": providers,
            "session_options": options,
            "engine_logs": engine_logs,
        }
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
            kv_on_device=kv_on_device,
            device_id=device_id,
            stream=stream if choice.provider == CUDA else None,
            max_handles=max_handles,
            tokenizer=tok,
            check_finite=check_finite,
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
        self._kv[handle] = _EMPTY
        return handle

    def extend(self, requests: Sequence[tuple[Handle, Sequence[int]]]) -> Any:
        """Append tokens to handles and return one raw-logits row per appended token.

        Args:
            requests: ``(handle, tokens)`` pairs; each handle at most once, tokens non-empty.

        Returns:
            ``(sum(len(tokens)), vocab_size)`` float32 logits (float64 for double graphs),
            rows in request order: a torch tensor on the session's device when
            ``kv_on_device``, else a numpy array.

        Raises:
            HandleError: an unknown or closed handle.
            InputError: empty or out-of-vocabulary tokens, a handle twice.
            CapacityError: a handle would exceed the context size.
            BackendContractError: NaN/+inf logits or a wrong logits shape (no handle changes).
        """
        news = self._table.check_extend(requests)
        if not news:
            return self._empty_logits()
        self.stats["calls"] += 1
        handles = [h for h, _ in requests]
        jobs = []
        for h, new in zip(handles, news, strict=True):
            kv = self._kv[h]
            jobs.append((self._table.tokens(h)[kv.length :] + new, len(new), kv))
        groups = [jobs] if len(jobs) == 1 or self.batching == "padded" else [[j] for j in jobs]
        with self._buf.scope():
            results = [r for g in groups for r in self._run_group(g)]
            parts = [logits for logits, _ in results if logits is not None]
            logits = parts[0] if len(parts) == 1 else _concat(parts)
            if self.check_finite:
                self._check_logits(logits, handles)
        for h, new, (_, kv) in zip(handles, news, results, strict=True):
            self._table.tokens(h).extend(new)
            self._kv[h] = kv
        self.stats["logits_bytes"] += self._buf.nbytes(logits)
        return self._buf.hand_over(logits)

    def fork(self, handle: Handle, length: int) -> Handle:
        """A new handle holding the first ``length`` tokens of ``handle`` (zero-copy).

        Raises:
            HandleError: unknown handle or ``length`` out of range.
            CapacityError: too many handles.
        """
        self._table.check_length(handle, length)
        self._check_handle_room()
        child = self._table.fork(handle, length)
        self._kv[child] = self._cut(self._kv[handle], length)
        return child

    def truncate(self, handle: Handle, length: int) -> None:
        """Keep the first ``length`` tokens of ``handle`` (unmarks slots; nothing moves).

        Raises:
            HandleError: unknown handle or ``length`` out of range.
        """
        self._table.truncate(handle, length)
        self._kv[handle] = self._cut(self._kv[handle], length)

    def close(self, handle: Handle) -> None:
        """Free ``handle``.

        Raises:
            HandleError: unknown or already closed handle.
        """
        self._table.close(handle)
        del self._kv[handle]

    # -- introspection ---------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # ``apply_chat_template`` exists only when the tokenizer has a chat template, so
        # callers (``--chat``) can test for it with getattr(model, "apply_chat_template").
        if name == "apply_chat_template":
            tok = self.__dict__.get("tokenizer")
            if tok is not None and getattr(tok, "has_chat_template", False):
                return tok.apply_chat_template
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def tokens(self, handle: Handle) -> list[int]:
        """A copy of the tokens ``handle`` holds (tests, debugging)."""
        return list(self._table.tokens(handle))

    def cached_length(self, handle: Handle) -> int:
        """How many of the handle's tokens have their KV state computed."""
        self._table.tokens(handle)
        return self._kv[handle].length

    @property
    def open_handles(self) -> int:
        """How many handles are open."""
        return len(self._table)

    def __repr__(self) -> str:
        return (
            f"OrtModel(name={self.name!r}, vocab_size={self.vocab_size}, provider={self.provider!r}, "
            f"kv_cache={self.signature.has_cache}, batching={self.batching!r}, "
            f"kv_on_device={self.kv_on_device})"
        )

    # -- internals -------------------------------------------------------------------

    def _check_handle_room(self) -> None:
        if self.max_handles is not None and len(self._table) >= self.max_handles:
            raise CapacityError(f"{self.name}: {self.max_handles} handles are already open")

    def _empty_logits(self) -> Any:
        kind = "double" if self.signature.logits_type == "double" else "float"
        return self._buf.zeros((0, self.vocab_size), kind)

    @staticmethod
    def _cut(kv: _KV, length: int) -> _KV:
        """The first ``length`` cached tokens of ``kv`` (marks only)."""
        if length >= kv.length:
            return kv
        if length == 0:
            return _EMPTY
        valid = kv.valid.copy()
        marked = np.flatnonzero(valid)
        valid[marked[length:]] = False
        return _KV(buf=kv.buf, row=kv.row, valid=valid, length=length)

    def _gather(self, rows: Sequence[_KV], width: int) -> tuple[list[Any], np.ndarray]:
        """A new ``[B, H, width, D]`` past holding each row's marked slots, right-aligned."""
        sig, buf = self.signature, self._buf
        shape = (len(rows), sig.kv_heads, width, sig.head_dim)
        past = [buf.zeros(shape, sig.kv_type) for _ in sig.past_names]
        mask = np.zeros((len(rows), width), dtype=bool)
        for b, kv in enumerate(rows):
            if not kv.length:
                continue
            slots = np.flatnonzero(kv.valid)
            mask[b, width - len(slots) :] = True
            for dst, src in zip(past, kv.buf, strict=True):
                buf.gather_slots(src, kv.row, slots, dst, b, width - len(slots))
        if width:  # bytes of the marked slots copied, over every past input
            per_slot = sum(buf.nbytes(p) // (width * len(rows)) for p in past)
            self.stats["kv_copied_bytes"] += per_slot * int(mask.sum())
        return past, mask

    def _past(self, rows: Sequence[_KV]) -> tuple[list[Any], np.ndarray]:
        """The past to feed for ``rows`` and its ``[B, S]`` slot mask, copying only
        when the rows are not already one buffer (or one row of one)."""
        sig = self.signature
        first = rows[0]
        exact = sig.has_mask and sig.has_positions  # the graph skips unmarked slots

        def slack_ok(kv: _KV) -> bool:
            if not self.kv_on_device:  # host buffers cross to the device whole: no holes
                return len(kv.valid) == kv.length
            return len(kv.valid) - kv.length <= max(_SLACK, kv.length)

        if len(rows) == 1:
            if first.length and (exact or bool(first.valid.all())) and slack_ok(first):
                self.stats["kv_zero_copy_runs"] += 1
                return [self._buf.row(a, first.row) for a in first.buf], first.valid[None]
        elif (
            exact
            and all(kv.buf is first.buf and kv.length and slack_ok(kv) for kv in rows)
            and [kv.row for kv in rows] == list(range(len(rows)))
            and self._buf.shape(first.buf[0])[0] == len(rows)
        ):
            self.stats["kv_zero_copy_runs"] += 1
            return list(first.buf), np.stack([kv.valid for kv in rows])
        return self._gather(rows, max(kv.length for kv in rows))

    def _run_group(self, jobs: Sequence[tuple[list[int], int, _KV]]) -> list[tuple[Any, _KV]]:
        sig, buf = self.signature, self._buf
        self.stats["runs"] += 1
        b = len(jobs)
        if not sig.has_cache:  # the whole context, right-padded; causal masking hides the pad
            full = [job[0] for job in jobs]
            t = max(len(f) for f in full)
            ids = np.zeros((b, t), dtype=np.int64)
            mask = np.zeros((b, t), dtype=np.int64)
            for i, f in enumerate(full):
                ids[i, : len(f)] = f
                mask[i, : len(f)] = 1
            pos = np.tile(np.arange(t, dtype=np.int64), (b, 1))
            out = self._call(ids, mask, pos, [], (b, t), 0)
            index = np.concatenate(
                [
                    i * t + np.arange(len(f) - job[1], len(f))
                    for i, (f, job) in enumerate(zip(full, jobs, strict=True))
                ]
            )
            return self._split(out[0], index, jobs, [_EMPTY] * b)
        rows = [job[2] for job in jobs]
        if b == 1 and not rows[0].length:
            past: list[Any] = [
                buf.zeros((1, sig.kv_heads, 0, sig.head_dim), sig.kv_type) for _ in sig.past_names
            ]
            past_mask = np.zeros((1, 0), dtype=bool)
        else:
            past, past_mask = self._past(rows)
        s = past_mask.shape[1]
        t = max(len(job[0]) for job in jobs)
        ids = np.zeros((b, t), dtype=np.int64)
        mask = np.zeros((b, s + t), dtype=np.int64)
        pos = np.zeros((b, t), dtype=np.int64)
        mask[:, :s] = past_mask
        for i, (run, _, kv) in enumerate(jobs):
            m = len(run)
            ids[i, :m] = run
            mask[i, s : s + m] = 1
            pos[i, :m] = np.arange(kv.length, kv.length + m)
            pos[i, m:] = kv.length + m - 1
        out = self._call(ids, mask, pos, past, (b, t), s + t)
        present = tuple(out[1:])
        index = np.concatenate(
            [
                i * t + np.arange(len(run) - n_new, len(run))
                for i, (run, n_new, _) in enumerate(jobs)
            ]
        )
        states = [
            _KV(buf=present, row=i, valid=mask[i].astype(bool), length=kv.length + len(run))
            for i, (run, _, kv) in enumerate(jobs)
        ]
        return self._split(out[0], index, jobs, states)

    def _call(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        pos: np.ndarray,
        past: Sequence[Any],
        lead: tuple[int, int],
        total: int,
    ) -> list[Any]:
        sig, buf = self.signature, self._buf
        host = [("input_ids", ids, sig.ids_type)]
        if sig.has_mask:
            host.append(("attention_mask", mask, sig.mask_type))
        if sig.has_positions:
            host.append(("position_ids", pos, sig.ids_type))
        feeds: list[Feed] = []
        for name, array, kind in host:  # small uploads; int64 or int32 as the graph wants
            dev = buf.from_host(
                np.ascontiguousarray(array, dtype=np.int64 if kind == "int64" else np.int32)
            )
            self.stats["upload_bytes"] += array.size * (8 if kind == "int64" else 4)
            feeds.append((name, dev, kind))
        feeds += [(n, a, sig.kv_type) for n, a in zip(sig.past_names, past, strict=True)]
        outputs: list[Output] = [(sig.logits_name, (*lead, self.vocab_size), sig.logits_type)]
        outputs += [
            (n, (lead[0], sig.kv_heads, total, sig.head_dim), sig.kv_type)
            for n in sig.present_names
        ]
        out = self._run(feeds, outputs)
        shape = buf.shape(out[0])
        if len(shape) != 3 or shape[:2] != lead or shape[2] != self.vocab_size:
            raise BackendContractError(
                f"{self.name}: graph returned logits of shape {shape}, "
                f"expected {(*lead, self.vocab_size)}"
            )
        return out

    def _split(
        self, logits: Any, index: np.ndarray, jobs: Sequence[Any], states: list[_KV]
    ) -> list[tuple[Any, _KV]]:
        """The rows asked for, as one array per group (first job) and the new states."""
        shape = self._buf.shape(logits)
        every = len(index) == shape[0] * shape[1]
        rows = self._buf.logits(logits, None if every else index)
        out: list[tuple[Any, _KV]] = [(rows, states[0])]
        out += [(None, st) for st in states[1:]]
        return out

    def _check_logits(self, logits: Any, handles: Sequence[Handle]) -> None:
        if isinstance(logits, np.ndarray):
            bad = bool(np.isnan(logits).any() or np.isposinf(logits).any())
        else:  # torch: one host read per call (the core checks again anyway)
            import torch

            bad = bool(torch.any(torch.isnan(logits) | torch.isposinf(logits)))
        if bad:
            raise BackendContractError(
                f"{self.name}: NaN or +inf logits for an extend of handles {list(handles)}"
            )


def _concat(parts: list[Any]) -> Any:
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=0)
    import torch

    return torch.cat(parts, dim=0)


def _torch_installed() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _graph_path(path: str) -> str:
    """The ``.onnx`` file ``path`` names: itself, or in a folder ``model.onnx`` or the
    folder's only ``.onnx`` file.

    Raises:
        ConfigError: no such file, or a folder without exactly one candidate.
    """
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "model.onnx")):
            return os.path.join(path, "model.onnx")
        found = sorted(f for f in os.listdir(path) if f.endswith(".onnx"))
        if len(found) == 1:
            return os.path.join(path, found[0])
        raise ConfigError(
            f"ONNX model folder {path} holds {len(found) or 'no'} .onnx files"
            + (f" ({', '.join(found)}): name one" if found else "")
        )
    if not os.path.isfile(path):
        raise ConfigError(f"ONNX model file not found: {path}")
    return path


def _tokenizer_for(path: str, tokenizer: Any, find: bool) -> Tokenizer | None:
    """The tokenizer ``from_file`` was given, read from a path, or found beside ``path``."""
    from .._hf_tokenizer import find_tokenizer_files, load_hf_tokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        return load_hf_tokenizer(os.fspath(tokenizer), owner="onnxruntime")
    if tokenizer is not None or not find:
        return tokenizer  # type: ignore[no-any-return]
    folder = os.path.dirname(os.path.abspath(path))
    if not find_tokenizer_files(folder):
        return None
    try:
        return load_hf_tokenizer(folder, owner="onnxruntime")
    except ConfigError as exc:
        _log.warning("%s; prompts must be token ids", exc)
        return None


def _listed() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())
