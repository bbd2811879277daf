"""The client's Open Inference Protocol helpers, against the server's own codec.

The names and parameters must be those the server's ``service/protocol/oip_codec.py`` reads
and writes: parameters built here are parsed with the server's parser, and outputs named by
the server's functions are decoded here.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from mcdropout_client import oip
from service.core import catalogue
from service.gen.inference import grpc_service_pb2 as server_oip
from service.protocol import oip_codec
from service.repository import parse_config


def as_request_parameters(parameters: dict[str, Any]) -> dict[str, server_oip.InferParameter]:
    """What tritonclient makes of a parameters dict (bool, int64, double, string)."""
    request = server_oip.ModelInferRequest()
    for key, value in parameters.items():
        if isinstance(value, str):
            request.parameters[key].string_param = value
        elif isinstance(value, bool):
            request.parameters[key].bool_param = value
        elif isinstance(value, int):
            request.parameters[key].int64_param = value
        else:
            request.parameters[key].double_param = value
    return dict(request.parameters)


def test_the_constants_are_the_servers() -> None:
    assert oip.MC_SAMPLES == oip_codec.MC_SAMPLES
    assert oip.MC_RETURN_SAMPLES == oip_codec.MC_RETURN_SAMPLES
    assert oip.MC_INTERVAL_LEVELS == oip_codec.MC_INTERVAL_LEVELS
    assert oip.MC_TARGET_STANDARD_ERROR == oip_codec.MC_TARGET_STANDARD_ERROR
    assert oip.MC_SEED == oip_codec.MC_SEED
    assert oip.SAMPLES_PER_ROW == catalogue.SAMPLES_PER_ROW_NAME


def test_mc_parameters_parse_back_on_the_server() -> None:
    parameters = oip.mc_parameters(
        num_samples=300, return_samples=True, interval_levels=[0.9, 0.123456789], seed=2**63 - 1
    )
    parsed = as_request_parameters(parameters)
    options = oip_codec.mc_options_of(parsed)
    assert options.num_samples == 300
    assert options.return_samples
    assert options.interval_levels == (0.9, 0.123456789)  # no precision lost in the string
    assert options.seed == 2**63 - 1
    adaptive = oip_codec.mc_options_of(
        as_request_parameters(oip.mc_parameters(target_standard_error=0.01))
    )
    assert adaptive.target_standard_error == 0.01


def test_mc_parameters_leave_defaults_out_and_refuse_what_predict_refuses() -> None:
    assert oip.mc_parameters() == {}
    assert oip.mc_parameters(seed=0) == {oip.MC_SEED: 0}
    with pytest.raises(ValueError, match="int64"):
        oip.mc_parameters(seed=2**63)
    with pytest.raises(ValueError, match="num_samples"):
        oip.mc_parameters(num_samples=0)


def server_interval_name(output: str, method: str, level: float, bound: str) -> str:
    """The server catalogue's name for one interval bound of values output ``output``."""
    config = parse_config(
        {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 1]}],
         "outputs": [{"name": output, "dtype": "float32", "shape": [-1, 2]}]},
        "m",
    )  # fmt: skip
    extras = catalogue.Catalogue(config).extras(
        return_samples=False, interval_levels=(level,), adaptive=False
    )
    (answer,) = [
        a for a in extras
        if isinstance(a.statistic, catalogue.IntervalBound)
        and (a.statistic.method, a.statistic.bound) == (method, bound)
    ]  # fmt: skip
    return answer.name


def test_output_names() -> None:
    assert oip.statistic_output_name("logits", "mutual_information") == "logits_mutual_information"
    with pytest.raises(ValueError, match="unknown statistic"):
        oip.statistic_output_name("y", "median")
    assert oip.interval_output_name("y", 0.95, "empirical", "lower") == (
        "y_interval_empirical_0.95_lower"
    )
    # the server's own naming
    assert server_interval_name("y", "empirical", 0.95, "lower") == (
        "y_interval_empirical_0.95_lower"
    )


def regression_arrays(rows: int = 3) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    arrays: dict[str, Any] = {
        f"y_{stat}": rng.random((rows, 2)) for stat in ("mean", "variance", "std")
    }
    arrays["y_aleatoric_variance"] = rng.random((rows, 2))
    arrays["y_total_variance"] = arrays["y_variance"] + arrays["y_aleatoric_variance"]
    arrays["y_samples"] = rng.random((rows, 5, 2))
    for level in (0.95, 0.5):
        for method in ("gaussian", "empirical"):
            for bound in ("lower", "upper"):
                name = server_interval_name("y", method, level, bound)
                arrays[name] = rng.random((rows, 2))
    arrays[oip.SAMPLES_PER_ROW] = np.array([5, 5, 5], np.int64)
    return arrays


