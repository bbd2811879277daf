"""Writing a verified model version into the model repository (docs/model-repository.md).

A version is built in a hidden temporary folder beside its target (``<name>/.tmp-<v>-<random>``)
and renamed into place only when every file is written and synced, so the server never sees a
half-written version. Versions are never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from export.errors import ExportArgumentError, PublishError, VersionExistsError

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "METADATA_FILE",
    "MODEL_FILE",
    "NAME_PATTERN",
    "SERVER_DTYPES",
    "TensorSpec",
    "activation_bytes_per_row",
    "config_document",
    "existing_versions",
    "graph_io",
    "next_version",
    "publish_version",
    "to_json",
    "validate_name",
    "weights_sha256",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
#: Model folder names the server accepts.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
#: Tensor dtypes the server can decode (numpy names).
SERVER_DTYPES = frozenset(
    {"float32", "float64", "float16", "int64", "int32", "int8", "uint8", "bool"}
)


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output as config.json describes it.

    Attributes:
        name: the graph name.
        dtype: numpy dtype name, e.g. "float32".
        shape: dimensions with -1 for the (first, dynamic) batch dimension.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self, semantics: str | None = None) -> dict[str, Any]:
        """The ``inputs[]`` / ``outputs[]`` entry of config.json."""
        entry: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if semantics is not None:
            entry["semantics"] = semantics
        return entry


def validate_name(name: str) -> None:
    """Raise ExportArgumentError unless ``name`` is a valid model folder name."""
    if not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise ExportArgumentError(
            f"model name must match [A-Za-z0-9_.-]+ (and not be '.' or '..'), got {name!r}"
        )


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    if dtype not in SERVER_DTYPES:
        raise ExportArgumentError(
            f"tensor {value.name!r} has dtype {dtype}; the server supports {sorted(SERVER_DTYPES)}"
        )
    shape = tuple(
        d.dim_value if d.HasField("dim_value") and i > 0 else -1
        for i, d in enumerate(tensor_type.shape.dim)
    )
    return TensorSpec(value.name, dtype, shape)


def graph_io(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs (initializers excluded) and outputs, in graph order.

    Args:
        model: a graph that passed ``check_batch_dimension``.

    Returns:
        (inputs, outputs).

    Raises:
        ExportArgumentError: a dtype the server cannot decode.
    """
    initializers = {init.name for init in model.graph.initializer}
    inputs = [_spec(v) for v in model.graph.input if v.name not in initializers]
    outputs = [_spec(v) for v in model.graph.output]
    return inputs, outputs


def activation_bytes_per_row(model: onnx.ModelProto) -> int:
    """Upper-bound estimate of the bytes one row of a batch needs in a session run.

    Sums, over the graph inputs, outputs and every intermediate tensor that shape inference
    could type, the bytes per row of those whose first dimension is the batch symbol and
    whose other dimensions are known. Tensors shape inference cannot resolve are skipped;
    if inference fails altogether only the inputs and outputs count. It ignores memory
    reuse, hence an upper bound.

    Args:
        model: the exported graph.

    Returns:
        Bytes per row (at least 1).
    """
    initializers = {init.name for init in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    symbols = {
        v.type.tensor_type.shape.dim[0].dim_param
        for v in inputs
        if v.type.tensor_type.shape.dim and v.type.tensor_type.shape.dim[0].dim_param
    }
    values: list[onnx.ValueInfoProto] = [*inputs, *model.graph.output]
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        values.extend(inferred.graph.value_info)
    except (onnx.shape_inference.InferenceError, ValueError) as error:
        log.warning("shape inference failed (%s): counting inputs and outputs only", error)
    total = 0
    seen: set[str] = set()
    for value in values:
        if value.name in seen or not value.type.HasField("tensor_type"):
            continue
        seen.add(value.name)
        tensor_type = value.type.tensor_type
        dims = tensor_type.shape.dim
        if not dims or dims[0].dim_param not in symbols:
            continue
        if not all(d.HasField("dim_value") for d in dims[1:]):
            continue
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).itemsize
        except KeyError:  # undefined or exotic element type
            continue
        total += itemsize * math.prod(d.dim_value for d in dims[1:])
    return max(total, 1)


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over the model's floating-point state_dict tensors, in state_dict order.

    Each tensor contributes the bytes of its contiguous CPU numpy array (bfloat16, which numpy
    lacks, contributes its raw 16-bit words).

    Args:
        model: the model.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        cpu = tensor.detach().cpu()
        if cpu.dtype == torch.bfloat16:
            cpu = cpu.view(torch.int16)
        digest.update(np.ascontiguousarray(cpu.numpy()).tobytes())
    return digest.hexdigest()


