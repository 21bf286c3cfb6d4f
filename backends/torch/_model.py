"""TorchModel: the Model protocol over a PyTorch network, with a paged KV pool.

Theory of operation. Each handle holds its tokens (in a :class:`HandleTable`) and a
*block table* into the model's :class:`~backends.torch._pool.KVPool` covering a prefix
of them, ``computed <= len(tokens)``. ``open`` only records the tokens (lazy prefill:
the prompt is computed together with the first extend, and only the rows asked for get
logits). ``extend`` writes the uncomputed tail plus the new tokens into the pool in
place and returns logits for the new tokens only. ``fork`` shares the parent's blocks
(reference counts, no copy); ``truncate`` drops whole blocks past the new length; a
branch that writes inside a block it shares copies that block first (copy-on-write of
at most ``block_size - 1`` slots).

Batching: the requests of one extend run as one packed forward pass (``"auto"``), one
row holding every token, with a mask built on the device from the block tables -- so
N tree branches attend to their common prefix where it lies, with no copy -- or as one
pass per request (``"loop"``). Long calls are split into passes of at most
``max_tokens_per_pass`` tokens (chunked prefill), which bounds the mask's size.

Devices: see :mod:`backends.torch._device` (private streams per device, one event per
result, pinned non-blocking uploads). Nothing here reads a device value back unless
``check_finite`` is on.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import torch

from ssd_core import BackendContractError, ConfigError, Handle, LatencyModel

from .._handles import HandleTable
from ._device import DeviceContext, Placement, hf_embeddings, parse_device, parse_dtype
from ._pool import KVPool, Stats
from ._runners import (
    Forward,
    HFRunner,
    LegacyModuleRunner,
    ModuleRunner,
    Runner,
    is_hf_causal_lm,
    pooled_plain,
)
from ._tokenizer import HFTokenizer, load_hf_tokenizer

__all__ = ["TorchModel"]

log = logging.getLogger(__name__)

#: ``"auto"`` and ``"packed"``: one packed pass per extend; ``"pad"``: the former name of
#: the same; ``"loop"``: one pass per request.
_BATCHING = ("auto", "packed", "pad", "loop")


def _dtype_keyword() -> str:
    """``dtype`` (transformers >= 4.56) or ``torch_dtype`` (older) for ``from_pretrained``."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


@contextlib.contextmanager
def _transformers_progress(show: bool | None) -> Iterator[None]:
    """Turn transformers' own progress bars on or off for a block (``None``: leave them).

    Its GGUF loader draws a plain ``tqdm`` bar that ignores transformers' switch, so
    that module's ``tqdm`` is swapped for a disabled one as well.
    """
    if show is None:
        yield
        return
    import functools
    import importlib

    from transformers.utils import logging as hf_logging

    # Any, not a module type: its ``tqdm`` (replaced below) is an import it does not
    # re-export, so mypy sees no such attribute
    gguf_utils: Any
    try:
        gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:  # pragma: no cover - a transformers without GGUF support
        gguf_utils = None
    was_enabled = hf_logging.is_progress_bar_enabled()
    gguf_bar = getattr(gguf_utils, "tqdm", None)
    # transformers leaves enable/disable_progress_bar unannotated
    (hf_logging.enable_progress_bar if show else hf_logging.disable_progress_bar)()  # type: ignore[no-untyped-call]
    if gguf_bar is not None and not show:
        gguf_utils.tqdm = functools.partial(gguf_bar, disable=True)
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()  # type: ignore[no-untyped-call]
        if gguf_bar is not None:
            gguf_utils.tqdm = gguf_bar


@attrs.define
class _Seq:
    table: list[int]
    computed: int


def _prune_layers(module: Any, keep: int) -> None:
    """Keep the first ``keep`` decoder layers of a Llama-style HF model, in place."""
    base = getattr(module, "model", None)
    layers = getattr(base, "layers", None)
    if base is None or layers is None or not 1 <= keep <= len(layers):
        n = "no" if layers is None else len(layers)
        raise ConfigError(
            f"torch backend: cannot keep {keep} layers of a model with {n} decoder layers"
        )
    base.layers = layers[:keep]
    config = module.config
    config.num_hidden_layers = keep
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:keep]


