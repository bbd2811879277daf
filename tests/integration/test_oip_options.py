"""The Open Inference Protocol's optional MC parameters: raw samples, prediction intervals and
adaptive sampling, answered as extra outputs (same core as Predict)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from service.gen.inference import grpc_service_pb2_grpc as oip_grpc
from tests.integration.conftest import RunningServer
from tests.integration.test_oip import decode, infer_request


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[oip_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


X = {"features": np.random.default_rng(12).standard_normal((3, 5)).astype(np.float32)}


def test_samples_and_intervals_as_outputs(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    request = infer_request("tiny_reg", X, mc_samples=200)
    request.parameters["mc_return_samples"].bool_param = True
    request.parameters["mc_interval_levels"].string_param = "0.9"
    out = decode(stub.ModelInfer(request, timeout=60))
    samples = out["y_samples"]
    assert samples.shape == (3, 200, 2)
    np.testing.assert_allclose(out["y_mean"], samples.mean(axis=1), rtol=1e-12)
    q = np.quantile(samples, [0.05, 0.95], axis=1)
    np.testing.assert_allclose(out["y_interval_empirical_0.9_lower"], q[0], rtol=1e-12)
    np.testing.assert_allclose(out["y_interval_empirical_0.9_upper"], q[1], rtol=1e-12)
    half = out["y_interval_gaussian_0.9_upper"] - out["y_mean"]
    np.testing.assert_allclose(half, 1.6448536269514722 * out["y_std"], rtol=1e-9)


def test_requested_extra_output_alone(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    request = infer_request("tiny_reg", X, outputs=["mc_samples_per_row", "y_mean"])
    request.parameters["mc_target_standard_error"].double_param = 0.05
    out = decode(stub.ModelInfer(request, timeout=60))
    assert list(out) == ["mc_samples_per_row", "y_mean"]
    assert out["mc_samples_per_row"].shape == (3,)
    assert (out["mc_samples_per_row"] >= 32).all()


@pytest.mark.parametrize(
    ("name", "setter", "fragment"),
    [
        ("mc_interval_levels", lambda p: setattr(p, "string_param", "0.9,x"), "comma-separated"),
        (
            "mc_return_samples",
            lambda p: setattr(p, "int64_param", 1),
            "'mc_return_samples' must be a boolean, got an integer",
        ),
        (
            "mc_target_standard_error",
            lambda p: setattr(p, "string_param", "small"),
            "'mc_target_standard_error' must be a number, got a string",
        ),
    ],
)
def test_bad_option_parameters(
    stub: oip_grpc.GRPCInferenceServiceStub, name: str, setter, fragment: str
) -> None:  # type: ignore[no-untyped-def]
    request = infer_request("tiny_reg", X)
    setter(request.parameters[name])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in (info.value.details() or "")


def test_extra_outputs_need_their_parameter(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    request = infer_request("tiny_reg", X, outputs=["y_samples"])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has no output 'y_samples'" in (info.value.details() or "")


def test_mc_seed_reproduces_answers(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    def run(rows: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        request = infer_request("tiny_reg", {"features": rows}, mc_samples=100)
        request.parameters["mc_seed"].uint64_param = seed
        return decode(stub.ModelInfer(request, timeout=60))

    rows = X["features"]
    both = run(rows, 5)
    alone = run(rows[1:2], 5)
    assert both["y_mean"][1].tobytes() == alone["y_mean"][0].tobytes()
    assert both["y_variance"][1].tobytes() == alone["y_variance"][0].tobytes()
    assert run(rows[1:2], 6)["y_mean"][0].tobytes() != alone["y_mean"][0].tobytes()
