"""Hypothesis profiles for the exactness tests.

``ci`` (default): every cell runs a handful of examples; ~200+ whole-machine
enumerations in total, a few minutes on 2 cores. ``deep``: ten times as many examples
and the statistical tests at their long sample sizes. Select with the environment
variable ``SSD_TEST_PROFILE=deep`` (tests only; the library reads no environment).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

DEEP = os.environ.get("SSD_TEST_PROFILE", "ci") == "deep"

settings.register_profile(
    "exact-ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "exact-deep",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def examples(n: int) -> settings:
    """Settings for a cell with ``n`` examples in CI (10 n under the deep profile)."""
    return settings(
        settings.get_profile("exact-deep" if DEEP else "exact-ci"),
        max_examples=n * 10 if DEEP else n,
        derandomize=not DEEP,
    )