def _check_hf_attention(module: Any) -> int | None:
    """Refuse HF configurations the packed mask cannot express; returns a context cap.

    The mask reaches attention as a prepared 4-D tensor, which ``eager`` and ``sdpa``
    honour; flash-attention and flex kernels do not take an arbitrary mask.

    A sliding window is honoured by capping the context at the window (attention within
    the window is full attention); other non-full layer types are refused.
    """
    config = (
        module.config.get_text_config()
        if hasattr(module.config, "get_text_config")
        else module.config
    )
    kinds = set(getattr(config, "layer_types", None) or ())
    if kinds - {"full_attention", "sliding_attention"}:
        raise ConfigError(
            f"torch backend: layer types {sorted(kinds)} are not supported "
            "(full and sliding-window attention only)"
        )
    impl = getattr(module.config, "_attn_implementation", None)
    if impl not in (None, "eager", "sdpa", "ssd_pool_sdpa"):
        raise ConfigError(
            f"torch backend: attention implementation {impl!r} cannot take the KV pool's "
            "tree mask; load the model with attn_implementation='sdpa' (or 'eager')"
        )
    window = getattr(config, "sliding_window", None)
    uses = getattr(config, "use_sliding_window", True) and (
        "sliding_attention" in kinds or not kinds
    )
    return int(window) if window and uses else None


def load_pretrained(
    path: str,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype | None = "float32",
    device_map: Any = None,
    load_tokenizer: bool = True,
    tokenizer: str | None = None,
    keep_layers: int | None = None,
    progress_bars: bool | None = None,
) -> tuple[Any, HFTokenizer | None, str]:
    """Load a local transformers model folder or GGUF file and its tokenizer (never the
    hub), logging each slow step at INFO level; what :meth:`TorchModel.from_pretrained`
    wraps, and what ``ssd export-onnx`` reads its source with.

    Args: as :meth:`TorchModel.from_pretrained`.

    Returns:
        ``(the transformers model in eval mode on the CPU (or spread by device_map),
        its tokenizer or None, a name for it)``.

    Raises:
        ConfigError: the path does not exist, transformers cannot load it, or the
            ``tokenizer`` given cannot be read.
    """
    import time

    from transformers import AutoModelForCausalLM

    from ._gguf import fast_gguf

    if os.path.isfile(path) and path.endswith(".gguf") and gguf_file is None:
        path, gguf_file = os.path.split(os.path.abspath(path))
    where = path if gguf_file is None else os.path.join(path, gguf_file)
    if not os.path.exists(where):
        raise ConfigError(f"torch backend: no model at {path!r} (gguf_file={gguf_file!r})")
    extra: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    if dtype is not None:
        extra[_dtype_keyword()] = parse_dtype(dtype)
    if device_map is not None:
        extra["device_map"] = device_map
    t0 = time.perf_counter()
    with fast_gguf(), _transformers_progress(progress_bars):
        log.info("torch backend: loading %s (%s)", where, "GGUF" if gguf_file else "folder")
        try:
            # typed as the torch module it is: transformers leaves PreTrainedModel.eval
            # unannotated
            module: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, **extra
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"torch backend: cannot load {path!r}: {exc}") from exc
        log.info(
            "torch backend: weights of %s read%s in %.1f s (%s)",
            os.path.basename(where),
            " and dequantised" if gguf_file else "",
            time.perf_counter() - t0,
            str(next(module.parameters()).dtype).replace("torch.", ""),
        )
        if keep_layers is not None:
            _prune_layers(module, keep_layers)
        tok = None
        t1 = time.perf_counter()
        if tokenizer is not None:
            tok = load_hf_tokenizer(tokenizer, owner="torch backend")
        elif load_tokenizer:
            try:
                tok = load_hf_tokenizer(where, owner="torch backend")
            except ConfigError as exc:
                log.warning("%s", exc)
        if tok is not None:
            log.info("torch backend: tokenizer read in %.1f s", time.perf_counter() - t1)
    module.eval()
    return module, tok, os.path.basename(gguf_file or path.rstrip("/"))


