"""The command line client: ``python -m mcdropout_client`` (or the ``mcdropout`` script).

::

    python -m mcdropout_client [--target HOST:PORT] [--timeout S] [--tls ...] [--token-file F]
        predict --model NAME [--version V] [--samples T] [--threshold X] [--json]
                [--interval LEVEL ...] [--target-se SE] [--seed N] [--return-samples] FILE|-
        models [--json]
        metadata --model NAME [--version V] [--json]
        health [SERVICE]

A bearer token comes from ``--token-file`` or the ``MCDROPOUT_TOKEN`` variable (never from
the command line, where other users of the machine could read it).

Exit codes: 0 done (``health``: SERVING), 1 the server refused or failed a call (or
``health`` is not SERVING), 2 bad usage or an input file that cannot be used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np
from numpy.typing import NDArray

from mcdropout_client._convert import concat_predictions
from mcdropout_client._core import DEFAULT_TARGET
from mcdropout_client._sync import Client
from mcdropout_client.errors import ClientError
from mcdropout_client.files import FORMATS, read_input, shape_rows
from mcdropout_client.types import IntervalMethod, ModelInfo, OutputPrediction, Prediction

__all__ = ["main"]

DEFAULT_BATCH_ROWS = 256
#: The environment variable that may hold a bearer token.
TOKEN_VARIABLE = "MCDROPOUT_TOKEN"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        with _client(args) as client:
            code: int = args.run(client, args, sys.stdout, sys.stderr)
            return code
    except ClientError as error:
        print(f"error: {error.code.name}: {error.details}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader of stdout went away (`| head`): stop quietly, as cat does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mcdropout_client",
        description="Call an MC dropout server: predictions with their uncertainty.",
        epilog="Exit codes: 0 ok, 1 server or RPC error (or health not SERVING), 2 usage or "
        "input error.",
    )
    parser.add_argument("--target", default=DEFAULT_TARGET, help="server host:port (%(default)s)")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="deadline of each RPC in seconds (%(default)s)"
    )
    parser.add_argument(
        "--retries", type=int, default=3, help="retries of an UNAVAILABLE call (%(default)s)"
    )
    parser.add_argument("--tls", action="store_true", help="TLS, with the system's root CAs")
    parser.add_argument("--ca-cert", type=Path, help="PEM root certificates (implies --tls)")
    parser.add_argument("--client-cert", type=Path, help="PEM client certificate chain (mTLS)")
    parser.add_argument("--client-key", type=Path, help="PEM client private key (mTLS)")
    parser.add_argument(
        "--token-file",
        type=Path,
        help=f"a file holding a bearer token to send (default: ${TOKEN_VARIABLE}, if set)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    predict = commands.add_parser(
        "predict",
        help="predict rows from a file or stdin",
        description="Predict the rows of FILE (.npy, .npz, .csv, .json; '-' reads stdin) and "
        "print each row's prediction and uncertainty. Rows are reshaped to the model input's "
        "row shape (64 CSV columns -> 1x8x8). The uncertainty is the mutual information (nats) "
        "for classifiers and the std (the largest of the row's values) for regression.",
    )
    predict.add_argument("file", metavar="FILE", help="input file, or - for stdin")
    predict.add_argument("--model", "-m", required=True, help="model name")
    predict.add_argument("--version", help="model version (default: the newest)")
    predict.add_argument(
        "--samples", "-T", type=int, help="T, stochastic passes per row (default: the model's)"
    )
    predict.add_argument("--input-name", help="the input the file feeds (multi-input models)")
    predict.add_argument(
        "--format", choices=FORMATS, help="input format (default: from the suffix; stdin: json)"
    )
    predict.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_ROWS,
        help="rows per request (%(default)s); lower it if the server answers RESOURCE_EXHAUSTED",
    )
    predict.add_argument(
        "--threshold",
        type=float,
        help="flag rows whose uncertainty is above this (MI in nats for classifiers, std for "
        "regression) with '!'",
    )
    predict.add_argument("--json", action="store_true", help="print one JSON document")
    predict.add_argument(
        "--interval",
        type=float,
        action="append",
        default=[],
        metavar="LEVEL",
        help="regression: a central prediction interval at LEVEL in (0, 1); repeat for more",
    )
    predict.add_argument(
        "--interval-method",
        choices=("empirical", "gaussian"),
        default="empirical",
        help="the interval the table shows (%(default)s; --json has both)",
    )
    predict.add_argument(
        "--target-se",
        type=float,
        metavar="SE",
        help="adaptive sampling: sample until each row's Monte Carlo standard error is at most "
        "SE (--samples caps T)",
    )
    predict.add_argument("--seed", type=int, help="reproducible sampling with this seed")
    predict.add_argument(
        "--return-samples", action="store_true", help="every sample in the output (needs --json)"
    )
    predict.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal and there are "
        "several batches)",
    )
    predict.set_defaults(run=run_predict)

    models = commands.add_parser("models", help="list the models and their versions")
    models.add_argument("--json", action="store_true", help="print JSON")
    models.set_defaults(run=run_models)

    metadata = commands.add_parser("metadata", help="describe one model version")
    metadata.add_argument("--model", "-m", required=True, help="model name")
    metadata.add_argument("--version", help="model version (default: the newest)")
    metadata.add_argument("--json", action="store_true", help="print JSON")
    metadata.set_defaults(run=run_metadata)

    health = commands.add_parser(
        "health", help="print SERVING or NOT_SERVING; exit 0 only when SERVING"
    )
    health.add_argument(
        "service", nargs="?", default="", help="a model name or service (default: the server)"
    )
    health.set_defaults(run=run_health)
    return parser


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is not None:
        return str(args.token_file.read_text().strip())
    return os.environ.get(TOKEN_VARIABLE) or None


def _client(args: argparse.Namespace) -> Client:
    credentials = None
    if args.tls or args.ca_cert or args.client_cert or args.client_key:
        if (args.client_cert is None) != (args.client_key is None):
            raise ValueError("--client-cert and --client-key go together")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=args.ca_cert.read_bytes() if args.ca_cert else None,
            private_key=args.client_key.read_bytes() if args.client_key else None,
            certificate_chain=args.client_cert.read_bytes() if args.client_cert else None,
        )
    return Client(
        args.target,
        credentials=credentials,
        token=_token(args),
        timeout=args.timeout,
        max_retries=args.retries,
    )


def run_predict(client: Client, args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.return_samples and not args.json:
        raise ValueError("--return-samples needs --json (the table does not show samples)")
    raw = read_input(args.file, args.format, sys.stdin.buffer)
    info = client.model_metadata(args.model, version=args.version)
    inputs = shape_rows(info, raw, args.input_name)
    rows = int(next(iter(inputs.values())).shape[0])
    if rows == 0:
        raise ValueError(f"{args.file}: no rows")
    batches = range(0, rows, args.batch_size)
    show = err.isatty() and len(batches) > 1 if args.progress is None else args.progress
    progress = Progress(rows, err if show else None)
    parts: list[Prediction] = []
    try:
        for start in batches:
            batch = {name: a[start : start + args.batch_size] for name, a in inputs.items()}
            # The version is pinned so that every batch is answered by the same one.
            parts.append(
                client.predict(
                    args.model,
                    batch,
                    num_samples=args.samples,
                    version=info.version,
                    return_samples=args.return_samples,
                    interval_levels=args.interval,
                    target_standard_error=args.target_se,
                    seed=args.seed,
                )
            )
            progress.update(min(start + args.batch_size, rows))
    finally:
        progress.close()
    prediction = concat_predictions(parts)
    if args.json:
        json.dump(prediction_document(prediction, args.threshold), out, allow_nan=False)
        out.write("\n")
    else:
        table = prediction_table(prediction, info, args.threshold, args.interval_method)
        out.write("\n".join(table) + "\n")
    return 0


def run_models(client: Client, args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    models = client.list_models()
    if args.json:
        json.dump([m.to_dict() for m in models], out)
        out.write("\n")
        return 0
    table = [[m.name, ", ".join(m.versions), m.task, "yes" if m.ready else "no"] for m in models]
    out.write("\n".join(render(["model", "versions", "task", "ready"], table, "llll")) + "\n")
    return 0


def run_metadata(client: Client, args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    info = client.model_metadata(args.model, version=args.version)
    if args.json:
        json.dump(info.to_dict(), out)
        out.write("\n")
        return 0
    lines = [
        f"{info.name} v{info.version} ({info.task}), versions {', '.join(info.versions)}",
        f"  T: default {info.default_num_samples}, max {info.max_num_samples}",
        f"  provider: {info.provider}, opset {info.opset}, verified: {info.verified}",
    ]
    for kind, specs in (("input", info.inputs), ("output", info.outputs)):
        for spec in specs:
            extra = f" {spec.semantics}" if spec.semantics else ""
            lines.append(f"  {kind} {spec.name}: {spec.dtype.name} {list(spec.shape)}{extra}")
    if info.labels:
        lines.append(f"  labels: {', '.join(info.labels)}")
    for layer in info.dropout:
        lines.append(f"  dropout {layer.module}: {layer.type} p={layer.p:g}")
    out.write("\n".join(lines) + "\n")
    return 0


def run_health(client: Client, args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    status = client.health(args.service)
    out.write(status + "\n")
    return 0 if status == "SERVING" else 1


def row_uncertainty(output: OutputPrediction) -> tuple[str, NDArray[np.float64]]:
    """The measure that the threshold applies to, one value per row.

    Classifiers: the mutual information (epistemic uncertainty, nats). Regression: the std,
    the largest over the row's values.
    """
    if output.mutual_information is not None:
        return "mutual_information", output.mutual_information
    std = output.std.reshape(output.num_rows, -1)
    return "std", std.max(axis=1) if std.shape[1] else np.zeros(output.num_rows)


def prediction_document(prediction: Prediction, threshold: float | None) -> dict[str, Any]:
    """Everything of a prediction as JSON, plus per output the uncertainty and flags."""
    document = prediction.to_dict()
    document["rows"] = prediction.num_rows
    document["threshold"] = threshold
    for name, output in prediction.outputs.items():
        measure, values = row_uncertainty(output)
        document["outputs"][name]["uncertainty"] = {
            "measure": measure,
            "values": [v if np.isfinite(v) else None for v in values.tolist()],
            "flagged": None if threshold is None else (values > threshold).tolist(),
        }
    return document


def prediction_table(
    prediction: Prediction,
    info: ModelInfo,
    threshold: float | None,
    interval_method: IntervalMethod = "empirical",
) -> list[str]:
    """Lines of a readable table per output: row, prediction, uncertainty, the intervals
    (by ``interval_method``), the T of each row (adaptive sampling), the '!' flag."""
    rows = prediction.num_rows
    header = f"{prediction.model} v{prediction.version}, T={prediction.num_samples}, "
    header += f"{rows} row{'' if rows == 1 else 's'}"
    if prediction.seed is not None:
        header += f", seed {prediction.seed}"
    lines = [header]
    for output in prediction.outputs.values():
        if len(prediction.outputs) > 1:
            lines.append(f"\noutput {output.name} ({output.semantics})")
        measure, values = row_uncertainty(output)
        flagged = np.zeros(len(values), bool) if threshold is None else values > threshold
        if output.predicted_class is not None:
            headers = ["row", "prediction", "p(pred)", "+-std", "entropy", "MI"]
            table = _classification_rows(output, info)
        else:
            headers, table = _regression_columns(output, interval_method)
        if prediction.num_samples_per_row is not None:
            headers.append("T")
            for cells, t in zip(table, prediction.num_samples_per_row.tolist(), strict=True):
                cells.append(str(t))
        if threshold is not None:
            headers.append("flag")
            for cells, flag in zip(table, flagged.tolist(), strict=True):
                cells.append("!" if flag else "")
        lines.extend(render(headers, table, "r" + "l" + "r" * (len(headers) - 2)))
        if threshold is not None:
            name = measure.replace("_", " ")
            lines.append(
                f"{int(flagged.sum())} of {len(values)} rows flagged: {name} > {threshold:g}"
            )
    return lines


def _classification_rows(output: OutputPrediction, info: ModelInfo) -> list[list[str]]:
    assert output.predicted_class is not None
    assert output.predictive_entropy is not None
    assert output.mutual_information is not None
    rows = []
    for i, c in enumerate(output.predicted_class.tolist()):
        label = output.predicted_label[i] if output.predicted_label else str(c)
        rows.append(
            [
                str(i),
                label,
                f"{output.mean[i, c]:.3f}",
                f"{output.std[i, c]:.3f}",
                f"{output.predictive_entropy[i]:.3f}",
                f"{output.mutual_information[i]:.3f}",
            ]
        )
    return rows


def _regression_columns(
    output: OutputPrediction, interval_method: IntervalMethod
) -> tuple[list[str], list[list[str]]]:
    """Mean and std per row; the total std of heteroscedastic outputs; the intervals."""
    n = output.num_rows
    columns: list[tuple[str, NDArray[np.float64]]] = [("mean", output.mean), ("+-std", output.std)]
    if output.total_variance is not None:
        columns.append(("+-total", np.sqrt(output.total_variance)))
    headers = ["row"] + [name for name, _ in columns]
    flat = [values.reshape(n, -1) for _, values in columns]
    table = [[str(i)] + [_values(values[i]) for values in flat] for i in range(n)]
    for interval in output.intervals:
        if interval.method != interval_method:
            continue
        headers.append(f"{interval.level:g} {interval.method}")
        lower, upper = interval.lower.reshape(n, -1), interval.upper.reshape(n, -1)
        for i, cells in enumerate(table):
            cells.append(_bounds(lower[i], upper[i]))
    return headers, table


def _bounds(lower: NDArray[np.float64], upper: NDArray[np.float64], limit: int = 4) -> str:
    shown = ", ".join(
        f"[{lo:.4g}, {hi:.4g}]" for lo, hi in zip(lower[:limit], upper[:limit], strict=True)
    )
    if len(lower) > limit:
        shown += f", ... ({len(lower)} values)"
    return shown


def _values(values: NDArray[np.float64], limit: int = 4) -> str:
    shown = ", ".join(f"{v:.4g}" for v in values[:limit].tolist())
    if len(values) > limit:
        shown += f", ... ({len(values)} values)"
    return shown


def render(headers: list[str], rows: list[list[str]], align: str) -> list[str]:
    """Columns padded to their widest cell; ``align`` is one of ``l``/``r`` per column."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = (
            c.rjust(w) if a == "r" else c.ljust(w)
            for c, w, a in zip(cells, widths, align, strict=True)
        )
        return "  ".join(padded).rstrip()

    return [line(headers), *(line(r) for r in rows)]


class Progress:
    """A one-line progress bar on ``stream`` (None: silent), redrawn in place."""

    WIDTH = 30

    def __init__(self, total: int, stream: IO[str] | None) -> None:
        self.total = total
        self.stream = stream

    def update(self, done: int) -> None:
        if self.stream is None:
            return
        filled = self.WIDTH * done // max(self.total, 1)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        percent = 100 * done // max(self.total, 1)
        self.stream.write(f"\rpredict [{bar}] {done}/{self.total} rows {percent:3d}%")
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()
