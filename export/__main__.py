"""Command line: ``python -m export --model pkg.module:factory ...`` (see ``--help``).

Exit status: 0 published, 1 the export failed (no dropout, graph checks, verification, ...),
2 bad usage (arguments, a factory that cannot be imported or does not build a module).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.api import export_model
from export.errors import ExportArgumentError, ExportError, GraphCheckError
from export.publish import MODEL_FILE

__all__ = ["build_parser", "load_factory", "main"]

log = logging.getLogger("export")

_DESCRIPTION = """\
Export a PyTorch model trained with dropout to an ONNX model version with the dropout kept
active (MC dropout), check the graph, verify its samples against PyTorch, and publish it into
a model repository as <repository>/<name>/<version>/{model.onnx,config.json,metadata.json}.

Nothing is published unless every check passes."""

_EPILOG = """\
examples:
  python -m export --model mypkg.nets:make_regressor --state-dict weights.pt \\
      --input-shape 1,13 --input-names features --output-names medv \\
      --repository models --name housing --task regression

  python -m export --model mypkg.nets:make_cnn --example batch.npy \\
      --repository models --name digits --task classification --labels 0,1,2,3,4,5,6,7,8,9

  python -m export --model mypkg.nets:make_bert --example ids.npy --example mask.npy \\
      --input-names input_ids,attention_mask --output-names logits \\
      --dynamic-axis input_ids:1:sequence --dynamic-axis attention_mask:1:sequence \\
      --axis-max sequence=512 --repository models --name sentiment --task classification

  python -m export --model mypkg.nets:make_two_head --input-shape 4,8 \\
      --output-names kind,price --output-semantics logits,values \\
      --output-labels kind=cat,dog --repository models --name pets

exit status: 0 published, 1 export failed (reason printed), 2 bad usage"""


def _comma_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 1,13, got {text!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"dimensions must be >= 1, got {text!r}")
    return shape


def _dynamic_axis(text: str) -> tuple[str, int, str]:
    input_name, _, rest = text.partition(":")
    axis, _, axis_name = rest.partition(":")
    try:
        return input_name, int(axis), axis_name
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected INPUT:AXIS:NAME, e.g. input_ids:1:sequence, got {text!r}"
        ) from None


def _axis_max(text: str) -> tuple[str, int]:
    axis_name, _, size = text.partition("=")
    try:
        return axis_name, int(size)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected NAME=SIZE, e.g. sequence=512, got {text!r}"
        ) from None


def _output_labels(text: str) -> tuple[str, list[str]]:
    output, sep, labels = text.partition("=")
    if not sep or not output:
        raise argparse.ArgumentTypeError(f"expected OUTPUT=A,B,C, got {text!r}")
    return output, _comma_list(labels)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m export``."""
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        required=True,
        metavar="MODULE:FACTORY",
        help="import path of a callable returning the nn.Module, e.g. mypkg.nets:make_model "
        "(called without arguments)",
    )
    model.add_argument(
        "--state-dict", type=Path, metavar="FILE.pt", help="weights to load (torch.save'd)"
    )

    example = parser.add_argument_group(
        "example input (one of; repeat for models with several inputs)"
    )
    source = example.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input-shape",
        type=_shape,
        action="append",
        metavar="B,D1,...",
        help="shape of a random standard-normal example input, batch first, e.g. 1,13. "
        "Verification runs on it: prefer --example with real data",
    )
    source.add_argument(
        "--example", type=Path, action="append", metavar="FILE.npy", help="example input array"
    )
    example.add_argument(
        "--input-dtype",
        default="float32",
        choices=("float32", "float64"),
        help="dtype of --input-shape examples (default: float32)",
    )
    example.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of --input-shape examples (default: 0)",
    )

    target = parser.add_argument_group("target")
    target.add_argument(
        "--repository", type=Path, required=True, metavar="DIR", help="model repository root"
    )
    target.add_argument("--name", required=True, help="model name ([A-Za-z0-9_.-]+)")
    target.add_argument(
        "--task",
        choices=("classification", "regression", "mixed"),
        help="what the outputs are (default: derived from --output-semantics)",
    )
    target.add_argument(
        "--version", type=int, metavar="N", help="version to publish (default: newest existing + 1)"
    )

    contract = parser.add_argument_group("serving contract (config.json)")
    contract.add_argument("--input-names", type=_comma_list, metavar="A,B", help="graph inputs")
    contract.add_argument("--output-names", type=_comma_list, metavar="A,B", help="graph outputs")
    contract.add_argument(
        "--output-semantics",
        type=_comma_list,
        metavar="S,...",
        help="per output: logits, probabilities, values, variance or log_variance "
        "(default: logits for classification, values for regression)",
    )
    contract.add_argument(
        "--variance-of",
        type=_output_labels,
        action="append",
        metavar="VARIANCE=VALUES",
        help="a variance/log_variance output and the values output it describes",
    )
    contract.add_argument(
        "--labels",
        type=_comma_list,
        metavar="A,B,C",
        help="class names (a model with one class output)",
    )
    contract.add_argument(
        "--output-labels",
        type=_output_labels,
        action="append",
        metavar="OUTPUT=A,B,C",
        help="class names of one class output (repeat for several)",
    )
    contract.add_argument(
        "--dynamic-axis",
        type=_dynamic_axis,
        action="append",
        metavar="INPUT:AXIS:NAME",
        help="a non-batch input axis that varies between requests, e.g. input_ids:1:sequence "
        "(axes sharing a NAME share one size)",
    )
    contract.add_argument(
        "--axis-max",
        type=_axis_max,
        action="append",
        metavar="NAME=SIZE",
        help="the largest size of a dynamic axis, e.g. sequence=512",
    )
    contract.add_argument(
        "--default-samples",
        type=int,
        default=100,
        metavar="T",
        help="default T per request (default: 100)",
    )
    contract.add_argument(
        "--max-samples",
        type=int,
        default=10000,
        metavar="T",
        help="largest T per request (default: 10000)",
    )
    contract.add_argument(
        "--description", default="", metavar="TEXT", help="free text for config.json"
    )

    checks = parser.add_argument_group("export and verification")
    checks.add_argument(
        "--opset", type=int, default=18, metavar="N", help="ONNX opset, 18..21 (default: 18)"
    )
    checks.add_argument(
        "--verify-samples",
        type=int,
        metavar="N",
        help="MC samples drawn from each of ONNX Runtime and PyTorch (default: up to 4000, "
        "fewer, and fewer rows, for large models, to fit --verify-time-budget-s)",
    )
    checks.add_argument(
        "--verify-time-budget-s",
        type=float,
        default=60.0,
        metavar="S",
        help="sampling time verification aims at when --verify-samples is not set (default: 60)",
    )
    checks.add_argument(
        "--verify-device",
        metavar="DEVICE",
        help="where the PyTorch reference runs, e.g. cpu, cuda (default: cuda when available)",
    )
    checks.add_argument(
        "--false-failure-probability",
        type=float,
        default=1e-4,
        metavar="P",
        help="probability that verification rejects a correct export (default: 1e-4)",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log level on stderr (default: WARNING)",
    )
    return parser