class TorchModel:
    """A PyTorch causal LM (Hugging Face or plain module) as an :class:`ssd_core.Model`.

    Build one with :meth:`from_pretrained` or :meth:`from_module`. Logits come back as
    float32 torch tensors on the device of the model's LM head, ordered for the caller
    (see :mod:`backends.torch._device`).

    Args:
        runner: the forward adapter (see :mod:`backends.torch._runners`).
        network: the wrapped module (kept for introspection).
        vocab_size: logits per row.
        context_size: most tokens per handle, or ``None``.
        device: the device of the LM head (a single-device model's device).
        placement: where the weights are, for a model spread over several devices
            (default: everything on ``device``).
        name: used in messages.
        tokenizer: a Tokenizer, or ``None``.
        batching: ``"auto"``/``"packed"`` (one pass per extend; ``"pad"`` is the former
            name) or ``"loop"`` (one pass per request).
        use_stream: run on private streams (default: on CUDA only).
        check_finite: reject NaN/+inf logits here with :class:`BackendContractError`
            (one device-to-host sync per call). Off by default: ``ssd_core`` checks
            every logits array it receives anyway; turn it on when using the model
            without the core.
        block_size: KV pool slots per block.
        kv_tokens: KV pool slots allocated up front per layer (it doubles when full).
        max_tokens_per_pass: split longer extends into several passes (bounds the
            attention mask at ``max_tokens_per_pass`` x pool span).
        timing: record a start/end event pair per call (``model.timings``).

    Attributes:
        stats: a :class:`~backends.torch._pool.Stats` of bytes moved (no syncs to read).

    Raises:
        ConfigError: an unknown batching policy, a bad vocabulary size or pool setting.
    """

    def __init__(
        self,
        runner: Runner,
        *,
        network: torch.nn.Module,
        vocab_size: int,
        context_size: int | None,
        device: torch.device,
        placement: Placement | None = None,
        name: str = "torch",
        tokenizer: Any = None,
        batching: str = "auto",
        use_stream: bool | None = None,
        check_finite: bool = False,
        block_size: int = 16,
        kv_tokens: int | None = None,
        max_tokens_per_pass: int = 512,
        timing: bool = False,
    ) -> None:
        if batching not in _BATCHING:
            raise ConfigError(
                f"torch backend: batching must be one of {_BATCHING}, got {batching!r}"
            )
        if vocab_size < 1:
            raise ConfigError(f"torch backend: vocab_size must be >= 1, got {vocab_size}")
        if int(block_size) < 1 or int(max_tokens_per_pass) < 1:
            raise ConfigError("torch backend: block_size and max_tokens_per_pass must be >= 1")
        if kv_tokens is not None and int(kv_tokens) < 1:
            raise ConfigError(f"torch backend: kv_tokens must be >= 1, got {kv_tokens}")
        self.name = name
        self.vocab_size = int(vocab_size)
        self.context_size = context_size
        self.tokenizer = tokenizer
        self.placement = placement or Placement.single(device)
        self.device = self.placement.output
        self.network = network
        self.batching = batching
        self.check_finite = check_finite
        self.max_tokens_per_pass = int(max_tokens_per_pass)
        self._runner = runner
        self._ctx = DeviceContext(self.placement, use_stream, timing=timing)
        self._table = HandleTable(owner=name, vocab_size=self.vocab_size, context_size=context_size)
        self.stats = Stats()
        if kv_tokens is None:
            kv_tokens = min(context_size or 1024, 1024)
        self._pool = KVPool(
            block_size=int(block_size), initial_tokens=int(kv_tokens), stats=self.stats
        )
        self._seqs: dict[Handle, _Seq] = {}
        self._timing_tags: list[tuple[int, int, int]] = []
        #: Declared costs (seconds, estimated from the network's size and device; no
        #: timing, so runs stay reproducible per seed): what the core's speculation
        #: policy plans with (``SSDConfig(cost="declared")``).
        self.latency = declared_latency(network, self.device, torch.get_num_threads())

    # -- constructors -------------------------------------------------------------

    @classmethod
    def from_module(
        cls,
        module: torch.nn.Module,
        *,
        vocab_size: int | None = None,
        context_size: int | None = None,
        device: str | int | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        tokenizer: Any = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> TorchModel:
        """Wrap a Hugging Face causal LM or a plain module.

        Args:
            module: a transformers ``*ForCausalLM`` or a module with one of the plain
                signatures (:data:`backends.torch.PLAIN_FORWARD_DOC`).
            vocab_size: logits per row; default from the HF config/output layer or the
                module's ``vocab_size`` attribute.
            context_size: default ``config.max_position_embeddings`` or the module's
                ``context_size`` attribute, else unbounded.
            device: ``"cpu"``, ``"cuda:0"``, ...: the module is moved there (in place).
                ``None``: leave it where it is -- on one device, or spread over several
                (an accelerate ``device_map``, or placed by hand: inputs go to the
                embedding's device, logits come from the LM head's).
            dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``; default: keep.
            tokenizer: a transformers tokenizer or an :class:`ssd_core.Tokenizer`.
            name: for messages.
            **kwargs: ``batching``, ``use_stream``, ``check_finite``, ``block_size``,
                ``kv_tokens``, ``max_tokens_per_pass``, ``timing``.

        Returns:
            The model.

        Raises:
            ConfigError: bad device/dtype, an unsupported attention layout, or no way
                to learn the vocabulary size.
        """
        if device is not None:
            dev = parse_device(device)
            module.to(device=dev, dtype=parse_dtype(dtype) if dtype is not None else None)
            placement = Placement.single(dev)
        else:
            if dtype is not None:
                module.to(dtype=parse_dtype(dtype))
            placement = (
                Placement.of_module(module)
                if next(module.parameters(), None) is not None
                else Placement.single(torch.device("cpu"))
            )
        module.eval()
        if is_hf_causal_lm(module):
            config: Any = module.config
            window = _check_hf_attention(module)
            runner: Runner = HFRunner(module)
            out = hf_embeddings(module, "output")
            if vocab_size is None:
                vocab_size = (
                    getattr(out, "out_features", None) or config.get_text_config().vocab_size
                )
            if context_size is None:
                context_size = getattr(config.get_text_config(), "max_position_embeddings", None)
            if window is not None and (context_size is None or context_size > window):
                log.info("torch backend: context capped at the sliding window, %d", window)
                context_size = window
            name = name or str(getattr(config, "name_or_path", "") or type(module).__name__)
            gen = getattr(module, "generation_config", None)
            extra_eos = getattr(gen, "eos_token_id", None)
            extra = [extra_eos] if isinstance(extra_eos, int) else list(extra_eos or ())
        else:
            runner = ModuleRunner(module) if pooled_plain(module) else LegacyModuleRunner(module)
            vocab_size = (
                vocab_size if vocab_size is not None else getattr(module, "vocab_size", None)
            )
            if context_size is None:
                context_size = getattr(module, "context_size", None)
            name = name or type(module).__name__
            extra = []
        if vocab_size is None:
            raise ConfigError("torch backend: pass vocab_size= for a module without one")
        if tokenizer is not None and hasattr(
            tokenizer, "convert_ids_to_tokens"
        ):  # a transformers tokenizer
            tokenizer = HFTokenizer(tokenizer, extra)
        elif isinstance(tokenizer, HFTokenizer) and set(extra) - set(tokenizer.eos_token_ids):
            # the model's generation_config may name more end ids than the tokenizer
            tokenizer = HFTokenizer(tokenizer.hf, [*tokenizer.eos_token_ids, *extra])
        return cls(
            runner,
            network=module,
            vocab_size=int(vocab_size),
            context_size=context_size,
            device=placement.output,
            placement=placement,
            name=name,
            tokenizer=tokenizer,
            **kwargs,
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        gguf_file: str | None = None,
        device: str | int | torch.device | None = "cpu",
        dtype: str | torch.dtype | None = "float32",
        device_map: Any = None,
        load_tokenizer: bool = True,
        tokenizer: str | None = None,
        keep_layers: int | None = None,
        progress_bars: bool | None = None,
        **kwargs: Any,
    ) -> TorchModel:
        """Load a local transformers model directory or GGUF file (never the hub).

        Each slow step is logged at INFO level on ``backends.torch`` (``ssd -v`` shows
        them): the config, the tokenizer, the weights (read, dequantised for a GGUF,
        converted to ``dtype`` once). A GGUF file is parsed once, not once per step
        (:mod:`backends.torch._gguf`).

        Args:
            path: a model directory, or a ``.gguf`` file (then ``gguf_file`` is implied).
            gguf_file: a GGUF file name inside the directory ``path``.
            device: where to put the weights (ignored with ``device_map``).
            dtype: weight and compute dtype, handed to transformers so the weights are
                converted once as they are read (GGUF weights right after dequantising).
            device_map: spread the model over several devices with accelerate
                (``"auto"``, ``"balanced"``, or a dict module name -> device).
            load_tokenizer: also load the tokenizer from the same files; when there is
                none a warning names the cause and the model takes token ids.
            tokenizer: read the tokenizer from this folder or GGUF file instead (an
                error if it cannot be read).
            keep_layers: keep only the first ``keep_layers`` decoder layers (a cheap,
                poor draft made from the target itself; Llama-style models only).
            progress_bars: show transformers' own progress bars (``None``: leave
                transformers' setting as it is).
            **kwargs: passed to :meth:`from_module`.

        Returns:
            The model.

        Raises:
            ConfigError: the path does not exist, transformers cannot load it, or the
                ``tokenizer`` given cannot be read.
        """
        module, tok, name = load_pretrained(
            path,
            gguf_file=gguf_file,
            dtype=dtype,
            device_map=device_map,
            load_tokenizer=load_tokenizer,
            tokenizer=tokenizer,
            keep_layers=keep_layers,
            progress_bars=progress_bars,
        )
        kwargs.setdefault("name", name)
        if device_map is not None:
            return cls.from_module(module, device=None, dtype=None, tokenizer=tok, **kwargs)
        return cls.from_module(module, device=device, dtype=dtype, tokenizer=tok, **kwargs)

    # -- the Model protocol ---------------------------------------------------------

    def open(self, tokens: Sequence[int]) -> Handle:
        """Make a handle holding ``tokens`` (computed lazily at the first extend)."""
        handle = self._table.open(tokens)
        self._seqs[handle] = _Seq(table=[], computed=0)
        return handle

    def extend(self, requests: Sequence[tuple[Handle, Sequence[int]]]) -> torch.Tensor:
        """Append tokens to handles and return float32 logits for every appended token.

        Raises:
            HandleError, InputError, CapacityError: before any compute.
            BackendContractError: the network returned a wrong shape or NaN/+inf logits.
        """
        news = self._table.check_extend(requests)
        if not news:
            return torch.empty((0, self.vocab_size), dtype=torch.float32, device=self.device)
        self.stats.calls += 1
        rows = []  # (seq, tokens to run, how many of them are new)
        for (handle, _), new in zip(requests, news, strict=True):
            seq = self._seqs[handle]
            rows.append((seq, self._table.tokens(handle)[seq.computed :] + new, len(new)))
        groups = (
            [list(range(len(rows)))] if self.batching != "loop" else [[r] for r in range(len(rows))]
        )
        passes: list[tuple[Forward, Any, list[int]]] = []
        tables: list[list[int]] = [list(seq.table) for seq, _, _ in rows]
        try:
            # planning is host bookkeeping, but growing the pool copies the arenas: it
            # must be queued on the model's streams like the rest
            with self._ctx():
                overlay: dict[int, int] = {}
                for group in groups:
                    overlay = self._plan(rows, group, tables, overlay, passes)
                pieces = []
                for fw, plan, idx in passes:
                    self._pool.run_cow(plan)
                    out = self._runner.forward(fw)
                    if out.dim() != 2 or tuple(out.shape) != (fw.n_logits, self.vocab_size):
                        raise BackendContractError(
                            f"{self.name}: network returned logits of shape "
                            f"{tuple(out.shape)}, expected ({fw.n_logits}, {self.vocab_size})"
                        )
                    self.stats.forwards += 1
                    self.stats.tokens += sum(len(t) for t in fw.tokens)
                    pieces.append((fw, out, idx))
                logits = self._assemble(pieces, len(rows))
                if logits.dtype != torch.float32:
                    logits = logits.float()
                self._check(logits, sum(n for _, _, n in rows))
        except BaseException:
            for _, plan, _ in reversed(passes):
                self._pool.abort(plan)
            raise
        for _, plan, _ in passes:
            self._pool.commit(plan)
        for (seq, toks, _), table in zip(rows, tables, strict=True):
            seq.table = table
            seq.computed += len(toks)
        for (handle, _), new in zip(requests, news, strict=True):
            self._table.tokens(handle).extend(new)
        self.stats.logit_rows += logits.shape[0]
        self.stats.logits_bytes += logits.numel() * logits.element_size()
        if self._ctx.timing:
            self._timing_tags.append((len(rows), sum(len(t) for _, t, _ in rows), len(logits)))
        return self._ctx.hand_over(logits)

    def fork(self, handle: Handle, length: int) -> Handle:
        """A new handle holding the first ``length`` tokens of ``handle`` (shares its KV
        blocks; nothing is copied)."""
        child = self._table.fork(handle, length)
        parent = self._seqs[handle]
        done = min(parent.computed, length)
        self._seqs[child] = _Seq(table=self._pool.fork_table(parent.table, done), computed=done)
        return child

    def truncate(self, handle: Handle, length: int) -> None:
        """Keep the first ``length`` tokens of ``handle`` (drops whole blocks past it)."""
        self._table.truncate(handle, length)
        seq = self._seqs[handle]
        if seq.computed > length:
            seq.computed = length
            self._pool.truncate_table(seq.table, length)

    def close(self, handle: Handle) -> None:
        """Free ``handle`` and its share of the KV pool."""
        self._table.close(handle)
        self._pool.release(self._seqs.pop(handle).table)

    # -- internals -------------------------------------------------------------------

    def _plan(
        self,
        rows: list[tuple[_Seq, list[int], int]],
        group: list[int],
        tables: list[list[int]],
        overlay: dict[int, int],
        passes: list[tuple[Forward, Any, list[int]]],
    ) -> dict[int, int]:
        """Plan the passes for ``rows[group]`` (at most ``max_tokens_per_pass`` tokens
        each, every row's tokens in order), appending to ``passes``; updates ``tables``."""
        done = dict.fromkeys(group, 0)
        while True:
            budget = self.max_tokens_per_pass
            take = {}
            for r in group:
                n = min(len(rows[r][1]) - done[r], budget)
                if n > 0:
                    take[r] = n
                    budget -= n
            if not take:
                return overlay
            idx = list(take)
            plan = self._pool.plan(
                [(tables[r], rows[r][0].computed + done[r], take[r]) for r in idx], overlay
            )
            overlay = plan.filled
            keep = []
            for r in idx:
                first_new = len(rows[r][1]) - rows[r][2]
                keep.append(max(0, done[r] + take[r] - max(done[r], first_new)))
            fw = Forward(
                pool=self._pool,
                tokens=[rows[r][1][done[r] : done[r] + take[r]] for r in idx],
                starts=[rows[r][0].computed + done[r] for r in idx],
                keep=keep,
                tables=plan.tables,
                slots=plan.slots,
                device=self.placement.input,
                stats=self.stats,
            )
            for j, r in enumerate(idx):
                tables[r] = plan.tables[j]
                done[r] += take[r]
            passes.append((fw, plan, idx))

    @staticmethod
    def _assemble(
        pieces: list[tuple[Forward, torch.Tensor, list[int]]], n_rows: int
    ) -> torch.Tensor:
        """The logits rows in request order (one pass: already in order)."""
        useful = [(fw, out, idx) for fw, out, idx in pieces if fw.n_logits]
        if len(useful) == 1 and useful[0][2] == list(range(n_rows)):
            return useful[0][1]
        parts: list[list[torch.Tensor]] = [[] for _ in range(n_rows)]
        for fw, out, idx in useful:
            at = 0
            for r, k in zip(idx, fw.keep, strict=True):
                if k:
                    parts[r].append(out[at : at + k])
                at += k
        return torch.cat([p for row in parts for p in row])

    def _check(self, logits: torch.Tensor, n_rows: int) -> None:
        if tuple(logits.shape) != (n_rows, self.vocab_size):
            raise BackendContractError(
                f"{self.name}: logits of shape {tuple(logits.shape)}, expected ({n_rows}, {self.vocab_size})"
            )
        if self.check_finite and bool(torch.any(torch.isnan(logits) | torch.isposinf(logits))):
            raise BackendContractError(f"{self.name}: network returned NaN or +inf logits")

    # -- introspection --------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # ``apply_chat_template`` exists only when the tokenizer has a chat template, so
        # callers can test for it with getattr(model, "apply_chat_template", None).
        if name == "apply_chat_template":
            tok = self.__dict__.get("tokenizer")
            if tok is not None and getattr(tok, "has_chat_template", False):
                return tok.apply_chat_template
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def open_handles(self) -> int:
        """How many handles are open."""
        return len(self._table)

    @property
    def pool(self) -> KVPool:
        """The KV pool (introspection: capacity, blocks in use, reference counts)."""
        return self._pool

    @property
    def last_event(self) -> Any:
        """The event recorded with the latest logits (``None`` without private streams)."""
        return self._ctx.last_event

    def call_timings(self, reference: Any = None) -> list[dict[str, float]]:
        """One record per ``extend`` since the last :meth:`clear_timings`, when built with
        ``timing=True``: ``requests``, ``tokens`` (run through the network), ``rows``
        (logits returned), ``ms``, and with ``reference`` (a CUDA event recorded earlier
        on the same device, or a ``time.perf_counter()`` value on CPU) ``start_ms`` and
        ``end_ms`` from it. Reading CUDA events waits for them: call this at the end.
        """
        out = []
        for (start, end), (requests, tokens, rows) in zip(
            self._ctx.timings, self._timing_tags, strict=True
        ):
            rec: dict[str, float] = {"requests": requests, "tokens": tokens, "rows": rows}
            if isinstance(start, float):
                rec["ms"] = 1e3 * (end - start)
                if reference is not None:
                    rec["start_ms"], rec["end_ms"] = (
                        1e3 * (start - reference),
                        1e3 * (end - reference),
                    )
            else:
                end.synchronize()
                rec["ms"] = float(start.elapsed_time(end))
                if reference is not None:
                    rec["start_ms"] = float(reference.elapsed_time(start))
                    rec["end_ms"] = float(reference.elapsed_time(end))
            out.append(rec)
        return out

    def clear_timings(self) -> None:
        """Forget the recorded call timings."""
        self._ctx.timings.clear()
        self._timing_tags.clear()

    def tokens(self, handle: Handle) -> list[int]:
        """A copy of the tokens ``handle`` holds."""
        return list(self._table.tokens(handle))

    def computed(self, handle: Handle) -> int:
        """How many of the handle's tokens have their KV in the pool."""
        self._table.tokens(handle)
        return self._seqs[handle].computed

    def free(self) -> None:
        """Drop the KV pool's memory (handles stay valid only if none is used again)."""
        self._pool.free()

    def __repr__(self) -> str:
        return (
            f"TorchModel(name={self.name!r}, vocab_size={self.vocab_size}, "
            f"device={self.device}, batching={self.batching!r})"
        )


#: Bytes per second one pass streams its weights at, and flops per second per thread
#: (CPU) or per device (GPU), for :func:`declared_latency`.
_CPU_STREAM, _CPU_FLOPS = 1.0e10, 4.5e10
_GPU_STREAM, _GPU_FLOPS = 2.0e12, 2.0e14


def declared_latency(network: torch.nn.Module, device: torch.device, threads: int) -> LatencyModel:
    """What one call costs, estimated from the network's size (the same network and
    options always declare the same figures).

    A pass streams every weight once (``per_call`` = weight bytes / stream rate) and
    each row adds ``2 * n_params`` flops (``per_token``). On a CPU the rates are those
    measured for SmolLM2-135M fp32 on this project's 2-core machine: one row 51 ms
    (540 MB at ~10 GB/s), each further row ~6 ms (~45 Gflop/s per thread). On a GPU a
    decode pass is memory-bound: the weights at ~2 TB/s, rows nearly free.
    """
    params = {id(p): p for p in network.parameters()}.values()
    n = sum(p.numel() for p in params)
    size = sum(p.numel() * p.element_size() for p in params)
    if device.type == "cpu":
        call, row = size / _CPU_STREAM, 2.0 * n / (max(threads, 1) * _CPU_FLOPS)
    else:
        call, row = size / _GPU_STREAM, 2.0 * n / _GPU_FLOPS
    return LatencyModel(per_call=call, per_token=row, prefill_per_token=row)
