"""The Model protocol: what a backend must provide.

A backend is a *scorer* over opaque sequence handles. It never samples: every random
decision happens in the core, from one injected random source. A handle names
backend-side state (a KV cache, a token list) for one token sequence.

The contract, in one paragraph: ``open(tokens)`` makes a handle holding ``tokens``
(possibly none) and returns no logits; ``extend([(h, toks), ...])`` appends ``toks`` to
each handle and returns one logits row for *every* appended token, rows in request
order; row ``i`` of a request is the next-token distribution after the sequence up to
and including ``toks[i]``. ``fork(h, n)`` makes a new, independent handle holding the
first ``n`` tokens of ``h``; ``truncate(h, n)`` drops everything after the first ``n``
tokens; ``close(h)`` frees the handle. Logits are *raw* (temperature 1, no processing).

Sequences are addressed only through handles, so the core can keep many speculative
branches alive at once (one per fork) and cheaply roll back rejected tokens.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Hashable, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["Handle", "Model", "Tokenizer", "free_model", "model_lock"]

#: An opaque, hashable name for one sequence's backend-side state. Backends choose the
#: type (an int is typical); the core only stores handles and passes them back.
Handle = Hashable


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids, for backends that have a vocabulary with text.

    ``eos_token_ids`` lists the ids that end generation by default (a chat model may
    have several). ``decode`` must accept any ids the model can produce.
    """

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Tokenise ``text``; ``add_special_tokens`` prepends BOS where the model wants it."""
        ...

    def decode(self, tokens: Sequence[int]) -> str:
        """Detokenise ``tokens`` to text (special tokens rendered or dropped, as the model does)."""
        ...


@runtime_checkable
class Model(Protocol):
    """A language model the core can score sequences with.

    Read-only facts (class attributes, instance attributes or properties all do):

    * ``name`` -- short human-readable name, used in error messages and reports.
    * ``vocab_size`` -- number of logits per row. Draft and target must agree.
    * ``context_size`` -- the most tokens one handle may hold, or ``None`` if unbounded.
      The core stops a sequence with finish reason ``"length"`` before exceeding it,
      and refuses a prompt that leaves no room to generate.
    * ``tokenizer`` -- a :class:`Tokenizer`, or ``None`` for id-only models.

    Optional capability flags (looked up with ``getattr``):

    * ``max_handles`` -- the most handles that may be open at once, if the backend has
      such a limit. SSD keeps ``1 + fan-out`` draft handles per sequence; the engine
      refuses a configuration that needs more.
    * ``free()`` -- release the whole model (engine context, weights) at once;
      :func:`free_model` calls it.

    Threads: the core never calls one model from two threads at once. Every call the
    engine makes holds the model's lock (:func:`model_lock`), so the same object can
    be the target and the draft, and two engines can share a model. A backend that
    releases the GIL while it computes (llama.cpp, torch, onnxruntime do) gets real
    overlap between *different* models; one that does not still works, without it.

    Must:

    * return logits as a 2-D array (rows x ``vocab_size``) of a real floating dtype,
      finite or ``-inf`` (a token that can never occur); never NaN or ``+inf``. The
      array may be any Python-array-API array (numpy, torch on any device); the core
      does its math in that array's namespace and on its device. Every call returns
      the same array type (the engine refuses a switch with a
      :class:`~ssd_core.BackendContractError`).
    * be deterministic: the same token sequence gives the same logits whatever the
      handle's history (forks, truncations) and whatever else is in the same batch,
      up to the backend's documented tolerance.
    * keep handles independent: extending or truncating one handle never changes what
      another handle (parent, child or sibling) holds.
    * leave every handle unchanged when a call raises (an invalid id, a closed handle
      or a capacity overflow anywhere in an ``extend`` batch rejects the whole batch).

    May:

    * compute lazily, share prefixes copy-on-write, pad batches, reuse freed slots;
    * offer ``free()`` to release the whole model (engine context, weights) at once;
      the ``ssd`` command calls it when it is done with a model.

    Raises:

    * :class:`~ssd_core.HandleError` for an unknown or closed handle, or a length
      beyond what the handle holds;
    * :class:`~ssd_core.CapacityError` when a handle would exceed ``context_size`` or
      no more handles can be opened;
    * :class:`~ssd_core.InputError` for a token id outside ``[0, vocab_size)``.
    """

    @property
    def name(self) -> str: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def context_size(self) -> int | None: ...

    @property
    def tokenizer(self) -> Tokenizer | None: ...

    def open(self, tokens: Sequence[int]) -> Handle:
        """Make a new handle holding ``tokens`` (prefill). ``tokens`` may be empty.

        Returns:
            The new handle. No logits: ask for them by extending.
        """
        ...

    def extend(self, requests: Sequence[tuple[Handle, Sequence[int]]]) -> Any:
        """Append tokens to several handles at once and score every appended token.

        Args:
            requests: ``(handle, tokens)`` pairs, each ``tokens`` non-empty; a handle
                appears at most once.

        Returns:
            A 2-D array with ``sum(len(tokens))`` rows and ``vocab_size`` columns, the
            rows of the first request first. Row ``j`` of a request holds the raw logits
            for the token that follows ``tokens[j]``.
        """
        ...

    def fork(self, handle: Handle, length: int) -> Handle:
        """Make a new handle holding the first ``length`` tokens of ``handle``.

        ``0 <= length <= len(handle)``. The two handles are independent afterwards.
        """
        ...

    def truncate(self, handle: Handle, length: int) -> None:
        """Keep only the first ``length`` tokens of ``handle`` (``0 <= length <= len``)."""
        ...

    def close(self, handle: Handle) -> None:
        """Free ``handle``. Using it afterwards raises :class:`~ssd_core.HandleError`."""
        ...


def free_model(model: object) -> None:
    """Release ``model`` through its optional ``free()`` (engine context, weights);
    a model without one is left to the garbage collector. Safe to call twice when the
    backend's ``free()`` is idempotent, as the in-house backends' are."""
    free = getattr(model, "free", None)
    if callable(free):
        free()


_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_BY_ID: dict[int, threading.RLock] = {}
_LOCKS_GUARD = threading.Lock()


def model_lock(model: object) -> threading.RLock:
    """The lock every engine holds while it calls ``model``: one per model object, so
    the same model as target and draft, or shared by two engines in two threads, is
    never called from two threads at once (llama.cpp contexts, for one, crash when it
    is). Re-entrant, so a backend may take it too."""
    with _LOCKS_GUARD:
        try:
            lock = _LOCKS.get(model)
            if lock is None:
                lock = _LOCKS[model] = threading.RLock()
            return lock
        except TypeError:  # not weak-referenceable: keyed by identity for its lifetime
            return _LOCKS_BY_ID.setdefault(id(model), threading.RLock())
