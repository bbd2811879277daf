"""Half precision: a verified fp32 export converted to a float16 graph with float32 inputs and
outputs.

On a GPU, half precision runs dropout-everywhere models several times faster than float32
(PyTorch on an H200: ViT-B/16 on the tile 132 ms fp32, 27.7 ms bf16). The graph is converted
once at export time (``export_model(precision="fp16")``) with onnxconverter-common's float16
converter, and its inputs and outputs stay float32, so clients, config.json and the server's
statistics (accumulated in float32 and float64 from the float32 outputs) do not change.

What must not change is the dropout: the stochastic nodes and the comparisons that turn
uniforms into masks (``rand < keep``) stay in float32 (the converter's block list), so the
keep probability is the exported rate, not its float16 rounding (0.1 is 0.0999755859375 in
float16). The rest of the graph computes in float16; the verification against PyTorch fp32
states its tolerance (:data:`FP16_MEAN_MARGIN`, :data:`FP16_VARIANCE_MARGIN`).

bfloat16 is not offered: onnxconverter-common has no bfloat16 converter and ONNX Runtime's CPU
kernels have no bfloat16 (so nothing here could verify it).
"""

from __future__ import annotations

from typing import Literal

import onnx

__all__ = [
    "FP16_MEAN_MARGIN",
    "FP16_VARIANCE_MARGIN",
    "KEPT_IN_FLOAT32",
    "PRECISIONS",
    "Precision",
    "to_float16",
]

Precision = Literal["fp32", "fp16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16")

#: Ops left in float32 (the converter casts around them): the random nodes and the
#: comparisons that make their masks.
KEPT_IN_FLOAT32 = (
    "Dropout",
    "RandomUniformLike",
    "RandomNormalLike",
    "RandomUniform",
    "RandomNormal",
    "Less",
    "LessOrEqual",
    "Greater",
    "GreaterOrEqual",
)

#: Verification tolerance of a float16 graph against PyTorch float32, beyond sampling error:
#: means within 2% of (|mean| + std), variances within a ratio of 1.15. Measured on the zoo's
#: BERT, ViT, LSTM, heteroscedastic and two-head models at T = 4000: the float16 graph's means
#: differed from the float32 graph's by at most 2.5 standard errors, the variance ratios
#: stayed within 0.925..1.065, both within sampling error.
FP16_MEAN_MARGIN = 0.02
FP16_VARIANCE_MARGIN = 0.15


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model computing in float16, with float32 inputs and outputs and its random nodes
    and their mask comparisons in float32.

    Args:
        model: a float32 model (not modified).

    Returns:
        The converted model.
    """
    from onnxconverter_common import float16  # noqa: PLC0415 (only half-precision exports)

    converted: onnx.ModelProto = float16.convert_float_to_float16(
        model, keep_io_types=True, op_block_list=list(KEPT_IN_FLOAT32)
    )
    return converted
