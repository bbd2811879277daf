"""Baseline (a): the usual PyTorch MC dropout code behind a straightforward gRPC server.

``python -m bench.naive_server --state-dict W.pt --port-file F`` serves
``mcdropout.v1.MCDropoutService/Predict`` (the generated stubs, ``service.protocol.codec``) on
127.0.0.1. Every request is handled on its own: the model, in MC dropout mode
(``export.mc_mode.mc_dropout_copy``: eval, dropout in train mode), runs T forward passes in a
Python loop, then numpy computes the mean and the unbiased variance of the per-sample softmax
probabilities. No batching across requests, no tiling: the code most MC dropout tutorials
write, served by a thread-pool ``grpc.server``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import threading
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import torch
from torch import nn

from export.mc_mode import mc_dropout_copy
from service.errors import InvalidInput
from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.gen.mcdropout.v1 import mcdropout_pb2_grpc as pb_grpc
from service.protocol.codec import decode_tensor, encode_tensor

__all__ = ["NaiveServicer", "main", "mc_dropout_predict"]

log = logging.getLogger(__name__)


def mc_dropout_predict(
    model: nn.Module, x: torch.Tensor, num_samples: int
) -> tuple[np.ndarray, np.ndarray]:
    """T stochastic forward passes, one after the other: (B, ...) -> mean, variance (B, C).

    Args:
        model: in MC dropout mode (dropout modules in train mode, the rest in eval mode).
        x: the rows (B, ...), on the model's device.
        num_samples: T.

    Returns:
        The mean and the unbiased variance (ddof=1) over the T samples of the per-sample
        softmax probabilities, float64, each (B, C).
    """
    with torch.no_grad():
        samples = torch.stack([model(x) for _ in range(num_samples)])  # (T, B, C)
    probabilities = torch.softmax(samples, dim=-1).cpu().numpy().astype(np.float64)
    return probabilities.mean(axis=0), probabilities.var(axis=0, ddof=1)


class NaiveServicer(pb_grpc.MCDropoutServiceServicer):
    """Predict only; one model, one version."""

    def __init__(
        self,
        model: nn.Module,
        name: str,
        input_name: str,
        default_samples: int,
        device: torch.device | None = None,
    ) -> None:
        self._device = device or torch.device("cpu")
        self._model = model.to(self._device)
        self._name = name
        self._input_name = input_name
        self._default_samples = default_samples

    def Predict(  # noqa: N802 (the generated method name)
        self, request: pb.PredictRequest, context: grpc.ServicerContext
    ) -> pb.PredictResponse:
        if request.model != self._name:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model!r}")
        inputs = {named.name: named.tensor for named in request.inputs}
        if list(inputs) != [self._input_name]:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"expected one input {self._input_name!r}"
            )
        try:
            array = decode_tensor(inputs[self._input_name], self._input_name)
        except InvalidInput as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        num_samples = request.num_samples or self._default_samples
        x = torch.from_numpy(np.array(array, dtype=np.float32)).to(self._device)
        mean, variance = mc_dropout_predict(self._model, x, num_samples)
        statistics = pb.OutputStatistics(
            name="logits",
            semantics=pb.OUTPUT_SEMANTICS_LOGITS,
            mean=encode_tensor(mean),
            variance=encode_tensor(variance),
            std=encode_tensor(np.sqrt(variance)),
        )
        return pb.PredictResponse(
            model=self._name, version="1", num_samples=num_samples, outputs=[statistics]
        )


def _load_model(factory: str, state_dict: Path) -> nn.Module:
    module_name, _, attribute = factory.partition(":")
    model: nn.Module = getattr(importlib.import_module(module_name), attribute)()
    model.load_state_dict(torch.load(state_dict, map_location="cpu", weights_only=True))
    return mc_dropout_copy(model)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.naive_server",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--state-dict", type=Path, required=True, help="torch.save'd weights")
    parser.add_argument(
        "--factory", default="export.examples:DigitsCNN", help="module:callable building the model"
    )
    parser.add_argument("--model-name", default="digits")
    parser.add_argument("--input-name", default="image")
    parser.add_argument("--default-samples", type=int, default=100, help="T when a request has 0")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--port-file", type=Path, help="write {'grpc_port': N, 'pid': P} once serving"
    )
    parser.add_argument("--workers", type=int, default=4, help="gRPC handler threads")
    parser.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then stop (in-flight calls get 5 s)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.torch_threads)
    model = _load_model(args.factory, args.state_dict)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers))
    pb_grpc.add_MCDropoutServiceServicer_to_server(  # type: ignore[no-untyped-call]
        NaiveServicer(
            model, args.model_name, args.input_name, args.default_samples, torch.device(args.device)
        ),
        server,
    )
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    server.start()
    if args.port_file is not None:
        tmp = args.port_file.with_name(f"{args.port_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"grpc_port": port, "pid": os.getpid()}))
        tmp.replace(args.port_file)
    log.info(
        "naive MC dropout server on %s, %s:%d (%d threads)",
        args.device, args.host, port, args.workers,
    )  # fmt: skip
    stopping.wait()
    server.stop(grace=5.0).wait(10.0)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
