"""Writing a verified model version into the model repository (docs/model-repository.md).

A version is built in a hidden temporary folder beside its target (``<name>/.tmp-<v>-<random>``)
and renamed into place only when every file is written and synced, so the server never sees a
half-written version. Versions are never overwritten.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import math
import operator
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
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
        shape: dimensions with -1 for the (first, dynamic) batch dimension and for any other
            dynamic dimension.
        max_shape: inputs with a dynamic non-batch dimension: the same length as ``shape``,
            -1 at the batch, the largest size at each dynamic dimension, the fixed size
            elsewhere; None otherwise.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    max_shape: tuple[int, ...] | None = None

    @property
    def dynamic_axes(self) -> tuple[int, ...]:
        """The dynamic dimensions other than the batch."""
        return tuple(i for i, d in enumerate(self.shape) if i > 0 and d == -1)

    def to_dict(self, semantics: str | None = None) -> dict[str, Any]:
        """The ``inputs[]`` / ``outputs[]`` entry of config.json."""
        entry: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.max_shape is not None:
            entry["max_shape"] = list(self.max_shape)
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
    # -1: the batch (always) and any symbolic dimension (declared dynamic, or derived).
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


_BINARY_OPS: dict[type[ast.operator], Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
# The functions the exporter writes into dimension expressions (sympy printing).
_DIM_FUNCTIONS: dict[str, Callable[..., int]] = {
    "floor": int,
    "FloorToInt": int,
    "FloorDiv": operator.floordiv,
    "Mod": operator.mod,
    "ceiling": lambda x: -(-x // 1),
    "CeilToInt": lambda x: -(-x // 1),
    "Max": max,
    "Min": min,
}


def _evaluate(node: ast.AST, sizes: Mapping[str, int]) -> int | float:
    """An arithmetic dimension expression; KeyError/ValueError for anything else."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, sizes)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name):
        return sizes[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, sizes)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        return _evaluate(node.left, sizes) / _evaluate(node.right, sizes)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left, sizes), _evaluate(node.right, sizes)
        return _BINARY_OPS[type(node.op)](int(left), int(right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        function = _DIM_FUNCTIONS[node.func.id]
        return function(*(_evaluate(arg, sizes) for arg in node.args))
    raise ValueError(f"unsupported dimension expression {ast.dump(node)}")


def _dim_size(dim: onnx.TensorShapeProto.Dimension, max_dims: Mapping[str, int]) -> int | None:
    """A dimension's size, symbolic ones evaluated at ``max_dims``; None when unknown."""
    if dim.HasField("dim_value"):
        return dim.dim_value
    if not dim.dim_param or not max_dims:
        return None
    try:
        size = _evaluate(ast.parse(dim.dim_param, mode="eval"), max_dims)
    except (KeyError, ValueError, SyntaxError, TypeError, ZeroDivisionError, RecursionError):
        return None
    return int(size) if size >= 0 else None


def activation_bytes_per_row(
    model: onnx.ModelProto, max_dims: Mapping[str, int] | None = None
) -> int:
    """Upper-bound estimate of the bytes one row of a batch needs in a session run.

    Sums, over the graph inputs, outputs and every intermediate tensor that shape inference
    could type, the bytes per row of those whose first dimension is the batch symbol and
    whose other dimensions are known. Tensors shape inference cannot resolve are skipped;
    if inference fails altogether only the inputs and outputs count. It ignores memory
    reuse, hence an upper bound.

    Args:
        model: the exported graph.
        max_dims: dynamic non-batch dimensions: symbol (dim_param) -> its largest size. The
            estimate is made with every such dimension at its largest size: symbolic
            dimensions (e.g. "sequence", "2*sequence") are evaluated there.

    Returns:
        Bytes per row (at least 1).
    """
    max_dims = max_dims or {}
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
        sizes = [_dim_size(d, max_dims) for d in dims[1:]]
        if any(size is None for size in sizes):
            continue
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).itemsize
        except KeyError:  # undefined or exotic element type
            continue
        total += itemsize * math.prod(size or 0 for size in sizes)
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
    task: str | None,
    description: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    semantics: Sequence[str],
    labels: Sequence[str] | None,
    variance_of: Mapping[str, str],
    default_num_samples: int,
    max_num_samples: int,
    activation_bytes: int,
    output_labels: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """config.json, with the fields in the documented order.

    Args:
        name: the model name.
        task: "classification", "regression" or "mixed"; None leaves it out.
        description: free text.
        inputs: the graph inputs (with ``max_shape`` where they have dynamic axes).
        outputs: the graph outputs.
        semantics: per output, its semantics.
        labels: the top-level labels (a model with exactly one class output), or None.
        variance_of: variance output name -> the values output it describes ("of").
        default_num_samples: the default T.
        max_num_samples: the largest T.
        activation_bytes: the ``activation_bytes_per_row`` estimate.
        output_labels: class output name -> its own labels (written in its entry).

    Returns:
        The document.
    """
    output_labels = output_labels or {}
    entries = []
    for spec, kind in zip(outputs, semantics, strict=True):
        entry = spec.to_dict(kind)
        if spec.name in variance_of:
            entry["of"] = variance_of[spec.name]
        if spec.name in output_labels:
            entry["labels"] = list(output_labels[spec.name])
        entries.append(entry)
    document: dict[str, Any] = {"format_version": FORMAT_VERSION, "name": name}
    if task is not None:
        document["task"] = task
    document |= {
        "description": description,
        "inputs": [spec.to_dict() for spec in inputs],
        "outputs": entries,
    }
    if labels is not None:
        document["labels"] = list(labels)
    document["num_samples"] = {"default": default_num_samples, "max": max_num_samples}
    document["activation_bytes_per_row"] = activation_bytes
    return document
