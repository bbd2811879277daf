"""A minimal synchronous test client over the generated stubs (the typed client library of the
project comes with its own issue)."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import grpc
from numpy.typing import NDArray

from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.gen.mcdropout.v1 import mcdropout_pb2_grpc as pb_grpc
from service.protocol.codec import decode_tensor, encode_tensor

_STATS = ("mean", "variance", "std", "predicted_class", "predictive_entropy", "expected_entropy",
          "mutual_information", "variation_ratio")  # fmt: skip


class Client:
    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(
            target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
        )
        self.stub = pb_grpc.MCDropoutServiceStub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object | TracebackType | None) -> None:
        self.channel.close()

    def request(
        self, model: str, inputs: dict[str, NDArray[Any]], num_samples: int = 0, version: str = ""
    ) -> pb.PredictRequest:
        return pb.PredictRequest(
            model=model,
            version=version,
            num_samples=num_samples,
            inputs=[pb.NamedTensor(name=k, tensor=encode_tensor(v)) for k, v in inputs.items()],
        )

    def predict_raw(
        self, request: pb.PredictRequest, timeout: float | None = 60
    ) -> pb.PredictResponse:
        response: pb.PredictResponse = self.stub.Predict(request, timeout=timeout)
        return response

    def predict(
        self,
        model: str,
        inputs: dict[str, NDArray[Any]],
        num_samples: int = 0,
        version: str = "",
        timeout: float | None = 60,
    ) -> dict[str, Any]:
        """Predict and decode: {"model", "version", "num_samples", output name: {stat: array}}."""
        response = self.predict_raw(self.request(model, inputs, num_samples, version), timeout)
        result: dict[str, Any] = {
            "model": response.model,
            "version": response.version,
            "num_samples": response.num_samples,
        }
        for out in response.outputs:
            stats: dict[str, Any] = {}
            for name in _STATS:
                if out.HasField(name):
                    stats[name] = decode_tensor(getattr(out, name), name)
            stats["predicted_label"] = list(out.predicted_label)
            stats["semantics"] = out.semantics
            result[out.name] = stats
        return result
