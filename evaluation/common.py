"""What every stage shares: the server subprocess, a small gRPC client, seeding, the machine line.

The client speaks to the server only through the generated stubs and ``service.protocol.codec`` (the
project's typed client library is not a dependency of the evaluation).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import torch

from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.gen.mcdropout.v1 import mcdropout_pb2_grpc as pb_grpc
from service.protocol.codec import decode_tensor, encode_tensor
from tools.launcher import launch_service

__all__ = [
    "ROOT",
    "EvalClient",
    "Prediction",
    "machine_description",
    "quiet_export_logs",
    "running_server",
    "seed_everything",
    "serving",
]

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
FloatArray = npt.NDArray[np.float64]

#: Seconds the server gets to load every model version (each is checked at load time).
SERVER_START_TIMEOUT_S = 300.0
#: gRPC deadline of one Predict call.
PREDICT_TIMEOUT_S = 300.0
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def seed_everything(seed: int) -> torch.Generator:
    """Seeds random, numpy's legacy global state and torch; returns a torch generator."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def quiet_export_logs() -> None:
    """The ONNX exporter is chatty (warnings, INFO lines per export): keep the progress readable."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("torch", "onnxscript", "onnx_ir", "export"):
        logging.getLogger(name).setLevel(logging.ERROR)


def machine_description() -> str:
    """'CPU model, N cores, OS, Python, torch': the machine line of the report."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cpu}, {cores} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, no GPU used"
    )


@contextlib.contextmanager
def running_server(
    repository: Path, workdir: Path, extra_flags: Sequence[str] = ()
) -> Iterator[str]:
    """Runs ``python -m service`` on 127.0.0.1 (free port) for the duration of the block.

    Started and stopped by tools/launcher.py: the server loads every model of ``repository``
    before it writes its port file, so the target it yields is ready; it is always stopped
    (SIGTERM, then SIGKILL after a bounded wait) when the block ends.

    Args:
        repository: the model repository to serve.
        workdir: holds the port file and ``server.log``.
        extra_flags: more ``python -m service`` flags.

    Yields:
        The gRPC target, ``127.0.0.1:PORT``.

    Raises:
        RuntimeError: the server exited or did not serve within ``SERVER_START_TIMEOUT_S``; the
            message carries the end of its log.
    """
    flags = ["--metrics-port", "-1", "--device", "cpu", *extra_flags]
    # tools/launcher.py: no MCD_* variables of the caller's shell, stopped by PID.
    with launch_service(
        repository, workdir, flags, start_timeout_s=SERVER_START_TIMEOUT_S
    ) as server:
        log.info("server pid %d serving %s on %s", server.pid, repository, server.target)
        yield server.target


@contextlib.contextmanager
def serving(
    repository: Path,
    workdir: Path,
    expected: set[str],
    extra_flags: Sequence[str] = (),
    attempts: int = 3,
) -> Iterator[EvalClient]:
    """A server on ``repository`` that serves every model of ``expected``, and a client.

    The server refuses a version when its load-time probe (8 copies of one random row) sees
    identical outputs. A valid model with very small dropout rates (p = 0.005 on a 13-50-1
    network: no unit dropped in a copy with probability 0.73) fails that probe now and then,
    so a start that misses a model is retried, up to ``attempts`` starts in all.

    Raises:
        RuntimeError: a model was still missing after the last attempt; the message carries
            the server's reason.
    """
    reasons: list[str] = []
    for attempt in range(1, attempts + 1):
        with (
            running_server(repository, workdir, extra_flags) as target,
            EvalClient(target) as client,
        ):
            missing = expected - client.ready_models()
            if not missing:
                yield client
                return
            log_text = (workdir / "server.log").read_text(errors="replace")
            reasons = [line for line in log_text.splitlines() if "not serving" in line]
        log.warning(
            "start %d of %d: the server does not serve %s (%s); restarting it",
            attempt, attempts, sorted(missing), "; ".join(reasons) or "no reason logged",
        )  # fmt: skip
    raise RuntimeError(f"models not served after {attempts} starts: {'; '.join(reasons)}")


