"""Hostile requests for the battery (tests/integration/test_battery.py): malformed request
kinds of both APIs with the status each must get, and seeded mutations of valid messages.

Every request is sent as raw bytes on a method path, so a kind may be anything a client can put
on the wire, protobuf or not.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np

from service.gen.inference import grpc_service_pb2 as oip
from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.protocol.codec import encode_tensor

Code = grpc.StatusCode

MCD = "/mcdropout.v1.MCDropoutService/"
OIP = "/inference.GRPCInferenceService/"
PREDICT = MCD + "Predict"
METADATA = MCD + "GetModelMetadata"
INFER = OIP + "ModelInfer"
OIP_METADATA = OIP + "ModelMetadata"
OIP_READY = OIP + "ModelReady"
HEALTH = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"

X = np.zeros((2, 6), np.float32)
Y = np.zeros((2, 5), np.float32)
MiB = 1024 * 1024


@dataclass(frozen=True)
class Kind:
    """A malformed request and the status it must get.

    Attributes:
        name: what is wrong.
        path: the method.
        payload: the request bytes.
        code: the status code the server must answer.
        fragment: a part of the message the server must send ("" for any).
    """

    name: str
    path: str
    payload: bytes
    code: Code
    fragment: str = ""


def predict(
    model: str = "tiny_cls", x: np.ndarray | None = X, **fields: object
) -> pb.PredictRequest:
    inputs = [] if x is None else [pb.NamedTensor(name="x", tensor=encode_tensor(x))]
    return pb.PredictRequest(model=model, inputs=inputs, **fields)  # type: ignore[arg-type]


def tensor_request(**tensor: object) -> bytes:
    named = pb.NamedTensor(name="x", tensor=pb.Tensor(**tensor))  # type: ignore[arg-type]
    return pb.PredictRequest(model="tiny_cls", inputs=[named]).SerializeToString()


def infer(
    model: str = "tiny_reg",
    x: np.ndarray | None = Y,
    datatype: str = "FP32",
    name: str = "features",
) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model)
    if x is not None:
        request.inputs.add(name=name, datatype=datatype, shape=x.shape)
        request.raw_input_contents.append(x.tobytes())
    return request


def with_parameter(request: oip.ModelInferRequest, key: str, **value: object) -> bytes:
    request.parameters[key].CopyFrom(oip.InferParameter(**value))  # type: ignore[arg-type]
    return request.SerializeToString()


def _regression(**fields: object) -> bytes:
    named = pb.NamedTensor(name="features", tensor=encode_tensor(Y))
    return pb.PredictRequest(model="tiny_reg", inputs=[named], **fields).SerializeToString()  # type: ignore[arg-type]


def _typed_wrong_field() -> bytes:
    request = oip.ModelInferRequest(model_name="tiny_reg")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[1, 5])
    tensor.contents.int_contents.extend([1, 2, 3, 4, 5])
    return request.SerializeToString()


def _mixed() -> bytes:
    request = infer()
    request.inputs[0].contents.fp32_contents.extend([0.0] * 10)
    return request.SerializeToString()


def _tensor_parameter(key: str) -> bytes:
    request = infer()
    request.inputs[0].parameters[key].string_param = "region"
    return request.SerializeToString()


def _outputs(*names: str) -> bytes:
    request = infer()
    request.outputs.extend(oip.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in names)
    return request.SerializeToString()


def _many_inputs(count: int, name_chars: int) -> bytes:
    request = predict()
    for i in range(count):
        request.inputs.add(name=f"{i:06d}" + "n" * name_chars, tensor=encode_tensor(X))
    return request.SerializeToString()


def _nested_groups(depth: int) -> bytes:
    # An unknown field 99 as nested groups (wire type 3 opens, 4 closes).
    return b"\x9b\x06" * depth + b"\x9c\x06" * depth


def kinds() -> list[Kind]:
    """The malformed request kinds (both APIs, health and reflection)."""
    big = "m" * (512 * 1024)  # under the 1 MiB message limit of the test server
    return [
        # -- bytes that are not the message -------------------------------------------------
        Kind("Predict: not protobuf", PREDICT, b"\xff\xff\xff\xff", Code.INVALID_ARGUMENT, "not a valid mcdropout.v1.PredictRequest"),
        Kind("Predict: truncated varint", PREDICT, b"\x20\x80", Code.INVALID_ARGUMENT, "not a valid"),
        Kind("Predict: truncated field", PREDICT, b"\x0a\x10abc", Code.INVALID_ARGUMENT, "not a valid"),
        Kind("Predict: length prefix of 4 GiB", PREDICT, b"\x0a\xff\xff\xff\xff\x0f", Code.INVALID_ARGUMENT, "not a valid"),
        Kind("Predict: invalid UTF-8 model name", PREDICT, b"\x0a\x02\xc3\x28", Code.INVALID_ARGUMENT, "not a valid"),
        Kind("Predict: stray end-group", PREDICT, b"\x0c", Code.INVALID_ARGUMENT, "not a valid"),
        Kind("Predict: groups nested 200 deep", PREDICT, _nested_groups(200), Code.INVALID_ARGUMENT, "not a valid"),
        Kind("GetModelMetadata: not protobuf", METADATA, b"\xff" * 64, Code.INVALID_ARGUMENT, "not a valid mcdropout.v1.GetModelMetadataRequest"),
        Kind("ListModels: not protobuf", MCD + "ListModels", b"\x07", Code.INVALID_ARGUMENT, "not a valid"),
        Kind("ModelInfer: not protobuf", INFER, b"\xff\xff\xff\xff", Code.INVALID_ARGUMENT, "not a valid inference.ModelInferRequest"),
        Kind("ModelInfer: truncated tensor", INFER, infer().SerializeToString()[:-7], Code.INVALID_ARGUMENT, "not a valid"),
        Kind("ModelMetadata: not protobuf", OIP_METADATA, b"\x0a\x05ab", Code.INVALID_ARGUMENT, "not a valid"),
        Kind("ModelReady: not protobuf", OIP_READY, b"\xff", Code.INVALID_ARGUMENT, "not a valid"),
        Kind("ServerLive: not protobuf", OIP + "ServerLive", b"\xff\xff", Code.INVALID_ARGUMENT, "not a valid"),
        Kind("Health: not protobuf", HEALTH, b"\xff\xff", Code.INVALID_ARGUMENT, "not a valid grpc.health.v1.HealthCheckRequest"),
        # -- client strings echoed in messages --------------------------------------------------
        Kind("Predict: 512 KiB model name", PREDICT, predict(big).SerializeToString(), Code.NOT_FOUND, "characters) not found"),
        Kind("Predict: 512 KiB version", PREDICT, predict(version=big).SerializeToString(), Code.INVALID_ARGUMENT, "version must be a positive integer"),
        Kind("Predict: control characters in the name", PREDICT, predict("\x00\x1b[2J\n").SerializeToString(), Code.NOT_FOUND, "not found"),
        Kind("Predict: 2000 unexpected inputs", PREDICT, _many_inputs(2000, 200), Code.INVALID_ARGUMENT, ""),
        Kind("GetModelMetadata: 512 KiB model name", METADATA, pb.GetModelMetadataRequest(model=big).SerializeToString(), Code.NOT_FOUND, "not found"),
        Kind("ModelInfer: 512 KiB model name", INFER, infer(big).SerializeToString(), Code.NOT_FOUND, "not found"),
        Kind("ModelInfer: 512 KiB datatype", INFER, infer(datatype=big).SerializeToString(), Code.INVALID_ARGUMENT, "characters) (supported"),
        Kind("ModelInfer: 512 KiB input name", INFER, infer(name=big).SerializeToString(), Code.INVALID_ARGUMENT, ""),
        # -- tensors ------------------------------------------------------------------------------
        Kind("Predict: wrong dtype", PREDICT, predict(x=X.astype(np.float64)).SerializeToString(), Code.INVALID_ARGUMENT, "must be float32"),
        Kind("Predict: wrong rank", PREDICT, predict(x=X[..., None]).SerializeToString(), Code.INVALID_ARGUMENT, "must have rank 2"),
        Kind("Predict: wrong shape", PREDICT, predict(x=X[:, :5]).SerializeToString(), Code.INVALID_ARGUMENT, "must have shape"),
        Kind("Predict: byte length", PREDICT, tensor_request(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 6], data=b"\0" * 47), Code.INVALID_ARGUMENT, "47 bytes"),
        Kind("Predict: dtype enum 999", PREDICT, tensor_request(dtype=999, shape=[1], data=b"\0"), Code.INVALID_ARGUMENT, "unsupported dtype 999"),
        Kind("Predict: negative dimension", PREDICT, tensor_request(dtype=pb.DATA_TYPE_FLOAT32, shape=[-1, 6], data=b""), Code.INVALID_ARGUMENT, "negative dimension"),
        Kind("Predict: 2^62 elements", PREDICT, tensor_request(dtype=pb.DATA_TYPE_FLOAT32, shape=[2**31, 2**31], data=b""), Code.INVALID_ARGUMENT, "too large"),
        Kind("Predict: rank 100", PREDICT, tensor_request(dtype=pb.DATA_TYPE_FLOAT32, shape=[1] * 100, data=b"\0" * 4), Code.INVALID_ARGUMENT, "dimensions, more than"),
        Kind("Predict: NaN", PREDICT, predict(x=np.full((2, 6), np.nan, np.float32)).SerializeToString(), Code.INVALID_ARGUMENT, "NaN"),
        Kind("Predict: infinity", PREDICT, predict(x=np.full((1, 6), np.inf, np.float32)).SerializeToString(), Code.INVALID_ARGUMENT, "infinite"),
        Kind("Predict: empty batch", PREDICT, predict(x=np.zeros((0, 6), np.float32)).SerializeToString(), Code.INVALID_ARGUMENT, "empty"),
        Kind("Predict: no input", PREDICT, predict(x=None).SerializeToString(), Code.INVALID_ARGUMENT, "missing"),
        Kind("Predict: input given twice", PREDICT, predict().SerializeToString() * 2, Code.INVALID_ARGUMENT, "given twice"),
        # -- request fields -----------------------------------------------------------------------
        Kind("Predict: T above the model's max", PREDICT, predict(num_samples=20_001).SerializeToString(), Code.INVALID_ARGUMENT, "num_samples must be in"),
        Kind("Predict: T = 2^32-1", PREDICT, predict(num_samples=2**32 - 1).SerializeToString(), Code.INVALID_ARGUMENT, "num_samples must be in"),
        Kind("Predict: unknown model", PREDICT, predict("nope").SerializeToString(), Code.NOT_FOUND, "model 'nope' not found"),
        Kind("Predict: unknown version", PREDICT, predict(version="9").SerializeToString(), Code.NOT_FOUND, "version '9'"),
        Kind("Predict: version not a number", PREDICT, predict(version="latest").SerializeToString(), Code.INVALID_ARGUMENT, "positive integer"),
        Kind("Predict: interval level 1.5", PREDICT, _regression(interval_levels=[1.5]), Code.INVALID_ARGUMENT, "interval levels must be in (0, 1)"),
        Kind("Predict: 100 interval levels", PREDICT, _regression(interval_levels=[0.5] * 100), Code.INVALID_ARGUMENT, "interval levels"),
        Kind("Predict: intervals of a classifier", PREDICT, predict(interval_levels=[0.9]).SerializeToString(), Code.INVALID_ARGUMENT, "regression"),
        Kind("Predict: negative target error", PREDICT, predict(target_standard_error=-1.0).SerializeToString(), Code.INVALID_ARGUMENT, "target_standard_error"),
        Kind("Predict: NaN target error", PREDICT, predict(target_standard_error=float("nan")).SerializeToString(), Code.INVALID_ARGUMENT, "target_standard_error"),
        Kind("Predict: 65 rows", PREDICT, predict(x=np.zeros((65, 6), np.float32)).SerializeToString(), Code.RESOURCE_EXHAUSTED, "65 rows"),
        Kind("Predict: rows x samples", PREDICT, predict(x=np.zeros((64, 6), np.float32), num_samples=10_000).SerializeToString(), Code.RESOURCE_EXHAUSTED, "rows x samples"),
        Kind("Predict: samples returned", PREDICT, predict(x=np.zeros((64, 6), np.float32), num_samples=5000, return_samples=True).SerializeToString(), Code.RESOURCE_EXHAUSTED, "returning the samples"),
        Kind("Predict: over the message limit", PREDICT, predict(x=np.zeros((50_000, 6), np.float32)).SerializeToString(), Code.RESOURCE_EXHAUSTED, ""),
        Kind("Predict: unknown method", MCD + "Explode", b"", Code.UNIMPLEMENTED, ""),
        Kind("ModelInfer: raw and typed", INFER, _mixed(), Code.INVALID_ARGUMENT, "not both"),
        Kind("ModelInfer: two blobs for one input", INFER, infer().SerializeToString() + oip.ModelInferRequest(raw_input_contents=[b"x"]).SerializeToString(), Code.INVALID_ARGUMENT, "raw_input_contents for 1 inputs"),
        Kind("ModelInfer: unknown datatype", INFER, infer(datatype="FP99").SerializeToString(), Code.INVALID_ARGUMENT, "unsupported datatype 'FP99'"),
        Kind("ModelInfer: BYTES input", INFER, infer(datatype="BYTES").SerializeToString(), Code.INVALID_ARGUMENT, "unsupported datatype 'BYTES'"),
        Kind("ModelInfer: typed values in the wrong field", INFER, _typed_wrong_field(), Code.INVALID_ARGUMENT, "goes in contents.fp32_contents"),
        Kind("ModelInfer: shared memory", INFER, _tensor_parameter("shared_memory_region"), Code.INVALID_ARGUMENT, "shared memory"),
        Kind("ModelInfer: classification extension", INFER, _tensor_parameter("classification"), Code.INVALID_ARGUMENT, "classification"),
        Kind("ModelInfer: mc_samples as a string", INFER, with_parameter(infer(), "mc_samples", string_param="10"), Code.INVALID_ARGUMENT, "must be an integer"),
        Kind("ModelInfer: negative mc_samples", INFER, with_parameter(infer(), "mc_samples", int64_param=-1), Code.INVALID_ARGUMENT, ">= 0"),
        Kind("ModelInfer: unparsable interval levels", INFER, with_parameter(infer(), "mc_interval_levels", string_param="0.9,x"), Code.INVALID_ARGUMENT, "comma-separated"),
        Kind("ModelInfer: negative seed", INFER, with_parameter(infer(), "mc_seed", int64_param=-3), Code.INVALID_ARGUMENT, "mc_seed"),
        Kind("ModelInfer: unknown output", INFER, _outputs("nope"), Code.INVALID_ARGUMENT, "has no output 'nope'"),
        Kind("ModelInfer: output twice", INFER, _outputs("y_mean", "y_mean"), Code.INVALID_ARGUMENT, "requested twice"),
        Kind("ModelInfer: unknown model", INFER, infer("nope").SerializeToString(), Code.NOT_FOUND, "not found"),
        Kind("ModelMetadata: unknown version", OIP_METADATA, oip.ModelMetadataRequest(name="tiny_reg", version="7").SerializeToString(), Code.NOT_FOUND, "version '7'"),
    ]  # fmt: skip


# -- fuzzing -------------------------------------------------------------------------------------

#: Valid requests the fuzzer mutates: (method path, bytes).
SEEDS: list[tuple[str, bytes]] = [
    (PREDICT, predict(num_samples=8).SerializeToString()),
    (PREDICT, _regression(num_samples=8, interval_levels=[0.9])),
    (METADATA, pb.GetModelMetadataRequest(model="tiny_cls").SerializeToString()),
    (INFER, with_parameter(infer(), "mc_samples", int64_param=8)),
    (OIP_METADATA, oip.ModelMetadataRequest(name="tiny_reg").SerializeToString()),
    (OIP_READY, oip.ModelReadyRequest(name="tiny_reg", version="1").SerializeToString()),
]


def _flip(rng: random.Random, data: bytearray) -> None:
    if data:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)


def _byte(rng: random.Random, data: bytearray) -> None:
    if data:
        data[rng.randrange(len(data))] = rng.choice((0, 0x7F, 0x80, 0xFF, rng.randrange(256)))


def _insert(rng: random.Random, data: bytearray) -> None:
    at = rng.randrange(len(data) + 1)
    data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))


def _delete(rng: random.Random, data: bytearray) -> None:
    if data:
        at = rng.randrange(len(data))
        del data[at : at + rng.randint(1, 8)]


def _truncate(rng: random.Random, data: bytearray) -> None:
    del data[rng.randrange(len(data) + 1) :]


def _duplicate(rng: random.Random, data: bytearray) -> None:
    if data:
        at = rng.randrange(len(data))
        data[at:at] = data[at : at + rng.randint(1, 32)]


MUTATIONS: list[Callable[[random.Random, bytearray], None]] = [
    _flip, _byte, _insert, _delete, _truncate, _duplicate,
]  # fmt: skip


def fuzzed(seed: int, count: int) -> list[tuple[str, bytes]]:
    """``count`` mutated requests (1 to 4 mutations each), the same for the same seed."""
    rng = random.Random(seed)
    messages = []
    for _ in range(count):
        path, valid = rng.choice(SEEDS)
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            rng.choice(MUTATIONS)(rng, data)
        messages.append((path, bytes(data)))
    return messages