def test_regression_outputs_decode_into_a_prediction() -> None:
    arrays = regression_arrays()
    result = oip.prediction_from_outputs(arrays, model="m", version="2", num_samples=5, seed=9)
    assert (result.model, result.version, result.num_samples, result.seed) == ("m", "2", 5, 9)
    y = result.output
    assert y.semantics == "values"
    np.testing.assert_array_equal(y.mean, arrays["y_mean"])
    np.testing.assert_array_equal(y.total_variance, arrays["y_total_variance"])  # type: ignore[arg-type]
    assert y.samples is not None
    assert y.samples.shape == (3, 5, 2)
    assert [(i.level, i.method) for i in y.intervals] == [
        (0.5, "gaussian"), (0.5, "empirical"), (0.95, "gaussian"), (0.95, "empirical"),
    ]  # fmt: skip
    np.testing.assert_array_equal(
        y.interval(0.95, "gaussian").upper, arrays["y_interval_gaussian_0.95_upper"]
    )
    assert result.num_samples_per_row is not None
    assert result.num_samples_per_row.tolist() == [5, 5, 5]
    assert not y.mean.flags.writeable


def test_classifier_outputs_decode_labels_and_measures() -> None:
    mean = np.array([[0.1, 0.9], [0.8, 0.2]])
    arrays = {
        "logits_mean": mean,
        "logits_variance": np.zeros((2, 2)),
        "logits_std": np.zeros((2, 2)),
        "logits_predicted_class": np.array([1, 0], np.int64),
        "logits_predicted_label": np.array([b"dog", b"cat"], dtype=object),
        "logits_entropy": np.array([0.3, 0.5]),
        "logits_expected_entropy": np.array([0.2, 0.4]),
        "logits_mutual_information": np.array([0.1, 0.1]),
        "logits_variation_ratio": np.array([0.0, 0.1]),
    }
    result = oip.prediction_from_outputs(arrays, semantics={"logits": "logits"})
    assert result.output.semantics == "logits"
    assert result.predicted_label == ("dog", "cat")
    np.testing.assert_array_equal(result.predictive_entropy, [0.3, 0.5])  # type: ignore[arg-type]
    assert result.output.is_classification
    assert oip.prediction_from_outputs(arrays).output.semantics == "unspecified"


def test_incomplete_or_foreign_outputs_are_refused() -> None:
    arrays = regression_arrays()
    del arrays["y_std"]
    with pytest.raises(ValueError, match="lacks"):
        oip.prediction_from_outputs(arrays)
    arrays = regression_arrays()
    arrays["something_else"] = np.zeros(3)
    with pytest.raises(ValueError, match="something_else"):
        oip.prediction_from_outputs(arrays)
    arrays = regression_arrays()
    del arrays["y_interval_empirical_0.5_upper"]
    with pytest.raises(ValueError, match="lower or upper"):
        oip.prediction_from_outputs(arrays)


def test_decode_infer_result_reads_a_tritonclient_answer() -> None:
    """A stand-in for tritonclient's InferResult: get_response() and as_numpy(name)."""
    arrays = regression_arrays()
    response = server_oip.ModelInferResponse(model_name="housing", model_version="1")
    for name in arrays:
        response.outputs.add(name=name)
    response.parameters[oip.MC_SAMPLES].int64_param = 5
    result = SimpleNamespace(get_response=lambda: response, as_numpy=lambda name: arrays[name])
    prediction = oip.decode_infer_result(result, seed=4)
    assert (prediction.model, prediction.version, prediction.num_samples) == ("housing", "1", 5)
    assert prediction.seed == 4
    assert len(prediction.intervals) == 4


def test_decode_infer_result_reads_a_tritonclient_http_answer() -> None:
    """tritonclient.http's InferResult of a JSON answer (its get_response() is a dict)."""
    http = pytest.importorskip("tritonclient.http")
    arrays = regression_arrays()
    body = {
        "model_name": "housing",
        "model_version": "1",
        "parameters": {oip.MC_SAMPLES: 5},
        "outputs": [
            {"name": name, "datatype": "FP64", "shape": list(a.shape), "data": a.ravel().tolist()}
            for name, a in arrays.items()
        ],
    }
    result = http.InferResult.from_response_body(json.dumps(body).encode())
    prediction = oip.decode_infer_result(result, seed=4)
    assert (prediction.model, prediction.version, prediction.num_samples) == ("housing", "1", 5)
    np.testing.assert_array_equal(prediction.outputs["y"].mean, arrays["y_mean"])
    assert len(prediction.intervals) == 4
