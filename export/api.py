"""``export_model``: a trained PyTorch model -> a verified MC dropout version in the repository.

The pipeline, each step failing loudly with an ``ExportError`` subclass::

    validate arguments -> find dropout (NoDropoutError / ZeroDropoutError)
    -> deep copy in MC mode -> torch.onnx.export (dynamo, opset 18..21)
    -> dropout kept? (DropoutNotKeptError) -> static graph checks (GraphCheckError)
    -> statistical verification against PyTorch (VerificationError)
    -> atomic publish (VersionExistsError / PublishError)

Nothing touches the repository before verification has passed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import onnx
import onnxruntime as ort
import torch
from torch import nn

from export.checks import MAX_OPSET, MIN_OPSET, GraphCheckReport, check_graph
from export.errors import (
    ExportArgumentError,
    GraphCheckError,
    VerificationError,
    VersionExistsError,
)
from export.mc_mode import DropoutModule, active_dropout, find_dropout_modules, mc_dropout_copy
from export.onnx_export import export_onnx_bytes, require_dropout_kept
from export.publish import (
    CONFIG_FILE,
    FORMAT_VERSION,
    METADATA_FILE,
    MODEL_FILE,
    TensorSpec,
    activation_bytes_per_row,
    config_document,
    graph_io,
    next_version,
    publish_version,
    to_json,
    validate_name,
    weights_sha256,
)
from export.verify import VerificationReport, verify_model

__all__ = ["ExportReport", "Semantics", "Task", "export_model"]

log = logging.getLogger(__name__)

Task = Literal["classification", "regression"]
Semantics = Literal["logits", "probabilities", "values", "variance", "log_variance"]

_TASKS = ("classification", "regression")
_CLASSIFICATION_SEMANTICS = ("logits", "probabilities")
# Verification tiles at most this many bytes of activations per run (see config.json's
# activation_bytes_per_row), so big models are sampled in chunks.
_VERIFY_BYTES_PER_RUN = 256 * 2**20


@dataclass(frozen=True)
class ExportReport:
    """What ``export_model`` published.

    Attributes:
        name: the model name.
        version: the version published.
        path: the version folder, ``repository/name/version``.
        inputs: the graph inputs as written to config.json.
        outputs: the graph outputs as written to config.json.
        dropout: every dropout module of the model (p == 0 included).
        graph_checks: the static checks on the written graph.
        verification: the statistical verification against PyTorch.
        config: the config.json document.
        metadata: the metadata.json document.
        elapsed_s: wall time of the whole export.
    """

    name: str
    version: int
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dropout: tuple[DropoutModule, ...]
    graph_checks: GraphCheckReport
    verification: VerificationReport
    config: dict[str, Any]
    metadata: dict[str, Any]
    elapsed_s: float

    def summary(self) -> str:
        """A readable multi-line report."""
        dropout = ", ".join(f"{d.module} ({d.type}, p={d.p:g})" for d in self.dropout)
        lines = [
            f"published {self.name} version {self.version} -> {self.path}",
            f"inputs:  {', '.join(f'{s.name} {s.dtype} {list(s.shape)}' for s in self.inputs)}",
            f"outputs: {', '.join(f'{s.name} {s.dtype} {list(s.shape)}' for s in self.outputs)}",
            f"dropout: {dropout}",
            f"opset {self.metadata['opset']}, "
            f"{len(self.metadata['stochastic_nodes'])} stochastic nodes, "
            f"{self.config['activation_bytes_per_row']} activation bytes per row",
            "graph checks:",
            self.graph_checks.summary(),
            self.verification.summary(),
            f"total {self.elapsed_s:.1f} s",
        ]
        return "\n".join(lines)


def _as_tuple(example_inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ExportArgumentError("example_inputs must be a tensor or a non-empty tuple of tensors")
    rows = {t.shape[0] if t.dim() else 0 for t in inputs}
    if len(rows) != 1 or 0 in rows:
        shapes = [tuple(t.shape) for t in inputs]
        raise ExportArgumentError(
            f"example inputs need a first (batch) dimension of the same size >= 1, got {shapes}"
        )
    return tuple(t.detach().cpu() for t in inputs)


def _run_once(mc_model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    with torch.no_grad():
        result = mc_model(*inputs)
    outputs = list(result) if isinstance(result, (tuple, list)) else [result]
    if not outputs or not all(isinstance(o, torch.Tensor) for o in outputs):
        raise ExportArgumentError(
            f"the model must return a tensor or a tuple of tensors, got {type(result).__name__}"
        )
    return outputs


def _default_names(prefix: str, count: int) -> list[str]:
    return [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]


def _check_names(kind: str, names: Sequence[str], count: int) -> list[str]:
    if len(names) != count:
        raise ExportArgumentError(f"{count} {kind}s, but {len(names)} {kind} names: {names}")
    if len(set(names)) != len(names) or not all(names):
        raise ExportArgumentError(f"{kind} names must be unique and non-empty, got {names}")
    return list(names)


def _resolve_semantics(task: str, output_semantics: Sequence[str] | None, count: int) -> list[str]:
    default = "logits" if task == "classification" else "values"
    semantics = list(output_semantics) if output_semantics is not None else [default] * count
    if len(semantics) != count:
        raise ExportArgumentError(f"{count} outputs, but {len(semantics)} output semantics")
    allowed = (
        _CLASSIFICATION_SEMANTICS
        if task == "classification"
        else ("values", "variance", "log_variance")
    )
    wrong = [s for s in semantics if s not in allowed]
    if wrong:
        raise ExportArgumentError(f"{task} outputs must have semantics {allowed}, got {wrong}")
    return semantics


def _check_variance_of(
    names: Sequence[str], semantics: Sequence[str], variance_of: Mapping[str, str]
) -> None:
    """Every variance output names a values output; nothing else is in ``variance_of``."""
    kinds = dict(zip(names, semantics, strict=True))
    variances = {n for n, s in kinds.items() if s in ("variance", "log_variance")}
    if set(variance_of) != variances:
        raise ExportArgumentError(
            f"variance_of must map exactly the variance outputs {sorted(variances)}, got "
            f"{sorted(variance_of)}"
        )
    for name, target in variance_of.items():
        if kinds.get(target) != "values":
            raise ExportArgumentError(
                f"{name!r} is the variance of {target!r}, not a values output"
            )


def _check_arguments(
    *,
    name: str,
    task: str,
    version: int | None,
    labels: Sequence[str] | None,
    default_num_samples: int,
    max_num_samples: int,
    opset: int,
    verify_samples: int,
    false_failure_probability: float,
    metrics: Mapping[str, Any] | None,
) -> None:
    validate_name(name)
    if task not in _TASKS:
        raise ExportArgumentError(f"task must be one of {_TASKS}, got {task!r}")
    if version is not None and version < 1:
        raise ExportArgumentError(f"version must be a positive integer or None, got {version}")
    if labels is not None and task != "classification":
        raise ExportArgumentError("labels are for classification models only")
    if default_num_samples < 1:
        raise ExportArgumentError(f"default_num_samples must be >= 1, got {default_num_samples}")
    if max_num_samples < default_num_samples:
        raise ExportArgumentError(
            f"max_num_samples must be >= default_num_samples ({default_num_samples}), "
            f"got {max_num_samples}"
        )
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportArgumentError(
            f"opset must be within {MIN_OPSET}..{MAX_OPSET}, got {opset} (ONNX Runtime 1.31 "
            "has no RandomUniformLike kernel at 22+)"
        )
    if verify_samples < 100:
        raise ExportArgumentError(f"verify_samples must be >= 100, got {verify_samples}")
    if not 0.0 < false_failure_probability < 1.0:
        raise ExportArgumentError(
            f"false_failure_probability must be in (0, 1), got {false_failure_probability}"
        )
    try:
        json.dumps(dict(metrics or {}), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ExportArgumentError(f"metrics must be JSON-serialisable: {error}") from error


def _check_outputs(
    task: str, shapes: Sequence[tuple[int, ...]], labels: Sequence[str] | None
) -> None:
    """Classification: exactly one (B, C) output, and one label per class when given."""
    if task != "classification":
        return
    if len(shapes) != 1 or len(shapes[0]) != 2:
        raise ExportArgumentError(
            "a classification model needs exactly one output of shape [-1, C], got per-row "
            f"shapes {[list(s[1:]) for s in shapes]}"
        )
    classes = shapes[0][1]
    if labels is not None and len(labels) != classes:
        raise ExportArgumentError(f"{classes} classes but {len(labels)} labels: {list(labels)}")


def _rows_per_run(activation_bytes: int) -> int:
    return max(1, min(65536, _VERIFY_BYTES_PER_RUN // activation_bytes))


def export_model(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    repository: Path,
    name: str,
    task: Task,
    version: int | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    output_semantics: Sequence[Semantics] | None = None,
    variance_of: Mapping[str, str] | None = None,
    labels: Sequence[str] | None = None,
    default_num_samples: int = 100,
    max_num_samples: int = 10000,
    opset: int = 18,
    verify_samples: int = 4000,
    false_failure_probability: float = 1e-4,
    description: str = "",
    metrics: Mapping[str, Any] | None = None,
) -> ExportReport:
    """Export ``model`` to ONNX with dropout kept active, verify it, publish it.

    ``model`` is never modified: a deep copy is put in MC dropout mode (``eval()``, then
    ``train()`` on the dropout modules only) and exported.

    Args:
        model: the trained model; must contain at least one dropout module with p > 0.
        example_inputs: one tensor, or a tuple with one tensor per model input, each
            (B, ...). Its shapes (except B) become the graph's; its first rows (up to 8) are
            used for verification, so pass realistic data.
        repository: the model repository root, e.g. ``Path("models")``.
        name: the model name (folder name, ``[A-Za-z0-9_.-]+``).
        task: "classification" or "regression".
        version: the version to publish; None takes one more than the newest existing.
        input_names: graph input names; default "input" (or "input_0", "input_1", ...).
        output_names: graph output names; default "output" (or "output_0", ...).
        variance_of: heteroscedastic regression: {variance output name: the values output it
            describes}, for the outputs whose semantics is "variance" or "log_variance".
        output_semantics: per output "logits", "probabilities" or "values" (or "variance" /
            "log_variance" with ``variance_of``); default logits
            for classification, values for regression.
        labels: classification only: one name per class.
        default_num_samples: T when a request does not set it.
        max_num_samples: the largest T a request may ask for.
        opset: default-domain ONNX opset, 18..21.
        verify_samples: n, the MC samples drawn from each of ONNX Runtime and PyTorch.
        false_failure_probability: probability that verification rejects a correct export.
        description: free text for config.json.
        metrics: free-form scores for metadata.json (e.g. test accuracy).

    Returns:
        The report of what was published.

    Raises:
        ExportArgumentError: an invalid argument.
        NoDropoutError: the model has no dropout module.
        ZeroDropoutError: every dropout module has p == 0.
        DropoutNotKeptError: the exported graph lost some dropout.
        OnnxExportError: torch.onnx.export failed.
        GraphCheckError: the static graph checks found problems.
        VerificationError: ONNX Runtime does not sample like PyTorch MC dropout.
        VersionExistsError: the requested version exists.
        PublishError: writing the version failed.
    """
    started = time.perf_counter()
    repository = Path(repository)
    _check_arguments(
        name=name,
        task=task,
        version=version,
        labels=labels,
        default_num_samples=default_num_samples,
        max_num_samples=max_num_samples,
        opset=opset,
        verify_samples=verify_samples,
        false_failure_probability=false_failure_probability,
        metrics=metrics,
    )
    if version is not None and (repository / name / str(version)).exists():
        raise VersionExistsError(f"{repository / name / str(version)} already exists")
    inputs = _as_tuple(example_inputs)
    active = active_dropout(model)
    dropout = find_dropout_modules(model)
    mc_model = mc_dropout_copy(model)
    outputs = _run_once(mc_model, inputs)
    input_names = _check_names(
        "input", input_names or _default_names("input", len(inputs)), len(inputs)
    )
    output_names = _check_names(
        "output", output_names or _default_names("output", len(outputs)), len(outputs)
    )
    semantics = _resolve_semantics(task, output_semantics, len(outputs))
    _check_variance_of(output_names, semantics, variance_of or {})
    _check_outputs(task, [tuple(o.shape) for o in outputs], labels)

    log.info("exporting %s (%d active dropout modules) at opset %d", name, len(active), opset)
    onnx_bytes = export_onnx_bytes(
        mc_model,
        inputs,
        input_names=input_names,
        output_names=output_names,
        opset=opset,
        dropout=active,
    )
    # Check the bytes that will be written, not the exporter's in-memory object.
    graph = onnx.load_from_string(onnx_bytes)
    stochastic = require_dropout_kept(graph, active)
    graph_checks = check_graph(graph)
    if not graph_checks.passed:
        raise GraphCheckError(
            "the exported graph failed static checks: " + "; ".join(graph_checks.problems),
            graph_checks,
        )
    graph_inputs, graph_outputs = graph_io(graph)
    if [s.name for s in graph_inputs] != input_names or [
        s.name for s in graph_outputs
    ] != output_names:
        raise ExportArgumentError(
            f"the graph's inputs/outputs {[s.name for s in graph_inputs]} / "
            f"{[s.name for s in graph_outputs]} differ from {input_names} / {output_names}"
        )
    _check_outputs(task, [s.shape for s in graph_outputs], labels)
    activation_bytes = activation_bytes_per_row(graph)

    log.info("verifying %s against PyTorch with %d samples", name, verify_samples)
    verification = verify_model(
        onnx_bytes,
        mc_model,
        inputs,
        num_samples=verify_samples,
        false_failure_probability=false_failure_probability,
        max_rows_per_run=_rows_per_run(activation_bytes),
    )
    if not verification.passed:
        raise VerificationError(
            f"verification of {name} failed ({', '.join(verification.failed)}); nothing was "
            "published:\n" + verification.summary(),
            verification,
        )

    config = config_document(
        name=name,
        task=task,
        description=description,
        inputs=graph_inputs,
        outputs=graph_outputs,
        semantics=semantics,
        variance_of=variance_of or {},
        labels=labels,
        default_num_samples=default_num_samples,
        max_num_samples=max_num_samples,
        activation_bytes=activation_bytes,
    )
    metadata: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "opset": next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
        "weights_sha256": weights_sha256(model),
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "dropout": [d.to_dict() for d in dropout],
        "stochastic_nodes": [n.to_dict() for n in stochastic],
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
        "verification": verification.to_dict(),
        "metrics": dict(metrics or {}),
    }
    chosen = version if version is not None else next_version(repository, name)
    path = publish_version(
        repository,
        name,
        chosen,
        {
            MODEL_FILE: onnx_bytes,
            CONFIG_FILE: to_json(config),
            METADATA_FILE: to_json(metadata),
        },
    )
    return ExportReport(
        name=name,
        version=chosen,
        path=path,
        inputs=tuple(graph_inputs),
        outputs=tuple(graph_outputs),
        dropout=tuple(dropout),
        graph_checks=graph_checks,
        verification=verification,
        config=config,
        metadata=metadata,
        elapsed_s=time.perf_counter() - started,
    )