def existing_versions(model_dir: Path) -> list[int]:
    """The version numbers present under a model folder, ascending (temp folders ignored)."""
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and not p.name.startswith("0")
    )


def next_version(repository: Path, name: str) -> int:
    """One more than the newest version of ``name`` in ``repository`` (1 when none)."""
    versions = existing_versions(repository / name)
    return versions[-1] + 1 if versions else 1


def to_json(document: Mapping[str, Any]) -> bytes:
    """Indented, UTF-8 JSON with a final newline; NaN/inf are refused."""
    return (json.dumps(document, indent=2, allow_nan=False) + "\n").encode()


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _sync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish_version(repository: Path, name: str, version: int, files: Mapping[str, bytes]) -> Path:
    """Atomically create ``repository/name/version`` holding ``files``.

    Args:
        repository: the model repository root (created if missing).
        name: the model name.
        version: a positive integer.
        files: file name -> contents, e.g. model.onnx, config.json, metadata.json.

    Returns:
        The published version folder.

    Raises:
        VersionExistsError: the version folder already exists.
        PublishError: writing or renaming failed (the temporary folder is removed).
    """
    validate_name(name)
    if version < 1:
        raise ExportArgumentError(f"version must be a positive integer, got {version}")
    model_dir = repository / name
    target = model_dir / str(version)
    if target.exists():
        raise VersionExistsError(f"{target} already exists; versions are never overwritten")
    created: list[Path] = [p for p in (repository, model_dir) if not p.exists()]
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=model_dir))
    try:
        tmp.chmod(0o755)  # mkdtemp makes 0700; the server may run as another user
        for file_name, data in files.items():
            _write_synced(tmp / file_name, data)
        _sync_directory(tmp)
        # rename() would silently replace an empty directory created meanwhile: look again.
        if target.exists():
            raise VersionExistsError(f"{target} appeared while publishing; not overwritten")
        os.rename(tmp, target)
        _sync_directory(model_dir)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in reversed(created):
            # Leave nothing behind that this call created, if it is still empty.
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        if isinstance(error, (VersionExistsError, KeyboardInterrupt, SystemExit)):
            raise
        if isinstance(error, OSError):
            raise PublishError(f"could not publish {target}: {error}") from error
        raise
    log.info("published %s", target)
    return target


def config_document(
    *,
    name: str,
    task: str,
    description: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    semantics: Sequence[str],
    labels: Sequence[str] | None,
    variance_of: Mapping[str, str],
    default_num_samples: int,
    max_num_samples: int,
    activation_bytes: int,
) -> dict[str, Any]:
    """config.json, with the fields in the documented order."""
    document: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "task": task,
        "description": description,
        "inputs": [spec.to_dict() for spec in inputs],
        "outputs": [
            spec.to_dict(s) | ({"of": variance_of[spec.name]} if spec.name in variance_of else {})
            for spec, s in zip(outputs, semantics, strict=True)
        ],
    }
    if labels is not None:
        document["labels"] = list(labels)
    document["num_samples"] = {"default": default_num_samples, "max": max_num_samples}
    document["activation_bytes_per_row"] = activation_bytes
    return document
