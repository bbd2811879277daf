"""Finds model versions in the repository folder and parses their configs into typed objects.

Layout and file formats: docs/model-repository.md. Nothing here touches ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from service import tensors
from service.errors import ModelLoadError

__all__ = [
    "DEFAULT_MAX_QUEUE_DELAY_US",
    "DynamicBatchingConfig",
    "Fingerprint",
    "ModelConfig",
    "ProvenanceInfo",
    "Semantics",
    "Task",
    "TensorSpec",
    "VersionFolder",
    "VersionSource",
    "find_versions",
    "fingerprint",
    "load_version",
    "parse_config",
]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
#: dtype names config.json accepts (the dtype table's config column), for messages.
_CONFIG_DTYPES = sorted(d.config for d in tensors.DTYPES if d.config is not None)


class Task(StrEnum):
    """What a model's outputs are, derived from their semantics when config.json omits it."""

    CLASSIFICATION = "classification"
    REGRESSION = "regression"
    #: class outputs and values outputs in one model (say, a classifier head beside a
    #: regression head), each answered with its own statistics
    MIXED = "mixed"


class Semantics(StrEnum):
    LOGITS = "logits"
    PROBABILITIES = "probabilities"
    VALUES = "values"
    #: a heteroscedastic model's predicted variance of another ("of") values output
    VARIANCE = "variance"
    #: the same as a natural log (exp is applied per sample)
    LOG_VARIANCE = "log_variance"

    @property
    def is_classification(self) -> bool:
        return self in (Semantics.LOGITS, Semantics.PROBABILITIES)

    @property
    def is_variance(self) -> bool:
        return self in (Semantics.VARIANCE, Semantics.LOG_VARIANCE)


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output.

    ``shape[0]`` is -1, the batch dimension; -1 elsewhere marks a dynamic axis (a sequence
    length, say), whose largest size an input gives in ``max_shape``.
    """

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    semantics: Semantics | None = None
    #: variance / log_variance outputs: the values output whose aleatoric variance this is
    variance_of: str | None = None
    #: inputs with dynamic axes: ``shape`` with each dynamic axis's maximum (-1 at axis 0)
    max_shape: tuple[int, ...] | None = None
    #: class outputs: one name per class (the last axis), or empty
    labels: tuple[str, ...] = ()

    @property
    def row_shape(self) -> tuple[int, ...]:
        """The shape of one row (without the batch dimension); -1 at dynamic axes."""
        return self.shape[1:]

    @functools.cached_property
    def dynamic_axes(self) -> tuple[int, ...]:
        """The axes (beyond the batch axis) whose size a request chooses (read per request:
        computed once)."""
        return tuple(i for i, d in enumerate(self.shape) if i > 0 and d == -1)

    @property
    def row_size(self) -> int:
        """Elements in one row at the largest shape (the shape itself without dynamic axes)."""
        dims = (self.max_shape or self.shape)[1:]
        return int(np.prod([max(d, 1) for d in dims], dtype=np.int64))

    @property
    def row_bytes(self) -> int:
        return self.row_size * self.dtype.itemsize


#: Batching delay when config.json does not set one: long enough to merge requests that
#: arrive together, short against the milliseconds of even a small MC dropout run.
DEFAULT_MAX_QUEUE_DELAY_US = 500
#: Upper bound of ``max_queue_delay_us`` (10 s): a larger value is almost surely a unit slip.
_MAX_QUEUE_DELAY_LIMIT_US = 10_000_000


@dataclass(frozen=True)
class DynamicBatchingConfig:
    """The optional ``dynamic_batching`` section of ``config.json``.

    Attributes:
        enabled: merge concurrent requests with the same version and T into one run.
        max_batch_rows: most rows of one merged run; None for the server's
            ``--max-batch-rows``.
        max_queue_delay_us: longest time, in microseconds, the oldest waiting request is held
            back for more requests to join its run.
        pad: models with dynamic axes whose answers do not depend on padding (a text
            classifier that masks padded tokens): per input, the value that pads its dynamic
            axes at the end, so that requests of different lengths share runs (padded to the
            longest). Without it, requests of different lengths never share a run.
    """

    enabled: bool = True
    max_batch_rows: int | None = None
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US
    pad: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    """The parsed ``config.json`` of one version."""

    name: str
    task: Task
    description: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    default_num_samples: int
    max_num_samples: int
    activation_bytes_per_row: int | None
    dynamic_batching: DynamicBatchingConfig = DynamicBatchingConfig()
    #: "fp32", or "fp16": the graph computes in float16 behind float32 inputs and outputs
    precision: str = "fp32"

    @property
    def labels(self) -> tuple[str, ...]:
        """The labels of the model's class output when it has exactly one (the model-level
        labels of the metadata); empty otherwise."""
        classes = [o for o in self.outputs if o.semantics and o.semantics.is_classification]
        return classes[0].labels if len(classes) == 1 else ()

    def variance_output(self, name: str) -> TensorSpec | None:
        """The variance (or log-variance) output describing values output ``name``, if any:
        the model is heteroscedastic for that output."""
        return next((o for o in self.outputs if o.variance_of == name), None)


@dataclass(frozen=True)
class DropoutInfo:
    module: str
    type: str
    p: float


@dataclass(frozen=True)
class ProvenanceInfo:
    """What the server reports from ``metadata.json`` (all optional for hand-made models)."""

    opset: int = 0
    verified: bool = False
    weights_sha256: str = ""
    dropout: tuple[DropoutInfo, ...] = ()


@dataclass(frozen=True)
class VersionSource:
    """A version folder found on disk, with its parsed config."""

    name: str
    version: int
    path: Path
    config: ModelConfig
    provenance: ProvenanceInfo

    @property
    def model_path(self) -> Path:
        return self.path / "model.onnx"


def _require(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise ModelLoadError(f"{where}: {message}")


def _tensor_spec(raw: Any, where: str, *, output: bool) -> TensorSpec:
    _require(isinstance(raw, dict), where, f"must be an object, got {raw!r}")
    name = raw.get("name")
    _require(isinstance(name, str) and bool(name), where, "needs a non-empty 'name'")
    dtype_name = raw.get("dtype")
    dtype = tensors.from_config(dtype_name) if isinstance(dtype_name, str) else None
    _require(
        dtype is not None,
        where,
        f"dtype must be one of {', '.join(_CONFIG_DTYPES)}, got {dtype_name!r}",
    )
    assert dtype is not None
    shape = raw.get("shape")
    _require(
        isinstance(shape, list) and len(shape) >= 1 and all(isinstance(d, int) for d in shape),
        where,
        f"shape must be a list of integers, got {shape!r}",
    )
    _require(shape[0] == -1, where, f"the first dimension must be -1 (batch), got {shape!r}")
    _require(
        all(d >= 1 or d == -1 for d in shape[1:]),
        where,
        f"sizes must be >= 1, or -1 for a dynamic axis, got {shape!r}",
    )
    max_shape = _max_shape(raw.get("max_shape"), shape, where, output=output)
    semantics: Semantics | None = None
    variance_of: str | None = None
    labels: tuple[str, ...] = ()
    if output:
        raw_semantics = raw.get("semantics", "values")
        _require(
            raw_semantics in {s.value for s in Semantics},
            where,
            "semantics must be logits, probabilities, values, variance or log_variance, got "
            f"{raw_semantics!r}",
        )
        semantics = Semantics(raw_semantics)
        if semantics.is_variance:
            variance_of = raw.get("of")
            _require(
                isinstance(variance_of, str) and bool(variance_of),
                where,
                f"a {semantics.value} output names the values output it describes in 'of'",
            )
        else:
            _require("of" not in raw, where, "'of' is only for variance and log_variance outputs")
        if semantics.is_classification:
            _require(
                len(shape) >= 2 and shape[-1] >= 1,
                where,
                f"a class output has its classes on a fixed last axis, [-1, ..., C], got {shape}",
            )
        labels = _labels(raw.get("labels"), where)
        _require(
            not labels or (semantics.is_classification and len(labels) == shape[-1]),
            where,
            f"labels name the {shape[-1]} classes of a class output, got {len(labels)} labels"
            if semantics.is_classification
            else "labels are for class outputs (logits or probabilities)",
        )
    return TensorSpec(
        name=name,
        dtype=np.dtype(dtype.numpy.name),  # native byte order, as arrays are decoded
        shape=tuple(shape),
        semantics=semantics,
        variance_of=variance_of,
        max_shape=max_shape,
        labels=labels,
    )


def _max_shape(raw: Any, shape: list[int], where: str, *, output: bool) -> tuple[int, ...] | None:
    """An input's ``max_shape``: required with dynamic axes, the largest size of each."""
    dynamic = [i for i, d in enumerate(shape) if i > 0 and d == -1]
    if raw is None:
        _require(
            output or not dynamic,
            where,
            f"an input with dynamic axes {dynamic} gives their largest sizes in 'max_shape'",
        )
        return None
    _require(not output, where, "max_shape is for inputs")
    _require(
        isinstance(raw, list)
        and len(raw) == len(shape)
        and all(_is_int(d) for d in raw)
        and raw[0] == -1
        and all(m >= 1 and d in (-1, m) for d, m in zip(shape[1:], raw[1:], strict=True)),
        where,
        f"max_shape must be the shape {shape} with each -1 beyond the batch axis replaced by its "
        f"largest size (>= 1), got {raw!r}",
    )
    return tuple(raw)


