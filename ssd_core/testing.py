"""Public hooks for tests, audits and the conformance suite.

Everything the exact enumerator and the deliberately lossy negative controls need, as a
small documented surface, so no test and no part of ``conformance`` reaches into
``ssd_core``'s private modules (``tests/core/test_layering.py`` enforces it):

* the request vocabulary a driver sees -- :class:`Open`, :class:`Extend`,
  :class:`Fork`, :class:`Close`, :class:`Purpose`, :class:`Lane` -- and :func:`perform`,
  which carries one out on a model;
* the machine's own hooks: :meth:`~ssd_core.Machine.snapshot` (a hashable state that
  determines the future output distribution), :meth:`~ssd_core.Machine.held` (what it
  believes each handle holds), :meth:`~ssd_core.Machine.clone` (branch a machine,
  optionally with another random source) and :meth:`~ssd_core.Machine.outstanding`;
* :class:`MathOps`, the seam for the verification math and the cache lookup: pass an
  ``attrs.evolve(MathOps(), ...)`` to :class:`~ssd_core.Machine`, or make every machine
  built inside a block use it with :func:`using_ops` (``generate``, ``stream``, the
  engine and the conformance suite build their own), to audit a step or to plant a
  lossy variant;
* the named draws: every random decision goes through a
  :class:`~ssd_core.RandomSource` with a key ``(purpose, stream, round, ...)``
  (purposes ``accept``, ``token``, ``neural``, ``tree``); wrap a source to observe or
  change draws, and use ``SeededSource(seed, check_unique=True)`` to assert that no
  name is drawn twice;
* the math itself, for unit tests: :func:`target_probs`, :func:`draft_weights`,
  :func:`accept_probabilities`, :func:`residual_weights`, :func:`check_logits`, :func:`top_ids`,
  :func:`count_above`, :func:`sample_inverse_cdf`, :func:`to_numpy`; and the device
  side of it (docs/gpu.md): :func:`inverse_cdf`, :func:`move_like`, :func:`fetch`,
  :func:`top_candidates`, :func:`pick_top`, :func:`rank_from`, :func:`uniform_draws`;
* :data:`TREE_TRANSITIONS`, the tree job's stage table (with the sequence and machine
  tables exported from :mod:`ssd_core`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ._jobs import _OPS_STACK, TREE_TRANSITIONS, Branch, MathOps, TreeStage
from ._math import (
    accept_probabilities,
    check_logits,
    count_above,
    draft_weights,
    fetch,
    move_like,
    pick_top,
    rank_from,
    residual_weights,
    target_probs,
    top_candidates,
    top_ids,
)
from ._math import to_host as to_numpy
from ._random import inverse_cdf, sample_inverse_cdf, uniform_draws
from ._requests import Close, Extend, Fork, Lane, Open, Purpose, Request, perform
from ._sequence import Outcome

__all__ = [
    "TREE_TRANSITIONS",
    "Branch",
    "Close",
    "Extend",
    "Fork",
    "Lane",
    "MathOps",
    "Open",
    "Outcome",
    "Purpose",
    "Request",
    "TreeStage",
    "accept_probabilities",
    "check_logits",
    "count_above",
    "draft_weights",
    "fetch",
    "inverse_cdf",
    "move_like",
    "perform",
    "pick_top",
    "rank_from",
    "residual_weights",
    "sample_inverse_cdf",
    "target_probs",
    "to_numpy",
    "top_candidates",
    "top_ids",
    "uniform_draws",
    "using_ops",
]


@contextlib.contextmanager
def using_ops(ops: MathOps) -> Iterator[MathOps]:
    """Every :class:`~ssd_core.Machine` built inside the block without an explicit
    ``ops`` -- by :func:`~ssd_core.generate`, :func:`~ssd_core.stream`, an
    :class:`~ssd_core.Engine` or the conformance suite -- uses ``ops``. For tests and
    audits only: it is process-wide."""
    _OPS_STACK.append(ops)
    try:
        yield ops
    finally:
        _OPS_STACK.remove(ops)
