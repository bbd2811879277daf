"""PyTorch -> ONNX with MC dropout kept active: export, graph checks, verification, publishing.

``export_model`` is the entry point (``python -m export`` is its command line); the other
names are its building blocks, usable on their own:

* ``mc_dropout_copy`` / ``find_dropout_modules``: the PyTorch MC dropout reference.
* ``check_graph``: static checks on any ``onnx.ModelProto``.
* ``verify_model``: statistical comparison of ONNX Runtime samples with PyTorch's.
* ``export.errors``: the exception tree (every failure is an ``ExportError``).
* ``export.zoo``: real architectures with random weights and the arguments that export them
  (tests and benchmarks; torchvision, timm and transformers from the ``dev`` extra).
"""

from __future__ import annotations

from export.api import ExportReport, Semantics, Task, export_model
from export.checks import CheckResult, GraphCheckReport, NodeRef, check_graph
from export.errors import (
    DropoutError,
    DropoutNotKeptError,
    DropoutNotRunError,
    ExportArgumentError,
    ExportError,
    GraphCheckError,
    NoDropoutError,
    OnnxExportError,
    PublishError,
    VerificationError,
    VersionExistsError,
    ZeroDropoutError,
)
from export.mc_mode import DROPOUT_TYPES, DropoutModule, find_dropout_modules, mc_dropout_copy
from export.publish import TensorSpec
from export.verify import VerificationCheck, VerificationReport, verify_model

__all__ = [
    "DROPOUT_TYPES",
    "CheckResult",
    "DropoutError",
    "DropoutModule",
    "DropoutNotKeptError",
    "DropoutNotRunError",
    "ExportArgumentError",
    "ExportError",
    "ExportReport",
    "GraphCheckError",
    "GraphCheckReport",
    "NoDropoutError",
    "NodeRef",
    "OnnxExportError",
    "PublishError",
    "Semantics",
    "Task",
    "TensorSpec",
    "VerificationCheck",
    "VerificationError",
    "VerificationReport",
    "VersionExistsError",
    "ZeroDropoutError",
    "check_graph",
    "export_model",
    "find_dropout_modules",
    "mc_dropout_copy",
    "verify_model",
]
