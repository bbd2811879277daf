"""The client's conversions, retry policy, file readers and CLI formatting: no sockets."""

from __future__ import annotations

import importlib
import io
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from service.client import Client, ClientError, ModelInfo, Prediction
from service.client import cli as client_cli
from service.client._common import RetryPolicy, channel_options, check_timeout
from service.client._convert import (
    as_dtype,
    concat_predictions,
    model_info_from_proto,
    model_summary_from_proto,
    num_samples_field,
    predict_request,
    prediction_from_proto,
    prepare_inputs,
    version_str,
)
from service.client.files import detect_format, parse, parse_csv, parse_json, shape_rows
from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.protocol.codec import decode_tensor, encode_tensor

ROOT = Path(__file__).resolve().parents[2]
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
        inputs=[pb.TensorSpec(name=n, dtype=d, shape=s) for n, s, d in inputs],
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


def regression_output(rows: int, name: str = "y") -> pb.OutputStatistics:
    mean = np.arange(rows * 2, dtype=np.float64).reshape(rows, 2)
    variance = np.full((rows, 2), 4.0)
    variance[:, 1] = 0.25
    return pb.OutputStatistics(
        name=name,
        semantics=pb.OUTPUT_SEMANTICS_VALUES,
        mean=encode_tensor(mean),
        variance=encode_tensor(variance),
        std=encode_tensor(np.sqrt(variance)),
    )


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
    assert model.verified
    assert model.input().name == "x"
    assert model.input("x") is model.inputs[0]
    with pytest.raises(ValueError, match="no input 'z'"):
        model.input("z")


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
    assert result.predicted_class is not None
    assert result.predicted_class.dtype == np.int64
    assert result.predicted_label == tuple(proto.predicted_label)
    assert result.output.is_classification
    for name in ("predictive_entropy", "expected_entropy", "mutual_information"):
        assert getattr(result, name).shape == (4,)
    assert result.variation_ratio is not None


def test_regression_response_has_no_classification_measures() -> None:
    result = prediction_from_proto(response(regression_output(3)))
    assert result.mean.shape == (3, 2)
    np.testing.assert_array_equal(result.std[:, 0], 2.0)
    assert not result.output.is_classification
    for name in (
        "predicted_class",
        "predicted_label",
        "predictive_entropy",
        "expected_entropy",
        "mutual_information",
        "variation_ratio",
    ):
        assert getattr(result, name) is None


def test_several_outputs_need_an_explicit_choice() -> None:
    result = prediction_from_proto(response(regression_output(2, "a"), regression_output(2, "b")))
    assert list(result.outputs) == ["a", "b"]
    with pytest.raises(ValueError, match="pick one"):
        _ = result.mean
    assert result.outputs["b"].mean.shape == (2, 2)


def test_malformed_response_tensor_is_a_client_error() -> None:
    bad = regression_output(2)
    bad.mean.data = b"\x00"
    with pytest.raises(ClientError) as info_:
        prediction_from_proto(response(bad))
    assert info_.value.code == grpc.StatusCode.INTERNAL


def test_to_dict_is_strict_json_with_nan_as_null() -> None:
    document = prediction_from_proto(response(classification_output(3))).to_dict()
    text = json.dumps(document, allow_nan=False)
    parsed = json.loads(text)["outputs"]["logits"]
    assert parsed["variance"][0][0] is None
    assert len(parsed["predicted_label"]) == 3
    assert parsed["semantics"] == "logits"


# --- inputs -> request --------------------------------------------------------------------


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


def test_request_carries_the_encoded_inputs() -> None:
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    request = predict_request("m", "3", {"x": x}, 7)
    assert (request.model, request.version, request.num_samples) == ("m", "3", 7)
    np.testing.assert_array_equal(decode_tensor(request.inputs[0].tensor, "x"), x)


def test_version_and_num_samples_arguments() -> None:
    assert (version_str(None), version_str(3), version_str("2")) == ("", "3", "2")
    assert (num_samples_field(None), num_samples_field(10)) == (0, 10)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_samples"):
            num_samples_field(bad)  # type: ignore[arg-type]
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


