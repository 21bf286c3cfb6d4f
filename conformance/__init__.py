"""The conformance suite a backend author runs against their own backend.

Modelled on Hypothesis's ``run_conformance_test`` and trio's ``check_two_way_stream``:
public checkers that take a *factory* (a zero-argument callable returning a fresh
model), do not import pytest, and are run by this project on every backend it ships.

* :func:`check_model` -- the Model-protocol half: shapes, determinism, KV correctness,
  batching, forks, truncation, closing, capacity, error types, and a stateful random
  walk, each a row of the returned :class:`Report`.
* :func:`assert_conforms` -- the same, raising :class:`ConformanceError` (an
  ``AssertionError`` holding the report table) for use in a test.
* :func:`check_backend` -- the same on a registered backend's default model.
* :func:`model_state_machine` -- the random walk as a Hypothesis
  ``RuleBasedStateMachine``, for authors who use Hypothesis (imported lazily).
* ``python -m conformance package.module:factory [--quick|--full]`` or
  ``python -m conformance --backend NAME`` -- the command line.

The lossless half (greedy identity and distribution tests of the speculative engine
over a target/draft pair) builds on the core and will report through the same
:class:`Report`/:class:`CheckResult` types (see :meth:`Report.combine`).

See ``docs/backend-authors.md``.
"""

from __future__ import annotations

from ._arrays import max_abs_diff, to_numpy
from ._backends import check_backend
from ._report import CheckResult, ConformanceError, Report, Status
from ._runner import CHECK_NAMES, assert_conforms, check_model
from ._settings import Settings, default_tolerance
from ._stateful import model_state_machine

__all__ = [
    "CHECK_NAMES",
    "CheckResult",
    "ConformanceError",
    "Report",
    "Settings",
    "Status",
    "assert_conforms",
    "check_backend",
    "check_model",
    "default_tolerance",
    "max_abs_diff",
    "model_state_machine",
    "to_numpy",
]
