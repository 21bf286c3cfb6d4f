"""Fan-out planning (Saguaro Def 11 / Thm 12) and the online estimates behind it.

The miss rate of a speculation cache follows a power law in the fan-out,
``1 - p_hit(F) = F^(-r)``. With draft acceptance rate ``a`` the verification outcome
"k tokens accepted" has probability ~ ``a^k (1 - a)`` (and ``a^K`` for all K). Maximising
the hit rate under the budget ``sum_k F_k <= B`` gives a capped geometric series::

    F_k = F_0 * a^(k / (1 + r))                          for k < K
    F_K = F_0 * a^(K / (1 + r)) * (1 - a)^(-1 / (1 + r))

with ``F_0`` chosen so the sum is ``B``; we round to integers by largest remainder.

``a`` and ``r`` are estimated online from observed outcomes: ``a`` from accepted vs
proposed tokens, ``r`` from the *rank* of each realised recovery/bonus token among the
draft's candidates at its position -- a hit at fan-out F means rank <= F, so one
observed rank tells us about every F at once.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["OutcomeStats", "geometric_fanout"]


def geometric_fanout(budget: int, k: int, accept_rate: float, r: float) -> tuple[int, ...]:
    """Integer fan-outs ``F_0..F_K`` summing to ``budget`` (Thm 12, largest remainder).

    Args:
        budget: B >= 0.
        k: K >= 1, the speculation length.
        accept_rate: a in [0, 1]; clamped into (0.01, 0.99) for the formula.
        r: power-law exponent > 0.
    """
    if budget <= 0:
        return (0,) * (k + 1)
    a = min(max(accept_rate, 0.01), 0.99)
    e = 1.0 / (1.0 + max(r, 1e-3))
    raw = [a ** (j * e) for j in range(k)] + [a ** (k * e) * (1.0 - a) ** (-e)]
    scale = budget / sum(raw)
    exact = [x * scale for x in raw]
    out = [math.floor(x) for x in exact]
    rest = budget - sum(out)
    by_remainder = sorted(range(k + 1), key=lambda j: (out[j] - exact[j], j))
    for j in by_remainder[:rest]:
        out[j] += 1
    return tuple(out)


class OutcomeStats:
    """Running estimates of the acceptance rate and the power-law exponent.

    One instance per speculation source (after primary / after backup) so the two get
    separate allocations.
    """

    def __init__(self, window: int = 512) -> None:
        self.proposed = 0
        self.accepted = 0
        self.ranks: deque[int] = deque(maxlen=window)

    def observe(self, accepted: int, proposed: int, rank: int | None) -> None:
        """Record one verification: ``accepted`` of ``proposed`` tokens, and the rank
        (1 = the draft's top candidate) of the recovery/bonus token, if known."""
        self.accepted += accepted
        self.proposed += proposed
        if rank is not None:
            self.ranks.append(rank)

    @property
    def accept_rate(self) -> float:
        # A Beta(1, 1) prior keeps the estimate sane before the first observation.
        return (self.accepted + 1) / (self.proposed + 2)

    @property
    def power_law_r(self) -> float:
        """Least-squares fit of ``log(1 - p_hit(F)) = -r log F`` over the observed ranks."""
        n = len(self.ranks)
        if n < 8:
            return 1.0
        num = den = 0.0
        for f in range(2, 33):
            miss = sum(1 for x in self.ranks if x > f) / n
            if miss <= 0.0:
                break
            lf = math.log(f)
            num += -math.log(miss) * lf
            den += lf * lf
        if den == 0.0:
            return 4.0  # every outcome was the top candidate: fan-out barely matters
        return min(max(num / den, 0.1), 10.0)

    def plan(self, budget: int, k: int) -> tuple[int, ...]:
        return geometric_fanout(budget, k, self.accept_rate, self.power_law_r)
