"""The Open Inference Protocol (``inference.GRPCInferenceService``) against the real server,
through the generated stubs: every RPC, raw and typed inputs, requested outputs, every
datatype a model may take, status codes, streaming, metrics, and agreement with Predict.

Statistical tests: the OIP-versus-Predict comparison runs a per-element two-sample z-test on
the mean and a log-variance-ratio z-test on the variance (export/stats.py), each with a
Bonferroni threshold over the elements compared at false-failure probability ALPHA = 1e-4;
two models, two tests each: this file fails by chance with probability below 4e-4.

This module imports ``service.gen.inference``: tritonclient, whose generated code defines the
same ``inference.*`` messages, must never be imported into the test process (protobuf's
default descriptor pool refuses duplicate symbols), so test_tritonclient.py runs it in a
subprocess.
"""

from __future__ import annotations

import re
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from numpy.typing import NDArray
from torch import nn

import service
from export import export_model
from export.stats import Moments, mean_z_test, variance_ratio_test
from mcdropout_client import Client
from mcdropout_client import oip as client_oip
from service.gen.inference import grpc_service_pb2 as oip
from service.gen.inference import grpc_service_pb2_grpc as oip_grpc
from tests.integration.conftest import ExportedModels, RunningServer, start_server, stop_server
from tests.integration.parity import ALPHA, N_TORCH, server_moments, torch_mc_samples

Code = grpc.StatusCode
Input = oip.ModelInferRequest.InferInputTensor
Requested = oip.ModelInferRequest.InferRequestedOutputTensor

#: OIP datatype -> numpy dtype of raw contents (little-endian).
NP = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4",
      "UINT8": "u1", "BOOL": "?", "BYTES": None}  # fmt: skip
CLS_OUTPUTS = ["logits", "logits_mean", "logits_variance", "logits_std", "logits_predicted_class",
               "logits_predicted_label", "logits_entropy", "logits_expected_entropy",
               "logits_mutual_information", "logits_variation_ratio"]  # fmt: skip


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[oip_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


def infer_request(
    model: str,
    inputs: dict[str, NDArray[Any]],
    mc_samples: int | None = None,
    *,
    outputs: list[str] | None = None,
    version: str = "",
    request_id: str = "",
) -> oip.ModelInferRequest:
    """A raw-contents request, as tritonclient sends it."""
    dtypes = {np.dtype(v).newbyteorder("="): k for k, v in NP.items() if v}
    request = oip.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype=dtypes[array.dtype], shape=array.shape)
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    if mc_samples is not None:
        request.parameters["mc_samples"].int64_param = mc_samples
    request.outputs.extend(Requested(name=n) for n in outputs or [])
    return request


def _bytes_tensor(raw: bytes) -> NDArray[Any]:
    items, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        items.append(raw[offset + 4 : offset + 4 + length].decode())
        offset += 4 + length
    return np.array(items, dtype=object)


def decode(response: oip.ModelInferResponse) -> dict[str, NDArray[Any]]:
    """Output name -> array, from raw_output_contents (the only form the server answers)."""
    assert len(response.raw_output_contents) == len(response.outputs)
    decoded = {}
    for out, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        assert not out.HasField("contents")
        dtype = NP[out.datatype]
        array = _bytes_tensor(raw) if dtype is None else np.frombuffer(raw, dtype)
        decoded[out.name] = array.reshape(tuple(out.shape))
    return decoded


def _metric(server: RunningServer, pattern: str) -> float | None:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        match = re.search(pattern + r" ([0-9.e+-]+)", r.read().decode())
    return float(match.group(1)) if match else None


def rows(name: str, n: int, seed: int = 0) -> dict[str, NDArray[Any]]:
    rng = np.random.default_rng(seed)
    key, shape = {"tiny_cls": ("x", (6,)), "tiny_reg": ("features", (5,))}[name]
    return {key: rng.standard_normal((n, *shape)).astype(np.float32)}


# --- server and model RPCs ---------------------------------------------------------------------


