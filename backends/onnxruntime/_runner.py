"""Running a session: plain ``session.run`` or one reused IOBinding.

:class:`PlainRunner` hands numpy feeds to ``session.run`` and gets fresh numpy outputs:
the fast path on the CPU provider. :class:`BoundRunner` keeps *one* IOBinding for the
model's life, binds every input and output to the data pointer of a buffer the model
owns (:mod:`backends.onnxruntime._buffers`: torch tensors on the device, or numpy on
the host), rebinds an input only when its buffer or shape changed, and lets onnxruntime
write the logits and the new KV cache straight into buffers on the device -- nothing is
copied to the host. The code path is the same on every device, so it is tested on the
CPU (``device="cpu"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._buffers import ONNX_TYPES, Buffers, NumpyBuffers

__all__ = ["BoundRunner", "Feed", "Output", "PlainRunner", "Runner"]

#: ``(input name, buffer, ONNX type name)``.
Feed = tuple[str, Any, str]
#: ``(output name, shape, ONNX type name)``.
Output = tuple[str, tuple[int, ...], str]


class PlainRunner:
    """``session.run(output_names, feeds)`` with numpy arrays."""

    io_binding = False

    def __init__(self, session: Any) -> None:
        self._session = session
        self.buffers: Buffers = NumpyBuffers()
        self.device_type, self.device_id = "cpu", 0

    def __call__(self, feeds: Sequence[Feed], outputs: Sequence[Output]) -> list[Any]:
        """Run the graph; returns the outputs (numpy arrays) in ``outputs`` order."""
        result = self._session.run([o[0] for o in outputs], {n: a for n, a, _ in feeds})
        for a in result:
            a.setflags(write=False)  # handles share them: never written in place
        return list(result)


class BoundRunner:
    """Run through one reused IOBinding, inputs and outputs bound to model buffers.

    Args:
        session: the inference session.
        buffers: where outputs are allocated (their device is the binding's device).
        run_options: an ``onnxruntime.RunOptions`` (e.g. without the provider's
            end-of-run synchronisation when it runs on the caller's stream).
        sync_before_run: wait for the buffers' device before each run (on CUDA when
            onnxruntime does not run on the torch stream that wrote the inputs).
    """

    io_binding = True

    def __init__(
        self,
        session: Any,
        buffers: Buffers,
        *,
        run_options: Any = None,
        sync_before_run: bool = False,
    ) -> None:
        self._session = session
        self.buffers = buffers
        self.device_type, self.device_id = buffers.device_type, buffers.device_id
        self._binding = session.io_binding()
        self._bound: dict[str, tuple[int, tuple[int, ...]]] = {}
        self._run_options = run_options
        self._sync = sync_before_run
        self.rebinds = 0

    def __call__(self, feeds: Sequence[Feed], outputs: Sequence[Output]) -> list[Any]:
        """Run the graph; returns freshly allocated output buffers in ``outputs`` order."""
        buf, binding = self.buffers, self._binding
        for name, array, kind in feeds:
            key = (buf.pointer(array), buf.shape(array))
            if self._bound.get(name) != key:
                binding.bind_input(
                    name,
                    self.device_type,
                    self.device_id,
                    ONNX_TYPES[kind][1],
                    list(key[1]),
                    key[0],
                )
                self._bound[name] = key
                self.rebinds += 1
        out = []
        for name, shape, kind in outputs:
            a = buf.empty(shape, kind)
            binding.bind_output(
                name,
                self.device_type,
                self.device_id,
                ONNX_TYPES[kind][1],
                list(shape),
                buf.pointer(a),
            )
            out.append(a)
        if self._sync:
            import torch

            torch.cuda.current_stream(torch.device(self.device_type, self.device_id)).synchronize()
        self._session.run_with_iobinding(binding, self._run_options)
        if isinstance(buf, NumpyBuffers):
            for a in out:
                a.setflags(write=False)
        return out


def host_copy(a: Any) -> np.ndarray:
    """A numpy copy of a buffer (tests)."""
    if isinstance(a, np.ndarray):
        return a
    # a torch tensor (torch is imported only where the buffers are torch's)
    copy: np.ndarray = (
        a.detach().to("cpu").float().numpy() if a.dtype.is_floating_point else a.cpu().numpy()
    )
    return copy


Runner = PlainRunner | BoundRunner