def load_factory(spec: str) -> Callable[[], Any]:
    """Import ``package.module:attribute`` (the attribute may be dotted) and check it is callable.

    Raises:
        ExportArgumentError: malformed spec, import failure, missing or non-callable attribute.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ExportArgumentError(f"--model must look like package.module:factory, got {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ExportArgumentError(f"cannot import {module_name!r}: {error}") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ExportArgumentError(f"{module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ExportArgumentError(f"{spec} is not callable")
    factory: Callable[[], Any] = target
    return factory


def _build_model(spec: str, state_dict: Path | None) -> nn.Module:
    model = load_factory(spec)()
    if not isinstance(model, nn.Module):
        raise ExportArgumentError(f"{spec}() returned {type(model).__name__}, not an nn.Module")
    if state_dict is not None:
        try:
            weights = torch.load(state_dict, map_location="cpu", weights_only=True)
            model.load_state_dict(weights)
        except (OSError, RuntimeError, TypeError, ValueError) as error:
            raise ExportArgumentError(f"cannot load {state_dict}: {error}") from error
    return model


def _example_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    if args.example:
        arrays = []
        for path in args.example:
            try:
                arrays.append(np.load(path, allow_pickle=False))
            except (OSError, ValueError) as error:
                raise ExportArgumentError(f"cannot read {path}: {error}") from error
        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
    generator = torch.Generator().manual_seed(args.seed)
    dtype = getattr(torch, args.input_dtype)
    return tuple(torch.randn(shape, generator=generator, dtype=dtype) for shape in args.input_shape)


def _silence_dependencies() -> None:
    """Keep the exporter's and torch's warnings out of the report (logs stay on stderr)."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("torch", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _dynamic_axes(entries: Sequence[tuple[str, int, str]] | None) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for input_name, axis, axis_name in entries or ():
        axes.setdefault(input_name, {})[axis] = axis_name
    return axes


def _variance_of(entries: Sequence[tuple[str, list[str]]] | None) -> dict[str, str]:
    pairs = {}
    for variance, targets in entries or ():
        if len(targets) != 1:
            raise ExportArgumentError(f"--variance-of {variance}= names one values output")
        pairs[variance] = targets[0]
    return pairs


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: arguments without the program name; default ``sys.argv[1:]``.

    Returns:
        The exit status: 0 published, 1 export failed, 2 bad usage.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    _silence_dependencies()
    try:
        model = _build_model(args.model, args.state_dict)
        report = export_model(
            model,
            _example_inputs(args),
            repository=args.repository,
            name=args.name,
            task=args.task,
            version=args.version,
            input_names=args.input_names,
            output_names=args.output_names,
            output_semantics=args.output_semantics,
            variance_of=_variance_of(args.variance_of) or None,
            labels=args.labels,
            output_labels=dict(args.output_labels or ()) or None,
            dynamic_axes=_dynamic_axes(args.dynamic_axis) or None,
            axis_max=dict(args.axis_max or ()) or None,
            default_num_samples=args.default_samples,
            max_num_samples=args.max_samples,
            opset=args.opset,
            verify_samples=args.verify_samples,
            verify_time_budget_s=args.verify_time_budget_s,
            verify_device=args.verify_device,
            false_failure_probability=args.false_failure_probability,
            description=args.description,
        )
    except ExportArgumentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ExportError as error:
        print(f"export failed ({type(error).__name__}): {error}", file=sys.stderr)
        if isinstance(error, GraphCheckError):
            print(error.report.summary(), file=sys.stderr)
        return 1
    print(report.summary())
    print(f"wrote {report.path / MODEL_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