def test_server_live_ready_and_metadata(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    assert stub.ServerLive(oip.ServerLiveRequest()).live
    assert stub.ServerReady(oip.ServerReadyRequest()).ready
    meta = stub.ServerMetadata(oip.ServerMetadataRequest())
    assert (meta.name, meta.version) == ("mcdropout", service.__version__)
    assert list(meta.extensions) == [
        "parameters", "mc_dropout", "model_configuration", "statistics", "model_repository",
        "binary_tensor_data",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "version", "ready"),
    [("tiny_cls", "", True), ("tiny_reg", "1", True), ("tiny_reg", "2", True),
     ("tiny_reg", "3", False), ("nope", "", False), ("deterministic", "", False)],
)  # fmt: skip
def test_model_ready(
    stub: oip_grpc.GRPCInferenceServiceStub, name: str, version: str, ready: bool
) -> None:
    assert stub.ModelReady(oip.ModelReadyRequest(name=name, version=version)).ready is ready


def test_model_ready_with_a_malformed_version_is_invalid(
    stub: oip_grpc.GRPCInferenceServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelReady(oip.ModelReadyRequest(name="tiny_cls", version="latest"))
    assert info.value.code() == Code.INVALID_ARGUMENT


def _tensors(meta: Any) -> list[tuple[str, str, list[int]]]:
    return [(t.name, t.datatype, list(t.shape)) for t in meta]


def test_model_metadata_of_a_classifier(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    meta = stub.ModelMetadata(oip.ModelMetadataRequest(name="tiny_cls"))
    assert (meta.name, list(meta.versions), meta.platform) == (
        "tiny_cls", ["1"], "onnxruntime_mcdropout",
    )  # fmt: skip
    assert _tensors(meta.inputs) == [("x", "FP32", [-1, 6])]
    assert _tensors(meta.outputs) == [
        ("logits", "FP32", [-1, 4]),  # the graph's own output: its MC mean
        ("logits_mean", "FP64", [-1, 4]),
        ("logits_variance", "FP64", [-1, 4]),
        ("logits_std", "FP64", [-1, 4]),
        ("logits_predicted_class", "INT64", [-1]),
        ("logits_predicted_label", "BYTES", [-1]),
        ("logits_entropy", "FP64", [-1]),
        ("logits_expected_entropy", "FP64", [-1]),
        ("logits_mutual_information", "FP64", [-1]),
        ("logits_variation_ratio", "FP64", [-1]),
    ]


def test_model_metadata_of_a_regressor_and_its_versions(
    stub: oip_grpc.GRPCInferenceServiceStub,
) -> None:
    meta = stub.ModelMetadata(oip.ModelMetadataRequest(name="tiny_reg", version="1"))
    assert list(meta.versions) == ["2", "1"]
    assert _tensors(meta.inputs) == [("features", "FP32", [-1, 5])]
    assert _tensors(meta.outputs) == [
        ("y", "FP32", [-1, 2]), ("y_mean", "FP64", [-1, 2]), ("y_variance", "FP64", [-1, 2]),
        ("y_std", "FP64", [-1, 2]),
    ]  # fmt: skip


@pytest.mark.parametrize(("name", "version"), [("nope", ""), ("tiny_reg", "7")])
def test_model_metadata_of_an_unknown_model_is_not_found(
    stub: oip_grpc.GRPCInferenceServiceStub, name: str, version: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelMetadata(oip.ModelMetadataRequest(name=name, version=version))
    assert info.value.code() == Code.NOT_FOUND


def test_health_reports_the_service_serving(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = health.Check(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
        )
        assert check.status == health_pb2.HealthCheckResponse.SERVING


# --- ModelInfer ------------------------------------------------------------------------------


def test_infer_raw_classifier_answers_every_statistic(
    stub: oip_grpc.GRPCInferenceServiceStub,
) -> None:
    response = stub.ModelInfer(
        infer_request("tiny_cls", rows("tiny_cls", 5), 300, request_id="r-1")
    )
    assert (response.model_name, response.model_version, response.id) == ("tiny_cls", "1", "r-1")
    assert response.parameters["mc_samples"].int64_param == 300
    out = decode(response)
    assert list(out) == CLS_OUTPUTS
    assert out["logits_mean"].shape == (5, 4)
    np.testing.assert_allclose(out["logits_mean"].sum(axis=1), 1.0, rtol=1e-6)  # float32 softmax
    np.testing.assert_allclose(out["logits_std"] ** 2, out["logits_variance"], rtol=1e-9)
    assert out["logits"].dtype == np.float32  # the graph's dtype
    np.testing.assert_array_equal(out["logits"], out["logits_mean"].astype(np.float32))
    np.testing.assert_array_equal(out["logits_predicted_class"], out["logits_mean"].argmax(axis=1))
    labels = np.array(["ant", "bee", "cat", "dog"])
    assert list(out["logits_predicted_label"]) == list(labels[out["logits_predicted_class"]])
    entropy = -(out["logits_mean"] * np.log(out["logits_mean"])).sum(axis=1)
    np.testing.assert_allclose(out["logits_entropy"], entropy, rtol=1e-9)
    np.testing.assert_allclose(
        out["logits_mutual_information"],
        out["logits_entropy"] - out["logits_expected_entropy"],
        atol=1e-12,
    )
    assert np.all((out["logits_variation_ratio"] >= 0) & (out["logits_variation_ratio"] <= 0.75))


def test_typed_fp32_contents_and_the_default_number_of_samples(
    stub: oip_grpc.GRPCInferenceServiceStub,
) -> None:
    x = rows("tiny_cls", 3)["x"]
    tensor = Input(name="x", datatype="FP32", shape=x.shape)
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    response = stub.ModelInfer(oip.ModelInferRequest(model_name="tiny_cls", inputs=[tensor]))
    assert response.parameters["mc_samples"].int64_param == 50  # the model's default
    assert not any(out.HasField("contents") for out in response.outputs)
    assert decode(response)["logits_mean"].shape == (3, 4)


def test_requested_outputs_come_alone_in_the_requested_order(
    stub: oip_grpc.GRPCInferenceServiceStub,
) -> None:
    asked = ["logits_mutual_information", "logits_predicted_label", "logits_mean"]
    response = stub.ModelInfer(infer_request("tiny_cls", rows("tiny_cls", 2), 20, outputs=asked))
    out = decode(response)
    assert list(out) == asked
    assert [o.datatype for o in response.outputs] == ["FP64", "BYTES", "FP64"]
    assert out["logits_predicted_label"].shape == (2,)


def test_an_older_version_on_request(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    response = stub.ModelInfer(infer_request("tiny_reg", rows("tiny_reg", 2), 10, version="1"))
    assert response.model_version == "1"
    assert decode(response)["y_mean"].shape == (2, 2)
    newest = stub.ModelInfer(infer_request("tiny_reg", rows("tiny_reg", 2), 10))
    assert newest.model_version == "2"


def _mixed() -> oip.ModelInferRequest:
    request = infer_request("tiny_cls", rows("tiny_cls", 1))
    request.inputs[0].contents.fp32_contents.extend([0.0] * 6)
    return request


def _param(parameter: oip.InferParameter) -> oip.ModelInferRequest:
    request = infer_request("tiny_cls", rows("tiny_cls", 1))
    request.parameters["mc_samples"].CopyFrom(parameter)
    return request


def _named_param(name: str, parameter: oip.InferParameter) -> oip.ModelInferRequest:
    request = infer_request("tiny_cls", rows("tiny_cls", 1))
    request.parameters[name].CopyFrom(parameter)
    return request


def _short_blob() -> oip.ModelInferRequest:
    request = infer_request("tiny_cls", rows("tiny_cls", 2))
    request.raw_input_contents[0] = request.raw_input_contents[0][:-1]
    return request


def _bytes_input() -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="tiny_cls")
    request.inputs.add(name="x", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(b"\1\0\0\0a")
    return request


X = rows("tiny_cls", 2)["x"]
ERRORS: list[tuple[str, Any, Code, str]] = [
    ("wrong datatype", lambda: infer_request("tiny_cls", {"x": X.astype(np.float64)}), Code.INVALID_ARGUMENT, "must be float32, got float64"),
    ("wrong shape", lambda: infer_request("tiny_cls", {"x": X[:, :5]}), Code.INVALID_ARGUMENT, "must have shape [-1, 6], got [2, 5]"),
    ("byte length", _short_blob, Code.INVALID_ARGUMENT, "47 bytes of raw contents for shape [2, 6] of FP32 (expected 48)"),
    ("NaN", lambda: infer_request("tiny_cls", {"x": np.full((1, 6), np.nan, np.float32)}), Code.INVALID_ARGUMENT, "NaN or infinite"),
    ("raw and typed", _mixed, Code.INVALID_ARGUMENT, "either raw_input_contents or typed contents"),
    ("BYTES input", _bytes_input, Code.INVALID_ARGUMENT, "unsupported datatype 'BYTES'"),
    ("unknown output", lambda: infer_request("tiny_cls", {"x": X}, outputs=["logitz"]), Code.INVALID_ARGUMENT, "has no output 'logitz'"),
    ("unknown mc_ parameter", lambda: _named_param("mc_sample", oip.InferParameter(int64_param=3)), Code.INVALID_ARGUMENT, "unknown parameter 'mc_sample'"),
    ("sequence_id", lambda: _named_param("sequence_id", oip.InferParameter(uint64_param=7)), Code.INVALID_ARGUMENT, "sequences are not supported"),
    ("priority", lambda: _named_param("priority", oip.InferParameter(uint64_param=1)), Code.INVALID_ARGUMENT, "priorities are not supported"),
    ("mc_samples double", lambda: _param(oip.InferParameter(double_param=10.0)), Code.INVALID_ARGUMENT, "'mc_samples' must be an integer"),
    ("mc_samples string", lambda: _param(oip.InferParameter(string_param="10")), Code.INVALID_ARGUMENT, "'mc_samples' must be an integer"),
    ("mc_samples bool", lambda: _param(oip.InferParameter(bool_param=True)), Code.INVALID_ARGUMENT, "'mc_samples' must be an integer"),
    ("mc_samples negative", lambda: _param(oip.InferParameter(int64_param=-5)), Code.INVALID_ARGUMENT, "must be >= 0"),
    ("mc_samples above max", lambda: infer_request("tiny_cls", {"x": X}, 20_001), Code.INVALID_ARGUMENT, "num_samples must be in 1..20000"),
    ("unknown model", lambda: infer_request("nope", {"x": X}), Code.NOT_FOUND, "model 'nope' not found"),
    ("unknown version", lambda: infer_request("tiny_cls", {"x": X}, version="9"), Code.NOT_FOUND, "version '9'"),
    ("too many rows", lambda: infer_request("tiny_cls", {"x": np.zeros((65, 6), np.float32)}), Code.RESOURCE_EXHAUSTED, "65 rows is more than the limit of 64"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "make", "code", "fragment"), ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_requests_get_their_status(
    stub: oip_grpc.GRPCInferenceServiceStub, case: str, make: Any, code: Code, fragment: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(make(), timeout=30)
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details()
    assert stub.ServerLive(oip.ServerLiveRequest()).live


# --- ModelStreamInfer ------------------------------------------------------------------------


def test_stream_answers_in_order_and_survives_errors(
    stub: oip_grpc.GRPCInferenceServiceStub,
) -> None:
    good = rows("tiny_reg", 2)
    requests = [
        infer_request("tiny_reg", good, 2000, request_id="0"),  # the slowest first
        infer_request("tiny_reg", good, 5, request_id="1"),
        infer_request("tiny_reg", {"features": good["features"][:, :4]}, request_id="2"),
        infer_request("nope", good, request_id="3"),
        _param(oip.InferParameter(string_param="x")),
        *(infer_request("tiny_reg", good, 10 + i, request_id=str(5 + i)) for i in range(12)),
    ]
    requests[4].id = "4"
    answers = list(stub.ModelStreamInfer(iter(requests), timeout=60))
    assert [a.infer_response.id for a in answers] == [str(i) for i in range(len(requests))]
    errors = {a.infer_response.id: a.error_message for a in answers if a.error_message}
    assert set(errors) == {"2", "3", "4"}
    assert re.match(r"INVALID_ARGUMENT: input 'features' must have shape", errors["2"])
    assert errors["3"] == "NOT_FOUND: model 'nope' not found"
    assert errors["4"].startswith("INVALID_ARGUMENT: parameter 'mc_samples' must be an integer")
    for answer in answers:
        if not answer.error_message:
            samples = answer.infer_response.parameters["mc_samples"].int64_param
            expected = {"0": 2000, "1": 5}.get(answer.infer_response.id)
            assert samples == (expected or 10 + int(answer.infer_response.id) - 5)
            assert decode(answer.infer_response)["y_mean"].shape == (2, 2)


def test_stream_errors_are_counted_in_metrics(
    stub: oip_grpc.GRPCInferenceServiceStub, server: RunningServer
) -> None:
    def count() -> float:
        pattern = (r'mcd_request_errors_total\{code="INVALID_ARGUMENT",method="ModelStreamInfer",'
                   r'model="tiny_reg"\}')  # fmt: skip
        return _metric(server, pattern) or 0.0

    before = count()
    bad = infer_request("tiny_reg", {"features": np.zeros((1, 3), np.float32)})
    answers = list(stub.ModelStreamInfer(iter([bad, bad]), timeout=30))
    assert all(a.error_message for a in answers)
    assert count() == before + 2


def test_a_cancelled_stream_drops_its_requests_and_the_server_goes_on(
    stub: oip_grpc.GRPCInferenceServiceStub, server: RunningServer
) -> None:
    sent = threading.Event()
    release = threading.Event()

    def requests() -> Iterator[oip.ModelInferRequest]:
        yield infer_request("tiny_reg", rows("tiny_reg", 20), 20_000)  # about a second of work
        sent.set()
        release.wait(30)  # keep the stream open until the client cancels

    call = stub.ModelStreamInfer(requests(), timeout=60)
    try:
        assert sent.wait(30)
        call.cancel()
    finally:
        release.set()
    with pytest.raises(grpc.RpcError) as info:
        next(iter(call))
    assert info.value.code() == Code.CANCELLED
    gauge = r'mcd_requests_in_flight\{method="ModelStreamInfer"\}'
    deadline = time.monotonic() + 20
    while _metric(server, gauge) not in (None, 0.0):
        assert time.monotonic() < deadline, "the cancelled stream's request is still in flight"
        time.sleep(0.05)
    assert stub.ServerLive(oip.ServerLiveRequest()).live
    assert "ModelStreamInfer failed" not in server.log()


# --- agreement with Predict ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "output"), [("tiny_cls", "logits"), ("tiny_reg", "y")])
def test_oip_agrees_with_predict(
    stub: oip_grpc.GRPCInferenceServiceStub,
    client: Client,
    test_models: ExportedModels,
    name: str,
    output: str,
) -> None:
    """Both protocols reach the same core: the same distribution of mean and variance."""
    x = rows(name, 4, seed=7)
    t = 2000
    ours = decode(stub.ModelInfer(infer_request(name, x, t)))
    theirs = client.predict(name, x, num_samples=t).outputs[output]
    # The answers carry no fourth moment: the variance test takes the kurtosis from PyTorch MC
    # dropout samples of the same model (the same distribution under the null hypothesis).
    samples = torch_mc_samples(
        test_models.torch_models[name], next(iter(x.values())), N_TORCH, softmax=name == "tiny_cls"
    )
    reference = Moments.from_samples(samples.reshape(N_TORCH, -1))
    oip_side = server_moments(ours[f"{output}_mean"], ours[f"{output}_variance"], t, reference)
    predict_side = server_moments(theirs.mean, theirs.variance, t, reference)
    mean = mean_z_test(oip_side, predict_side, ALPHA)
    assert mean.passed, mean
    variance = variance_ratio_test(oip_side, predict_side, ALPHA)
    assert variance.passed, variance


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("tiny_cls", {"num_samples": 30, "return_samples": True, "seed": 5}),
        ("tiny_reg", {"num_samples": 40, "interval_levels": [0.9, 0.5], "seed": 2**63 - 1}),
        ("tiny_reg", {"num_samples": 64, "target_standard_error": 0.05}),
    ],
)
def test_the_clients_oip_helpers_decode_what_predict_answers(
    stub: oip_grpc.GRPCInferenceServiceStub, client: Client, name: str, options: dict[str, Any]
) -> None:
    """mcdropout_client.oip: its parameters set every option, and the OIP answer decodes into
    the Prediction that Predict gives; with a seed, bit for bit."""
    x = rows(name, 3, seed=8)
    request = infer_request(name, x)
    for key, value in client_oip.mc_parameters(**options).items():
        parameter = request.parameters[key]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int):
            parameter.int64_param = value
        elif isinstance(value, float):
            parameter.double_param = value
        else:
            parameter.string_param = value
    response = stub.ModelInfer(request)
    ours = client_oip.prediction_from_outputs(
        decode(response),
        model=response.model_name,
        version=response.model_version,
        num_samples=response.parameters[client_oip.MC_SAMPLES].int64_param,
    )
    theirs = client.predict(name, x, **options)
    assert (ours.model, ours.version) == (name, theirs.version)
    out, expected = ours.output, theirs.output
    assert out.is_classification == expected.is_classification
    if options.get("seed") is not None:  # reproducible: the same numbers through both protocols
        assert ours.num_samples == theirs.num_samples
        for field in ("mean", "variance", "std", "predictive_entropy", "samples"):
            a, b = getattr(out, field), getattr(expected, field)
            assert (a is None) == (b is None), field
            if a is not None:
                np.testing.assert_array_equal(a, b, err_msg=field)
        assert out.predicted_label == expected.predicted_label
        assert [(i.level, i.method) for i in out.intervals] == sorted(
            ((i.level, i.method) for i in expected.intervals),
            key=lambda k: (k[0], ["gaussian", "empirical"].index(k[1])),
        )
        for interval in expected.intervals:
            got = out.interval(interval.level, interval.method)  # type: ignore[arg-type]
            np.testing.assert_array_equal(got.lower, interval.lower)
            np.testing.assert_array_equal(got.upper, interval.upper)
    else:  # adaptive: both report each row's T, capped at 64
        assert ours.num_samples_per_row is not None
        assert theirs.num_samples_per_row is not None
        assert ours.num_samples_per_row.shape == theirs.num_samples_per_row.shape == (3,)
        assert ours.num_samples_per_row.max() <= 64
        assert ours.num_samples == ours.num_samples_per_row.max()


# --- every datatype a model may take ---------------------------------------------------------


class TypedDtypes(nn.Module):
    """One [B, 2] input per dtype that can travel as typed contents, cast and concatenated."""

    def __init__(self, num_inputs: int = 5) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(2 * num_inputs, 3))

    def forward(self, f64: torch.Tensor, i64: torch.Tensor, i32: torch.Tensor, u8: torch.Tensor,
                b: torch.Tensor) -> torch.Tensor:  # fmt: skip
        return self.head(torch.cat([x.float() for x in (f64, i64, i32, u8, b)], dim=1))


class AllDtypes(TypedDtypes):
    """The same plus an FP16 input (raw contents only)."""

    def __init__(self) -> None:
        super().__init__(num_inputs=6)

    def forward(self, f16: torch.Tensor, f64: torch.Tensor, i64: torch.Tensor,  # type: ignore[override]  # noqa: PLR0917
                i32: torch.Tensor, u8: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # fmt: skip
        return self.head(torch.cat([x.float() for x in (f16, f64, i64, i32, u8, b)], dim=1))


DTYPE_INPUTS = {"f16": "FP16", "f64": "FP64", "i64": "INT64", "i32": "INT32", "u8": "UINT8",
                "b": "BOOL"}  # fmt: skip
TYPED_INPUTS = {k: v for k, v in DTYPE_INPUTS.items() if v != "FP16"}


def dtype_rows(n: int, inputs: dict[str, str] = DTYPE_INPUTS) -> dict[str, NDArray[Any]]:
    rng = np.random.default_rng(3)
    return {name: (rng.random((n, 2)) * 5).astype(np.dtype(NP[datatype]).newbyteorder("="))
            for name, datatype in inputs.items()}  # fmt: skip


@pytest.fixture(scope="module")
def dtypes_stub(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[oip_grpc.GRPCInferenceServiceStub]:
    """A server of its own with two models: ``dtypes`` takes FP16, FP64, INT64, INT32, UINT8 and
    BOOL; ``typed`` the same without FP16, which cannot travel as typed contents."""
    repository = tmp_path_factory.mktemp("dtypes_repository")
    for name, model, inputs in (("dtypes", AllDtypes, DTYPE_INPUTS),
                                ("typed", TypedDtypes, TYPED_INPUTS)):  # fmt: skip
        torch.manual_seed(0)
        example = tuple(torch.from_numpy(a.copy()) for a in dtype_rows(8, inputs).values())
        export_model(model(), example, repository=repository, name=name,
                     task="regression", input_names=list(inputs), output_names=["y"],
                     verify_samples=2000)  # fmt: skip
    running = start_server(repository, Path(tmp_path_factory.mktemp("dtypes_server")))
    try:
        with grpc.insecure_channel(running.target) as channel:
            yield oip_grpc.GRPCInferenceServiceStub(channel)
    finally:
        assert stop_server(running) == 0, running.log()


def test_every_input_datatype_raw(dtypes_stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    meta = dtypes_stub.ModelMetadata(oip.ModelMetadataRequest(name="dtypes"))
    assert _tensors(meta.inputs) == [(n, d, [-1, 2]) for n, d in DTYPE_INPUTS.items()]
    response = dtypes_stub.ModelInfer(infer_request("dtypes", dtype_rows(3), 50))
    assert decode(response)["y_mean"].shape == (3, 3)
    wrong = infer_request("dtypes", {**dtype_rows(3), "i32": dtype_rows(3)["i64"]})
    with pytest.raises(grpc.RpcError) as info:
        dtypes_stub.ModelInfer(wrong)
    assert info.value.code() == Code.INVALID_ARGUMENT
    assert "input 'i32' must be int32, got int64" in info.value.details()


def test_every_input_datatype_typed(dtypes_stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    fields = {"FP64": "fp64_contents", "INT64": "int64_contents", "INT32": "int_contents",
              "UINT8": "uint_contents", "BOOL": "bool_contents"}  # fmt: skip
    x = dtype_rows(2, TYPED_INPUTS)
    request = oip.ModelInferRequest(model_name="typed")
    for name, datatype in TYPED_INPUTS.items():
        tensor = request.inputs.add(name=name, datatype=datatype, shape=[2, 2])
        getattr(tensor.contents, fields[datatype]).extend(x[name].ravel().tolist())
    typed = decode(dtypes_stub.ModelInfer(request))
    assert typed["y_mean"].shape == (2, 3)


def test_fp16_cannot_travel_as_typed_contents(
    dtypes_stub: oip_grpc.GRPCInferenceServiceStub,
) -> None:
    request = infer_request("dtypes", dtype_rows(1))
    del request.raw_input_contents[:]
    for tensor, array in zip(request.inputs, dtype_rows(1).values(), strict=True):
        tensor.contents.fp32_contents.extend(array.astype(np.float32).ravel().tolist())
    with pytest.raises(grpc.RpcError) as info:
        dtypes_stub.ModelInfer(request)
    assert info.value.code() == Code.INVALID_ARGUMENT
    assert "FP16 has no typed contents" in info.value.details()
