"""Running a session so that tensors stay where they are used.

On the CPU a session run takes numpy arrays and returns numpy arrays. On CUDA that would copy
the prefix's outputs to the host and back for the sampler, so :class:`SessionRunner` uses IO
binding there: the prefix's outputs stay on the device as ``OrtValue`` s and are bound as the
sampler's inputs, the sampler's tile never leaves the device, and only the (B, ...)-sized
summaries are copied to the host. The same code path runs on the CPU when asked (the tests
exercise it there; on a machine without a GPU it is the only way to run it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

__all__ = ["DeviceValue", "SessionRunner"]

#: A tensor for a session: a host array, or an OrtValue (possibly in device memory).
DeviceValue: TypeAlias = "NDArray[Any] | ort.OrtValue"


class SessionRunner:
    """Runs one session, with or without IO binding.

    Args:
        session: the session.
        binding: run through IO binding.
        device: where bound outputs that stay on the device live ("cuda" or "cpu").
        device_id: the device index.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        *,
        binding: bool,
        device: str = "cpu",
        device_id: int = 0,
    ) -> None:
        self.session = session
        self.binding = binding
        self._device = device
        self._device_id = device_id

    def _bind(self, feed: Mapping[str, DeviceValue]) -> ort.IOBinding:
        binding = self.session.io_binding()
        for name, value in feed.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        return binding

    def run(
        self,
        fetches: list[str],
        feed: Mapping[str, DeviceValue],
        options: ort.RunOptions | None,
    ) -> list[NDArray[Any]]:
        """Outputs on the host, in the order of ``fetches``."""
        if not self.binding:
            host = {n: v.numpy() if isinstance(v, ort.OrtValue) else v for n, v in feed.items()}
            outputs: list[NDArray[Any]] = self.session.run(fetches, host, options)
            return outputs
        binding = self._bind(feed)
        for name in fetches:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding, options)
        copied: list[NDArray[Any]] = binding.copy_outputs_to_cpu()
        return copied

    def run_on_device(
        self,
        fetches: list[str],
        feed: Mapping[str, DeviceValue],
        options: ort.RunOptions | None,
    ) -> dict[str, DeviceValue]:
        """Outputs left where the session made them (device memory under IO binding)."""
        if not self.binding:
            return dict(zip(fetches, self.run(fetches, feed, options), strict=True))
        binding = self._bind(feed)
        for name in fetches:
            binding.bind_output(name, self._device, self._device_id)
        self.session.run_with_iobinding(binding, options)
        values: list[ort.OrtValue] = binding.get_outputs()
        return dict(zip(fetches, values, strict=True))
