"""The server's Open Inference Protocol extension, for users of an OIP client (tritonclient).

The server also speaks the Open Inference Protocol (KServe v2, Triton's ``inference`` gRPC
API). Its Monte Carlo options travel as request parameters, and each statistic comes back as
an output named ``<model output>_<statistic>``. This module holds those names and two helpers:
:func:`mc_parameters` builds the ``parameters`` of a request, :func:`decode_infer_result`
(or :func:`prediction_from_outputs`) turns the answer into the same
:class:`~mcdropout_client.Prediction` that :meth:`mcdropout_client.Client.predict` returns::

    import tritonclient.grpc as triton
    from mcdropout_client import oip

    client = triton.InferenceServerClient("127.0.0.1:8001")
    x = triton.InferInput("x", [4, 6], "FP32")
    x.set_data_from_numpy(rows)
    result = client.infer("tiny_cls", [x], parameters=oip.mc_parameters(num_samples=100))
    prediction = oip.decode_infer_result(result)
    prediction.mutual_information

How far this goes, and why: it does not generate or import the ``inference.*`` messages. The
reference client of that protocol is tritonclient, which registers its own copy of them in
protobuf's default descriptor pool under another file name; a second copy here would make
``import mcdropout_client`` fail in any process that also imports tritonclient (duplicate
symbols). The native ``mcdropout.v1`` API that :class:`~mcdropout_client.Client` speaks reaches
every feature with typed messages; this module serves those who already use an OIP client
(for the same server, or behind a KServe / Triton-compatible gateway).

Output names (see also the server's ``service/protocol/oip_codec.py``):

==========================================  =============================================
``<out>_mean``, ``_variance``, ``_std``     every output (FP64, the output's shape)
``<out>_aleatoric_variance``,               heteroscedastic regression outputs
``<out>_total_variance``
``<out>_predicted_class`` (INT64),          classifiers, shape [B]
``_predicted_label`` (BYTES), ``_entropy``,
``_expected_entropy``,
``_mutual_information``, ``_variation_ratio``
``<out>_samples``                           with ``mc_return_samples``: (B, T, ...)
``<out>_interval_<method>_<level>_<bound>`` with ``mc_interval_levels``: method gaussian or
                                            empirical, level as ``f"{level:g}"``, bound
                                            lower or upper
``mc_samples_per_row`` (INT64, [B])         with ``mc_target_standard_error``
==========================================  =============================================

The response parameter ``mc_samples`` carries T.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from mcdropout_client._convert import PredictOptions
from mcdropout_client.types import Interval, OutputPrediction, Prediction, Semantics

__all__ = [
    "CLASSIFICATION_STATISTICS",
    "INTERVAL_METHODS",
    "MC_INTERVAL_LEVELS",
    "MC_RETURN_SAMPLES",
    "MC_SAMPLES",
    "MC_SEED",
    "MC_TARGET_STANDARD_ERROR",
    "SAMPLES_PER_ROW",
    "STATISTICS",
    "decode_infer_result",
    "interval_output_name",
    "mc_parameters",
    "prediction_from_outputs",
    "statistic_output_name",
]

#: Request parameter: T (int64; 0 or absent: the model's default).
MC_SAMPLES = "mc_samples"
#: Request parameter: also answer every sample (bool).
MC_RETURN_SAMPLES = "mc_return_samples"
#: Request parameter: interval levels, comma-separated in a string ("0.9,0.95").
MC_INTERVAL_LEVELS = "mc_interval_levels"
#: Request parameter: adaptive sampling's target standard error (double).
MC_TARGET_STANDARD_ERROR = "mc_target_standard_error"
#: Request parameter: reproducible sampling (int64 or uint64).
MC_SEED = "mc_seed"
#: Output: the T of each row under adaptive sampling.
SAMPLES_PER_ROW = "mc_samples_per_row"

#: Statistic suffixes of every output (the last two for heteroscedastic outputs only).
STATISTICS = ("mean", "variance", "std", "aleatoric_variance", "total_variance")
#: Statistic suffixes of classifier outputs, shape [B].
CLASSIFICATION_STATISTICS = (
    "predicted_class",
    "predicted_label",
    "entropy",
    "expected_entropy",
    "mutual_information",
    "variation_ratio",
)
INTERVAL_METHODS = ("gaussian", "empirical")

#: OIP statistic suffix -> the attribute of :class:`~mcdropout_client.OutputPrediction`.
_ATTRIBUTE_OF = {
    "aleatoric_variance": "aleatoric_variance",
    "total_variance": "total_variance",
    "predicted_class": "predicted_class",
    "entropy": "predictive_entropy",
    "expected_entropy": "expected_entropy",
    "mutual_information": "mutual_information",
    "variation_ratio": "variation_ratio",
}
_INTERVAL = re.compile(
    r"(?P<output>.+)_interval_(?P<method>gaussian|empirical)_(?P<level>[^_]+)_(?P<bound>lower|upper)"
)

ParameterValue = bool | int | float | str


def mc_parameters(
    *,
    num_samples: int | None = None,
    return_samples: bool = False,
    interval_levels: Iterable[float] = (),
    target_standard_error: float | None = None,
    seed: int | None = None,
) -> dict[str, ParameterValue]:
    """The request parameters of a ModelInfer call with these options, in the form
    tritonclient's ``infer(..., parameters=...)`` takes (bool, int, float or str values).

    The options mean what they mean in :meth:`mcdropout_client.Client.predict`; None and the
    defaults leave a parameter out.

    Raises:
        ValueError: an option that Client.predict refuses too, or a seed of 2^63 or more
            (tritonclient sends integers as int64 parameters; the native API takes any
            uint64 seed).
        TypeError: an option of the wrong type.
    """
    options = PredictOptions.of(
        num_samples, return_samples, interval_levels, target_standard_error, seed
    )
    parameters: dict[str, ParameterValue] = {}
    if options.num_samples:
        parameters[MC_SAMPLES] = options.num_samples
    if options.return_samples:
        parameters[MC_RETURN_SAMPLES] = True
    if options.interval_levels:
        parameters[MC_INTERVAL_LEVELS] = ",".join(repr(x) for x in options.interval_levels)
    if options.target_standard_error is not None:
        parameters[MC_TARGET_STANDARD_ERROR] = options.target_standard_error
    if options.seed is not None:
        if options.seed >= 2**63:
            raise ValueError(
                f"seed {options.seed} does not fit the int64 parameter that tritonclient sends "
                "(at most 2^63-1); use Client.predict for larger seeds"
            )
        parameters[MC_SEED] = options.seed
    return parameters


def statistic_output_name(output: str, statistic: str) -> str:
    """``<output>_<statistic>``: the OIP output that carries one statistic of a model output.

    Raises:
        ValueError: an unknown statistic (see :data:`STATISTICS`,
            :data:`CLASSIFICATION_STATISTICS`, and ``"samples"``).
    """
    if statistic not in (*STATISTICS, *CLASSIFICATION_STATISTICS, "samples"):
        raise ValueError(f"unknown statistic {statistic!r}")
    return f"{output}_{statistic}"


def interval_output_name(
    output: str,
    level: float,
    method: Literal["gaussian", "empirical"],
    bound: Literal["lower", "upper"],
) -> str:
    """The OIP output that carries one bound of one interval of a model output."""
    if method not in INTERVAL_METHODS or bound not in ("lower", "upper"):
        raise ValueError(f"unknown interval method {method!r} or bound {bound!r}")
    return f"{output}_interval_{method}_{level:g}_{bound}"


def _labels(array: NDArray[Any]) -> tuple[str, ...]:
    return tuple(
        item.decode() if isinstance(item, bytes) else str(item) for item in array.ravel().tolist()
    )


def _read_only(array: NDArray[Any]) -> NDArray[Any]:
    array = np.array(array, copy=True)
    array.flags.writeable = False
    return array


def prediction_from_outputs(
    arrays: Mapping[str, NDArray[Any]],
    *,
    model: str = "",
    version: str = "",
    num_samples: int = 0,
    semantics: Mapping[str, Semantics] | None = None,
    seed: int | None = None,
) -> Prediction:
    """The :class:`~mcdropout_client.Prediction` of a ModelInfer answer's outputs.

    Every model output needs its ``_mean``, ``_variance`` and ``_std`` (an answer to a request
    that names no outputs has them all); the other statistics are taken when present.

    Args:
        arrays: output name -> array, as decoded by the OIP client (BYTES as bytes objects).
        model: the model name of the answer.
        version: the version of the answer.
        num_samples: T (the response parameter ``mc_samples``).
        semantics: model output -> semantics, when known (the OIP metadata does not carry
            them): by default ``"values"`` for regression outputs and ``"unspecified"`` for
            classifier outputs (whose means are probabilities either way).
        seed: the seed of the request, to record in the result.

    Raises:
        ValueError: an output without its mean, variance or std, or an output name that is
            none of the server's.
    """
    names = set(arrays)
    used: set[str] = set()
    bases = [name.removesuffix("_mean") for name in arrays if name.endswith("_mean")]
    outputs: dict[str, OutputPrediction] = {}
    for base in bases:
        core = {stat: f"{base}_{stat}" for stat in ("mean", "variance", "std")}
        missing = [name for name in core.values() if name not in names]
        if missing:
            raise ValueError(f"output {base!r}: the answer lacks {missing}")
        used.update(core.values())
        if base in names:  # the output under its own name: the mean again, in the graph's dtype
            used.add(base)
        fields: dict[str, Any] = {k: _read_only(arrays[v]) for k, v in core.items()}
        for suffix, attribute in _ATTRIBUTE_OF.items():
            name = f"{base}_{suffix}"
            if name in names:
                fields[attribute] = _read_only(arrays[name])
                used.add(name)
        if f"{base}_predicted_label" in names:
            fields["predicted_label"] = _labels(arrays[f"{base}_predicted_label"])
            used.add(f"{base}_predicted_label")
        if f"{base}_samples" in names:
            fields["samples"] = _read_only(arrays[f"{base}_samples"])
            used.add(f"{base}_samples")
        intervals: dict[tuple[float, str], dict[str, NDArray[Any]]] = {}
        for name in names:
            match = _INTERVAL.fullmatch(name)
            if match and match["output"] == base:
                key = (float(match["level"]), match["method"])
                intervals.setdefault(key, {})[match["bound"]] = _read_only(arrays[name])
                used.add(name)
        # The server's order: by level as requested (here ascending), gaussian then empirical.
        ordered = sorted(intervals, key=lambda k: (k[0], INTERVAL_METHODS.index(k[1])))
        if any(set(intervals[k]) != {"lower", "upper"} for k in ordered):
            raise ValueError(f"output {base!r}: an interval lacks its lower or upper bound")
        fields["intervals"] = tuple(
            Interval(
                level,
                method,
                intervals[(level, method)]["lower"],
                intervals[(level, method)]["upper"],
            )
            for level, method in ordered
        )
        classifier = "predicted_class" in fields
        default: Semantics = "unspecified" if classifier else "values"
        outputs[base] = OutputPrediction(
            name=base, semantics=(semantics or {}).get(base, default), **fields
        )
    per_row = None
    if SAMPLES_PER_ROW in names:
        per_row = _read_only(np.asarray(arrays[SAMPLES_PER_ROW], dtype=np.int64))
        used.add(SAMPLES_PER_ROW)
    unknown = sorted(names - used)
    if unknown:
        raise ValueError(f"outputs {unknown} are none of the server's statistic outputs")
    return Prediction(
        model=model,
        version=version,
        num_samples=num_samples,
        outputs=outputs,
        num_samples_per_row=per_row,
        seed=seed,
    )


def decode_infer_result(
    result: Any,
    *,
    semantics: Mapping[str, Semantics] | None = None,
    seed: int | None = None,
) -> Prediction:
    """The :class:`~mcdropout_client.Prediction` of a tritonclient ``InferResult``.

    Args:
        result: what ``tritonclient.grpc`` or ``tritonclient.http``'s
            ``InferenceServerClient.infer`` returned (anything with ``get_response()``, giving
            a ModelInferResponse or the REST answer's JSON dict, and ``as_numpy(name)``).
        semantics: model output -> semantics, when known (see
            :func:`prediction_from_outputs`).
        seed: the seed of the request, to record in the result.

    Raises:
        ValueError: see :func:`prediction_from_outputs`.
    """
    response = result.get_response()
    if isinstance(response, Mapping):  # tritonclient.http: the JSON answer
        names = [str(output["name"]) for output in response.get("outputs", [])]
        model, version = str(response.get("model_name", "")), str(response.get("model_version", ""))
        num_samples = int(response.get("parameters", {}).get(MC_SAMPLES, 0))
    else:
        names = [output.name for output in response.outputs]
        model, version = response.model_name, response.model_version
        num_samples = 0
        if MC_SAMPLES in response.parameters:
            num_samples = int(response.parameters[MC_SAMPLES].int64_param)
    arrays = {name: result.as_numpy(name) for name in names}
    return prediction_from_outputs(
        arrays,
        model=model,
        version=version,
        num_samples=num_samples,
        semantics=semantics,
        seed=seed,
    )
