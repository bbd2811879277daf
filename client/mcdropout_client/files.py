"""Input rows from files for the command line: .npy, .npz, .csv and .json, or stdin.

Reading gives numbers as parsed (one array, or input name -> array); :func:`shape_rows` then
converts them to the model's dtype and row shape, using its metadata.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, TypeAlias

import numpy as np
from numpy.typing import NDArray

from mcdropout_client._convert import as_dtype
from mcdropout_client.types import ModelInfo

__all__ = ["FORMATS", "RawRows", "detect_format", "parse", "read_input", "shape_rows"]

#: Parsed rows: one array (single-input models) or input name -> array.
RawRows: TypeAlias = NDArray[Any] | dict[str, NDArray[Any]]

FORMATS = ("npy", "npz", "csv", "json")


def detect_format(source: str, fmt: str | None) -> str:
    """The format named by ``fmt``, else by the file's suffix; stdin (``-``) means JSON.

    Raises:
        ValueError: unknown format or suffix.
    """
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
        return fmt
    if source == "-":
        return "json"
    suffix = Path(source).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise ValueError(
            f"cannot tell the format of {source!r} from its suffix: use .npy, .npz, .csv or "
            ".json, or --format"
        )
    return suffix


def read_input(source: str, fmt: str | None, stdin: IO[bytes]) -> RawRows:
    """Read rows from a file, or from ``stdin`` when ``source`` is ``-``.

    Raises:
        ValueError: the content cannot be parsed.
        OSError: the file cannot be read.
    """
    fmt = detect_format(source, fmt)
    data = stdin.read() if source == "-" else Path(source).read_bytes()
    return parse(data, fmt, source)


def parse(data: bytes, fmt: str, source: str = "input") -> RawRows:
    """Parse the bytes of one input file in ``fmt`` (see :data:`FORMATS`)."""
    if fmt in ("npy", "npz"):
        try:
            loaded = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise ValueError(f"{source}: not a valid .{fmt} file ({error})") from error
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:
            return {name: loaded[name] for name in loaded.files}
    text = data.decode("utf-8-sig")
    if fmt == "csv":
        return parse_csv(text, source)
    if fmt == "json":
        return parse_json(text, source)
    raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")


def parse_csv(text: str, source: str = "input") -> NDArray[np.float64]:
    """Numeric rows, one per line; a first line that is not all numbers is a header, skipped.

    Returns:
        (N, columns) float64.

    Raises:
        ValueError: a cell that is not a number (with its line), ragged rows, or no rows.
    """
    rows: list[list[float]] = []
    first = True
    reader = csv.reader(io.StringIO(text))
    for cells in reader:
        number = reader.line_num
        if not any(cell.strip() for cell in cells):
            continue
        values = [_number(cell) for cell in cells]
        header, first = first, False
        if any(v is None for v in values):
            if header:
                continue
            bad = next(c for c, v in zip(cells, values, strict=True) if v is None)
            raise ValueError(f"{source}, line {number}: {bad!r} is not a number")
        if rows and len(values) != len(rows[0]):
            raise ValueError(
                f"{source}, line {number}: {len(values)} columns, expected {len(rows[0])}"
            )
        rows.append([v for v in values if v is not None])
    if not rows:
        raise ValueError(f"{source}: no rows")
    return np.array(rows, dtype=np.float64)


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def parse_json(text: str, source: str = "input") -> RawRows:
    """A list of rows, or an object ``{input name: rows}``.

    Raises:
        ValueError: invalid JSON, ragged rows, values that are not numbers.
    """
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source}: invalid JSON ({error})") from error
    if isinstance(document, Mapping):
        if not document:
            raise ValueError(f"{source}: no inputs in the JSON object")
        return {
            str(name): _json_array(rows, f"{source}[{name!r}]") for name, rows in document.items()
        }
    return _json_array(document, source)


def _json_array(rows: Any, where: str) -> NDArray[Any]:
    if not isinstance(rows, list):
        raise ValueError(f"{where}: expected a list of rows, got {type(rows).__name__}")
    try:
        array = np.asarray(rows)
    except ValueError as error:  # ragged nesting
        raise ValueError(f"{where}: rows of different lengths ({error})") from error
    if array.size == 0:
        raise ValueError(f"{where}: no rows")
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{where}: values must be numbers")
    return array


def shape_rows(
    info: ModelInfo, raw: RawRows, input_name: str | None = None
) -> dict[str, NDArray[Any]]:
    """Give parsed rows the model's dtype and row shape (from its metadata).

    Flat rows are reshaped to the input's row shape when the sizes match (64 CSV columns ->
    (1, 8, 8) for an input of shape (-1, 1, 8, 8)), and a single row gets a batch dimension.

    Returns:
        Input name -> (N, *row_shape) array of the input's dtype, the same N for all.

    Raises:
        ValueError: unknown input, values that do not convert, different row counts.
    """
    named = raw if isinstance(raw, dict) else {info.input(input_name).name: raw}
    if isinstance(raw, dict) and input_name is not None:
        raise ValueError("--input-name is for files with one array; this one names its inputs")
    shaped: dict[str, NDArray[Any]] = {}
    for name, values in named.items():
        spec = info.input(name)
        array = as_dtype(values, spec.dtype, name)
        row_shape = spec.row_shape
        if all(d >= 0 for d in row_shape):
            row_size = math.prod(row_shape)
            if array.ndim == 1 and len(row_shape) != 1 and array.size == row_size:
                array = array.reshape(1, *row_shape)
            elif array.ndim == 2 and len(row_shape) != 1 and array.shape[1] == row_size:
                array = array.reshape(array.shape[0], *row_shape)
        if array.ndim == len(row_shape):
            array = array[np.newaxis]
        shaped[name] = array
    counts = {name: int(a.shape[0]) for name, a in shaped.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"inputs have different numbers of rows: {counts}")
    return shaped
