"""Draft-lane faults keep the output exactly the target's distribution (issue 11).

The draft raises or returns NaN logits at a random call of each run (so the runs
degrade at random rounds: before the first token, between tokens, inside an SSD
tree); the first
``M_TOKENS`` generated tokens are G-tested against the processed target's exact
distribution (``conformance.stats``), as the exactness suite does.

The test has teeth: a *lossy degrade* -- on a draft fault, the draft's proposal is
committed unverified instead of being replaced by target steps -- is built here as a
test double (a draft that flags its faulty calls instead of raising, and a
:class:`~ssd_core.testing.MathOps` that then accepts the proposal outright) and the
same test rejects it.
"""

from __future__ import annotations

import threading
from typing import Any

import attrs
import numpy as np
import pytest

from backends.reference import ReferenceModel
from conformance.stats import bonferroni, power_lower_bound, statistical_lossless_test
from ssd_core import SamplingParams, SSDConfig
from ssd_core.testing import MathOps, using_ops

from .doubles import Probe

VOCAB = 30
M_TOKENS = 3
MAX_BINS = 16
SAMPLES = 6_000
EFFECT_TV = 0.05
#: The lossless family: sd and ssd (neural and fast fallbacks), each at its Bonferroni
#: share of 1e-4; a correct engine fails a run with probability <= 1e-4.
MODES = {
    "sd": ("sd", SSDConfig(k=3)),
    "ssd-neural": ("ssd", SSDConfig(k=3, fanout=(2, 1, 1, 2), fallback="neural")),
    "ssd-fast": ("ssd", SSDConfig(k=3, fanout=(2, 1, 1, 2), fallback="fast")),
}
ALPHA = bonferroni(1e-4, len(MODES))
#: A run (one generate call) meets its fault at a draft call drawn uniformly from the
#: first HORIZON extend/fork calls after its prefill, if it makes that many: faults
#: land before the first token, between tokens, in a glue pass, a fork or a tree step.
HORIZON = {"sd": 5, "ssd": 16}
#: How far the draft is from the target (a far draft makes an unverified proposal a
#: large error, so the negative control is caught with room to spare).
DIVERGENCE = 1.5
PARAMS = SamplingParams(temperature=1.0)


def make_target() -> ReferenceModel:
    return ReferenceModel.random(vocab_size=VOCAB, order=2, seed=31, peakedness=2.0)


TARGET = make_target()


def _random_plan(seed: int, actions: tuple[str, ...], horizon: int) -> Any:
    """One fault per run at a random draft call (see HORIZON); a fork fault raises."""
    rng = np.random.default_rng(seed)
    lock = threading.Lock()
    state: dict[str, Any] = {"countdown": None, "last": None}

    def plan(method: str, n: int) -> str | None:
        with lock:
            if method == "open":  # a run's prefill (one open per prompt): a new run
                if state["last"] != "open":
                    state["countdown"] = int(rng.integers(horizon))
                state["last"] = method
                return None
            state["last"] = method
            if method not in ("extend", "fork") or state["countdown"] is None:
                return None
            if state["countdown"] > 0:
                state["countdown"] -= 1
                return None
            state["countdown"] = None
            action = actions[int(rng.integers(len(actions)))]
        return action if method == "extend" else "raise"

    return plan


def test_stated_power() -> None:
    assert power_lower_bound(SAMPLES, MAX_BINS - 1, ALPHA, EFFECT_TV) >= 0.9


@pytest.mark.parametrize("mode", sorted(MODES))
def test_draft_faults_keep_the_target_distribution(mode: str) -> None:
    run_mode, config = MODES[mode]
    drafts: list[Probe] = []

    def make_draft() -> Probe:
        inner = ReferenceModel.perturbed(TARGET, divergence=DIVERGENCE, seed=32)
        seed = 100 + sorted(MODES).index(mode)
        probe = Probe(inner, plan=_random_plan(seed, ("raise", "nan"), HORIZON[run_mode]))
        drafts.append(probe)
        return probe

    res = statistical_lossless_test(
        lambda: TARGET,
        make_draft,
        TARGET.logits,
        prompt=[1, 2],
        params=PARAMS,
        mode=run_mode,
        config=config,
        m=M_TOKENS,
        samples=SAMPLES,
        seed=5000 + sorted(MODES).index(mode),
        alpha=ALPHA,
        effect_tv=EFFECT_TV,
        max_bins=MAX_BINS,
        batch=16,
    )
    faults = sum(sum(d.faults.values()) for d in drafts)
    runs = SAMPLES // 16  # one generate call of 16 sequences each
    print(f"{mode}: {faults} of {runs} runs met a draft fault; {res.summary()}")
    assert faults >= runs // 3, f"only {faults} of {runs} runs met a fault"
    assert not res.rejected, f"{mode} with draft faults: {res.summary()}"


# -- the negative control -------------------------------------------------------------------


class LossyDegrade:
    """The lossy policy under test: on a draft fault, commit what the draft proposed
    without verifying it. The faulty call returns its (finite) logits and flags the
    sequences it served; the next acceptance test of each is forced to 1."""

    def __init__(self) -> None:
        self.unverified = 0
        self.lock = threading.Lock()

    def ops(self) -> MathOps:
        exact = MathOps()

        def accept(p: Any, q: Any, tokens: Any) -> list[float]:
            with self.lock:
                if self.unverified > 0:
                    self.unverified -= 1
                    return [1.0] * len(tokens)
            return exact.accept_probabilities(p, q, tokens)

        return attrs.evolve(exact, accept_probabilities=accept)

    def draft(self, seed: int) -> Any:
        inner = ReferenceModel.perturbed(TARGET, divergence=DIVERGENCE, seed=32)
        plan = _random_plan(seed, ("flag",), HORIZON["sd"])
        policy = self

        class Flagging(Probe):
            def extend(self, requests: Any) -> Any:
                out = super().extend(requests)
                if self.faults["flag"] > self.seen:
                    self.seen = self.faults["flag"]
                    with policy.lock:
                        policy.unverified += len(requests)
                return out

        probe = Flagging(inner, plan=plan)
        probe.seen = 0
        return probe


def test_a_lossy_degrade_is_rejected() -> None:
    """Same faults, same test, but a degrade that commits the faulty round's proposal
    unverified: the G-test rejects it."""
    lossy = LossyDegrade()
    with using_ops(lossy.ops()):
        res = statistical_lossless_test(
            lambda: TARGET,
            lambda: lossy.draft(100),
            TARGET.logits,
            prompt=[1, 2],
            params=PARAMS,
            mode="sd",
            config=SSDConfig(k=3),
            m=M_TOKENS,
            samples=SAMPLES,
            seed=5000,
            alpha=ALPHA,
            effect_tv=EFFECT_TV,
            max_bins=MAX_BINS,
            batch=16,
        )
    print(f"lossy degrade: {res.summary()}")
    assert res.rejected, f"the lossy degrade was not caught: {res.summary()}"
