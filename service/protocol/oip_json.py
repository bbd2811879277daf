"""The Open Inference Protocol's documents as plain data, built once for both of its forms.

Server and model metadata, and Triton's extensions (model configuration, statistics, the
repository index), are built here as the dicts the REST form sends as JSON (Triton's names,
numbers as numbers). The gRPC servicer parses the same dicts into its messages
(``google.protobuf.json_format.ParseDict``: the field names are the proto's), so the two forms
cannot say different things. Inference answers are not documents: each layer encodes
``PredictResult`` itself (``oip_codec`` for gRPC's raw contents, ``http`` for JSON and binary
data).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from service import __version__, tensors
from service.core.catalogue import Answer
from service.core.dataplane import ModelMetadata, VersionState, VersionStatistics
from service.core.statistics import Duration
from service.errors import InvalidInput, quote
from service.repository import TensorSpec

__all__ = [
    "EXTENSIONS",
    "PLATFORM",
    "SERVER_NAME",
    "check_load_parameters",
    "check_unload_parameters",
    "config_type",
    "model_config",
    "model_metadata",
    "model_statistics",
    "repository_index",
    "server_metadata",
]

SERVER_NAME = "mcdropout"
PLATFORM = "onnxruntime_mcdropout"
#: Only what the server really does: "parameters" (request and response parameters: the mc_*
#: options, mc_samples), "mc_dropout" (custom: statistic outputs per model output),
#: Triton's "model_configuration", "statistics" and "model_repository", and the REST form's
#: "binary_tensor_data". No classification, sequence, shared memory, trace or logging.
EXTENSIONS = (
    "parameters",
    "mc_dropout",
    "model_configuration",
    "statistics",
    "model_repository",
    "binary_tensor_data",
)
_CUDA = "CUDAExecutionProvider"


def server_metadata() -> dict[str, Any]:
    """``GET /v2`` and ServerMetadata."""
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


def _wire_type(spec: TensorSpec) -> tensors.DType:
    dtype = tensors.from_numpy(spec.dtype)
    assert dtype is not None  # config.json dtypes are all in the table
    return dtype


def input_metadata(spec: TensorSpec) -> dict[str, Any]:
    """A model input: OIP datatype, shape with -1 for the batch (and dynamic axes)."""
    return {"name": spec.name, "datatype": _wire_type(spec).oip, "shape": list(spec.shape)}


def output_metadata(answer: Answer) -> dict[str, Any]:
    """One output of the answers (the catalogue's)."""
    return {
        "name": answer.name,
        "datatype": answer.statistic.dtype.oip,
        "shape": list(answer.shape),
    }


def model_metadata(metadata: ModelMetadata) -> dict[str, Any]:
    """``GET /v2/models/{m}[/versions/{v}]`` and ModelMetadata: the inputs, and every output
    an answer has (the graph's own outputs, their MC mean, then the statistics)."""
    return {
        "name": metadata.name,
        "versions": [str(v) for v in metadata.versions],
        "platform": PLATFORM,
        "inputs": [input_metadata(spec) for spec in metadata.config.inputs],
        "outputs": [output_metadata(answer) for answer in metadata.statistics],
    }


def config_type(dtype: tensors.DType) -> str:
    """Triton's ``DataType`` name of a wire type (``TYPE_FP32``; BYTES is ``TYPE_STRING``)."""
    return "TYPE_STRING" if dtype.is_bytes else f"TYPE_{dtype.oip}"


def model_config(metadata: ModelMetadata) -> dict[str, Any]:
    """``GET /v2/models/{m}[/versions/{v}]/config`` and ModelConfig, in Triton's terms.

    Every input and output has the batch as its first dimension, so ``max_batch_size`` is the
    most rows of one request and ``dims`` leave the batch out. The outputs are those of the
    metadata (what a request can name). ``dynamic_batching`` is there when the model batches
    concurrent requests: ``preferred_batch_size`` is its run's row cap. The MC dropout settings
    are in ``parameters`` (strings, as Triton's are).
    """
    config = metadata.config
    document: dict[str, Any] = {
        "name": metadata.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "version_policy": {"all": {}},
        "max_batch_size": metadata.max_request_rows,
        "input": [
            {
                "name": spec.name,
                "data_type": config_type(_wire_type(spec)),
                "format": "FORMAT_NONE",
                "dims": list(spec.shape[1:]),
            }
            for spec in config.inputs
        ],
        "output": [
            {
                "name": answer.name,
                "data_type": config_type(answer.statistic.dtype),
                "dims": list(answer.shape[1:]),
            }
            for answer in metadata.statistics
        ],
        "instance_group": [
            {
                "name": metadata.name,
                "kind": "KIND_GPU" if metadata.provider == _CUDA else "KIND_CPU",
                "count": metadata.compute_workers,
            }
        ],
        "parameters": {
            name: {"string_value": value}
            for name, value in (
                ("task", config.task.value),
                ("description", config.description),
                ("mc_default_num_samples", str(config.default_num_samples)),
                ("mc_max_num_samples", str(config.max_num_samples)),
                ("execution_provider", metadata.provider),
                ("version", str(metadata.version)),
            )
        },
    }
    batching = metadata.batching
    if batching is not None and batching.enabled:
        document["dynamic_batching"] = {
            "preferred_batch_size": [batching.max_batch_rows],
            "max_queue_delay_microseconds": round(batching.max_queue_delay_s * 1e6),
        }
    return document


def _duration(duration: Duration) -> dict[str, int]:
    return {"count": duration.count, "ns": duration.ns}


def model_statistics(entries: Sequence[VersionStatistics]) -> dict[str, Any]:
    """``GET /v2/models[/{m}[/versions/{v}]]/stats`` and ModelStatistics (Triton's
    definitions: ``service.core.statistics``)."""
    empty = _duration(Duration())
    return {
        "model_stats": [
            {
                "name": s.model,
                "version": str(s.version),
                "last_inference": s.last_inference_ms,
                "inference_count": s.inference_count,
                "execution_count": s.execution_count,
                "inference_stats": {
                    "success": _duration(s.success),
                    "fail": _duration(s.fail),
                    "queue": _duration(s.queue),
                    "compute_input": _duration(s.compute_input),
                    "compute_infer": _duration(s.compute_infer),
                    "compute_output": _duration(s.compute_output),
                    "cache_hit": empty,
                    "cache_miss": empty,
                },
                "batch_stats": [
                    {
                        "batch_size": b.batch_size,
                        "compute_input": _duration(b.compute_input),
                        "compute_infer": _duration(b.compute_infer),
                        "compute_output": _duration(b.compute_output),
                    }
                    for b in s.batches.values()
                ],
            }
            for s in entries
        ]
    }


def repository_index(states: Sequence[VersionState], ready_only: bool) -> list[dict[str, str]]:
    """``POST /v2/repository/index`` and RepositoryIndex: every model version the server knows,
    with its state (READY, LOADING, UNAVAILABLE, UNLOADING) and the reason when not READY."""
    return [
        {
            "name": s.model,
            "version": "" if s.version is None else str(s.version),
            "state": s.state.value,
            "reason": s.reason,
        }
        for s in states
        if not ready_only or s.state.value == "READY"
    ]


def check_load_parameters(parameters: Mapping[str, Any]) -> None:
    """Triton's load overrides are not supported: a load reads the repository as it is.

    Raises:
        InvalidInput: a ``config`` or ``file:<path>`` parameter.
    """
    for name in parameters:
        if name == "config" or name.startswith("file:"):
            raise InvalidInput(
                f"load parameter {quote(name)}: overriding a model's config or files is not "
                "supported; change the model repository, then load"
            )


def check_unload_parameters(parameters: Mapping[str, Any]) -> None:
    """``unload_dependents`` (a boolean) is accepted: no model here depends on another.

    Raises:
        InvalidInput: ``unload_dependents`` that is not a boolean.
    """
    value = parameters.get("unload_dependents", False)
    if not isinstance(value, bool):
        raise InvalidInput(f"parameter 'unload_dependents' must be a boolean, got {quote(value)}")
