"""The Open Inference Protocol codec: raw and typed inputs, parameters, output metadata,
encoding (the output names themselves are the catalogue's: test_catalogue.py).

No socket: messages are built and decoded in memory; inputs go through the data plane's
decoding, as a request's would.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from service import tensors
from service.core.catalogue import Catalogue
from service.core.dataplane import OutputResult, PredictResult, decode_inputs
from service.errors import InvalidInput
from service.gen.inference import grpc_service_pb2 as oip
from service.maths.uncertainty import classification_stats, regression_stats
from service.protocol import oip_json
from service.protocol.oip_codec import (
    encode_outputs,
    mc_options_of,
    requested_output_names,
    wire_inputs,
)
from service.repository import ModelConfig, parse_config

Input = oip.ModelInferRequest.InferInputTensor
Requested = oip.ModelInferRequest.InferRequestedOutputTensor

CLASSIFIER = parse_config(
    {
        "task": "classification",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3]}],
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": [-1, 4], "semantics": "logits"}
        ],
        "labels": ["ant", "bee", "cat", "dog"],
    },
    "cls",
)
REGRESSOR = parse_config(
    {
        "task": "regression",
        "inputs": [{"name": "a", "dtype": "int64", "shape": [-1, 2]},
                   {"name": "b", "dtype": "float16", "shape": [-1, 2, 2]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 2], "semantics": "values"},
                    {"name": "z", "dtype": "float32", "shape": [-1, 1], "semantics": "values"}],
    },
    "reg",
)  # fmt: skip


ONE_INPUT = parse_config(
    {
        "task": "regression",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 1]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 1]}],
    },
    "one",
)
#: OIP datatype -> its numpy dtype (the table's), for the inputs a model may take.
DTYPE_OF = {d.oip: d.numpy for d in tensors.DTYPES if not d.is_bytes}


def decode(request: oip.ModelInferRequest) -> dict[str, NDArray[Any]]:
    """What the data plane makes of a request's inputs (for a model with one input, "x")."""
    return decode_inputs(ONE_INPUT, wire_inputs(request))


def raw_request(*arrays: tuple[str, str, NDArray[Any]]) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="m")
    for name, datatype, array in arrays:
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(array.astype(DTYPE_OF[datatype]).tobytes())
    return request


# --- inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", sorted(DTYPE_OF))
def test_raw_inputs_round_trip_every_datatype(datatype: str) -> None:
    rng = np.random.default_rng(0)
    x = (rng.random((3, 2)) * 100).astype(DTYPE_OF[datatype])
    decoded = decode(raw_request(("x", datatype, x)))["x"]
    assert decoded.dtype == DTYPE_OF[datatype].newbyteorder("=")
    np.testing.assert_array_equal(decoded, x)


def test_raw_inputs_are_read_little_endian() -> None:
    request = oip.ModelInferRequest(
        inputs=[Input(name="x", datatype="INT32", shape=[1, 2])],
        raw_input_contents=[struct.pack("<2i", 1, -2)],
    )
    np.testing.assert_array_equal(decode(request)["x"], [[1, -2]])


@pytest.mark.parametrize(
    ("datatype", "field", "values", "expected_dtype"),
    [
        ("FP32", "fp32_contents", [1.5, -2.0], np.float32),
        ("FP64", "fp64_contents", [1.5, -2.0], np.float64),
        ("INT64", "int64_contents", [2**40, -3], np.int64),
        ("INT32", "int_contents", [7, -3], np.int32),
        ("INT8", "int_contents", [127, -128], np.int8),
        ("UINT8", "uint_contents", [0, 255], np.uint8),
        ("UINT64", "uint64_contents", [2**63, 1], np.uint64),
        ("BOOL", "bool_contents", [True, False], np.bool_),
    ],
)
def test_typed_inputs(datatype: str, field: str, values: list[Any], expected_dtype: Any) -> None:
    tensor = Input(name="x", datatype=datatype, shape=[1, 2])
    getattr(tensor.contents, field).extend(values)
    decoded = decode(oip.ModelInferRequest(inputs=[tensor]))["x"]
    assert decoded.dtype == np.dtype(expected_dtype)
    np.testing.assert_array_equal(decoded, np.array([values], dtype=expected_dtype))


