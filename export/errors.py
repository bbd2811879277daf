"""The exporter's exceptions: one base class, one subclass per way an export can fail.

::

    ExportError                     anything that stops a model from being published
    ├── ExportArgumentError         a bad argument (name, task, opset, labels, ...), found early
    ├── DropoutError                the model's dropout cannot give MC dropout samples
    │   ├── NoDropoutError          no dropout module at all
    │   ├── ZeroDropoutError        every dropout module has p == 0
    │   ├── DropoutNotRunError      no dropout module with p > 0 runs in the MC-mode forward
    │   └── DropoutNotKeptError     the ONNX graph lost (some of) the dropout
    ├── OnnxExportError             torch.onnx.export failed for another reason
    ├── GraphCheckError             the static checks on the written graph found problems
    ├── VerificationError           ONNX Runtime samples do not match PyTorch MC dropout
    └── PublishError                the version could not be written into the repository
        └── VersionExistsError      the version folder already exists (never overwritten)

Every message names what is wrong (module names, node names, the failed check) so the
caller can act on it without a debugger.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from export.checks import GraphCheckReport
    from export.verify import VerificationReport

__all__ = [
    "DropoutError",
    "DropoutNotKeptError",
    "DropoutNotRunError",
    "ExportArgumentError",
    "ExportError",
    "GraphCheckError",
    "NoDropoutError",
    "OnnxExportError",
    "PublishError",
    "VerificationError",
    "VersionExistsError",
    "ZeroDropoutError",
]


class ExportError(Exception):
    """Base class of every error raised by the exporter."""


class ExportArgumentError(ExportError, ValueError):
    """An argument of the export is invalid; raised before any work is done."""


class DropoutError(ExportError):
    """The model's dropout cannot produce MC dropout samples in ONNX."""


class NoDropoutError(DropoutError):
    """The model has no dropout module, so MC dropout would return T identical samples."""


class ZeroDropoutError(DropoutError):
    """Every dropout module of the model has p == 0."""


class DropoutNotRunError(DropoutError):
    """No dropout module with p > 0 runs in the MC-mode forward (all are bypassed)."""


class DropoutNotKeptError(DropoutError):
    """The exported graph has fewer stochastic nodes than dropout modules that run."""


class OnnxExportError(ExportError):
    """``torch.onnx.export`` failed for a reason unrelated to dropout."""


class GraphCheckError(ExportError):
    """The static checks on the exported graph found problems.

    Attributes:
        report: every check and its problems.
    """

    def __init__(self, message: str, report: GraphCheckReport) -> None:
        super().__init__(message)
        self.report = report


class VerificationError(ExportError):
    """ONNX Runtime's samples do not behave like PyTorch's MC dropout samples.

    Attributes:
        report: every verification check with its figures; ``report.failed`` names the
            checks that failed.
    """

    def __init__(self, message: str, report: VerificationReport) -> None:
        super().__init__(message)
        self.report = report


class PublishError(ExportError):
    """The version could not be written into the model repository."""


class VersionExistsError(PublishError):
    """The target version folder already exists; versions are never overwritten."""
