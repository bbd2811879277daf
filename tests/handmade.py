"""Hand-made model versions for the lifecycle tests: tiny ONNX graphs built with onnx.helper
(no torch, milliseconds), written into a repository the way an exporter or an operator would.

The graph is ``y = Dropout(x) @ W + offset``: with zero inputs every sample is exactly
``offset``, so an answer tells which copy of a version served it.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FEATURES = 5
OUTPUTS = 2


def graph(offset: float, *, feature_dim: int | str = FEATURES) -> bytes:
    """The serialized model: ``y = Dropout(x, 0.3) @ W + offset``, x (batch, feature_dim).

    Args:
        offset: added to every output (identifies the copy).
        feature_dim: the graph's input width; a name makes it symbolic (any width passes the
            load-time checks, and a config.json with the wrong width fails only when run).
    """
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((FEATURES, OUTPUTS)).astype(np.float32)
    initializers = [
        numpy_helper.from_array(weights, "w"),
        numpy_helper.from_array(np.full((OUTPUTS,), offset, np.float32), "b"),
        numpy_helper.from_array(np.array(0.3, np.float32), "ratio"),
        numpy_helper.from_array(np.array(True), "training"),
    ]
    nodes = [
        helper.make_node("Dropout", ["x", "ratio", "training"], ["d"]),
        helper.make_node("MatMul", ["d", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["y"]),
    ]
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "handmade",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", feature_dim])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUTPUTS])],
            initializers,
        ),
        opset_imports=[helper.make_opsetid("", 18)],
        ir_version=9,
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


def config(name: str, *, features: int = FEATURES, **extra: Any) -> dict[str, Any]:
    """The config.json of :func:`graph` (``features`` other than the graph's is a mismatch)."""
    return {
        "format_version": 1,
        "name": name,
        "task": "regression",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, features]}],
        "outputs": [
            {"name": "y", "dtype": "float32", "shape": [-1, OUTPUTS], "semantics": "values"}
        ],
        "num_samples": {"default": 8, "max": 1000},
        **extra,
    }


def publish(root: Path, name: str, version: int, model: bytes, raw_config: Any) -> Path:
    """Write a version as the exporter does: in a hidden folder beside it, renamed into place
    complete."""
    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".tmp-{version}-{uuid.uuid4().hex}"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(model)
    (staging / "config.json").write_text(json.dumps(raw_config))
    target = model_dir / str(version)
    staging.rename(target)
    return target


def replace_files(folder: Path, model: bytes, raw_config: Any) -> None:
    """Replace a version's files in place, each atomically (write beside, rename over)."""
    for file, data in (("model.onnx", model), ("config.json", json.dumps(raw_config).encode())):
        staging = folder / f".{file}.{uuid.uuid4().hex}"
        staging.write_bytes(data)
        os.replace(staging, folder / file)
