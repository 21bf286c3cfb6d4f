"""Running a session: plain ``session.run`` or IOBinding.

On the CPU provider ``session.run`` with numpy feeds is the fast path. On CUDA the
IOBinding path copies each feed to the device once and lets onnxruntime allocate the
outputs on the device, then copies them back in one step; the code path is the same
whatever the device, so it is tested on the CPU (``device_type="cpu"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["BoundRunner", "PlainRunner", "Runner"]


class PlainRunner:
    """``session.run(output_names, feeds)``."""

    io_binding = False

    def __init__(self, session: Any) -> None:
        self._session = session

    def __call__(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> list[np.ndarray]:
        """Run the graph.

        Args:
            feeds: input name -> array.
            output_names: the outputs wanted, in order.

        Returns:
            The outputs as numpy arrays, in ``output_names`` order.
        """
        return list(self._session.run(list(output_names), dict(feeds)))


class BoundRunner:
    """Run through an IOBinding with inputs and outputs on ``device_type:device_id``.

    Args:
        session: the inference session.
        device_type: ``"cuda"`` on GPUs; ``"cpu"`` exercises the same path in tests.
        device_id: the device ordinal.
    """

    io_binding = True

    def __init__(self, session: Any, *, device_type: str = "cuda", device_id: int = 0) -> None:
        import onnxruntime

        self._ort = onnxruntime
        self._session = session
        self.device_type = device_type
        self.device_id = device_id

    def __call__(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> list[np.ndarray]:
        """Run the graph through an IOBinding (same contract as :class:`PlainRunner`)."""
        binding = self._session.io_binding()
        keep = []  # the OrtValues (and the host arrays they may alias) must outlive the run
        for name, array in feeds.items():
            host = np.ascontiguousarray(array)
            value = self._ort.OrtValue.ortvalue_from_numpy(host, self.device_type, self.device_id)
            keep.append((host, value))
            binding.bind_ortvalue_input(name, value)
        for name in output_names:
            binding.bind_output(name, self.device_type, self.device_id)
        binding.synchronize_inputs()
        self._session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        out = list(binding.copy_outputs_to_cpu())
        del keep
        return out


Runner = PlainRunner | BoundRunner