def _typed(datatype: str, field: str, values: list[Any], shape: list[int]) -> Input:
    tensor = Input(name="x", datatype=datatype, shape=shape)
    getattr(tensor.contents, field).extend(values)
    return tensor


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            oip.ModelInferRequest(
                inputs=[_typed("FP32", "fp32_contents", [1.0], [1, 1])], raw_input_contents=[b"x"]
            ),
            "not both",
        ),
        (
            oip.ModelInferRequest(
                inputs=[Input(name="x", datatype="FP32", shape=[1])], raw_input_contents=[b"", b""]
            ),
            "2 raw_input_contents for 1 inputs",
        ),
        (
            oip.ModelInferRequest(
                inputs=[Input(name="x", datatype="FP32", shape=[1, 2])],
                raw_input_contents=[b"\0" * 7],
            ),
            "7 bytes of raw contents for shape [1, 2] of FP32 (expected 8)",
        ),
        (
            oip.ModelInferRequest(
                inputs=[Input(name="x", datatype="BYTES", shape=[1])],
                raw_input_contents=[b"\1\0\0\0a"],
            ),
            "unsupported datatype 'BYTES'",
        ),
        (
            oip.ModelInferRequest(
                inputs=[Input(name="x", datatype="FP32", shape=[])], raw_input_contents=[b""]
            ),
            "shape is empty",
        ),
        (
            oip.ModelInferRequest(
                inputs=[Input(name="x", datatype="FP32", shape=[-1, 2])], raw_input_contents=[b""]
            ),
            "negative dimension",
        ),
        (
            oip.ModelInferRequest(
                inputs=[Input(name="x", datatype="BOOL", shape=[2])], raw_input_contents=[b"\0\2"]
            ),
            "BOOL bytes must be 0 or 1",
        ),
        (
            oip.ModelInferRequest(inputs=[_typed("FP32", "fp32_contents", [1.0] * 3, [2, 2])]),
            "3 values in contents.fp32_contents for shape [2, 2] (expected 4)",
        ),
        (
            oip.ModelInferRequest(inputs=[_typed("FP32", "fp64_contents", [1.0], [1])]),
            "FP32 goes in contents.fp32_contents, got fp64_contents",
        ),
        (
            oip.ModelInferRequest(inputs=[_typed("INT8", "int_contents", [128], [1])]),
            "outside the range of INT8",
        ),
        (
            oip.ModelInferRequest(inputs=[_typed("FP16", "fp32_contents", [1.0], [1])]),
            "FP16 has no typed contents",
        ),
        (
            oip.ModelInferRequest(
                inputs=[Input(name="x", datatype="FP32", shape=[1])] * 2,
                raw_input_contents=[b"\0" * 4] * 2,
            ),
            "given twice",
        ),
    ],
)
def test_malformed_inputs_are_invalid(request_: oip.ModelInferRequest, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        decode(request_)


def test_shared_memory_inputs_are_refused() -> None:
    request = raw_request(("x", "FP32", np.zeros((1, 1))))
    request.inputs[0].parameters["shared_memory_region"].string_param = "region"
    with pytest.raises(InvalidInput, match="shared memory is not supported"):
        decode(request)


def test_zero_rows_decode_to_an_empty_batch() -> None:
    """The core refuses empty batches; the codec only decodes them."""
    request = oip.ModelInferRequest(inputs=[Input(name="x", datatype="FP32", shape=[0, 3])])
    assert decode(request)["x"].shape == (0, 3)


# --- parameters ------------------------------------------------------------------------------


def _params(**values: oip.InferParameter) -> dict[str, oip.InferParameter]:
    return dict(values)


def _mc_samples(parameters: dict[str, oip.InferParameter]) -> int | None:
    return mc_options_of(parameters).num_samples


def test_mc_samples_parameter() -> None:
    assert _mc_samples({}) is None
    assert _mc_samples(_params(other=oip.InferParameter(string_param="x"))) is None
    assert _mc_samples(_params(mc_samples=oip.InferParameter(int64_param=0))) is None
    assert _mc_samples(_params(mc_samples=oip.InferParameter(int64_param=250))) == 250
    assert _mc_samples(_params(mc_samples=oip.InferParameter(uint64_param=7))) == 7


@pytest.mark.parametrize(
    "parameter",
    [
        oip.InferParameter(double_param=10.0),
        oip.InferParameter(string_param="10"),
        oip.InferParameter(bool_param=True),
        oip.InferParameter(),
        oip.InferParameter(int64_param=-1),
    ],
)
def test_mc_samples_must_be_a_non_negative_integer(parameter: oip.InferParameter) -> None:
    with pytest.raises(InvalidInput, match="mc_samples"):
        _mc_samples({"mc_samples": parameter})


# --- outputs ---------------------------------------------------------------------------------

CLASSIFIER_OUTPUTS = [
    ("logits", "FP32", [-1, 4]),  # the graph's own output: its mean, in the graph's dtype
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


def _metadata(config: ModelConfig) -> list[tuple[str, str, list[int]]]:
    outputs = [oip_json.output_metadata(a) for a in Catalogue(config).answers]
    return [(t["name"], t["datatype"], list(t["shape"])) for t in outputs]


def test_output_names_of_a_classifier() -> None:
    assert _metadata(CLASSIFIER) == CLASSIFIER_OUTPUTS


def test_a_classifier_without_labels_has_no_label_output() -> None:
    unlabelled = parse_config(
        {
            "task": "classification",
            "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3]}],
            "outputs": [{"name": "p", "dtype": "float32", "shape": [-1, 2],
                         "semantics": "probabilities"}],
        },
        "u",
    )  # fmt: skip
    names = [name for name, _, _ in _metadata(unlabelled)]
    assert "p_predicted_label" not in names
    assert "p_predicted_class" in names


def test_output_names_of_a_regressor() -> None:
    assert _metadata(REGRESSOR) == [
        ("y", "FP32", [-1, 2]),
        ("y_mean", "FP64", [-1, 2]),
        ("y_variance", "FP64", [-1, 2]),
        ("y_std", "FP64", [-1, 2]),
        ("z", "FP32", [-1, 1]),
        ("z_mean", "FP64", [-1, 1]),
        ("z_variance", "FP64", [-1, 1]),
        ("z_std", "FP64", [-1, 1]),
    ]


def test_input_metadata_uses_oip_datatypes() -> None:
    assert [
        (t["name"], t["datatype"], list(t["shape"]))
        for t in map(oip_json.input_metadata, REGRESSOR.inputs)
    ] == [
        ("a", "INT64", [-1, 2]),
        ("b", "FP16", [-1, 2, 2]),
    ]


def test_requested_output_names_refuse_unsupported_parameters() -> None:
    asked = [Requested(name="z_std"), Requested(name="y_mean")]
    assert requested_output_names(asked) == ["z_std", "y_mean"]
    assert requested_output_names([]) == []
    classification = Requested(name="logits_mean")
    classification.parameters["classification"].int64_param = 2
    with pytest.raises(InvalidInput, match="classification extension is not supported"):
        requested_output_names([classification])


def _result(config: ModelConfig, stats: list[Any], outputs: list[str] | None) -> PredictResult:
    catalogue = Catalogue(config)
    return PredictResult(
        model=config.name,
        version=1,
        num_samples=stats[0].num_samples,
        outputs=tuple(
            OutputResult(spec=spec, stats=s, statistics=catalogue.statistics(spec.name))
            for spec, s in zip(config.outputs, stats, strict=True)
        ),
        answer=catalogue.select(outputs, return_samples=False, interval_levels=(), adaptive=False),
    )


def _classifier_result() -> PredictResult:
    rng = np.random.default_rng(1)
    stats = classification_stats(rng.standard_normal((20, 3, 4)), from_logits=True)
    return _result(CLASSIFIER, [stats], None)


def _decode_bytes(raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        items.append(raw[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return items


def test_encode_every_classifier_output() -> None:
    result = _classifier_result()
    stats = result.outputs[0].stats
    encoded = {t.name: t for t in encode_outputs(result)}
    assert list(encoded) == [name for name, _, _ in CLASSIFIER_OUTPUTS]
    expected = {
        "logits_mean": stats.mean,
        "logits_variance": stats.variance,
        "logits_std": stats.std,
        "logits_entropy": stats.predictive_entropy,
        "logits_expected_entropy": stats.expected_entropy,
        "logits_mutual_information": stats.mutual_information,
        "logits_variation_ratio": stats.variation_ratio,
    }
    for name, array in expected.items():
        tensor = encoded[name]
        assert (tensor.datatype, tensor.shape) == ("FP64", array.shape)
        np.testing.assert_array_equal(np.frombuffer(tensor.raw, "<f8").reshape(tensor.shape), array)
    own = encoded["logits"]
    assert (own.datatype, own.shape) == ("FP32", stats.mean.shape)
    np.testing.assert_array_equal(
        np.frombuffer(own.raw, "<f4").reshape(own.shape), stats.mean.astype(np.float32)
    )
    predicted = encoded["logits_predicted_class"]
    assert (predicted.datatype, predicted.shape) == ("INT64", (3,))
    classes = np.frombuffer(predicted.raw, "<i8")
    np.testing.assert_array_equal(classes, stats.mean.argmax(axis=1))
    label = encoded["logits_predicted_label"]
    assert (label.datatype, label.shape) == ("BYTES", (3,))
    assert _decode_bytes(label.raw) == [CLASSIFIER.labels[c].encode() for c in classes]


def test_encode_a_subset_in_the_requested_order() -> None:
    stats = regression_stats(np.random.default_rng(2).standard_normal((10, 2, 2)))
    z_stats = regression_stats(np.random.default_rng(3).standard_normal((10, 2, 1)))
    result = _result(REGRESSOR, [stats, z_stats], ["z_variance", "y_mean"])
    encoded = encode_outputs(result)
    assert [(t.name, t.shape) for t in encoded] == [("z_variance", (2, 1)), ("y_mean", (2, 2))]
    np.testing.assert_array_equal(np.frombuffer(encoded[1].raw, "<f8").reshape(2, 2), stats.mean)
