"""Engine options of the llama.cpp backend, validated once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs

from ssd_core import ConfigError

from .._specs import flag

__all__ = ["FLASH_ATTN", "MAX_CELLS", "MAX_SEQUENCES", "LlamaOptions", "pad_cells"]

#: ``flash_attn`` values and llama.cpp's ``flash_attn_type`` for them.
FLASH_ATTN = {"auto": -1, "on": 1, "off": 0}

#: llama.cpp's context size (``llama_context_params.n_ctx``) is a uint32.
MAX_CELLS = 2**32 - 1
#: llama.cpp positions are int32: no sequence may hold more tokens than this.
MAX_POSITIONS = 2**31 - 1
#: llama.cpp's ``LLAMA_MAX_SEQ`` (``llama_max_parallel_sequences()``).
MAX_SEQUENCES = 256
#: llama.cpp rounds every KV stream up to a multiple of this many cells.
CELL_PAD = 256


def pad_cells(cells: int) -> int:
    """``cells`` rounded up the way llama.cpp pads a KV stream."""
    return -(-cells // CELL_PAD) * CELL_PAD


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
        n_seq_max: the most handles open at once (llama.cpp sequence ids; at most 256).
        n_seq: sequence slots allocated at load. ``None`` (default): 1 in the
            per_sequence layout, where every slot costs ``n_ctx`` KV cells, and
            ``n_seq_max`` in the unified layout, where slots share one pool and cost
            nothing. A per_sequence model grows its slots (doubling, up to
            ``n_seq_max``) when a handle needs one: it builds a larger llama.cpp
            context and copies every open sequence's KV state into it, bit for bit.
            Pass the batch size you will use to skip the growth steps.
        n_gpu_layers: layers offloaded to a GPU (llama-cpp-python built with CUDA/Metal).
        flash_attn: ``"auto"``, ``"on"`` or ``"off"``.
        batch_invariant: split every decode so each row's logits equal a one-token
            decode's, bit for bit (greedy AR, SD and SSD then agree).
        invariant_batch: the most tokens per ``llama_decode`` in batch-invariant mode
            with flash attention auto/on (measured: <= 63); with flash attention off
            the backend decodes one token at a time.
        n_batch: the most tokens per ``llama_decode`` when not batch-invariant.
        prefill_batch: the most tokens per ``llama_decode`` when ``open`` prefills a
            prompt. ``None`` (default): ``n_batch`` with ``flash_attn="off"`` (the prompt
            is decoded in one batch, as llama-cpp-python's ``Llama`` does, which gives its
            greedy tokens: measured 11 of 11 bundled prompts, docs/llama_cpp.md), else
            the decode chunk. A prompt prefilled in a larger batch holds KV values that
            differ in the last bits from the same tokens appended by ``extend``; every
            mode opens a prompt the same way, so greedy AR, SD and SSD still agree.
        allow_special: let ``tokenizer.encode`` and chat-message contents turn the
            text of special tokens (``<|im_start|>``) into their ids. Off by default:
            user text is never parsed for control tokens, so it cannot forge a chat
            turn (the chat template's own control tokens are always parsed).
        extra_bufts: let llama.cpp repack weights into its extra CPU buffer types
            (AMX tiles, repacked quants); llama-cpp-python's default is on. Off by
            default here: a build with AMX compiled in (``AMX_INT8 = 1`` in
            ``llama_cpp.llama_print_system_info()``), run on a virtual machine whose
            CPU flags show ``amx_tile``/``amx_int8`` but whose guest does not really
            enable the tile state, dies with SIGILL at the first decode (seen on an
            earlier machine of this project, see docs/llama_cpp.md). Where the CPU
            has no AMX the setting changes neither the greedy tokens nor (measurably)
            the speed of SmolLM2 Q4_1.
        verbose: let llama.cpp's own log reach stderr (otherwise it is dropped; the
            last warnings are kept and quoted in error messages).
    """

    n_threads: int = attrs.field(factory=_default_threads, converter=int, validator=_positive)
    n_ctx: int = attrs.field(default=1024, converter=int, validator=_positive)
    kv_size: int | None = attrs.field(
        default=None, converter=attrs.converters.optional(int), validator=_positive
    )
    n_seq_max: int = attrs.field(default=16, converter=int, validator=_positive)
    n_seq: int | None = attrs.field(
        default=None, converter=attrs.converters.optional(int), validator=_positive
    )
    kv_layout: str = attrs.field(
        default="auto", validator=attrs.validators.in_(("auto", "per_sequence", "unified"))
    )
    n_gpu_layers: int = attrs.field(default=0, converter=int)
    flash_attn: str = attrs.field(default="auto", converter=_flash)
    batch_invariant: bool = attrs.field(default=True, converter=_to_bool)
    invariant_batch: int = attrs.field(default=63, converter=int, validator=_positive)
    n_batch: int = attrs.field(default=512, converter=int, validator=_positive)
    prefill_batch: int | None = attrs.field(
        default=None, converter=attrs.converters.optional(int), validator=_positive
    )
    allow_special: bool = attrs.field(default=False, converter=_to_bool)
    extra_bufts: bool = attrs.field(default=False, converter=_to_bool)
    verbose: bool = attrs.field(default=False, converter=_to_bool)

    def __attrs_post_init__(self) -> None:
        # Every size llama.cpp stores in 32 bits, computed here in Python ints, so an
        # overflow is refused before anything is allocated.
        if self.n_seq_max > MAX_SEQUENCES:
            raise ConfigError(
                f"llama_cpp option n_seq_max={self.n_seq_max} exceeds llama.cpp's limit of "
                f"{MAX_SEQUENCES} sequences; lower n_seq_max"
            )
        if self.n_seq is not None and self.n_seq > self.n_seq_max:
            raise ConfigError(
                f"llama_cpp option n_seq={self.n_seq} exceeds n_seq_max={self.n_seq_max}"
            )
        if self.n_ctx > MAX_POSITIONS:
            raise ConfigError(
                f"llama_cpp option n_ctx={self.n_ctx} exceeds llama.cpp's 32-bit positions "
                f"({MAX_POSITIONS}); lower n_ctx"
            )
        if self.max_kv_cells > MAX_CELLS:
            what = (
                f"kv_size={self.kv_size}"
                if self.unified and self.kv_size is not None
                else f"n_ctx={self.n_ctx} x n_seq_max={self.n_seq_max}"
                if not self.unified
                else f"n_ctx={self.n_ctx} + 64 x n_seq_max={self.n_seq_max}"
            )
            raise ConfigError(
                f"llama_cpp: {what} needs {self.max_kv_cells:,} KV cells, more than "
                f"llama.cpp's 32-bit context size allows ({MAX_CELLS:,}); lower n_ctx "
                f"or n_seq_max" + (" or kv_size" if self.unified else "")
            )

    @property
    def unified(self) -> bool:
        """Whether all handles share one KV pool (see ``kv_layout``)."""
        if self.kv_layout == "auto":
            return not self.batch_invariant
        return self.kv_layout == "unified"

    @property
    def initial_slots(self) -> int:
        """Sequence slots allocated at load (see ``n_seq``)."""
        if self.n_seq is not None:
            return self.n_seq
        return self.n_seq_max if self.unified else 1

    def kv_cells_for(self, slots: int) -> int:
        """KV cells a context with ``slots`` sequence slots holds (llama.cpp's padding
        included), as a Python int."""
        if not self.unified:
            return pad_cells(self.n_ctx) * slots
        return pad_cells(
            self.kv_size if self.kv_size is not None else self.n_ctx + 64 * self.n_seq_max
        )

    @property
    def kv_cells(self) -> int:
        """KV cells allocated at load."""
        return self.kv_cells_for(self.initial_slots)

    @property
    def max_kv_cells(self) -> int:
        """KV cells once every one of ``n_seq_max`` slots exists."""
        return self.kv_cells_for(self.n_seq_max)

    @property
    def decode_chunk(self) -> int:
        """The most tokens one ``llama_decode`` call may carry under these options."""
        if not self.batch_invariant:
            return self.n_batch
        return 1 if self.flash_attn == "off" else min(self.invariant_batch, self.n_batch)

    @property
    def prefill_chunk(self) -> int:
        """The most tokens one ``llama_decode`` call of ``open`` may carry."""
        if self.prefill_batch is not None:
            return self.prefill_batch
        return self.n_batch if self.flash_attn == "off" else self.decode_chunk

    @property
    def ubatch(self) -> int:
        """llama.cpp's ``n_batch``/``n_ubatch``: the largest decode this model sends
        (the compute buffers, logits rows included, are sized for it)."""
        return max(self.decode_chunk, self.prefill_chunk)

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
