"""TorchModel: the Model protocol over a PyTorch network with per-handle KV state.

Theory of operation. Each handle holds its tokens (in a :class:`HandleTable`) and a KV
state covering a *prefix* of them, ``computed <= len(tokens)``. ``open`` only records
the tokens (lazy prefill: the prompt is computed together with the first extend, in one
forward pass). ``extend`` runs the uncomputed tail plus the new tokens and returns logits
for the new tokens only. ``fork`` and ``truncate`` slice the state (views: forks share
the parent's prefix until either grows, because growing always makes new tensors).

Batching: requests whose shapes agree run as one batch with no mask. Otherwise the
``batching`` policy decides: ``"pad"`` left-pads past states and right-pads new tokens
into one forward with an attention mask and explicit position ids; ``"loop"`` runs one
forward per request. ``"auto"`` (default) pads, see docs/torch.md for the measurement
behind it. Nothing is mutated until the forward pass has succeeded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from ssd_core import BackendContractError, ConfigError, Handle

from .._handles import HandleTable
from ._device import DeviceContext, parse_device, parse_dtype
from ._runners import KV, HFRunner, ModuleRunner, Runner, is_hf_causal_lm, slice_state, stack_past
from ._tokenizer import HFTokenizer

__all__ = ["TorchModel"]

log = logging.getLogger(__name__)

_BATCHING = ("auto", "pad", "loop")


@attrs.define
class _Row:
    handle: Handle
    state: KV | None
    computed: int
    inputs: list[int]  # uncomputed tail + new tokens
    n_new: int


def _length(state: KV | None) -> int:
    return 0 if not state else int(state[0][0].shape[-2])


def _crop(state: KV | None, length: int) -> KV | None:
    if state is None or length == 0:
        return None
    if _length(state) <= length:
        return state
    return tuple((k[..., :length, :], v[..., :length, :]) for k, v in state)


def _prune_layers(module: Any, keep: int) -> None:
    """Keep the first ``keep`` decoder layers of a Llama-style HF model, in place."""
    base = getattr(module, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or not 1 <= keep <= len(layers):
        n = "no" if layers is None else len(layers)
        raise ConfigError(f"torch backend: cannot keep {keep} layers of a model with {n} decoder layers")
    base.layers = layers[:keep]
    config = module.config
    config.num_hidden_layers = keep
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:keep]


class TorchModel:
    """A PyTorch causal LM (Hugging Face or plain module) as an :class:`ssd_core.Model`.

    Build one with :meth:`from_pretrained` or :meth:`from_module`. Logits come back as
    float32 torch tensors on the model's device.

    Args:
        runner: the forward adapter (see :mod:`backends.torch._runners`).
        network: the wrapped module (kept for introspection).
        vocab_size: logits per row.
        context_size: most tokens per handle, or ``None``.
        device: the device the network lives on.
        name: used in messages.
        tokenizer: a Tokenizer, or ``None``.
        batching: ``"auto"``, ``"pad"`` or ``"loop"`` (see the module docstring).
        use_stream: run on a private stream (default: on CUDA only).
        check_finite: reject NaN/+inf logits here with :class:`BackendContractError`
            (one device-to-host sync per call). Off by default: ``ssd_core`` checks
            every logits array it receives anyway; turn it on when using the model
            without the core.

    Raises:
        ConfigError: an unknown batching policy or a bad vocabulary size.
    """

    def __init__(
        self,
        runner: Runner,
        *,
        network: torch.nn.Module,
        vocab_size: int,
        context_size: int | None,
        device: torch.device,
        name: str = "torch",
        tokenizer: Any = None,
        batching: str = "auto",
        use_stream: bool | None = None,
        check_finite: bool = False,
    ) -> None:
        if batching not in _BATCHING:
            raise ConfigError(f"torch backend: batching must be one of {_BATCHING}, got {batching!r}")
        if vocab_size < 1:
            raise ConfigError(f"torch backend: vocab_size must be >= 1, got {vocab_size}")
        self.name = name
        self.vocab_size = int(vocab_size)
        self.context_size = context_size
        self.tokenizer = tokenizer
        self.device = device
        self.network = network
        self.batching = batching
        self.check_finite = check_finite
        self._runner = runner
        self._ctx = DeviceContext(device, use_stream)
        self._table = HandleTable(owner=name, vocab_size=self.vocab_size, context_size=context_size)
        self._kv: dict[Handle, KV | None] = {}

    # -- constructors -------------------------------------------------------------

    @classmethod
    def from_module(
        cls,
        module: torch.nn.Module,
        *,
        vocab_size: int | None = None,
        context_size: int | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        tokenizer: Any = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> TorchModel:
        """Wrap a Hugging Face causal LM or a plain module (moved to ``device``/``dtype`` in place).

        Args:
            module: a transformers ``*ForCausalLM`` or a module with the plain signature
                (:data:`backends.torch.PLAIN_FORWARD_DOC`).
            vocab_size: logits per row; default from the HF config/output layer or the
                module's ``vocab_size`` attribute.
            context_size: default ``config.max_position_embeddings`` or the module's
                ``context_size`` attribute, else unbounded.
            device: ``"cpu"``, ``"cuda:0"``, ...; default: where the module's weights are.
            dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``; default: keep.
            tokenizer: a transformers tokenizer or an :class:`ssd_core.Tokenizer`.
            name: for messages.
            **kwargs: ``batching``, ``use_stream``, ``check_finite``.

        Returns:
            The model.

        Raises:
            ConfigError: bad device/dtype, or no way to learn the vocabulary size.
        """
        first = next(module.parameters(), None)
        dev = parse_device(device) if device is not None else (
            first.device if first is not None else torch.device("cpu")
        )
        if dtype is not None:
            module.to(device=dev, dtype=parse_dtype(dtype))
        else:
            module.to(device=dev)
        module.eval()
        if is_hf_causal_lm(module):
            config: Any = module.config
            runner: Runner = HFRunner(module)
            out = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
            if vocab_size is None:
                vocab_size = getattr(out, "out_features", None) or config.get_text_config().vocab_size
            if context_size is None:
                context_size = getattr(config.get_text_config(), "max_position_embeddings", None)
            name = name or str(getattr(config, "name_or_path", "") or type(module).__name__)
            gen = getattr(module, "generation_config", None)
            extra_eos = getattr(gen, "eos_token_id", None)
            extra = [extra_eos] if isinstance(extra_eos, int) else list(extra_eos or ())
        else:
            runner = ModuleRunner(module)
            vocab_size = vocab_size if vocab_size is not None else getattr(module, "vocab_size", None)
            if context_size is None:
                context_size = getattr(module, "context_size", None)
            name = name or type(module).__name__
            extra = []
        if vocab_size is None:
            raise ConfigError("torch backend: pass vocab_size= for a module without one")
        if tokenizer is not None and hasattr(tokenizer, "convert_ids_to_tokens"):  # a transformers tokenizer
            tokenizer = HFTokenizer(tokenizer, extra)
        return cls(runner, network=module, vocab_size=int(vocab_size), context_size=context_size,
                   device=dev, name=name, tokenizer=tokenizer, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        gguf_file: str | None = None,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype | None = "float32",
        load_tokenizer: bool = True,
        keep_layers: int | None = None,
        **kwargs: Any,
    ) -> TorchModel:
        """Load a local transformers model directory or GGUF file (never the hub).

        Args:
            path: a model directory, or a ``.gguf`` file (then ``gguf_file`` is implied).
            gguf_file: a GGUF file name inside the directory ``path``.
            device: where to put the weights.
            dtype: weight and compute dtype (GGUF weights are dequantised first).
            load_tokenizer: also load the tokenizer from the same files.
            keep_layers: keep only the first ``keep_layers`` decoder layers (a cheap,
                poor draft made from the target itself; Llama-style models only).
            **kwargs: passed to :meth:`from_module`.

        Returns:
            The model.

        Raises:
            ConfigError: the path does not exist or transformers cannot load it.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if os.path.isfile(path) and path.endswith(".gguf") and gguf_file is None:
            path, gguf_file = os.path.split(os.path.abspath(path))
        if not os.path.exists(path if gguf_file is None else os.path.join(path, gguf_file)):
            raise ConfigError(f"torch backend: no model at {path!r} (gguf_file={gguf_file!r})")
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        try:
            module = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **extra)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"torch backend: cannot load {path!r}: {exc}") from exc
        if keep_layers is not None:
            _prune_layers(module, keep_layers)
        tokenizer = None
        if load_tokenizer:
            try:
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **extra)
            except (OSError, ValueError) as exc:
                log.warning("torch backend: no tokenizer for %s: %s", path, exc)
        kwargs.setdefault("name", os.path.basename(gguf_file or path.rstrip("/")))
        return cls.from_module(module, device=device, dtype=dtype, tokenizer=tokenizer, **kwargs)

    # -- the Model protocol ---------------------------------------------------------

    def open(self, tokens: Sequence[int]) -> Handle:
        """Make a handle holding ``tokens`` (computed lazily at the first extend)."""
        handle = self._table.open(tokens)
        self._kv[handle] = None
        return handle

    def extend(self, requests: Sequence[tuple[Handle, Sequence[int]]]) -> torch.Tensor:
        """Append tokens to handles and return float32 logits for every appended token.

        Raises:
            HandleError, InputError, CapacityError: before any compute.
            BackendContractError: the network returned a wrong shape or NaN/+inf logits.
        """
        news = self._table.check_extend(requests)
        rows = []
        for (handle, _), new in zip(requests, news, strict=False):
            toks = self._table.tokens(handle)
            state = self._kv[handle]
            done = _length(state)
            rows.append(_Row(handle=handle, state=state, computed=done,
                             inputs=toks[done:] + new, n_new=len(new)))
        if not rows:
            return torch.empty((0, self.vocab_size), dtype=torch.float32, device=self.device)
        with self._ctx():
            results = [self._run(group) for group in self._groups(rows)]
            logits = torch.cat([r[0] for r in results]) if len(results) > 1 else results[0][0]
            self._check(logits, sum(r.n_new for r in rows))
        states = [s for r in results for s in r[1]]
        for row, new, state in zip(rows, news, states, strict=False):
            self._table.tokens(row.handle).extend(new)
            self._kv[row.handle] = state
        return self._ctx.hand_over(logits)

    def fork(self, handle: Handle, length: int) -> Handle:
        """A new handle holding the first ``length`` tokens of ``handle`` (shares its KV prefix)."""
        child = self._table.fork(handle, length)
        self._kv[child] = _crop(self._kv[handle], length)
        return child

    def truncate(self, handle: Handle, length: int) -> None:
        """Keep the first ``length`` tokens of ``handle``."""
        self._table.truncate(handle, length)
        self._kv[handle] = _crop(self._kv[handle], length)

    def close(self, handle: Handle) -> None:
        """Free ``handle`` and its KV state."""
        self._table.close(handle)
        del self._kv[handle]

    # -- internals -------------------------------------------------------------------

    def _groups(self, rows: list[_Row]) -> list[list[_Row]]:
        uniform = len({(r.computed, len(r.inputs)) for r in rows}) == 1
        if uniform or self.batching in ("auto", "pad"):
            return [rows]
        return [[r] for r in rows]

    def _run(self, rows: list[_Row]) -> tuple[torch.Tensor, list[KV]]:
        dev = self.device
        width_p = max(r.computed for r in rows)
        width_t = max(len(r.inputs) for r in rows)
        padded = any(r.computed != width_p or len(r.inputs) != width_t for r in rows)
        ids, pos, mask = [], [], []
        for r in rows:
            m = len(r.inputs)
            ids.append(r.inputs + [0] * (width_t - m))
            pos.append([r.computed + j for j in range(m)] + [r.computed + m - 1] * (width_t - m))
            if padded:
                mask.append([False] * (width_p - r.computed) + [True] * (r.computed + m)
                            + [False] * (width_t - m))
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        positions = torch.tensor(pos, dtype=torch.long, device=dev)
        attn = torch.tensor(mask, dtype=torch.bool, device=dev) if padded else None
        past = rows[0].state if len(rows) == 1 else stack_past([r.state for r in rows], width_p)
        keep = width_t - min(len(r.inputs) - r.n_new for r in rows)
        out, new_past = self._runner.forward(input_ids, positions, past, attn, keep)
        if out.dim() != 3 or out.shape[0] != len(rows) or out.shape[-1] != self.vocab_size:
            raise BackendContractError(
                f"{self.name}: network returned logits of shape {tuple(out.shape)}, expected "
                f"[{len(rows)}, <= {width_t}, {self.vocab_size}]"
            )
        kept = out.shape[1]
        offset = width_t - kept
        if len(rows) == 1:
            r = rows[0]
            start = len(r.inputs) - r.n_new - offset
            logits = out[0, start : start + r.n_new]
        else:
            index = [b * kept + j - offset
                     for b, r in enumerate(rows)
                     for j in range(len(r.inputs) - r.n_new, len(r.inputs))]
            flat = out.reshape(len(rows) * kept, self.vocab_size)
            logits = flat.index_select(0, torch.tensor(index, dtype=torch.long, device=dev))
        states = [slice_state(new_past, b, width_p - r.computed, width_p + len(r.inputs))
                  for b, r in enumerate(rows)]
        return logits.float(), states

    def _check(self, logits: torch.Tensor, n_rows: int) -> None:
        if logits.shape != (n_rows, self.vocab_size):
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

    def tokens(self, handle: Handle) -> list[int]:
        """A copy of the tokens ``handle`` holds."""
        return list(self._table.tokens(handle))

    def __repr__(self) -> str:
        return (f"TorchModel(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"device={self.device}, batching={self.batching!r})")
