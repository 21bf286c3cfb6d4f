"""User-facing configuration values: sampling parameters and the SSD configuration.

Every field is checked by an attrs validator when the value is built, so a bad value
is refused with a :class:`~ssd_core.ConfigError` that names it -- before any model is
called -- and nothing is silently coerced (``"12"`` is not a list of ids, ``1.7`` is
not a fan-out, ``"no"`` is not ``False``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import attrs

from ._errors import ConfigError, UnknownOptionError
from ._fanout import default_budget, default_saguaro_c
from ._policy import CostModel

__all__ = [
    "FALLBACKS",
    "MODES",
    "SSDConfig",
    "SamplingParams",
    "check_int",
    "check_seed",
    "stop_ids_for",
]

MODES = ("ar", "sd", "ssd")
FALLBACKS = ("neural", "fast", "auto")

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(float(x))


def check_int(name: str, value: object, *, minimum: int = 0) -> int:
    """``value`` if it is an int (not a bool) ``>= minimum``, else :class:`ConfigError`."""
    if not _is_int(value) or value < minimum:  # type: ignore[operator]
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value  # type: ignore[return-value]


def check_seed(value: object) -> int:
    """A random seed: an int in ``[0, 2**64)`` (refused, never wrapped or truncated)."""
    if not _is_int(value) or not 0 <= value < 1 << 64:  # type: ignore[operator]
        raise ConfigError(f"seed must be an int in [0, 2**64), got {value!r}")
    return value  # type: ignore[return-value]


def _int_at_least(minimum: int, hint: str = "") -> Validator:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not _is_int(value) or value < minimum:
            raise ConfigError(f"{attribute.name} must be an int >= {minimum}{hint}, got {value!r}")

    return check


def _real_in(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Validator:
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"

    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        ok = _is_real(value)
        if ok:
            v = float(value)
            ok = (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
        if not ok:
            raise ConfigError(
                f"{attribute.name} must be a number in {left}{lo}, {hi}{right}, got {value!r}"
            )

    return check


def _is_bool(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{attribute.name} must be True or False, got {value!r}")


def _token_ids(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{name} must be a list of token ids, got {value!r}")
    out = tuple(value)
    for t in out:
        if not _is_int(t) and not (hasattr(t, "__index__") and not isinstance(t, bool)):
            raise ConfigError(f"{name} must hold int token ids, got {t!r}")
    return tuple(int(t) for t in out)


def _stop_token_ids(value: Any) -> tuple[int, ...] | None:
    return None if value is None else _token_ids("stop_token_ids", value)


def _stop_sequences(value: Any) -> tuple[tuple[int, ...], ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"stop_sequences must be a list of token-id lists, got {value!r}")
    out = tuple(_token_ids("stop_sequences", seq) for seq in value)
    if any(len(seq) == 0 for seq in out):
        raise ConfigError("stop_sequences must not contain an empty sequence")
    return out


def _stop_strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not hasattr(value, "__iter__"):
        raise ConfigError(f"stop must be a string or a list of strings, got {value!r}")
    out = tuple(value)
    for s in out:
        if not isinstance(s, str) or not s:
            raise ConfigError(f"stop strings must be non-empty strings, got {s!r}")
    return out


def _optional_temperature(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _real_in(0.0, math.inf, hi_open=True)(_inst, attribute, value)


@attrs.frozen(kw_only=True)
class SamplingParams:
    """How tokens are chosen, per sequence.

    Attributes:
        temperature: target temperature; ``0`` is greedy (lowest id among ties). The
            default, 1.0, is vLLM's and the OpenAI API's; the ``ssd`` command line
            defaults to greedy (see ``ssd generate --help``).
        top_k: keep the ``top_k`` most likely tokens (ties at the boundary kept); 0 = off.
        top_p: nucleus sampling mass in ``(0, 1]``; 1 = off.
        min_p: drop tokens below ``min_p`` times the most likely one's probability.
        draft_temperature: the draft's temperature; ``None`` = same as ``temperature``.
            Any value is lossless: the verifier uses the distribution the draft sampled.
        stop_token_ids: ids that end the sequence (kept in the output); ``None`` = the
            target tokenizer's EOS ids, if it has a tokenizer.
        stop_sequences: token sequences that end the sequence when generated (kept).
        stop: text stop strings (needs a target with a tokenizer): matched on the
            decoded text across token boundaries; the text is cut *before* the match and
            the tokens end with the token that completed it.
        ignore_eos: do not stop on the tokenizer's EOS ids.

    Generation is exact with respect to the *processed* target distribution.
    """

    temperature: float = attrs.field(default=1.0, validator=_real_in(0.0, math.inf, hi_open=True))
    top_k: int = attrs.field(default=0, validator=_int_at_least(0, " (0 = off)"))
    top_p: float = attrs.field(default=1.0, validator=_real_in(0.0, 1.0, lo_open=True))
    min_p: float = attrs.field(default=0.0, validator=_real_in(0.0, 1.0))
    draft_temperature: float | None = attrs.field(default=None, validator=_optional_temperature)
    stop_token_ids: tuple[int, ...] | None = attrs.field(default=None, converter=_stop_token_ids)
    stop_sequences: tuple[tuple[int, ...], ...] = attrs.field(default=(), converter=_stop_sequences)
    stop: tuple[str, ...] = attrs.field(default=(), converter=_stop_strings)
    ignore_eos: bool = attrs.field(default=False, validator=_is_bool)

    @property
    def effective_draft_temperature(self) -> float:
        return self.temperature if self.draft_temperature is None else self.draft_temperature


def stop_ids_for(params: SamplingParams, tokenizer: Any) -> frozenset[int]:
    """The token ids that end a sequence under ``params``: its ``stop_token_ids`` if
    given, else the tokenizer's EOS ids unless ``ignore_eos`` (the one place this rule
    lives)."""
    if params.stop_token_ids is not None:
        return frozenset(params.stop_token_ids)
    if params.ignore_eos or tokenizer is None:
        return frozenset()
    return frozenset(int(t) for t in (getattr(tokenizer, "eos_token_ids", ()) or ()))


def _fanout(value: Any) -> int | tuple[int, ...]:
    if _is_int(value):
        return int(value)
    if isinstance(value, (str, bytes, bool, float)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"fanout must be an int budget or a list of ints, got {value!r}")
    out = tuple(value)
    if not all(_is_int(v) for v in out):
        raise ConfigError(f"fanout must be an int budget or a list of ints, got {value!r}")
    return out


def _optional_fanout(value: Any) -> int | tuple[int, ...] | None:
    return None if value is None else _fanout(value)


def _fanout_shape(inst: SSDConfig, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    name = attribute.name
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{name} budget must be >= 0, got {value}")
        return
    if len(value) != inst.k + 1:
        raise ConfigError(
            f"{name} list must have K + 1 = {inst.k + 1} entries (F_0..F_K), got {len(value)}"
        )
    if any(f < 0 for f in value):
        raise ConfigError(f"{name} entries must be >= 0, got {value}")


def _cost_source(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, CostModel) and value not in ("declared", "measured"):
        raise ConfigError(f"cost must be 'declared', 'measured' or a CostModel, got {value!r}")


def _known_fallback(_inst: Any, _attribute: attrs.Attribute[Any], value: Any) -> None:
    if value not in FALLBACKS:
        raise UnknownOptionError(
            f"unknown fallback {value!r}; choose one of {', '.join(FALLBACKS)}"
        )


@attrs.frozen(kw_only=True)
class SSDConfig:
    """Speculation settings.

    Attributes:
        k: draft tokens per speculation (K >= 1); a sequence near its token budget
            drafts fewer (never more than it can still commit).
        fanout: the speculation-cache fan-out. An int is a budget B = sum of F_k per
            sequence, allocated each round by the capped geometric rule of Saguaro's
            Thm 12 from the per-token acceptance and power-law exponent estimated
            online from that sequence's own rounds. A list of K + 1 ints fixes
            F_0..F_K (F_k candidates for "k accepted"). Default (``None``): the budget
            ``3 (K + 1)`` (:func:`~ssd_core.default_budget`), filled in at
            construction -- ``attrs.evolve(config, k=...)`` keeps the old budget.
        fanout_after_backup: the same, for rounds whose speculation came from the
            fallback; ``None`` = estimate (or use) ``fanout`` separately for them.
        saguaro_c: Saguaro sampling constant C in (0, 1]: the draft down-weights the
            tokens it caches by C, which raises the cache hit rate. 1 = plain sampling.
            Default (``None``): chosen per request from its draft temperature by
            :func:`~ssd_core.default_saguaro_c` (1 when greedy or at T >= 1, 0.85 at
            0 < T <= 0.7). Any C is exact: the verifier uses the q it drew from.
        fallback: on a cache miss, ``"neural"`` drafts just in time with the draft
            model, ``"fast"`` proposes cheap n-gram backup tokens (verified as point
            masses), ``"auto"`` chooses per round from measured hit rate, times and
            batch size (Saguaro Thm 17) -- the one setting whose tokens depend on
            timing and on the other sequences in flight.
        rank_window: how many recent outcomes the online estimators remember.
        adaptive: choose each round's speculation length (up to ``k``, 0 included: a
            plain target step) from Saguaro's Theorem 7 -- expected tokens per unit of
            cost, with acceptance predicted from the draft's confidence at each
            position; ``False`` always proposes ``k`` tokens (as far as the budget and
            the contexts allow). Lossless either way.
        cost: what a round costs, for ``adaptive``: ``"declared"`` (the models'
            ``latency``, else a memory-bound target; deterministic, so a seed gives the
            same tokens on every run), ``"measured"`` (fitted online from this run's
            timings: follows the hardware, but at temperature > 0 two runs may choose
            differently) or a fixed :class:`~ssd_core.CostModel`.
    """

    k: int = attrs.field(default=4, validator=_int_at_least(1))
    fanout: int | tuple[int, ...] = attrs.field(
        default=None, converter=_optional_fanout, validator=_fanout_shape
    )
    fanout_after_backup: int | tuple[int, ...] | None = attrs.field(
        default=None, converter=_optional_fanout, validator=_fanout_shape
    )
    saguaro_c: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(_real_in(0.0, 1.0, lo_open=True))
    )
    fallback: Literal["neural", "fast", "auto"] = attrs.field(
        default="neural", validator=_known_fallback
    )
    rank_window: int = attrs.field(default=512, validator=_int_at_least(1))
    adaptive: bool = attrs.field(default=True, validator=_is_bool)
    cost: CostModel | Literal["declared", "measured"] = attrs.field(
        default="declared", validator=_cost_source
    )

    def __attrs_post_init__(self) -> None:
        if self.fanout is None:  # the default budget grows with K
            object.__setattr__(self, "fanout", default_budget(self.k))

    def c_for(self, draft_temperature: float) -> float:
        """The Saguaro constant C a request drafting at ``draft_temperature`` uses:
        ``saguaro_c``, or when that is ``None``, :func:`default_saguaro_c`."""
        if self.saguaro_c is not None:
            return float(self.saguaro_c)
        return default_saguaro_c(draft_temperature)

    def tree_budget(self) -> int:
        """The most branches one sequence's tree may hold (largest of the budgets)."""
        sizes = [
            f if isinstance(f, int) else sum(f)
            for f in (self.fanout, self.fanout_after_backup)
            if f is not None
        ]
        return max(sizes)

    def draft_handles_per_sequence(self, mode: str) -> int:
        """Draft handles one sequence may hold at once: its own, plus (SSD) one per
        cached branch. The one rule the engine and the conformance suite share."""
        if mode == "ar":
            return 0
        return 1 + (self.tree_budget() if mode == "ssd" else 0)
