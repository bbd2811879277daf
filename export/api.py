"""``export_model``: a trained PyTorch model -> a verified MC dropout version in the repository.

The pipeline, each step failing loudly with an ``ExportError`` subclass::

    validate arguments -> find dropout (NoDropoutError / ZeroDropoutError)
    -> deep copy in MC mode, one forward with hooks: which dropout modules run
    -> torch.onnx.export (dynamo, opset 18..21, dynamic batch and declared axes)
    -> no module ran and no stochastic node (DropoutNotRunError)
    -> a stochastic node per module that runs? (DropoutNotKeptError)
    -> static graph checks (GraphCheckError)
    -> statistical verification against PyTorch (VerificationError)
    -> atomic publish (VersionExistsError / PublishError)

PyTorch's fused attention fast paths are off for the export and for the PyTorch reference
alike (``mc_mode.fastpath_disabled``). Nothing touches the repository before verification
has passed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
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

from export.checks import (
    MAX_OPSET,
    MIN_OPSET,
    GraphCheckReport,
    check_graph,
    find_stochastic_nodes,
)
from export.errors import (
    DropoutNotRunError,
    ExportArgumentError,
    GraphCheckError,
    VerificationError,
    VersionExistsError,
)
from export.mc_mode import (
    DropoutModule,
    active_dropout,
    find_dropout_modules,
    mc_dropout_copy,
    probe_forward,
)
from export.onnx_export import BATCH_DIM, export_onnx_bytes, require_dropout_kept
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
from export.verify import DEFAULT_TIME_BUDGET_S, VerificationReport, verify_model
from service.repository import parse_config

__all__ = ["ExportReport", "Semantics", "Task", "export_model"]

log = logging.getLogger(__name__)

Task = Literal["classification", "regression", "mixed"]
Semantics = Literal["logits", "probabilities", "values", "variance", "log_variance"]

_TASKS = ("classification", "regression", "mixed")
_CLASSIFICATION_SEMANTICS = ("logits", "probabilities")
_REGRESSION_SEMANTICS = ("values", "variance", "log_variance")
_AXIS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
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
        dropout_not_run: the dropout modules with p > 0 whose forward does not run in the
            MC-mode forward (bypassed, e.g. by a fused attention kernel that only takes their
            rate while the attention module trains): not counted among the stochastic nodes
            the graph must have.
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
    dropout_not_run: tuple[DropoutModule, ...]
    graph_checks: GraphCheckReport
    verification: VerificationReport
    config: dict[str, Any]
    metadata: dict[str, Any]
    elapsed_s: float

    def summary(self) -> str:
        """A readable multi-line report."""
        dropout = ", ".join(f"{d.module} ({d.type}, p={d.p:g})" for d in self.dropout)

        def describe(spec: TensorSpec) -> str:
            text = f"{spec.name} {spec.dtype} {list(spec.shape)}"
            return text + (f" (max {list(spec.max_shape)})" if spec.max_shape else "")

        lines = [
            f"published {self.name} version {self.version} -> {self.path}",
            f"inputs:  {', '.join(describe(s) for s in self.inputs)}",
            f"outputs: {', '.join(describe(s) for s in self.outputs)}",
            f"dropout: {dropout}",
        ]
        if self.dropout_not_run:
            lines.append(
                f"dropout not run in the MC-mode forward ({len(self.dropout_not_run)}, not "
                "counted among the stochastic nodes required): "
                + ", ".join(d.module for d in self.dropout_not_run)
            )
        lines += [
            "PyTorch fused attention fast path (torch.backends.mha) off for the export and "
            "the PyTorch reference",
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


def _default_names(prefix: str, count: int) -> list[str]:
    return [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]


def _check_names(kind: str, names: Sequence[str], count: int) -> list[str]:
    if len(names) != count:
        raise ExportArgumentError(f"{count} {kind}s, but {len(names)} {kind} names: {names}")
    if len(set(names)) != len(names) or not all(names):
        raise ExportArgumentError(f"{kind} names must be unique and non-empty, got {names}")
    return list(names)


def _resolve_semantics(
    task: str | None, output_semantics: Sequence[str] | None, count: int
) -> tuple[str, list[str]]:
    """(the task written to config.json, per-output semantics) from the arguments."""
    if output_semantics is None:
        if task is None or task == "mixed":
            raise ExportArgumentError(
                "output_semantics is required when task is None or 'mixed' (one of logits, "
                "probabilities, values, variance, log_variance per output)"
            )
        default = "logits" if task == "classification" else "values"
        semantics = [default] * count
    else:
        semantics = list(output_semantics)
    if len(semantics) != count:
        raise ExportArgumentError(f"{count} outputs, but {len(semantics)} output semantics")
    wrong = [s for s in semantics if s not in (*_CLASSIFICATION_SEMANTICS, *_REGRESSION_SEMANTICS)]
    if wrong:
        raise ExportArgumentError(
            f"output semantics must be among {_CLASSIFICATION_SEMANTICS + _REGRESSION_SEMANTICS}"
            f", got {wrong}"
        )
    classes = [s in _CLASSIFICATION_SEMANTICS for s in semantics]
    derived = "classification" if all(classes) else "regression" if not any(classes) else "mixed"
    if task is not None and task != derived:
        raise ExportArgumentError(
            f"task {task!r} does not fit the output semantics {semantics} (they make it "
            f"{derived!r}: classification outputs are logits/probabilities, regression outputs "
            "values/variance/log_variance)"
        )
    return derived, semantics


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
    task: str | None,
    version: int | None,
    labels: Sequence[str] | None,
    output_labels: Mapping[str, Sequence[str]] | None,
    default_num_samples: int,
    max_num_samples: int,
    opset: int,
    verify_samples: int | None,
    verify_time_budget_s: float,
    false_failure_probability: float,
    metrics: Mapping[str, Any] | None,
) -> None:
    validate_name(name)
    if task is not None and task not in _TASKS:
        raise ExportArgumentError(f"task must be one of {_TASKS} or None, got {task!r}")
    if version is not None and version < 1:
        raise ExportArgumentError(f"version must be a positive integer or None, got {version}")
    if labels is not None and task == "regression":
        raise ExportArgumentError("labels are for classification outputs only")
    if labels is not None and output_labels:
        raise ExportArgumentError(
            "give labels (a model with one class output) or output_labels, not both"
        )
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
    if verify_samples is not None and verify_samples < 100:
        raise ExportArgumentError(f"verify_samples must be >= 100 or None, got {verify_samples}")
    if not verify_time_budget_s > 0:
        raise ExportArgumentError(f"verify_time_budget_s must be > 0, got {verify_time_budget_s}")
    if not 0.0 < false_failure_probability < 1.0:
        raise ExportArgumentError(
            f"false_failure_probability must be in (0, 1), got {false_failure_probability}"
        )
    try:
        json.dumps(dict(metrics or {}), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ExportArgumentError(f"metrics must be JSON-serialisable: {error}") from error


def _check_outputs(
    names: Sequence[str],
    semantics: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    labels: Sequence[str] | None,
    output_labels: Mapping[str, Sequence[str]],
) -> None:
    """Class outputs: classes along a static last axis, one label per class where given.

    ``shapes`` are per output, batch first; -1 marks a dynamic dimension (graph shapes).
    """
    class_outputs = [
        (name, shape)
        for name, kind, shape in zip(names, semantics, shapes, strict=True)
        if kind in _CLASSIFICATION_SEMANTICS
    ]
    for name, shape in class_outputs:
        if len(shape) < 2 or shape[-1] < 1:
            raise ExportArgumentError(
                f"class output {name!r} needs its classes along a static last axis, shape "
                f"[-1, ..., C], got {list(shape)}"
            )
    if labels is not None:
        if len(class_outputs) != 1:
            raise ExportArgumentError(
                f"labels need exactly one class output, got {len(class_outputs)}: use "
                "output_labels to label several"
            )
        classes = class_outputs[0][1][-1]
        if len(labels) != classes:
            raise ExportArgumentError(f"{classes} classes but {len(labels)} labels: {list(labels)}")
    class_shapes = dict(class_outputs)
    for name, names_of_classes in output_labels.items():
        if name not in class_shapes:
            raise ExportArgumentError(
                f"output_labels names {name!r}, which is not a class output "
                f"({sorted(class_shapes)})"
            )
        classes = class_shapes[name][-1]
        if len(names_of_classes) != classes:
            raise ExportArgumentError(
                f"{name!r} has {classes} classes but {len(names_of_classes)} labels: "
                f"{list(names_of_classes)}"
            )


def _check_variance_shapes(outputs: Sequence[TensorSpec], variance_of: Mapping[str, str]) -> None:
    shapes = {spec.name: spec.shape for spec in outputs}
    for name, target in variance_of.items():
        if shapes[name] != shapes[target]:
            raise ExportArgumentError(
                f"variance output {name!r} has shape {list(shapes[name])}, its values output "
                f"{target!r} {list(shapes[target])}: they must match"
            )


def _resolve_dynamic_axes(
    dynamic_axes: Mapping[str, Mapping[int, str]] | None,
    axis_max: Mapping[str, int] | None,
    input_names: Sequence[str],
    inputs: Sequence[torch.Tensor],
) -> list[dict[int, str]]:
    """Per input, {axis: name} of its declared dynamic non-batch axes (validated)."""
    dynamic_axes = dynamic_axes or {}
    axis_max = dict(axis_max or {})
    unknown = sorted(set(dynamic_axes) - set(input_names))
    if unknown:
        raise ExportArgumentError(
            f"dynamic_axes names unknown inputs {unknown} (inputs: {list(input_names)})"
        )
    resolved: list[dict[int, str]] = []
    sizes: dict[str, int] = {}
    for name, tensor in zip(input_names, inputs, strict=True):
        axes: dict[int, str] = {}
        for axis, axis_name in dynamic_axes.get(name, {}).items():
            if not isinstance(axis, int) or not 1 <= axis < tensor.dim():
                raise ExportArgumentError(
                    f"dynamic axis {axis!r} of {name!r} must be within 1..{tensor.dim() - 1} "
                    "(axis 0 is the batch, always dynamic)"
                )
            if not isinstance(axis_name, str) or not _AXIS_NAME.fullmatch(axis_name):
                raise ExportArgumentError(
                    f"axis names must be identifiers ([A-Za-z_][A-Za-z0-9_]*), got {axis_name!r}"
                )
            if axis_name == BATCH_DIM:
                raise ExportArgumentError(f"axis name {BATCH_DIM!r} is the batch's")
            if axis_name not in axis_max:
                raise ExportArgumentError(f"axis_max has no size for dynamic axis {axis_name!r}")
            size = int(tensor.shape[axis])
            if size < 2:
                raise ExportArgumentError(
                    f"{name!r} has size {size} at dynamic axis {axis}: the example needs >= 2 "
                    "there (torch.export specialises sizes 0 and 1)"
                )
            if sizes.setdefault(axis_name, size) != size:
                raise ExportArgumentError(
                    f"axes named {axis_name!r} have different sizes in the example "
                    f"({sizes[axis_name]} and {size}): axes sharing a name share one size"
                )
            if not isinstance(axis_max[axis_name], int) or axis_max[axis_name] < size:
                raise ExportArgumentError(
                    f"axis_max[{axis_name!r}] must be an integer >= the example's size {size}, "
                    f"got {axis_max[axis_name]!r}"
                )
            axes[axis] = axis_name
        resolved.append(axes)
    unused = sorted(set(axis_max) - set(sizes))
    if unused:
        raise ExportArgumentError(f"axis_max names axes no input declares dynamic: {unused}")
    return resolved


def _with_max_shapes(
    specs: Sequence[TensorSpec],
    graph: onnx.ModelProto,
    axes: Sequence[Mapping[int, str]],
    axis_max: Mapping[str, int],
) -> tuple[list[TensorSpec], dict[str, int]]:
    """Inputs with ``max_shape`` set where they have dynamic axes, and {dim symbol: max}."""
    initializers = {init.name for init in graph.graph.initializer}
    values = [v for v in graph.graph.input if v.name not in initializers]
    result = []
    max_dims: dict[str, int] = {}
    for spec, value, declared in zip(specs, values, axes, strict=True):
        if not declared:
            result.append(spec)
            continue
        dims = value.type.tensor_type.shape.dim
        for axis, axis_name in declared.items():
            max_dims[dims[axis].dim_param] = axis_max[axis_name]
        max_shape = tuple(
            -1 if i == 0 else axis_max[declared[i]] if i in declared else d
            for i, d in enumerate(spec.shape)
        )
        result.append(TensorSpec(spec.name, spec.dtype, spec.shape, max_shape))
    return result, max_dims


def _rows_per_run(activation_bytes: int) -> int:
    return max(1, min(65536, _VERIFY_BYTES_PER_RUN // activation_bytes))


def export_model(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    repository: Path,
    name: str,
    task: Task | None = None,
    version: int | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    output_semantics: Sequence[Semantics] | None = None,
    variance_of: Mapping[str, str] | None = None,
    labels: Sequence[str] | None = None,
    output_labels: Mapping[str, Sequence[str]] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    axis_max: Mapping[str, int] | None = None,
    default_num_samples: int = 100,
    max_num_samples: int = 10000,
    opset: int = 18,
    verify_samples: int | None = None,
    verify_time_budget_s: float = DEFAULT_TIME_BUDGET_S,
    verify_device: str | None = None,
    false_failure_probability: float = 1e-4,
    description: str = "",
    metrics: Mapping[str, Any] | None = None,
) -> ExportReport:
    """Export ``model`` to ONNX with dropout kept active, verify it, publish it.

    ``model`` is never modified: a deep copy is put in MC dropout mode (``eval()``, then
    ``train()`` on the dropout modules only) and exported.

    Args:
        model: the trained model; must contain at least one dropout module with p > 0 that
            runs in its forward.
        example_inputs: one tensor, or a tuple with one tensor per model input, each
            (B, ...). Its shapes (except B and the declared dynamic axes) become the graph's;
            its first rows (up to 8) are used for verification, so pass realistic data.
        repository: the model repository root, e.g. ``Path("models")``.
        name: the model name (folder name, ``[A-Za-z0-9_.-]+``).
        task: "classification" (every output is a class output), "regression" (values /
            variance outputs), "mixed" (both), or None to derive it from
            ``output_semantics``. Written to config.json (derived when None).
        version: the version to publish; None takes one more than the newest existing.
        input_names: graph input names; default "input" (or "input_0", "input_1", ...).
        output_names: graph output names; default "output" (or "output_0", ...).
        output_semantics: per output "logits" or "probabilities" (class outputs, classes
            along the last axis, which must be static), "values", or "variance" /
            "log_variance" with ``variance_of``. Default: logits for classification, values
            for regression; required for "mixed" or task None.
        variance_of: heteroscedastic regression: {variance output name: the values output it
            describes}, for the outputs whose semantics is "variance" or "log_variance".
        labels: a model with exactly one class output: one name per class (written at the
            top of config.json).
        output_labels: {class output name: one name per class} (written in the output's
            entry); for several class outputs.
        dynamic_axes: {input name: {axis >= 1: axis name}}: non-batch axes that vary between
            requests, e.g. ``{"input_ids": {1: "sequence"}, "attention_mask": {1:
            "sequence"}}``. Axes sharing a name share one size (one torch.export Dim). The
            batch axis 0 is always dynamic.
        axis_max: {axis name: the largest size} for every name in ``dynamic_axes``.
        default_num_samples: T when a request does not set it.
        max_num_samples: the largest T a request may ask for.
        opset: default-domain ONNX opset, 18..21.
        verify_samples: n, the MC samples drawn from each of ONNX Runtime and PyTorch; None:
            up to 4000, cut (rows first) to fit ``verify_time_budget_s`` for large models.
        verify_time_budget_s: the verification sampling time aimed at when n is automatic.
        verify_device: where the PyTorch reference runs; None: CUDA when available.
        false_failure_probability: probability that verification rejects a correct export.
        description: free text for config.json.
        metrics: free-form scores for metadata.json (e.g. test accuracy).

    Returns:
        The report of what was published.

    Raises:
        ExportArgumentError: an invalid argument.
        NoDropoutError: the model has no dropout module.
        ZeroDropoutError: every dropout module has p == 0.
        DropoutNotRunError: no dropout module with p > 0 runs in the MC-mode forward.
        DropoutNotKeptError: the exported graph lost some dropout that runs.
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
        output_labels=output_labels,
        default_num_samples=default_num_samples,
        max_num_samples=max_num_samples,
        opset=opset,
        verify_samples=verify_samples,
        verify_time_budget_s=verify_time_budget_s,
        false_failure_probability=false_failure_probability,
        metrics=metrics,
    )
    if version is not None and (repository / name / str(version)).exists():
        raise VersionExistsError(f"{repository / name / str(version)} already exists")
    inputs = _as_tuple(example_inputs)
    active = active_dropout(model)
    dropout = find_dropout_modules(model)
    mc_model = mc_dropout_copy(model)
    probe = probe_forward(mc_model, inputs)
    running = [m for m in active if m.module in probe.ran]
    not_running = [m for m in active if m.module not in probe.ran]
    input_names = _check_names(
        "input", input_names or _default_names("input", len(inputs)), len(inputs)
    )
    output_names = _check_names(
        "output",
        output_names or _default_names("output", len(probe.outputs)),
        len(probe.outputs),
    )
    task_written, semantics = _resolve_semantics(task, output_semantics, len(probe.outputs))
    _check_variance_of(output_names, semantics, variance_of or {})
    _check_outputs(
        output_names,
        semantics,
        [tuple(o.shape) for o in probe.outputs],
        labels,
        output_labels or {},
    )
    input_axes = _resolve_dynamic_axes(dynamic_axes, axis_max, input_names, inputs)
    declared = {n: tuple(axes) for n, axes in zip(input_names, input_axes, strict=True) if axes}

    log.info(
        "exporting %s (%d dropout modules run, %d do not) at opset %d",
        name,
        len(running),
        len(not_running),
        opset,
    )
    onnx_bytes = export_onnx_bytes(
        mc_model,
        inputs,
        input_names=input_names,
        output_names=output_names,
        opset=opset,
        dropout=running,
        dynamic_axes=input_axes,
        axis_max=axis_max or {},
    )
    # Check the bytes that will be written, not the exporter's in-memory object.
    graph = onnx.load_from_string(onnx_bytes)
    if not running and not find_stochastic_nodes(graph):
        # Checked on the graph, not before the export: code may sample with a module's
        # rate and training flag without calling it (F.dropout(x, m.p, m.training)).
        raise DropoutNotRunError(
            f"none of the {len(active)} dropout modules with p > 0 of {type(model).__name__} "
            f"runs in the MC-mode forward ({', '.join(m.module for m in active)}) and the "
            "graph has no stochastic node: MC dropout would return identical samples"
        )
    stochastic = require_dropout_kept(graph, running, not_running)
    graph_checks = check_graph(graph, dynamic_axes=declared)
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
    _check_outputs(
        output_names, semantics, [s.shape for s in graph_outputs], labels, output_labels or {}
    )
    _check_variance_shapes(graph_outputs, variance_of or {})
    graph_inputs, max_dims = _with_max_shapes(graph_inputs, graph, input_axes, axis_max or {})
    activation_bytes = activation_bytes_per_row(graph, max_dims)

    config = config_document(
        name=name,
        task=task_written,
        description=description,
        inputs=graph_inputs,
        outputs=graph_outputs,
        semantics=semantics,
        variance_of=variance_of or {},
        labels=labels,
        output_labels=output_labels,
        default_num_samples=default_num_samples,
        max_num_samples=max_num_samples,
        activation_bytes=activation_bytes,
    )

    log.info("verifying %s against PyTorch", name)
    verification = verify_model(
        onnx_bytes,
        mc_model,
        inputs,
        num_samples=verify_samples,
        false_failure_probability=false_failure_probability,
        max_rows_per_run=_rows_per_run(activation_bytes),
        time_budget_s=verify_time_budget_s,
        device=verify_device,
        output_names=output_names,
        config=parse_config(config, name),
    )
    if not verification.passed:
        raise VerificationError(
            f"verification of {name} failed ({', '.join(verification.failed)}); nothing was "
            "published:\n" + verification.summary(),
            verification,
        )

    metadata: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "opset": next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
        "weights_sha256": weights_sha256(model),
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "dropout": [d.to_dict() for d in dropout],
        "dropout_not_run": [d.to_dict() for d in not_running],
        "mha_fastpath_enabled": False,
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
        dropout_not_run=tuple(not_running),
        graph_checks=graph_checks,
        verification=verification,
        config=config,
        metadata=metadata,
        elapsed_s=time.perf_counter() - started,
    )
