"""The transport ceiling: a grpc.aio server whose ``Predict`` answers at once, without a model.

``python -m bench.echo_server --port-file F`` serves ``mcdropout.v1.MCDropoutService/Predict``
on 127.0.0.1 and answers every request with a canned, well-formed response (uniform mean
probabilities of the request's B rows, zero variance, the T asked for). What the load
generator reaches against it is the most any server can show on this machine, where client and
server share the cores: a ratio above ceiling / peer cannot be measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.gen.mcdropout.v1 import mcdropout_pb2_grpc as pb_grpc
from service.protocol.codec import encode_tensor

__all__ = ["CannedServicer", "main"]

log = logging.getLogger(__name__)


class CannedServicer(pb_grpc.MCDropoutServiceServicer):
    """Answers from a cache keyed by (B, T); the first answer of a key is built once."""

    def __init__(self, classes: int) -> None:
        self._classes = classes
        self._answers: dict[tuple[int, int], pb.PredictResponse] = {}

    async def Predict(  # noqa: N802 (the generated method name)
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        shape = request.inputs[0].tensor.shape if request.inputs else []
        key = (int(shape[0]) if shape else 1, request.num_samples)
        answer = self._answers.get(key)
        if answer is None:
            rows, samples = key
            mean = np.full((rows, self._classes), 1.0 / self._classes)
            statistics = pb.OutputStatistics(
                name="logits", mean=encode_tensor(mean), variance=encode_tensor(mean * 0.0)
            )
            answer = pb.PredictResponse(
                model=request.model, version="1", num_samples=samples, outputs=[statistics]
            )
            self._answers[key] = answer
        return answer


async def _serve(host: str, port: int, port_file: Path | None, classes: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_MCDropoutServiceServicer_to_server(CannedServicer(classes), server)  # type: ignore[no-untyped-call]
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    if port_file is not None:
        tmp = port_file.with_name(f"{port_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"grpc_port": bound, "pid": os.getpid()}))
        tmp.replace(port_file)
    log.info("canned-answer server on %s:%d", host, bound)
    await stopping.wait()
    await server.stop(grace=2.0)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.echo_server",
        description="Predict answered at once with a canned response: the transport ceiling.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--port-file", type=Path, help="write {'grpc_port': N, 'pid': P} once serving"
    )
    parser.add_argument("--classes", type=int, default=10, help="C of the canned mean")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(_serve(args.host, args.port, args.port_file, args.classes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
