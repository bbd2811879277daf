"""The client's conversions, options, errors, retry policy and shared core: no sockets.

The core's flows are driven here by fake transports, for the sync and the asyncio client
alike: the two share every line but the transport call and the sleep.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from mcdropout_client import (
    AccessDeniedError,
    AsyncClient,
    CallCancelledError,
    Client,
    ClientError,
    DeadlineExceededError,
    InvalidArgumentError,
    ModelInfo,
    NotFoundError,
    PermissionDeniedError,
    Prediction,
    ResourceExhaustedError,
    RetryPolicy,
    ServerError,
    UnauthenticatedError,
    UnavailableError,
)
from mcdropout_client._convert import (
    PredictOptions,
    as_dtype,
    concat_predictions,
    model_info_from_proto,
    model_summary_from_proto,
    predict_request,
    prediction_from_proto,
    prepare_inputs,
    version_str,
)
from mcdropout_client._core import (
    GET_MODEL_METADATA,
    HEALTH_CHECK,
    LIST_MODELS,
    PREDICT,
    call_metadata,
    channel_options,
    check_timeout,
)
from mcdropout_client._gen.mcdropout.v1 import mcdropout_pb2 as pb
from mcdropout_client._tensors import decode_tensor, encode_tensor
from mcdropout_client.errors import error_for, from_rpc_error

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def metadata_proto(
    name: str = "cls",
    inputs: tuple[tuple[str, list[int], int], ...] = (("x", [-1, 6], pb.DATA_TYPE_FLOAT32),),
) -> pb.ModelMetadata:
    return pb.ModelMetadata(
        name=name,
        version="2",
        versions=["2", "1"],
        task=pb.TASK_CLASSIFICATION,
        inputs=[pb.TensorSpec(name=n, dtype=d, shape=s) for n, s, d in inputs],  # type: ignore[misc]
        outputs=[
            pb.TensorSpec(
                name="logits",
                dtype=pb.DATA_TYPE_FLOAT32,
                shape=[-1, 3],
                semantics=pb.OUTPUT_SEMANTICS_LOGITS,
            )
        ],
        labels=["a", "b", "c"],
        default_num_samples=50,
        max_num_samples=1000,
        provider="CPUExecutionProvider",
        opset=18,
        dropout=[pb.DropoutLayer(module="head.0", type="Dropout", p=0.5)],
        verified=True,
        weights_sha256="ab" * 32,
    )


def info(**kw: Any) -> ModelInfo:
    return model_info_from_proto(metadata_proto(**kw))


def classification_output(rows: int, name: str = "logits") -> pb.OutputStatistics:
    rng = np.random.default_rng(rows)
    mean = rng.dirichlet(np.ones(3), rows)
    variance = rng.uniform(0, 0.01, (rows, 3))
    variance[0, 0] = np.nan  # T = 1 gives NaN variances
    classes = mean.argmax(axis=1)
    per_row = rng.uniform(0, 1, rows)
    return pb.OutputStatistics(
        name=name,
        semantics=pb.OUTPUT_SEMANTICS_LOGITS,
        mean=encode_tensor(mean),
        variance=encode_tensor(variance),
        std=encode_tensor(np.sqrt(variance)),
        predicted_class=encode_tensor(classes.astype(np.int64)),
        predicted_label=["abc"[c] for c in classes],
        predictive_entropy=encode_tensor(per_row + 0.5),
        expected_entropy=encode_tensor(np.full(rows, 0.5)),
        mutual_information=encode_tensor(per_row),
        variation_ratio=encode_tensor(np.zeros(rows)),
    )


def regression_output(
    rows: int, name: str = "y", levels: tuple[float, ...] = (), samples: int = 0
) -> pb.OutputStatistics:
    mean = np.arange(rows * 2, dtype=np.float64).reshape(rows, 2)
    variance = np.full((rows, 2), 4.0)
    variance[:, 1] = 0.25
    out = pb.OutputStatistics(
        name=name,
        semantics=pb.OUTPUT_SEMANTICS_VALUES,
        mean=encode_tensor(mean),
        variance=encode_tensor(variance),
        std=encode_tensor(np.sqrt(variance)),
    )
    for level in levels:
        for method, width in (("gaussian", 1.0), ("empirical", 2.0)):
            out.intervals.append(
                pb.Interval(
                    level=level,
                    method=method,
                    lower=encode_tensor(mean - width * level),
                    upper=encode_tensor(mean + width * level),
                )
            )
    if samples:
        out.samples.CopyFrom(encode_tensor(np.ones((rows, samples, 2))))
    return out


def response(*outputs: pb.OutputStatistics, version: str = "2") -> pb.PredictResponse:
    return pb.PredictResponse(model="m", version=version, num_samples=50, outputs=list(outputs))


# --- proto -> result types ----------------------------------------------------------------


def test_model_metadata_becomes_model_info_with_numpy_dtypes() -> None:
    model = info()
    assert model.name == "cls"
    assert (model.version, model.versions) == ("2", ("2", "1"))
    assert model.task == "classification"
    assert model.labels == ("a", "b", "c")
    assert model.inputs[0].dtype == np.dtype(np.float32)
    assert model.inputs[0].shape == (-1, 6)
    assert model.inputs[0].row_shape == (6,)
    assert model.inputs[0].semantics is None
    assert model.outputs[0].semantics == "logits"
    assert (model.default_num_samples, model.max_num_samples) == (50, 1000)
    assert model.dropout[0].p == 0.5
    assert (model.provider, model.opset, model.verified) == ("CPUExecutionProvider", 18, True)
    assert model.weights_sha256 == "ab" * 32
    assert model.input().name == "x"
    assert model.input("x") is model.inputs[0]
    with pytest.raises(ValueError, match="no input 'z'"):
        model.input("z")
    assert json.loads(json.dumps(model.to_dict()))["inputs"][0]["dtype"] == "float32"


def test_variance_outputs_keep_their_semantics() -> None:
    proto = metadata_proto()
    proto.outputs.append(
        pb.TensorSpec(
            name="s",
            dtype=pb.DATA_TYPE_FLOAT32,
            shape=[-1, 3],
            semantics=pb.OUTPUT_SEMANTICS_LOG_VARIANCE,
        )
    )
    assert model_info_from_proto(proto).outputs[1].semantics == "log_variance"


def test_metadata_with_an_unknown_dtype_is_a_server_error() -> None:
    proto = metadata_proto(inputs=(("x", [-1, 6], 99),))
    with pytest.raises(ServerError) as error:
        model_info_from_proto(proto)
    assert error.value.code == grpc.StatusCode.INTERNAL


def test_model_summary() -> None:
    summary = model_summary_from_proto(
        pb.ModelSummary(name="r", versions=["3", "1"], task=pb.TASK_REGRESSION, ready=True)
    )
    assert (summary.name, summary.versions, summary.task, summary.ready) == (
        "r",
        ("3", "1"),
        "regression",
        True,
    )


def test_classification_response_decodes_every_statistic() -> None:
    proto = classification_output(4)
    result = prediction_from_proto(response(proto))
    assert isinstance(result, Prediction)
    assert (result.model, result.version, result.num_samples, result.num_rows) == ("m", "2", 50, 4)
    np.testing.assert_array_equal(result.mean, decode_tensor(proto.mean, "mean"))
    assert result.mean.dtype == np.float64
    assert not result.mean.flags.writeable
    assert result.predicted_class is not None
    assert result.predicted_class.dtype == np.int64
    assert result.predicted_label == tuple(proto.predicted_label)
    assert result.output.is_classification
    for name in ("predictive_entropy", "expected_entropy", "mutual_information"):
        assert getattr(result, name).shape == (4,)
    assert result.variation_ratio is not None
    for name in ("samples", "aleatoric_variance", "total_variance", "num_samples_per_row"):
        assert getattr(result, name) is None
    assert result.intervals == ()
    assert result.seed is None


def test_regression_response_has_no_classification_measures() -> None:
    result = prediction_from_proto(response(regression_output(3)))
    assert result.mean.shape == (3, 2)
    np.testing.assert_array_equal(result.std[:, 0], 2.0)
    assert not result.output.is_classification
    for name in ("predicted_class", "predicted_label", "predictive_entropy", "expected_entropy",
                 "mutual_information", "variation_ratio"):  # fmt: skip
        assert getattr(result, name) is None


def test_samples_intervals_heteroscedastic_and_per_row_t_are_decoded() -> None:
    y = regression_output(3, levels=(0.9, 0.5), samples=7)
    y.aleatoric_variance.CopyFrom(encode_tensor(np.full((3, 2), 0.5)))
    y.total_variance.CopyFrom(encode_tensor(np.full((3, 2), 4.5)))
    proto = response(y)
    proto.num_samples_per_row.CopyFrom(encode_tensor(np.array([50, 12, 3], np.int64)))
    result = prediction_from_proto(proto, seed=42)
    assert result.samples is not None
    assert result.samples.shape == (3, 7, 2)
    np.testing.assert_array_equal(result.aleatoric_variance, 0.5)  # type: ignore[arg-type]
    np.testing.assert_array_equal(result.total_variance, 4.5)  # type: ignore[arg-type]
    assert [(i.level, i.method) for i in result.intervals] == [
        (0.9, "gaussian"), (0.9, "empirical"), (0.5, "gaussian"), (0.5, "empirical"),
    ]  # fmt: skip
    empirical = result.interval(0.9)
    np.testing.assert_allclose(empirical.upper - result.mean, 1.8)
    np.testing.assert_allclose(result.interval(0.5, "gaussian").lower, result.mean - 0.5)
    with pytest.raises(KeyError, match=r"no empirical interval at 0\.8"):
        result.interval(0.8)
    assert result.num_samples_per_row is not None
    assert result.num_samples_per_row.tolist() == [50, 12, 3]
    assert result.seed == 42
    document = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert document["num_samples_per_row"] == [50, 12, 3]
    assert document["seed"] == 42
    assert len(document["outputs"]["y"]["intervals"]) == 4
    assert np.asarray(document["outputs"]["y"]["samples"]).shape == (3, 7, 2)


def test_several_outputs_need_an_explicit_choice() -> None:
    result = prediction_from_proto(response(regression_output(2, "a"), regression_output(2, "b")))
    assert list(result.outputs) == ["a", "b"]
    with pytest.raises(ValueError, match="pick one"):
        _ = result.mean
    assert result.outputs["b"].mean.shape == (2, 2)


@pytest.mark.parametrize("field", ["mean", "samples", "interval"])
def test_malformed_response_tensor_is_a_server_error(field: str) -> None:
    bad = regression_output(2, levels=(0.9,), samples=2)
    tensor = bad.intervals[1].upper if field == "interval" else getattr(bad, field)
    tensor.data = b"\x00"
    with pytest.raises(ServerError) as info_:
        prediction_from_proto(response(bad))
    assert info_.value.code == grpc.StatusCode.INTERNAL
    assert "malformed response" in info_.value.details


def test_to_dict_is_strict_json_with_nan_as_null() -> None:
    document = prediction_from_proto(response(classification_output(3))).to_dict()
    text = json.dumps(document, allow_nan=False)
    parsed = json.loads(text)["outputs"]["logits"]
    assert parsed["variance"][0][0] is None
    assert len(parsed["predicted_label"]) == 3
    assert parsed["semantics"] == "logits"


# --- arguments and inputs -> request --------------------------------------------------------


def test_ndarray_with_the_model_dtype_is_sent_as_it_is() -> None:
    x = np.ones((3, 6), np.float32)
    inputs = prepare_inputs(info(), x)
    assert list(inputs) == ["x"]
    assert inputs["x"] is x


def test_ndarray_with_another_dtype_is_refused_before_sending() -> None:
    with pytest.raises(ValueError, match=r"is float32, got float64.*astype\(np.float32\)"):
        prepare_inputs(info(), np.ones((3, 6)))


def test_lists_are_converted_to_the_model_dtype() -> None:
    inputs = prepare_inputs(info(), [[1, 2, 3, 4, 5, 6], [0.5] * 6])
    assert inputs["x"].dtype == np.float32
    assert inputs["x"].shape == (2, 6)


def test_one_row_without_batch_dimension_gets_one() -> None:
    assert prepare_inputs(info(), np.ones(6, np.float32))["x"].shape == (1, 6)
    assert prepare_inputs(info(), [1.0] * 6)["x"].shape == (1, 6)


def test_lossy_or_non_numeric_lists_are_refused() -> None:
    int_model = info(inputs=(("ids", [-1, 2], pb.DATA_TYPE_INT64),))
    with pytest.raises(ValueError, match="cannot convert float64 values to int64"):
        prepare_inputs(int_model, [[1.5, 2.0]])
    with pytest.raises(ValueError, match="must be numbers"):
        prepare_inputs(info(), [["a"] * 6])
    # whole numbers written as floats (CSV, JSON) may become integers
    assert as_dtype(np.array([1.0, 2.0]), np.dtype(np.int64), "ids").dtype == np.int64


def test_dict_inputs_and_input_name_for_multi_input_models() -> None:
    two = info(inputs=(("a", [-1, 2], pb.DATA_TYPE_FLOAT32), ("b", [-1, 3], pb.DATA_TYPE_FLOAT32)))
    a, b = np.zeros((4, 2), np.float32), np.zeros((4, 3), np.float32)
    assert set(prepare_inputs(two, {"a": a, "b": b})) == {"a", "b"}
    assert list(prepare_inputs(two, b, input_name="b")) == ["b"]
    with pytest.raises(ValueError, match="has inputs"):
        prepare_inputs(two, a)
    with pytest.raises(ValueError, match="no input 'c'"):
        prepare_inputs(two, {"c": a})
    with pytest.raises(ValueError, match="input_name is for a single array"):
        prepare_inputs(two, {"a": a}, input_name="a")
    with pytest.raises(ValueError, match="no inputs"):
        prepare_inputs(two, {})


def test_request_carries_the_inputs_and_every_option() -> None:
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    options = PredictOptions.of(7, True, [0.9, 0.5], None, 2**64 - 1)
    request = predict_request("m", "3", {"x": x}, options)
    assert (request.model, request.version, request.num_samples) == ("m", "3", 7)
    np.testing.assert_array_equal(decode_tensor(request.inputs[0].tensor, "x"), x)
    assert request.return_samples
    assert list(request.interval_levels) == [0.9, 0.5]
    assert request.seed == 2**64 - 1
    adaptive = predict_request("m", "", {"x": x}, PredictOptions.of(target_standard_error=0.01))
    assert adaptive.target_standard_error == 0.01
    assert not adaptive.HasField("seed")
    assert adaptive.num_samples == 0
    # seed 0 is a seed: sent, not confused with "no seed"
    assert predict_request("m", "", {"x": x}, PredictOptions.of(seed=0)).HasField("seed")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"num_samples": 2.5}, ValueError, "num_samples"),
        ({"num_samples": True}, ValueError, "num_samples"),
        ({"return_samples": "yes"}, TypeError, "return_samples"),
        ({"interval_levels": "0.9"}, TypeError, "interval_levels"),
        ({"interval_levels": [0.9, None]}, TypeError, "interval_levels"),
        ({"interval_levels": [float("nan")]}, ValueError, "finite"),
        ({"target_standard_error": 0.0}, ValueError, "None turns adaptive sampling off"),
        ({"target_standard_error": float("inf")}, ValueError, "target_standard_error"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 2**64}, ValueError, "seed"),
        ({"seed": 1.0}, ValueError, "seed"),
    ],
)
def test_bad_options_are_refused_before_sending(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        PredictOptions.of(**kwargs)


def test_numpy_scalars_are_accepted_as_options() -> None:
    options = PredictOptions.of(np.int64(5), np.bool_(True), np.array([0.9]), np.float32(0.5),
                                np.uint64(2**64 - 1))  # fmt: skip
    assert options == PredictOptions(5, True, (0.9,), 0.5, 2**64 - 1)
    assert type(options.seed) is int


def test_version_argument() -> None:
    assert (version_str(None), version_str(3), version_str("2")) == ("", "3", "2")
    with pytest.raises(TypeError):
        version_str(1.0)  # type: ignore[arg-type]


def test_concat_predictions_keeps_row_order() -> None:
    parts = [prediction_from_proto(response(classification_output(n))) for n in (2, 3)]
    joined = concat_predictions(parts)
    assert joined.num_rows == 5
    np.testing.assert_array_equal(joined.mean, np.concatenate([p.mean for p in parts]))
    assert joined.predicted_label == parts[0].predicted_label + parts[1].predicted_label  # type: ignore[operator]
    other = prediction_from_proto(response(classification_output(2), version="1"))
    with pytest.raises(ValueError, match="different"):
        concat_predictions([parts[0], other])
    with pytest.raises(ValueError, match="no predictions"):
        concat_predictions([])


def test_concat_predictions_joins_samples_intervals_and_per_row_t() -> None:
    def part(rows: int, t: int) -> Prediction:
        proto = response(regression_output(rows, levels=(0.9,), samples=4))
        proto.num_samples = t
        proto.num_samples_per_row.CopyFrom(encode_tensor(np.full(rows, t, np.int64)))
        return prediction_from_proto(proto)

    joined = concat_predictions([part(2, 10), part(3, 40)])
    assert joined.num_samples == 40  # the largest, as in one adaptive answer
    assert joined.num_samples_per_row.tolist() == [10, 10, 40, 40, 40]  # type: ignore[union-attr]
    assert joined.samples.shape == (5, 4, 2)  # type: ignore[union-attr]
    assert joined.interval(0.9, "gaussian").lower.shape == (5, 2)
    plain = prediction_from_proto(response(regression_output(2)))
    with pytest.raises(ValueError, match=r"different interval levels|only some"):
        concat_predictions([part(2, 10), plain])


# --- errors ---------------------------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "family"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.OUT_OF_RANGE, InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
        (grpc.StatusCode.CANCELLED, CallCancelledError),
        (grpc.StatusCode.UNAUTHENTICATED, UnauthenticatedError),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError),
        (grpc.StatusCode.INTERNAL, ServerError),
        (grpc.StatusCode.UNKNOWN, ServerError),
        (grpc.StatusCode.DATA_LOSS, ServerError),
        (grpc.StatusCode.UNIMPLEMENTED, ServerError),
        (grpc.StatusCode.FAILED_PRECONDITION, ClientError),
    ],
)
def test_each_status_family_has_its_class(code: grpc.StatusCode, family: type) -> None:
    error = from_rpc_error(FakeRpcError(code, "why"))
    assert type(error) is family
    assert isinstance(error, ClientError)
    assert (error.code, error.details, str(error)) == (code, "why", f"{code.name}: why")


def test_access_denied_covers_both_auth_codes() -> None:
    for code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        assert isinstance(error_for(code, "no"), AccessDeniedError)


def test_an_rpc_error_without_a_code_is_unknown() -> None:
    error = from_rpc_error(grpc.RpcError())
    assert error.code == grpc.StatusCode.UNKNOWN
    assert isinstance(error, ServerError)


# --- retry policy, deadlines, settings ------------------------------------------------------


def test_retry_policy_backs_off_exponentially_on_unavailable_only() -> None:
    policy = RetryPolicy(max_retries=3, backoff_s=0.1, max_backoff_s=0.3)
    delays = [policy.delay_s(UNAVAILABLE, i, None, 0.0) for i in range(4)]
    assert delays == [0.1, 0.2, 0.3, None]
    for code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL):  # fmt: skip
        assert policy.delay_s(code, 0, None, 0.0) is None
    assert RetryPolicy(max_retries=0).delay_s(UNAVAILABLE, 0, None, 0.0) is None


def test_retry_policy_never_sleeps_past_the_deadline() -> None:
    policy = RetryPolicy(max_retries=5, backoff_s=1.0, max_backoff_s=8.0)
    assert policy.delay_s(UNAVAILABLE, 0, deadline=10.5, now=9.0) == 1.0
    assert policy.delay_s(UNAVAILABLE, 1, deadline=10.5, now=9.0) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": 1.5}, "max_retries"),
        ({"backoff_s": -0.1}, "retry_backoff_s"),
        ({"backoff_s": 1.0, "max_backoff_s": 0.5}, "max_backoff_s"),
    ],
)
def test_retry_policy_validates_eagerly(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)


def test_timeouts_must_be_positive() -> None:
    assert check_timeout(None) is None
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="timeout"):
            check_timeout(bad)
    with pytest.raises(ValueError, match="max_message_bytes"):
        channel_options(0, RetryPolicy())


def test_bearer_token_and_metadata() -> None:
    assert call_metadata("abc.DEF-123_~+/==", [("x-trace", "1")]) == (
        ("authorization", "Bearer abc.DEF-123_~+/=="),
        ("x-trace", "1"),
    )
    assert call_metadata(None, ()) == ()
    for bad in ("", "two words", "Bearer abc", "line\nbreak", "é"):
        with pytest.raises(ValueError, match="bearer token"):
            call_metadata(bad, ())
    with pytest.raises(ValueError, match="not both"):
        call_metadata("abc", [("authorization", "Bearer other")])
    with pytest.raises(ValueError, match="metadata key"):
        call_metadata(None, [("X-Upper", "1")])
    with pytest.raises(ValueError, match="text values"):
        call_metadata(None, [("trace-bin", "1")])


def test_the_token_never_shows_in_repr() -> None:
    client = Client("127.0.0.1:1", token="s3cret")
    with client:
        assert "s3cret" not in repr(client)
        assert repr(client) == "Client('127.0.0.1:1')"


# --- the shared core, driven by fake transports -------------------------------------------

META = metadata_proto()


class Script:
    """Answers the RPCs of a client from a script of (method, answer or error), recording
    every request, its timeout and metadata."""

    def __init__(self, steps: list[tuple[str, Any]]) -> None:
        self.steps = steps
        self.calls: list[tuple[str, Any, float | None, Any]] = []

    def answer(self, method: str, request: Any, timeout: float | None, metadata: Any) -> Any:
        self.calls.append((method, request, timeout, metadata))
        expected, step = self.steps.pop(0)
        assert method == expected, f"called {method}, the script expected {expected}"
        if isinstance(step, Exception):
            raise step
        return step


def sync_client(
    monkeypatch: pytest.MonkeyPatch, script: Script, **kw: Any
) -> tuple[Client, list[float]]:
    sleeps: list[float] = []
    monkeypatch.setattr("mcdropout_client._sync.time.sleep", sleeps.append)
    # A channel opens no connection until its first RPC, and the fakes make none.
    client = Client("127.0.0.1:1", **kw)
    for method in list(client._methods):
        client._methods[method] = lambda request, timeout=None, metadata=None, m=method: (
            script.answer(m, request, timeout, metadata)
        )
    return client, sleeps


def async_run(
    monkeypatch: pytest.MonkeyPatch, script: Script, call: Callable[[AsyncClient], Any], **kw: Any
) -> tuple[Any, list[float]]:
    sleeps: list[float] = []

    async def fake_sleep(delay: float) -> None:
        sleeps.append(delay)

    monkeypatch.setattr("mcdropout_client._aio.asyncio.sleep", fake_sleep)

    async def scenario() -> Any:
        async with AsyncClient("127.0.0.1:1", **kw) as client:
            for method in list(client._methods):

                async def fake(
                    request: Any,
                    timeout: float | None = None,
                    metadata: Any = None,
                    m: str = method,
                ) -> Any:
                    return script.answer(m, request, timeout, metadata)

                client._methods[method] = fake
            return await call(client)

    return asyncio.run(scenario()), sleeps


def run_both(
    monkeypatch: pytest.MonkeyPatch,
    steps: Callable[[], list[tuple[str, Any]]],
    call: Callable[[Any], Any],
    **kw: Any,
) -> list[tuple[Any, Script, list[float]]]:
    """The same call on the sync and on the asyncio client, each with a fresh script."""
    results = []
    script = Script(steps())
    client, sleeps = sync_client(monkeypatch, script, **kw)
    with client:
        try:
            result: Any = call(client)
        except ClientError as error:
            result = error
    results.append((result, script, sleeps))
    script = Script(steps())

    async def acall(client: AsyncClient) -> Any:
        try:
            return await call(client)
        except ClientError as error:
            return error

    result, sleeps = async_run(monkeypatch, script, acall, **kw)
    results.append((result, script, sleeps))
    return results


def test_predict_fetches_metadata_once_then_sends_every_option(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def steps() -> list[tuple[str, Any]]:
        return [(GET_MODEL_METADATA, META), (PREDICT, response(classification_output(2))),
                (PREDICT, response(classification_output(2)))]  # fmt: skip

    def call(client: Any) -> Any:
        x = np.zeros((2, 6), np.float32)
        first = client.predict("cls", x, num_samples=9, seed=5, return_samples=True)
        second = client.predict("cls", x, interval_levels=[0.9], version=None)
        if asyncio.iscoroutine(first):

            async def both() -> Any:
                return await first, await second

            return both()
        return first, second

    for (first, second), script, _ in run_both(monkeypatch, steps, call, token="tok"):
        assert isinstance(first, Prediction)
        assert first.seed == 5
        assert second.seed is None
        methods = [c[0] for c in script.calls]
        assert methods == [GET_MODEL_METADATA, PREDICT, PREDICT]  # metadata kept
        request = script.calls[1][1]
        assert (request.model, request.num_samples, request.seed, request.return_samples) == (
            "cls", 9, 5, True,
        )  # fmt: skip
        assert list(script.calls[2][1].interval_levels) == [0.9]
        assert all(c[3] == (("authorization", "Bearer tok"),) for c in script.calls)


def test_unavailable_is_retried_then_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    ok = pb.ListModelsResponse(models=[pb.ModelSummary(name="m", versions=["1"])])

    def steps() -> list[tuple[str, Any]]:
        down = FakeRpcError(UNAVAILABLE, "down")
        return [(LIST_MODELS, down), (LIST_MODELS, down), (LIST_MODELS, ok)]

    for result, script, sleeps in run_both(
        monkeypatch, steps, lambda c: c.list_models(), retry_backoff_s=0.05
    ):
        assert [m.name for m in result] == ["m"]
        assert sleeps == [0.05, 0.1]
        assert len(script.calls) == 3


def test_retries_give_up_after_max_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    def steps() -> list[tuple[str, Any]]:
        return [(LIST_MODELS, FakeRpcError(UNAVAILABLE, "down"))] * 5

    for result, script, sleeps in run_both(
        monkeypatch, steps, lambda c: c.list_models(), max_retries=2
    ):
        assert isinstance(result, UnavailableError)
        assert (len(script.calls), len(sleeps)) == (3, 2)


def test_other_codes_are_never_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    def steps() -> list[tuple[str, Any]]:
        return [(GET_MODEL_METADATA, FakeRpcError(grpc.StatusCode.NOT_FOUND, "no model"))]

    def call(client: Any) -> Any:
        return client.predict("nope", np.zeros((1, 6), np.float32))

    for result, script, sleeps in run_both(monkeypatch, steps, call, max_retries=5):
        assert isinstance(result, NotFoundError)
        assert str(result) == "NOT_FOUND: no model"
        assert (len(script.calls), sleeps) == (1, [])


def test_every_attempt_gets_the_time_left_and_none_after_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    monkeypatch.setattr("mcdropout_client._core.monotonic", lambda: clock[0])

    def steps() -> list[tuple[str, Any]]:
        clock[0] = 100.0
        return [(GET_MODEL_METADATA, META)]

    def call(client: Any) -> Any:
        clock[0] = 100.0
        return client.predict("cls", np.zeros((1, 6), np.float32), timeout=30.0)

    # The metadata look-up "takes" 31 s of the 30 s deadline: Predict is never sent.
    original = Script.answer

    def slow(self: Script, *args: Any) -> Any:
        clock[0] += 31.0
        return original(self, *args)

    monkeypatch.setattr(Script, "answer", slow)
    for result, script, _ in run_both(monkeypatch, steps, call):
        assert isinstance(result, DeadlineExceededError)
        assert "deadline of 30.0 s exceeded" in result.details
        assert [(c[0], c[2]) for c in script.calls] == [(GET_MODEL_METADATA, 30.0)]


def test_health_names_the_unknown_service(monkeypatch: pytest.MonkeyPatch) -> None:
    from grpc_health.v1 import health_pb2

    def steps() -> list[tuple[str, Any]]:
        return [
            (HEALTH_CHECK, health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)),
            (HEALTH_CHECK, FakeRpcError(grpc.StatusCode.NOT_FOUND)),
        ]  # fmt: skip

    def call(client: Any) -> Any:
        first = client.health("m")
        if asyncio.iscoroutine(first):

            async def both() -> Any:
                serving = await first
                try:
                    await client.health("nope")
                except NotFoundError as error:
                    return serving, error
                raise AssertionError("no error")

            return both()
        try:
            client.health("nope")
        except NotFoundError as error:
            return first, error
        raise AssertionError("no error")

    for (serving, error), script, _ in run_both(monkeypatch, steps, call):
        assert serving == "SERVING"
        assert script.calls[0][1].service == "m"
        assert "no health status for 'nope'" in error.details
        assert isinstance(error.__cause__, NotFoundError)


def test_a_closed_client_refuses_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    client, _ = sync_client(monkeypatch, Script([]))
    client.close()
    client.close()  # closing twice is harmless
    with pytest.raises(RuntimeError, match="closed"):
        client.list_models()

    async def scenario() -> None:
        aclient = AsyncClient("127.0.0.1:1")
        await aclient.close()
        await aclient.close()
        with pytest.raises(RuntimeError, match="closed"):
            await aclient.health()

    asyncio.run(scenario())


def test_bad_arguments_send_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script([])
    client, _ = sync_client(monkeypatch, script)
    with client:
        for kwargs in ({"num_samples": 0}, {"seed": -1}, {"timeout": 0}, {"version": 1.5}):
            with pytest.raises((ValueError, TypeError)):
                client.predict("cls", np.zeros((1, 6), np.float32), **kwargs)
    assert script.calls == []
