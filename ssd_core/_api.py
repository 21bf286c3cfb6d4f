"""The public entry points: :func:`generate` and :func:`stream`."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import attrs

from ._config import MODES, SamplingParams, SSDConfig
from ._drivers import DRIVERS, run_driver
from ._errors import ConfigError, InputError, SSDError, UnknownOptionError
from ._events import Lane
from ._machine import Machine
from ._metrics import Metrics
from ._protocol import Model
from ._random import RandomSource, SeededSource

__all__ = ["GenerateResult", "GenerationError", "Stream", "StreamEvent", "generate", "stream"]


@attrs.frozen(kw_only=True)
class StreamEvent:
    """Tokens committed for one sequence (``index`` is its position in ``prompts``)."""

    index: int
    tokens: tuple[int, ...]


@attrs.frozen(kw_only=True)
class GenerateResult:
    """What :func:`generate` returns.

    Attributes:
        tokens: generated tokens only, one list per prompt, in input order.
        finish_reasons: ``"stop"`` (stop id or sequence, kept in ``tokens``) or
            ``"length"`` (``max_new_tokens`` or the context size), per prompt.
        metrics: the run's :class:`~ssd_core.Metrics`.
        texts: detokenised ``tokens`` when the target has a tokenizer, else ``None``.
    """

    tokens: list[list[int]]
    finish_reasons: list[str | None]
    metrics: Metrics
    texts: list[str] | None = None


class GenerationError(SSDError, RuntimeError):
    """A run failed part-way. ``partial`` holds every token committed before the fault
    (a :class:`GenerateResult`); the original exception is the ``__cause__``."""

    def __init__(self, message: str, partial: GenerateResult) -> None:
        super().__init__(message)
        self.partial = partial


class _Run:
    """Validated inputs, the machine and the driver for one call."""

    def __init__(
        self,
        target: Model,
        draft: Model | None,
        prompts: Sequence[Sequence[int]],
        *,
        mode: str,
        max_new_tokens: int,
        sampling: SamplingParams | Sequence[SamplingParams] | None,
        config: SSDConfig | None,
        driver: str,
        seed: int,
        source: RandomSource | None,
    ) -> None:
        if mode not in MODES:
            raise UnknownOptionError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if driver not in DRIVERS:
            raise UnknownOptionError(
                f"unknown driver {driver!r}; choose one of {', '.join(DRIVERS)}"
            )
        if config is None:
            config = SSDConfig()
        if not isinstance(config, SSDConfig):
            raise ConfigError(f"config must be an SSDConfig, got {type(config).__name__}")
        if (
            not isinstance(max_new_tokens, int)
            or isinstance(max_new_tokens, bool)
            or max_new_tokens < 0
        ):
            raise ConfigError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        vocab = _vocab_size(target, "target")
        if mode != "ar":
            if draft is None:
                raise ConfigError(f"mode {mode!r} needs a draft model")
            draft_vocab = _vocab_size(draft, "draft")
            if draft_vocab != vocab:
                raise ConfigError(
                    f"draft vocabulary ({getattr(draft, 'name', 'draft')}: {draft_vocab}) does not "
                    f"match the target's ({getattr(target, 'name', 'target')}: {vocab})"
                )
        if mode == "ssd" and draft is not None:
            _check_handle_budget(
                draft, config, len(prompts) if isinstance(prompts, Sequence) else 0
            )
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise InputError("prompts must be a non-empty list of token-id lists")
        checked: list[list[int]] = []
        ids: list[int]
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
                raise InputError(
                    f"prompt {i} must be a list of token ids, got {type(prompt).__name__}"
                )
            if len(prompt) == 0:
                raise InputError(f"prompt {i} is empty; every prompt needs at least one token")
            ids = []
            for t in prompt:
                if isinstance(t, bool) or not isinstance(t, int) and not hasattr(t, "__index__"):
                    raise InputError(f"prompt {i} holds {t!r}, which is not a token id")
                t = int(t)
                if not 0 <= t < vocab:
                    raise InputError(
                        f"prompt {i} holds token id {t}, outside the vocabulary [0, {vocab})"
                    )
                ids.append(t)
            checked.append(ids)
        if sampling is None:
            sampling = SamplingParams()
        if isinstance(sampling, SamplingParams):
            params = [sampling] * len(checked)
        else:
            params = list(sampling)
            if len(params) != len(checked) or not all(
                isinstance(p, SamplingParams) for p in params
            ):
                raise ConfigError(
                    "sampling must be one SamplingParams or one per prompt "
                    f"({len(checked)} prompts, got {len(params)} values)"
                )
        for p in params:
            stop_lists: list[tuple[int, ...]] = [p.stop_token_ids or (), *p.stop_sequences]
            for stop in stop_lists:
                for t in stop:
                    if not 0 <= t < vocab:
                        raise ConfigError(
                            f"stop token id {t} is outside the vocabulary [0, {vocab})"
                        )
        tokenizer = getattr(target, "tokenizer", None)
        eos = tuple(getattr(tokenizer, "eos_token_ids", ()) or ()) if tokenizer is not None else ()
        self.tokenizer = tokenizer
        self.mode = mode
        self.driver = driver
        self.models: dict[Lane, Model] = {Lane.TARGET: target}
        if mode != "ar" and draft is not None:
            self.models[Lane.DRAFT] = draft
        self.machine = Machine(
            prompts=checked,
            params=params,
            mode=mode,
            config=config,
            max_new_tokens=max_new_tokens,
            vocab_size=vocab,
            source=source if source is not None else SeededSource(seed),
            target_context=getattr(target, "context_size", None),
            draft_context=getattr(draft, "context_size", None) if draft is not None else None,
            target_name=str(getattr(target, "name", "target")),
            draft_name=str(getattr(draft, "name", "draft")),
            eos_ids=eos,
        )
        self.clock = [0.0]

    def events(self) -> Generator[StreamEvent, None, None]:
        for _ in run_driver(self.driver, self.machine, self.models, self.clock):
            for index, toks in self.machine.pop_new_tokens():
                yield StreamEvent(index=index, tokens=tuple(toks))

    def result(self) -> GenerateResult:
        outputs = [list(t) for t in self.machine.outputs]
        texts = None
        if self.tokenizer is not None:
            texts = [self.tokenizer.decode(t) for t in outputs]
        return GenerateResult(
            tokens=outputs,
            finish_reasons=self.machine.finish_reasons,
            metrics=self.machine.freeze_metrics(driver=self.driver, wall_s=self.clock[0]),
            texts=texts,
        )


class Stream:
    """The iterator :func:`stream` returns: :class:`StreamEvent` values as rounds
    commit tokens; :meth:`result` once it is exhausted; :meth:`close` (or leaving a
    ``with`` block) to stop early, which releases every handle and thread."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._events = run.events()
        self._finished = False

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> StreamEvent:
        try:
            return next(self._events)
        except StopIteration:
            self._finished = True
            raise

    def close(self) -> None:
        self._events.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def result(self) -> GenerateResult:
        """Tokens and metrics so far (complete once the stream is exhausted)."""
        return self._run.result()

    @property
    def finished(self) -> bool:
        return self._finished


