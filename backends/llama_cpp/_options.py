"""Engine options of the llama.cpp backend, validated once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs

from ssd_core import ConfigError

from .._specs import flag

__all__ = ["FLASH_ATTN", "LlamaOptions"]

#: ``flash_attn`` values and llama.cpp's ``flash_attn_type`` for them.
FLASH_ATTN = {"auto": -1, "on": 1, "off": 0}

#: Option names the CLI's generic options use, mapped to ours.
_ALIASES = {"threads": "n_threads", "context_size": "n_ctx", "gpu_layers": "n_gpu_layers"}


def _default_threads() -> int:
    # Half the cores, at most 4: draft and target each get their own threads, and an
    # oversubscribed OpenMP pool spins (measured: 2 threads on a busy 2-core machine
    # took 400 ms per token instead of 48 ms with 1).
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def _positive(instance: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"llama_cpp option {attribute.name} must be >= 1, got {value}")


def _flash(value: object) -> str:
    if value is True:
        return "on"
    if value is False:
        return "off"
    text = str(value).strip().lower()
    if text not in FLASH_ATTN:
        raise ConfigError(f"llama_cpp option flash_attn must be auto, on or off, got {value!r}")
    return text


def _to_bool(value: object) -> bool:
    if isinstance(value, str):
        try:
            return flag(value)
        except ValueError:
            raise ConfigError(f"llama_cpp: expected a boolean, got {value!r}") from None
    return bool(value)


@attrs.frozen(kw_only=True)
class LlamaOptions:
    """How one llama.cpp model is loaded and run.

    Attributes:
        n_threads: CPU threads for decoding (draft and target each get their own).
        n_ctx: the most tokens one handle may hold (the model's ``context_size``).
        kv_layout: ``"per_sequence"`` gives every handle its own KV stream of
            ``n_ctx`` cells, so cells always stay in position order and logits never
            depend on a handle's history (fork copies the parent's stream).
            ``"unified"`` puts all handles in one pool of ``kv_size`` cells: forks
            share prefix cells and memory is smaller, but cells freed by truncate/close
            get reused out of position order, which changes later logits by up to
            ~1e-2 (measured with flash attention), so greedy identity can break.
            ``"auto"`` (default) is per_sequence when ``batch_invariant``, else unified.
        kv_size: (unified layout) KV cells shared by all sequences; ``None`` means
            ``n_ctx + 64 * n_seq_max``.
        n_seq_max: the most handles open at once (llama.cpp sequence ids).
        n_gpu_layers: layers offloaded to a GPU (llama-cpp-python built with CUDA/Metal).
        flash_attn: ``"auto"``, ``"on"`` or ``"off"``.
        batch_invariant: split every decode so each row's logits equal a one-token
            decode's, bit for bit (greedy AR, SD and SSD then agree).
        invariant_batch: the most tokens per ``llama_decode`` in batch-invariant mode
            with flash attention auto/on (measured: <= 63); with flash attention off
            the backend decodes one token at a time.
        n_batch: the most tokens per ``llama_decode`` when not batch-invariant.
        extra_bufts: let llama.cpp repack weights into its extra CPU buffer types
            (AMX, repacked quants). Off by default: on this project's machines the CPU
            advertises AMX but the sandbox does not grant it, and the first decode dies
            with SIGILL (measured with llama-cpp-python 0.3.36 built natively).
        verbose: let llama.cpp's own log reach stderr.
    """

    n_threads: int = attrs.field(factory=_default_threads, converter=int, validator=_positive)
    n_ctx: int = attrs.field(default=1024, converter=int, validator=_positive)
    kv_size: int | None = attrs.field(
        default=None, converter=attrs.converters.optional(int), validator=_positive
    )
    n_seq_max: int = attrs.field(default=16, converter=int, validator=_positive)
    kv_layout: str = attrs.field(
        default="auto", validator=attrs.validators.in_(("auto", "per_sequence", "unified"))
    )
    n_gpu_layers: int = attrs.field(default=0, converter=int)
    flash_attn: str = attrs.field(default="auto", converter=_flash)
    batch_invariant: bool = attrs.field(default=True, converter=_to_bool)
    invariant_batch: int = attrs.field(default=63, converter=int, validator=_positive)
    n_batch: int = attrs.field(default=512, converter=int, validator=_positive)
    extra_bufts: bool = attrs.field(default=False, converter=_to_bool)
    verbose: bool = attrs.field(default=False, converter=_to_bool)

    @property
    def unified(self) -> bool:
        """Whether all handles share one KV pool (see ``kv_layout``)."""
        if self.kv_layout == "auto":
            return not self.batch_invariant
        return self.kv_layout == "unified"

    @property
    def kv_cells(self) -> int:
        """KV cells to allocate for all sequences together."""
        if not self.unified:
            return self.n_ctx * self.n_seq_max
        return self.kv_size if self.kv_size is not None else self.n_ctx + 64 * self.n_seq_max

    @property
    def decode_chunk(self) -> int:
        """The most tokens one ``llama_decode`` call may carry under these options."""
        if not self.batch_invariant:
            return self.n_batch
        return 1 if self.flash_attn == "off" else min(self.invariant_batch, self.n_batch)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any], *, strict: bool = False) -> LlamaOptions:
        """Build options from a dict (CLI options, spec options).

        Args:
            options: option names (or the aliases ``threads``, ``context_size``,
                ``gpu_layers``) mapped to values; ``None`` values are skipped.
            strict: raise on unknown names instead of ignoring them.

        Returns:
            The validated options.

        Raises:
            ConfigError: a value is invalid, or (``strict``) a name is unknown.
        """
        known = {a.name for a in attrs.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in options.items():
            name = _ALIASES.get(key, key)
            if value is None:
                continue
            if name in known:
                kwargs[name] = value
            elif strict:
                raise ConfigError(
                    f"unknown llama_cpp option {key!r}; known: {', '.join(sorted(known))}"
                )
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"llama_cpp options {kwargs}: {exc}") from None
