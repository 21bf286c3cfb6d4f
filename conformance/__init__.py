"""The conformance suite a backend author runs against their own backend.

Modelled on Hypothesis's ``run_conformance_test`` and trio's ``check_two_way_stream``:
public checkers that take a *factory* (a zero-argument callable returning a fresh
model), do not import pytest, and are run by this project on every backend it ships.

* :func:`check_model` -- the Model-protocol half: shapes, determinism, KV correctness,
  batching (and row order), forks, truncation, closing, capacity, error types, an
  optional comparison with a reference scorer (``reference=``), and a stateful random
  walk, each a row of the returned :class:`Report`. Each check runs with a time limit
  (``timeout=``); a hung backend fails that check instead of hanging the suite.
* :func:`assert_conforms` -- the same, raising :class:`ConformanceError` (an
  ``AssertionError`` holding the report table) for use in a test.
* :func:`check_backend` -- the same on a registered backend's default model.
* :func:`model_state_machine` -- the random walk as a Hypothesis
  ``RuleBasedStateMachine``, for authors who use Hypothesis (imported lazily).
* ``python -m conformance package.module:factory [--quick|--full]`` or
  ``python -m conformance --backend NAME`` -- the command line.

* :func:`check_lossless` -- the lossless half: greedy identity AR == SD == SSD, exact
  enumeration on a few token ids (:func:`restrict_vocab`), and Bonferroni-corrected
  G-tests of every mode and sampling processor against the exact processed target,
  over a target/draft pair of factories; same :class:`Report` rows
  (:meth:`Report.combine` joins the two halves); :func:`lossless_plan` picks tests
  and samples for a stated power.
* ``conformance.exact`` / ``conformance.stats`` -- the enumerating random source and
  the statistical machinery behind it, for backend authors' own tests.

See ``docs/backend-authors.md``.
"""

from __future__ import annotations

from ._arrays import max_abs_diff, to_numpy
from ._backends import check_backend
from ._checks_reference import Reference
from ._report import CheckResult, ConformanceError, Report, Status
from ._runner import CHECK_NAMES, assert_conforms, check_model
from ._settings import Settings, default_tolerance
from ._stateful import model_state_machine
from ._watchdog import DEFAULT_TIMEOUT
from .exact import (
    EnumerationTooLarge,
    ExactComparison,
    ExactDistribution,
    PureModel,
    compare_exact,
    enumerate_machine,
    logits_fn_of,
    processed_probs,
    restrict_vocab,
    target_distribution,
)
from .lossless import (
    DEFAULT_MODES,
    DEFAULT_PROCESSORS,
    check_lossless,
    lossless_plan,
    planned_power,
)
from .stats import (
    GTestResult,
    bonferroni,
    exact_prefix_distribution,
    g_test,
    power_lower_bound,
    required_samples,
    statistical_lossless_test,
)

__all__ = [
    "CHECK_NAMES",
    "DEFAULT_MODES",
    "DEFAULT_PROCESSORS",
    "DEFAULT_TIMEOUT",
    "EnumerationTooLarge",
    "ExactComparison",
    "ExactDistribution",
    "GTestResult",
    "PureModel",
    "Reference",
    "bonferroni",
    "check_lossless",
    "compare_exact",
    "enumerate_machine",
    "exact_prefix_distribution",
    "g_test",
    "logits_fn_of",
    "lossless_plan",
    "planned_power",
    "power_lower_bound",
    "processed_probs",
    "required_samples",
    "restrict_vocab",
    "statistical_lossless_test",
    "target_distribution",
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