# --- errors, retries, deadlines --------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_client_error_carries_code_and_message() -> None:
    error = ClientError.from_rpc_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, "model 'x'"))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.message == "model 'x'"
    assert str(error) == "NOT_FOUND: model 'x'"
    assert ClientError.from_rpc_error(grpc.RpcError()).code == grpc.StatusCode.UNKNOWN


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


class FakeStub:
    """Answers ListModels from a script of errors and responses, recording the timeouts."""

    def __init__(self, script: list[Exception | pb.ListModelsResponse]) -> None:
        self.script = script
        self.timeouts: list[float | None] = []

    def ListModels(  # noqa: N802 (the generated name)
        self, request: pb.ListModelsRequest, timeout: float | None = None
    ) -> pb.ListModelsResponse:
        self.timeouts.append(timeout)
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step


def fake_client(
    monkeypatch: pytest.MonkeyPatch, script: list[Exception | pb.ListModelsResponse], **kw: Any
) -> tuple[Client, FakeStub, list[float]]:
    sleeps: list[float] = []
    monkeypatch.setattr("service.client.sync.time.sleep", sleeps.append)
    # A channel opens no connection until its first RPC, and the fake stub makes none.
    client = Client("127.0.0.1:1", **kw)
    stub = FakeStub(script)
    client._stub = stub  # type: ignore[assignment]
    return client, stub, sleeps


def test_client_retries_unavailable_then_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    ok = pb.ListModelsResponse(models=[pb.ModelSummary(name="m", versions=["1"])])
    down = FakeRpcError(UNAVAILABLE, "down")
    client, stub, sleeps = fake_client(monkeypatch, [down, down, ok], retry_backoff_s=0.05)
    with client:
        assert [m.name for m in client.list_models()] == ["m"]
    assert sleeps == [0.05, 0.1]
    assert len(stub.timeouts) == 3


def test_client_gives_up_after_max_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    down = FakeRpcError(UNAVAILABLE, "down")
    client, stub, sleeps = fake_client(monkeypatch, [down] * 5, max_retries=2)
    with client, pytest.raises(ClientError) as info_:
        client.list_models()
    assert info_.value.code == UNAVAILABLE
    assert len(stub.timeouts) == 3
    assert len(sleeps) == 2


def test_client_never_retries_other_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    lost = FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "late")
    client, stub, sleeps = fake_client(monkeypatch, [lost], max_retries=5)
    with client, pytest.raises(ClientError, match="DEADLINE_EXCEEDED: late"):
        client.list_models()
    assert (len(stub.timeouts), sleeps) == (1, [])


def test_client_passes_the_remaining_deadline_to_each_attempt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ok = pb.ListModelsResponse()
    client, stub, _ = fake_client(monkeypatch, [FakeRpcError(UNAVAILABLE), ok], timeout=30.0)
    with client:
        client.list_models()
    with pytest.raises(RuntimeError, match="closed"):
        client.list_models()
    client.close()  # closing twice is harmless
    assert all(t is not None and 0 < t <= 30.0 for t in stub.timeouts)


# --- files and the CLI's formatting ---------------------------------------------------------


