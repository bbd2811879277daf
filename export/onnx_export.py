"""PyTorch (in MC dropout mode) -> ONNX bytes, with the dropout still sampling.

The recipe, measured in docs (see shared notes "onnx-mc-dropout"): the model is in ``eval()``
mode except for its dropout modules, and it goes through the dynamo exporter at opset 18..21
with a dynamic batch dimension. That keeps ``Dropout`` nodes whose ``training_mode`` input is a
constant true, exports Dropout1d/2d/3d and (Feature)AlphaDropout as RandomUniformLike masks,
and folds BatchNorm (running statistics) into the neighbouring Conv/Gemm. The legacy exporter
with ``TrainingMode.TRAINING`` is never used: it puts BatchNorm in training mode too.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from export.checks import NodeRef, find_stochastic_nodes
from export.errors import DropoutNotKeptError, OnnxExportError
from export.mc_mode import DropoutModule, fastpath_disabled

__all__ = ["BATCH_DIM", "dynamic_shapes_spec", "export_onnx_bytes", "require_dropout_kept"]

log = logging.getLogger(__name__)

#: The symbolic name of the batch dimension in exported graphs.
BATCH_DIM = "batch"

# torch.export specialises dimensions of size 0 and 1 to constants, so a dynamic batch
# dimension needs an example with at least two rows.
_MIN_EXPORT_ROWS = 2


# Loggers the exporter chats on (torchvision op registration warnings, one INFO line per
# optimisation pass) with the level that keeps only what matters.
_NOISY_LOGGERS = {
    "torch.onnx": logging.ERROR,
    "onnxscript": logging.WARNING,
    "onnx_ir": logging.WARNING,
}


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter for the duration of one export only."""
    loggers = {logging.getLogger(name): level for name, level in _NOISY_LOGGERS.items()}
    previous = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in previous.items():
            logger.setLevel(level)


def _with_min_rows(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    rows = inputs[0].shape[0]
    if rows >= _MIN_EXPORT_ROWS:
        return inputs
    repeats = -(-_MIN_EXPORT_ROWS // rows)
    return tuple(t.repeat(repeats, *([1] * (t.dim() - 1))) for t in inputs)


def dynamic_shapes_spec(
    input_axes: Sequence[Mapping[int, str]], axis_max: Mapping[str, int]
) -> tuple[dict[int, Any], ...]:
    """torch.export ``dynamic_shapes``: the batch axis of every input, plus declared axes.

    Axes that share a name share one ``torch.export.Dim`` (so the graph gets one symbol and
    torch.export checks the model treats them as equal), ranging over 1..``axis_max[name]``.

    Args:
        input_axes: per input, {axis >= 1: axis name}; empty for a batch-only input.
        axis_max: the largest size of each named axis.

    Returns:
        One {axis: Dim} per input.
    """
    batch = torch.export.Dim(BATCH_DIM)
    dims = {name: torch.export.Dim(name, min=1, max=axis_max[name]) for name in axis_max}
    return tuple(
        {0: batch, **{axis: dims[name] for axis, name in sorted(axes.items())}}
        for axes in input_axes
    )


def export_onnx_bytes(
    mc_model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int,
    dropout: Sequence[DropoutModule],
    dynamic_axes: Sequence[Mapping[int, str]] | None = None,
    axis_max: Mapping[str, int] | None = None,
) -> bytes:
    """Export a model already in MC dropout mode to serialized ONNX (weights inline).

    PyTorch's fused attention fast paths are off while tracing (``fastpath_disabled``), so
    the graph holds the dropout of the slow path the PyTorch reference also runs.

    Args:
        mc_model: the model from ``mc_dropout_copy`` (eval, dropout modules in train mode).
        example_inputs: one tensor per graph input, each (B, ...); B may be 1.
        input_names: graph input names, one per tensor.
        output_names: graph output names, one per model output.
        opset: the default-domain opset.
        dropout: the model's active dropout modules, named in errors.
        dynamic_axes: per input, {axis >= 1: axis name} of its dynamic non-batch axes;
            None when only the batch axis is dynamic.
        axis_max: the largest size of each axis name in ``dynamic_axes``.

    Returns:
        The model.onnx bytes: one self-contained protobuf, no external data file.

    Raises:
        DropoutNotKeptError: the exporter failed on a dropout op.
        OnnxExportError: the exporter failed for another reason, or wrote external data.
    """
    inputs = _with_min_rows(example_inputs)
    dynamic_shapes = dynamic_shapes_spec(
        dynamic_axes if dynamic_axes is not None else [{} for _ in inputs], axis_max or {}
    )
    try:
        with _quiet_exporter(), fastpath_disabled():
            program = torch.onnx.export(
                mc_model,
                inputs,
                dynamo=True,
                opset_version=opset,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
    except Exception as error:
        message = str(error)
        if "dropout" in message.lower():
            types = sorted({m.type for m in dropout})
            raise DropoutNotKeptError(
                f"torch.onnx.export cannot keep {', '.join(types)} in training mode "
                f"(modules {', '.join(m.module for m in dropout)}): {message.splitlines()[0]}"
            ) from error
        raise OnnxExportError(
            f"torch.onnx.export failed: {type(error).__name__}: {message.splitlines()[0]}"
        ) from error
    if program is None:  # only the legacy exporter returns None
        raise OnnxExportError("torch.onnx.export returned no ONNXProgram")
    with tempfile.TemporaryDirectory(prefix="mcd-export-") as tmp:
        path = Path(tmp) / "model.onnx"
        program.save(path, external_data=False)
        extra = sorted(p.name for p in Path(tmp).iterdir() if p != path)
        if extra:
            raise OnnxExportError(f"the exporter wrote external data files {extra}")
        data = path.read_bytes()
    log.debug("exported %d bytes of ONNX at opset %d", len(data), opset)
    return data


def require_dropout_kept(
    model: onnx.ModelProto,
    running: Sequence[DropoutModule],
    not_running: Sequence[DropoutModule] = (),
) -> list[NodeRef]:
    """Fail unless the graph has at least one stochastic node per running dropout module.

    A dropout module the exporter dropped or froze leaves fewer stochastic nodes than
    modules. (A module called twice gives two nodes; that passes, as it should.) Modules that
    exist but do not run in the MC-mode forward (``probe_forward``) sample in neither PyTorch
    nor the graph, so they are not counted; they are named in the message.

    Args:
        model: the exported graph.
        running: the active (p > 0) dropout modules that run in the MC-mode forward.
        not_running: the active dropout modules that do not run.

    Returns:
        The stochastic nodes.

    Raises:
        DropoutNotKeptError: fewer stochastic nodes than running dropout modules, or none.
    """
    nodes = find_stochastic_nodes(model)
    if not nodes or len(nodes) < len(running):
        modules = ", ".join(f"{m.module} ({m.type}, p={m.p})" for m in running)
        found = ", ".join(n.describe() for n in nodes) or "none"
        skipped = (
            f" ({len(not_running)} more do not run in the MC-mode forward and are not counted: "
            f"{', '.join(m.module for m in not_running)})"
            if not_running
            else ""
        )
        raise DropoutNotKeptError(
            f"the exported graph has {len(nodes)} stochastic nodes for {len(running)} active "
            f"dropout modules that run [{modules}]{skipped}; stochastic nodes found: {found}. "
            "Some dropout was removed or frozen by the exporter"
        )
    return nodes