def _labels(raw: Any, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    _require(
        isinstance(raw, list) and all(isinstance(x, str) for x in raw),
        where,
        "labels must be a list of strings",
    )
    return tuple(raw)


def _is_int(value: Any) -> bool:
    """A JSON integer (``true`` is an int to Python, but not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _dynamic_batching(raw: Any, where: str) -> DynamicBatchingConfig:
    """Parse the optional ``dynamic_batching`` section; absent means enabled with defaults."""
    if raw is None:
        return DynamicBatchingConfig()
    _require(isinstance(raw, dict), where, f"dynamic_batching must be an object, got {raw!r}")
    allowed = {f.name for f in fields(DynamicBatchingConfig)}
    unknown = sorted(set(raw) - allowed)
    # A misspelt key would otherwise be ignored silently (Triton's name is
    # max_queue_delay_microseconds, an easy slip).
    _require(
        not unknown,
        where,
        f"dynamic_batching has unknown keys {unknown}; allowed: {sorted(allowed)}",
    )
    enabled = raw.get("enabled", True)
    _require(
        isinstance(enabled, bool),
        where,
        f"dynamic_batching.enabled must be true or false, got {enabled!r}",
    )
    rows = raw.get("max_batch_rows")
    _require(
        rows is None or (_is_int(rows) and rows >= 1),
        where,
        f"dynamic_batching.max_batch_rows must be an integer >= 1, got {rows!r}",
    )
    delay = raw.get("max_queue_delay_us", DEFAULT_MAX_QUEUE_DELAY_US)
    _require(
        _is_int(delay) and 0 <= delay <= _MAX_QUEUE_DELAY_LIMIT_US,
        where,
        "dynamic_batching.max_queue_delay_us must be an integer in "
        f"0..{_MAX_QUEUE_DELAY_LIMIT_US}, got {delay!r}",
    )
    pad = raw.get("pad", {})
    _require(
        isinstance(pad, dict)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pad.values()),
        where,
        f"dynamic_batching.pad maps input names to numbers, got {pad!r}",
    )
    return DynamicBatchingConfig(enabled=enabled, max_batch_rows=rows, max_queue_delay_us=delay,
                                 pad=tuple(sorted(pad.items())))  # fmt: skip


def parse_config(raw: Any, model_name: str, where: str = "config.json") -> ModelConfig:
    """Validate a parsed ``config.json``.

    Raises:
        ModelLoadError: the config breaks a rule; the message names the field and value.
    """
    _require(isinstance(raw, dict), where, "must be a JSON object")
    _require(raw.get("format_version", 1) == 1, where, "format_version must be 1")
    _require(
        raw.get("name", model_name) == model_name,
        where,
        f"name {raw.get('name')!r} differs from the folder name {model_name!r}",
    )
    raw_inputs, raw_outputs = raw.get("inputs"), raw.get("outputs")
    _require(isinstance(raw_inputs, list) and bool(raw_inputs), where, "needs inputs[]")
    _require(isinstance(raw_outputs, list) and bool(raw_outputs), where, "needs outputs[]")
    inputs = tuple(
        _tensor_spec(r, f"{where} inputs[{i}]", output=False) for i, r in enumerate(raw_inputs)
    )
    outputs = tuple(
        _tensor_spec(r, f"{where} outputs[{i}]", output=True) for i, r in enumerate(raw_outputs)
    )
    names = [t.name for t in inputs + outputs]
    _require(len(set(names)) == len(names), where, f"tensor names must be unique, got {names}")
    classes = [o for o in outputs if o.semantics and o.semantics.is_classification]
    derived = (
        Task.CLASSIFICATION
        if len(classes) == len(outputs)
        else Task.REGRESSION
        if not classes
        else Task.MIXED
    )
    task_raw = raw.get("task", derived.value)
    _require(
        task_raw in {t.value for t in Task},
        where,
        f"task must be classification, regression or mixed, got {task_raw!r}",
    )
    _require(
        Task(task_raw) is derived,
        where,
        f"task {task_raw!r} does not match the outputs' semantics, which make it "
        f"{derived.value!r} (class outputs: {[o.name for o in classes]})",
    )
    task = derived
    labels = _labels(raw.get("labels"), where) if raw.get("labels") else ()
    if labels:  # the model-level labels of a model with one class output
        _require(
            len(classes) == 1 and not classes[0].labels,
            where,
            "top-level labels are for a model with exactly one class output (give each class "
            "output its own 'labels' instead)",
        )
        _require(
            len(labels) == classes[0].shape[-1],
            where,
            f"labels has {len(labels)} entries for {classes[0].shape[-1]} classes",
        )
        outputs = tuple(
            dataclasses.replace(o, labels=labels) if o is classes[0] else o for o in outputs
        )
    _check_variance_outputs(outputs, where)
    batching = _dynamic_batching(raw.get("dynamic_batching"), where)
    if batching.pad:
        dynamic = sorted(spec.name for spec in inputs if spec.dynamic_axes)
        _require(
            sorted(name for name, _ in batching.pad) == dynamic,
            where,
            f"dynamic_batching.pad gives a pad value for each input with dynamic axes, "
            f"{dynamic}, got {sorted(name for name, _ in batching.pad)}",
        )
        _require(
            not any(spec.dynamic_axes for spec in outputs),
            where,
            "dynamic_batching.pad is for models whose outputs have no dynamic axis (a padded "
            "request's outputs would have the longest request's length)",
        )
    samples = raw.get("num_samples", {})
    _require(isinstance(samples, dict), where, "num_samples must be an object")
    default = samples.get("default", 100)
    maximum = samples.get("max", 10_000)
    _require(
        isinstance(default, int) and isinstance(maximum, int) and 1 <= default <= maximum,
        where,
        f"num_samples needs 1 <= default <= max, got default={default!r} max={maximum!r}",
    )
    activation = raw.get("activation_bytes_per_row")
    _require(
        activation is None or (isinstance(activation, int) and activation > 0),
        where,
        f"activation_bytes_per_row must be a positive integer, got {activation!r}",
    )
    description = raw.get("description", "")
    precision = raw.get("precision", "fp32")
    _require(
        precision in ("fp32", "fp16"),
        where,
        f"precision must be fp32 or fp16, got {precision!r}",
    )
    return ModelConfig(
        name=model_name,
        task=task,
        description=description if isinstance(description, str) else "",
        inputs=inputs,
        outputs=outputs,
        default_num_samples=default,
        max_num_samples=maximum,
        activation_bytes_per_row=activation,
        dynamic_batching=batching,
        precision=precision,
    )


def _check_variance_outputs(outputs: tuple[TensorSpec, ...], where: str) -> None:
    """Each variance output describes a distinct values output of the same shape."""
    by_name = {o.name: o for o in outputs}
    described: set[str] = set()
    for out in outputs:
        if out.variance_of is None:
            continue
        target = by_name.get(out.variance_of)
        _require(
            target is not None and target.semantics is Semantics.VALUES,
            where,
            f"{out.name!r} is the variance of {out.variance_of!r}, which is not a values output",
        )
        assert target is not None
        _require(
            target.shape == out.shape,
            where,
            f"{out.name!r} has shape {list(out.shape)}, its values output {list(target.shape)}",
        )
        _require(out.variance_of not in described, where, f"{out.variance_of!r} has two variances")
        described.add(out.variance_of)


def _provenance(path: Path) -> ProvenanceInfo:
    file = path / "metadata.json"
    if not file.is_file():
        return ProvenanceInfo()
    try:
        raw = json.loads(file.read_text())
        dropout = tuple(
            DropoutInfo(module=str(d["module"]), type=str(d["type"]), p=float(d["p"]))
            for d in raw.get("dropout", [])
        )
        return ProvenanceInfo(
            opset=int(raw.get("opset", 0)),
            verified=bool(raw.get("verification", {}).get("passed", False)),
            weights_sha256=str(raw.get("weights_sha256", "")),
            dropout=dropout,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("%s: unreadable metadata.json ignored: %s", file, exc)
        return ProvenanceInfo()


def load_version(model_dir: Path, version: int) -> VersionSource:
    """Parse one version folder.

    Raises:
        ModelLoadError: files missing or config invalid.
    """
    path = model_dir / str(version)
    where = f"{model_dir.name}/{version}"
    _require((path / "model.onnx").is_file(), where, "model.onnx is missing")
    try:
        raw = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{where}: config.json is missing") from None
    except ValueError as exc:
        raise ModelLoadError(f"{where}: config.json is not valid JSON: {exc}") from None
    config = parse_config(raw, model_dir.name, f"{where}/config.json")
    return VersionSource(
        name=model_dir.name,
        version=version,
        path=path,
        config=config,
        provenance=_provenance(path),
    )


#: What identifies the files of a version folder: (name, size, mtime_ns, inode) of each regular
#: file but hidden ones (temporary files, editors' swap files), sorted by name. Any write,
#: replacement (even by a copy that keeps times and size: a new inode) or added or removed file
#: changes it; reading the files does not.
Fingerprint = tuple[tuple[str, int, int, int], ...]


@dataclass(frozen=True)
class VersionFolder:
    """A version folder found on disk, not yet parsed.

    Attributes:
        name: the model's name (its folder's name).
        version: the version number.
        path: the folder.
        fingerprint: its files as they were when found (empty when they could not be read).
    """

    name: str
    version: int
    path: Path
    fingerprint: Fingerprint


def fingerprint(folder: Path) -> Fingerprint:
    """The fingerprint of a version folder's files (blocking: a stat per file).

    Raises:
        OSError: the folder cannot be listed.
    """
    entries: list[tuple[str, int, int, int]] = []
    for path in folder.iterdir():
        if path.name.startswith("."):
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed while listing: the next scan sees the change
            continue
        if path.is_file():
            entries.append((path.name, stat.st_size, stat.st_mtime_ns, stat.st_ino))
    return tuple(sorted(entries))


def _model_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise ModelLoadError(f"model repository {root} is not a folder")
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and _NAME.match(p.name)
    )


def _version_dirs(model_dir: Path) -> list[Path]:
    """Version folders: positive integers. Others (hidden, an export in progress, "latest")
    are not versions and are ignored."""
    return sorted(
        p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) >= 1
    )


def find_versions(root: Path, names: set[str] | None = None) -> dict[str, dict[int, VersionFolder]]:
    """Every version folder under ``root`` with its fingerprint, without parsing anything
    (blocking: a listing and a stat per file; cheap enough for every poll).

    Args:
        root: the repository.
        names: only these models; None for all.

    Returns:
        Model name -> version number -> folder. A model folder without any version folder is
        left out.

    Raises:
        ModelLoadError: ``root`` is not a folder.
    """
    found: dict[str, dict[int, VersionFolder]] = {}
    for model_dir in _model_dirs(root):
        if names is not None and model_dir.name not in names:
            continue
        versions: dict[int, VersionFolder] = {}
        try:
            version_dirs = _version_dirs(model_dir)
        except OSError:  # removed while listing
            continue
        for version_dir in version_dirs:
            try:
                files = fingerprint(version_dir)
            except OSError:
                files = ()
            number = int(version_dir.name)
            versions[number] = VersionFolder(model_dir.name, number, version_dir, files)
        if versions:
            found[model_dir.name] = versions
    return found