def test_csv_with_and_without_header() -> None:
    np.testing.assert_array_equal(parse_csv("a,b\n1,2\n\n3,4.5\n"), [[1, 2], [3, 4.5]])
    np.testing.assert_array_equal(parse_csv("1,2\n3,4\n"), [[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="line 3: 'x' is not a number"):
        parse_csv("a,b\n1,2\n3,x\n")
    with pytest.raises(ValueError, match="line 2: 3 columns, expected 2"):
        parse_csv("1,2\n3,4,5\n")
    with pytest.raises(ValueError, match="no rows"):
        parse_csv("a,b\n")


def test_json_rows_or_named_inputs() -> None:
    array = parse_json("[[1, 2], [3, 4]]")
    assert isinstance(array, np.ndarray)
    assert array.shape == (2, 2)
    named = parse_json('{"a": [[1]], "b": [[2, 3]]}')
    assert isinstance(named, dict)
    assert set(named) == {"a", "b"}
    for bad, message in (("[[1, 2], [3]]", "different lengths"), ('[["a"]]', "numbers"),
                         ("{", "invalid JSON"), ("3", "list of rows"), ("[]", "no rows")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            parse_json(bad)


def test_npy_and_npz_bytes() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    buffer = io.BytesIO()
    np.save(buffer, x)
    np.testing.assert_array_equal(parse(buffer.getvalue(), "npy"), x)  # type: ignore[arg-type]
    buffer = io.BytesIO()
    np.savez(buffer, a=x, b=x[:, :1])
    named = parse(buffer.getvalue(), "npz")
    assert isinstance(named, dict)
    assert named["b"].shape == (2, 1)
    with pytest.raises(ValueError, match=r"not a valid \.npy"):
        parse(b"junk", "npy")


def test_format_from_suffix_or_flag() -> None:
    assert detect_format("rows.CSV", None) == "csv"
    assert detect_format("-", None) == "json"
    assert detect_format("-", "csv") == "csv"
    with pytest.raises(ValueError, match="--format"):
        detect_format("rows.txt", None)


def test_rows_are_shaped_to_the_model_input() -> None:
    image = info(inputs=(("image", [-1, 1, 8, 8], pb.DATA_TYPE_FLOAT32),))
    flat = np.arange(3 * 64, dtype=np.float64).reshape(3, 64)
    shaped = shape_rows(image, flat)["image"]
    assert (shaped.shape, shaped.dtype) == ((3, 1, 8, 8), np.float32)
    np.testing.assert_array_equal(shaped[1].ravel(), flat[1])
    assert shape_rows(image, flat[0])["image"].shape == (1, 1, 8, 8)
    assert shape_rows(info(), np.ones(6))["x"].shape == (1, 6)
    two = info(inputs=(("a", [-1, 2], pb.DATA_TYPE_FLOAT32), ("b", [-1, 1], pb.DATA_TYPE_FLOAT32)))
    with pytest.raises(ValueError, match="different numbers of rows"):
        shape_rows(two, {"a": np.ones((3, 2)), "b": np.ones((2, 1))})


def test_table_flags_rows_above_the_threshold() -> None:
    result = prediction_from_proto(response(classification_output(4)))
    mi = result.mutual_information
    assert mi is not None
    threshold = float(np.median(mi))
    lines = client_cli.prediction_table(result, info(), threshold)
    assert lines[0] == "m v2, T=50, 4 rows"
    assert lines[1].split() == ["row", "prediction", "p(pred)", "+-std", "entropy", "MI", "flag"]
    flagged = [line.endswith("!") for line in lines[2:6]]
    assert flagged == (mi > threshold).tolist()
    assert lines[-1] == f"{sum(flagged)} of 4 rows flagged: mutual information > {threshold:g}"
    assert all(not line.endswith("!") for line in client_cli.prediction_table(result, info(), None))


def test_regression_uncertainty_is_the_largest_std_of_a_row() -> None:
    result = prediction_from_proto(response(regression_output(2)))
    measure, values = client_cli.row_uncertainty(result.output)
    assert measure == "std"
    np.testing.assert_array_equal(values, [2.0, 2.0])
    document = client_cli.prediction_document(result, threshold=1.0)
    uncertainty = document["outputs"]["y"]["uncertainty"]
    assert uncertainty == {"measure": "std", "values": [2.0, 2.0], "flagged": [True, True]}
    lines = client_cli.prediction_table(result, info(), None)
    assert lines[2].split() == ["0", "0,", "1", "2,", "0.5"]


def test_progress_bar_is_silent_without_a_stream() -> None:
    stream = io.StringIO()
    bar = client_cli.Progress(10, stream)
    bar.update(5)
    bar.close()
    assert "5/10 rows  50%" in stream.getvalue()
    client_cli.Progress(10, None).update(5)  # no stream, no output, no error


# --- packaging ------------------------------------------------------------------------------


def test_console_script_points_at_the_cli() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["mcdropout"].partition(":")
    assert getattr(importlib.import_module(module), name) is client_cli.main


def test_client_imports_neither_torch_nor_onnxruntime() -> None:
    code = (
        "import sys, service.client, service.client.cli; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'onnxruntime', 'onnx', 'export', 'prometheus_client'}); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"service.client imported {result.stdout} {result.stderr}"