def _check_handle_budget(draft: Any, config: SSDConfig, batch: int) -> None:
    """SSD keeps a draft handle per sequence plus one per cached branch."""
    limit = getattr(draft, "max_handles", None)
    if not isinstance(limit, int) or isinstance(limit, bool):
        return
    trees = [config.fanout, config.fanout_after_backup]
    tree = max(f if isinstance(f, int) else sum(f) for f in trees if f is not None)
    need = batch * (1 + tree)
    if need > limit:
        raise ConfigError(
            f"ssd with fan-out {tree} for {batch} sequence(s) keeps up to {need} draft handles "
            f"open, but the draft ({getattr(draft, 'name', 'draft')}) holds at most {limit}; "
            "lower the fan-out or raise the draft's handle limit (llama.cpp: n_seq_max)"
        )


def _vocab_size(model: Any, role: str) -> int:
    v = getattr(model, "vocab_size", None)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"the {role} model has no valid vocab_size (got {v!r})")
    return v


def stream(
    target: Model,
    draft: Model | None = None,
    *,
    prompts: Sequence[Sequence[int]],
    mode: str = "ssd",
    max_new_tokens: int = 64,
    sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    config: SSDConfig | None = None,
    driver: str = "sequential",
    seed: int = 0,
    source: RandomSource | None = None,
) -> Stream:
    """Generate like :func:`generate`, yielding tokens as each round commits them.

    Every input is validated when ``stream`` is called, before any model call.
    Abandoning the iterator early closes every handle and stops the driver's
    threads.

    Returns:
        A :class:`Stream` of :class:`StreamEvent` values (prompt index, newly
        committed tokens); ``.result()`` gives the :class:`GenerateResult` at the end.

    Raises:
        ConfigError, InputError, UnknownOptionError: bad arguments (before any work).
        BackendContractError: a backend returned malformed logits.
    """
    run = _Run(
        target, draft, prompts, mode=mode, max_new_tokens=max_new_tokens, sampling=sampling,
        config=config, driver=driver, seed=seed, source=source,
    )  # fmt: skip
    return Stream(run)


def generate(
    target: Model,
    draft: Model | None = None,
    *,
    prompts: Sequence[Sequence[int]],
    mode: str = "ssd",
    max_new_tokens: int = 64,
    sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    config: SSDConfig | None = None,
    driver: str = "sequential",
    seed: int = 0,
    source: RandomSource | None = None,
) -> GenerateResult:
    """Generate up to ``max_new_tokens`` tokens for each prompt, exactly as the target
    would, using the draft to go faster.

    Args:
        target: the model whose distribution the output follows exactly.
        draft: the speculator (ignored, and may be ``None``, in ``"ar"`` mode).
        prompts: token-id lists, each non-empty; lengths may differ.
        mode: ``"ar"`` (target only), ``"sd"`` (speculative decoding) or ``"ssd"``
            (speculative speculative decoding, Saguaro).
        max_new_tokens: generation budget per prompt.
        sampling: one :class:`SamplingParams` for all prompts or one per prompt.
        config: :class:`SSDConfig` (K, fan-out, Saguaro C, fallback).
        driver: ``"sequential"``, ``"threaded"`` or ``"simulated"``.
        seed: seeds the default random source; the same seed gives the same tokens
            under every driver (``fallback="auto"`` with measured times excepted).
        source: a custom random source (overrides ``seed``).

    Returns:
        A :class:`GenerateResult`.

    Raises:
        ConfigError, InputError, UnknownOptionError: bad arguments, before any model call.
        GenerationError: a backend failed mid-run; ``.partial`` keeps what was generated.
    """
    run = _Run(
        target, draft, prompts, mode=mode, max_new_tokens=max_new_tokens, sampling=sampling,
        config=config, driver=driver, seed=seed, source=source,
    )  # fmt: skip
    try:
        for _ in run.events():
            pass
    except Exception as exc:
        raise GenerationError(f"generation failed: {exc!r}", run.result()) from exc
    return run.result()
