"""Fan-out planning (Saguaro Def 11 / Thm 12), the online estimates behind it, and the
default policies for the fan-out budget and the Saguaro sampling constant.

The miss rate of a speculation cache follows a power law in the fan-out,
``1 - p_hit(F) = F^(-r)``. With *per-token* draft acceptance ``a`` the verification
outcome "k tokens accepted" has probability ``a^k (1 - a)`` for k < K and ``a^K`` for
k = K. Maximising the hit rate under the budget ``sum_k F_k <= B`` gives a capped
geometric series::

    F_k = F_0 * a^(k / (1 + r))                          for k < K
    F_K = F_0 * a^(K / (1 + r)) * (1 - a)^(-1 / (1 + r))

with ``F_0`` chosen so the sum is ``B``; we round to integers by largest remainder.

Two acceptance numbers, not to be confused
------------------------------------------
* ``per_token_acceptance`` -- Thm 12's ``a``: the chance that the *next* draft token is
  accepted given that every earlier one was, estimated as
  ``accepted / (accepted + rejections)``. A round that accepts fewer tokens than it
  proposed ended in exactly one rejection; a round that accepted all of them ended in
  none (the tokens after a rejection are never tried, so they are not trials).
* ``accepted_fraction`` -- ``accepted / proposed``: the share of proposed tokens that
  were kept. With K = 6 and a = 0.87 it is about 0.6, and feeding it to the geometric
  rule piles the whole budget on the first positions.

``r`` comes from the *rank* of each realised recovery/bonus token among the draft's
candidates at its position: a hit at fan-out F means rank <= F, so one observed rank
tells us about every F at once. Ranks are kept as a histogram over a sliding window, and
the fit is recomputed only when a rank arrived since the last one.

Priors
------
Each estimate starts from a prior worth a few pseudo-observations (``prior_weight``):
``prior_acceptance`` tokens' worth for ``a``, and ``F^(-prior_r)`` pseudo-ranks for ``r``.
Before any observation the plan is the prior's plan; after one round the estimates are
a blend, never the extreme 0 or 1 a single round would give; with many rounds the data
wins. One instance serves one request (and one speculation source: after primary or
after backup), so a request's plan never depends on other requests in flight.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

from ._errors import ConfigError, InputError

__all__ = [
    "MAX_FIT_FANOUT",
    "OutcomeStats",
    "default_budget",
    "default_saguaro_c",
    "geometric_fanout",
    "outcome_fanout",
    "uniform_fanout",
]

#: Fan-outs 2..MAX_FIT_FANOUT enter the power-law fit; ranks above are pooled.
MAX_FIT_FANOUT = 32

# Precomputed log F for the fit (F = 2..MAX_FIT_FANOUT).
_LOG_F = [math.log(f) for f in range(2, MAX_FIT_FANOUT + 1)]
_SUM_LOG_F2 = sum(x * x for x in _LOG_F)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def geometric_fanout(budget: int, k: int, accept_rate: float, r: float) -> tuple[int, ...]:
    """Integer fan-outs ``F_0..F_K`` summing to ``budget`` (Thm 12, largest remainder).

    Args:
        budget: B >= 0.
        k: K >= 1, the speculation length.
        accept_rate: Thm 12's ``a``, the *per-token* acceptance
            ``accepted / (accepted + rejections)`` (not ``accepted / proposed``);
            clamped into [0.01, 0.99] for the formula.
        r: power-law exponent > 0 (clamped below at 1e-3).

    Returns:
        K + 1 non-negative ints whose sum is ``budget``.
    """
    a = min(max(accept_rate, 0.01), 0.99)
    return outcome_fanout(budget, [a**j * (1.0 - a) for j in range(k)] + [a**k], r)


def outcome_fanout(budget: int, probs: Sequence[float], r: float) -> tuple[int, ...]:
    """Thm 12 for any outcome distribution: maximising ``sum_k P_k (1 - F_k^(-r))``
    under ``sum_k F_k = B`` gives ``F_k ~ P_k^(1 / (1 + r))`` (the geometric rule is the
    case ``P_k = a^k (1 - a)``); integers by largest remainder.

    Args:
        budget: B >= 0.
        probs: P_0..P_K, the chance of each verification outcome ("k accepted").
        r: power-law exponent > 0 (clamped below at 1e-3).
    """
    n = len(probs)
    if budget <= 0:
        return (0,) * n
    e = 1.0 / (1.0 + max(r, 1e-3))
    raw = [max(p, 1e-9) ** e for p in probs]
    scale = budget / sum(raw)
    exact = [x * scale for x in raw]
    out = [math.floor(x) for x in exact]
    rest = budget - sum(out)
    by_remainder = sorted(range(n), key=lambda j: (out[j] - exact[j], j))
    for j in by_remainder[:rest]:
        out[j] += 1
    return tuple(out)


def uniform_fanout(budget: int, k: int) -> tuple[int, ...]:
    """``budget`` spread as evenly as possible over ``F_0..F_K`` (earlier positions
    get the remainder). The comparison point for :func:`geometric_fanout`."""
    _check(budget >= 0 and k >= 1, f"need budget >= 0 and k >= 1, got {budget}, {k}")
    base, extra = divmod(budget, k + 1)
    return tuple(base + (1 if j < extra else 0) for j in range(k + 1))


def default_budget(k: int) -> int:
    """The default fan-out budget ``B`` for speculation length ``k``: ``3 (K + 1)``.

    The budget must grow with K: a tree predicts K + 1 possible acceptance lengths, and
    a fixed B spreads thinner as K grows (in simulation, K = 6 at T = 0: SSD/SD 1.36
    with B = 12 vs 1.5 with B = 21). ``3 (K + 1)`` is the reference engine's
    fixed-list size (3 per position), which our adaptive plan then redistributes; see
    ``docs/simulation.md`` for the sweep behind this choice.

    Raises:
        ConfigError: ``k`` is not an int >= 1.
    """
    _check(
        isinstance(k, int) and not isinstance(k, bool) and k >= 1,
        f"k must be an int >= 1, got {k!r}",
    )
    return 3 * (k + 1)


def default_saguaro_c(temperature: float) -> float:
    """The default Saguaro sampling constant C for a (draft) temperature.

    Down-weighting the draft's cached top-F tokens by C moves the target's residual
    mass onto them (more cache hits) at the price of acceptance. The price is about
    ``(1 - C) m (1 - m)`` per token, ``m`` being the top-F mass of the draft row: small
    while rows are peaked (low temperature), largest at T ~ 1. Measured in simulation
    (``docs/simulation.md``, K = 6, budget 3 (K + 1)): C = 0.85 gains 1-3% at
    T = 0.5-0.7; at T = 1 every C < 1 lost (the hit rate rose, acceptance fell more).
    Hence:

    * T = 0: 1.0 (greedy drafts are point masses; C has no effect);
    * 0 < T <= 0.7: 0.85;
    * 0.7 < T < 1: linear from 0.85 to 1.0;
    * T >= 1: 1.0.

    Raises:
        ConfigError: ``temperature`` is not a finite number >= 0.
    """
    _check(
        _real(temperature) and 0.0 <= temperature < math.inf,
        f"temperature must be a finite number >= 0, got {temperature!r}",
    )
    if temperature == 0.0 or temperature >= 1.0:
        return 1.0
    if temperature <= 0.7:
        return 0.85
    return 0.85 + 0.15 * (temperature - 0.7) / 0.3


class OutcomeStats:
    """Running estimates of the per-token acceptance and the power-law exponent.

    One instance per request and speculation source (after primary / after backup),
    so each gets its own allocation.

    Args:
        window: how many recent ranks the power-law fit remembers.
        prior_acceptance: the per-token acceptance assumed before any observation.
        prior_r: the power-law exponent assumed before any observation.
        prior_weight: how many observations each prior is worth (> 0).

    Raises:
        ConfigError: an argument is out of range.
    """

    def __init__(
        self,
        window: int = 512,
        *,
        prior_acceptance: float = 0.8,
        prior_r: float = 1.0,
        prior_weight: float = 4.0,
    ) -> None:
        _check(isinstance(window, int) and window >= 1, f"window must be >= 1, got {window!r}")
        _check(
            _real(prior_acceptance) and 0.0 <= prior_acceptance <= 1.0,
            f"prior_acceptance must be in [0, 1], got {prior_acceptance!r}",
        )
        _check(
            _real(prior_r) and 0.0 < prior_r < math.inf,
            f"prior_r must be a finite number > 0, got {prior_r!r}",
        )
        _check(
            _real(prior_weight) and 0.0 < prior_weight < math.inf,
            f"prior_weight must be a finite number > 0, got {prior_weight!r}",
        )
        self.prior_acceptance = float(prior_acceptance)
        self.prior_r = float(prior_r)
        self.prior_weight = float(prior_weight)
        #: Draft tokens proposed, accepted, and rounds that ended in a rejection.
        self.proposed = 0
        self.accepted = 0
        self.rejections = 0
        # Per draft position j: rounds that tried it (every earlier one accepted) and
        # rounds that accepted it -- the outcome distribution need not be geometric.
        self._tried: list[int] = []
        self._kept: list[int] = []
        self.ranks: deque[int] = deque(maxlen=window)
        # _hist[j] = ranks in the window equal to j + 1 (j < MAX_FIT_FANOUT); the last
        # bucket pools every rank above MAX_FIT_FANOUT.
        self._hist = [0] * (MAX_FIT_FANOUT + 1)
        self._r: float | None = None
        self._plans: dict[tuple[int, int], tuple[int, ...]] = {}

    def observe(self, accepted: int, proposed: int, rank: int | None) -> None:
        """Record one verification: ``accepted`` of ``proposed`` tokens, and the rank
        (1 = the draft's top candidate) of the recovery/bonus token, if known.

        Raises:
            InputError: ``accepted`` is not in ``[0, proposed]`` or ``rank < 1``.
        """
        if not 0 <= accepted <= proposed:
            raise InputError(f"need 0 <= accepted <= proposed, got {accepted}, {proposed}")
        if rank is not None and rank < 1:
            raise InputError(f"rank must be >= 1, got {rank}")
        self.accepted += accepted
        self.proposed += proposed
        if accepted < proposed:
            self.rejections += 1
        tried = min(accepted + 1, proposed)
        while len(self._tried) < tried:
            self._tried.append(0)
            self._kept.append(0)
        for j in range(tried):
            self._tried[j] += 1
            self._kept[j] += j < accepted
        if rank is not None:
            if len(self.ranks) == self.ranks.maxlen:
                self._hist[self._bucket(self.ranks[0])] -= 1
            self.ranks.append(rank)
            self._hist[self._bucket(rank)] += 1
            self._r = None
        self._plans.clear()

    @staticmethod
    def _bucket(rank: int) -> int:
        return min(rank, MAX_FIT_FANOUT + 1) - 1

    @property
    def per_token_acceptance(self) -> float:
        """Thm 12's ``a``: accepted / (accepted + rejections), blended with the prior."""
        w = self.prior_weight
        return (self.accepted + w * self.prior_acceptance) / (self.accepted + self.rejections + w)

    def acceptance_at(self, j: int) -> float:
        """The chance that draft position ``j`` is accepted given every earlier one was:
        this request's own count there, shrunk toward :attr:`per_token_acceptance` by
        ``prior_weight`` pseudo-observations."""
        w, a = self.prior_weight, self.per_token_acceptance
        if j >= len(self._tried):
            return a
        return (self._kept[j] + w * a) / (self._tried[j] + w)

    def outcome_probs(self, k: int) -> list[float]:
        """P_0..P_K of "k accepted" for a K-token speculation, from the acceptance at
        each position (geometric when every position accepts alike)."""
        probs, survive = [], 1.0
        for j in range(k):
            a = min(max(self.acceptance_at(j), 0.0), 1.0)
            probs.append(survive * (1.0 - a))
            survive *= a
        return [*probs, survive]

    @property
    def accepted_fraction(self) -> float:
        """Accepted / proposed draft tokens (0 before any proposal). Not Thm 12's ``a``."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def accept_rate(self) -> float:
        """Alias of :attr:`per_token_acceptance` (the name engine v1 reads)."""
        return self.per_token_acceptance

    @property
    def power_law_r(self) -> float:
        """Least-squares fit of ``log(1 - p_hit(F)) = -r log F`` for F = 2..32, over the
        windowed ranks plus ``prior_weight`` pseudo-ranks drawn from ``F^(-prior_r)``;
        clamped into [0.1, 10]. Cached until the next rank arrives."""
        if self._r is None:
            self._r = self._fit()
        return self._r

    def _fit(self) -> float:
        n = len(self.ranks)
        w = self.prior_weight
        above = n - self._hist[0]  # ranks > 1, then > 2, ... as F grows
        num = 0.0
        for f, lf in zip(range(2, MAX_FIT_FANOUT + 1), _LOG_F):
            above -= self._hist[f - 1]
            miss = (above + w * f ** (-self.prior_r)) / (n + w)
            num += -math.log(miss) * lf
        return min(max(num / _SUM_LOG_F2, 0.1), 10.0)

    def plan(self, budget: int, k: int) -> tuple[int, ...]:
        """F_0..F_K for budget B: Thm 12's allocation for this request's measured outcome
        distribution (:meth:`outcome_probs`); cached until the next observation."""
        key = (budget, k)
        plan = self._plans.get(key)
        if plan is None:
            plan = outcome_fanout(budget, self.outcome_probs(k), self.power_law_r)
            self._plans[key] = plan
        return plan