@dataclass(frozen=True)
class Prediction:
    """The statistics of a model's single output, rows first (all float64).

    Attributes:
        num_samples: T, the stochastic passes the server ran.
        mean: (B, ...) mean over samples (classifiers: mean probabilities, (B, C)).
        std: (B, ...) sample standard deviation (ddof=1; NaN when T = 1).
        predictive_entropy: (B,) classifiers only, nats.
        mutual_information: (B,) classifiers only, nats.
        variation_ratio: (B,) classifiers only.
        samples: (B, T, ...) every sample (classifiers: probabilities), when asked for.
    """

    num_samples: int
    mean: FloatArray
    std: FloatArray
    predictive_entropy: FloatArray | None = None
    mutual_information: FloatArray | None = None
    variation_ratio: FloatArray | None = None
    samples: FloatArray | None = None


def _decode_optional(output: pb.OutputStatistics, field: str) -> FloatArray | None:
    if not output.HasField(field):
        return None
    return np.asarray(decode_tensor(getattr(output, field), field), np.float64)


class EvalClient:
    """A synchronous Predict client over the generated stubs (numpy in, numpy out)."""

    def __init__(self, target: str) -> None:
        options = [
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        ]
        self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.MCDropoutServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._input_names: dict[str, str] = {}

    def __enter__(self) -> EvalClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def ready_models(self) -> set[str]:
        """Names of the models the server serves (ready)."""
        response: pb.ListModelsResponse = self._stub.ListModels(
            pb.ListModelsRequest(), timeout=PREDICT_TIMEOUT_S
        )
        return {m.name for m in response.models if m.ready}

    def metadata(self, model: str) -> pb.ModelMetadata:
        """The newest version's metadata."""
        metadata: pb.ModelMetadata = self._stub.GetModelMetadata(
            pb.GetModelMetadataRequest(model=model), timeout=PREDICT_TIMEOUT_S
        )
        return metadata

    def default_samples(self, model: str) -> int:
        """The model's default T (what a request with num_samples = 0 gets)."""
        return int(self.metadata(model).default_num_samples)

    def _input_name(self, model: str) -> str:
        if model not in self._input_names:
            metadata = self.metadata(model)
            if len(metadata.inputs) != 1:
                raise ValueError(f"model {model} has {len(metadata.inputs)} inputs, expected 1")
            self._input_names[model] = metadata.inputs[0].name
        return self._input_names[model]

    def predict(
        self,
        model: str,
        rows: npt.NDArray[Any] | Mapping[str, npt.NDArray[Any]],
        num_samples: int,
        *,
        return_samples: bool = False,
        seed: int | None = None,
    ) -> Prediction:
        """One Predict call on the newest version of ``model``.

        Args:
            model: model name.
            rows: (B, ...) array of the model's dtype for its single input, or {name: array}.
            num_samples: T.
            return_samples: also answer every sample, (B, T, ...).
            seed: makes the answer reproducible (Predict.seed: each row's dropout noise comes
                from generators seeded by the seed and the row); None samples freshly.

        Returns:
            The statistics of the model's (single) output.
        """
        inputs = rows if isinstance(rows, Mapping) else {self._input_name(model): rows}
        request = pb.PredictRequest(
            model=model,
            num_samples=num_samples,
            return_samples=return_samples,
            inputs=[pb.NamedTensor(name=k, tensor=encode_tensor(v)) for k, v in inputs.items()],
            seed=seed,
        )
        response: pb.PredictResponse = self._stub.Predict(request, timeout=PREDICT_TIMEOUT_S)
        if len(response.outputs) != 1:
            raise ValueError(f"model {model} answered {len(response.outputs)} outputs, expected 1")
        output = response.outputs[0]
        mean = _decode_optional(output, "mean")
        std = _decode_optional(output, "std")
        if mean is None or std is None:
            raise ValueError(f"model {model} answered no mean or std")
        return Prediction(
            num_samples=response.num_samples,
            mean=mean,
            std=std,
            predictive_entropy=_decode_optional(output, "predictive_entropy"),
            mutual_information=_decode_optional(output, "mutual_information"),
            variation_ratio=_decode_optional(output, "variation_ratio"),
            samples=_decode_optional(output, "samples"),
        )
