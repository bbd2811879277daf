"""The realistic benchmark's variants: this engine against PyTorch and deterministic anchors.

Every variant runs on the benchmark's device (``bench.engine.Device``) at the export's
precision, takes the cell's inputs (one (B, ...) array per model input) and T, and returns the
same statistics of the softmax: mean and unbiased variance per element, predictive entropy and
mutual information per row.

* (a) ``torch_loop``: the usual PyTorch MC dropout code, T forward passes of the B rows in MC
  mode (eval, dropout modules in train), the statistics accumulated on the device.
* (b) ``torch_prefix_once``: hand-written PyTorch MC with the deterministic part run once. A
  head-dropout CNN runs its backbone once on the B rows, tiles the features to [T*B] sample-major
  and runs only the head (its first dropout on) on the tile; a dropout-everywhere model has no
  deterministic part, so (b) is the whole model on the [T*B] tile ("PyTorch on the tile"). The
  tile is cut into runs of the engine's rows per run (the same memory budget); the softmax
  statistics are computed on the device.
* (b') ``torch_prefix_once_bf16``: (b) under ``torch.autocast(dtype=torch.bfloat16)`` on the
  float32 model, beside the half-precision cells (bfloat16 is what PyTorch users reach for on
  a recent GPU; the engine has no bfloat16, export/precision.py says why).
* (c) ``ort_deterministic``: one deterministic pass of the B rows, ONNX Runtime on the same
  ``model.onnx`` with its default graph optimizations, which remove Dropout (``EliminateDropout``,
  which the server disables), and the random draws of dropout exported without a Dropout node
  made constant (:func:`deterministic_graph`); it is checked to be deterministic when built.
* (c') ``torch_eval``: one deterministic pass of the B rows, PyTorch in eval mode.
* (e) ``engine``: this engine, ``service.engine.runtime.build_engine``, what the server runs.

In the half-precision cells (an export with ``precision="fp16"``) the PyTorch anchors run a
``.half()`` copy of the model on float16 inputs (token ids stay int64); their statistics are
computed in float32 from the float16 logits, as the engine's are.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch
from torch import nn

from bench.engine import Call, Device, NotOnDevice, describe_error
from bench.realistic import Inputs, PreparedReal
from export.mc_mode import mc_dropout_copy
from service.engine.onnx_session import (
    SessionConfig,
    create_session,
)
from service.engine.runtime import McEngine, build_engine, chunk_samples

__all__ = [
    "REAL_VARIANTS",
    "DeviceStats",
    "RealBuilt",
    "RealVariant",
    "build_real_variants",
    "check_deterministic",
    "deterministic_graph",
    "deterministic_session",
]


@dataclass(frozen=True)
class RealVariant:
    """One variant of the realistic benchmark.

    Attributes:
        key: short name used in results ("torch_prefix_once").
        letter: as in the report: a, b, b', c, c', e.
        label: column header.
        deterministic: one pass whatever T (the "deterministic passes" unit).
    """

    key: str
    letter: str
    label: str
    deterministic: bool = False


REAL_VARIANTS: tuple[RealVariant, ...] = (
    RealVariant("torch_loop", "a", "PyTorch loop of T passes"),
    RealVariant("torch_prefix_once", "b", "hand-written PyTorch MC (prefix once)"),
    RealVariant("torch_prefix_once_bf16", "b'", "(b) under bf16 autocast"),
    RealVariant("ort_deterministic", "c", "one deterministic pass, ONNX Runtime", True),
    RealVariant("torch_eval", "c'", "one deterministic pass, PyTorch eval", True),
    RealVariant("engine", "e", "this engine (build_engine)"),
)
REAL_VARIANT_KEYS = tuple(v.key for v in REAL_VARIANTS)
#: The variants of a full-precision cell, and of a half-precision one.
FP32_VARIANTS = tuple(k for k in REAL_VARIANT_KEYS if k != "torch_prefix_once_bf16")
FP16_VARIANTS = REAL_VARIANT_KEYS


@dataclass(frozen=True)
class DeviceStats:
    """Statistics of T softmax samples, per row, copied to the host.

    Attributes:
        mean: (B, C) mean probability.
        variance: (B, C) unbiased variance of the probability.
        entropy: (B,) entropy of the mean probability (predictive entropy).
        mutual_information: (B,) predictive entropy minus the mean entropy of the samples.
    """

    mean: npt.NDArray[np.float64]
    variance: npt.NDArray[np.float64]
    entropy: npt.NDArray[np.float64]
    mutual_information: npt.NDArray[np.float64]


class _Accumulator:
    """Softmax statistics on the device: per run in float32, across runs in float64."""

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None
        self._squares: torch.Tensor | None = None
        self._entropy: torch.Tensor | None = None
        self.count = 0

    def update(self, logits: torch.Tensor) -> None:
        """logits (t, B, C), sample-major."""
        log_p = torch.log_softmax(logits.float(), dim=-1)
        p = log_p.exp()
        total = p.sum(0).double()
        squares = (p * p).sum(0).double()
        entropy = -(p * log_p).sum(-1).sum(0).double()
        if self._sum is None or self._squares is None or self._entropy is None:
            self._sum, self._squares, self._entropy = total, squares, entropy
        else:
            self._sum += total
            self._squares += squares
            self._entropy += entropy
        self.count += logits.shape[0]

    def result(self) -> DeviceStats:
        assert self._sum is not None
        assert self._squares is not None
        assert self._entropy is not None
        count = self.count
        mean = self._sum / count
        variance = ((self._squares - count * mean * mean) / max(1, count - 1)).clamp_min(0.0)
        entropy = -(mean * torch.log(mean.clamp_min(1e-300))).sum(-1)
        information = entropy - self._entropy / count

        def host(tensor: torch.Tensor) -> npt.NDArray[np.float64]:
            return np.asarray(tensor.cpu().numpy(), dtype=np.float64)

        return DeviceStats(host(mean), host(variance), host(entropy), host(information))


@dataclass
class RealBuilt:
    """A variant ready to call.

    Attributes:
        call: ``(inputs, T) -> statistics``, synchronised around the call on CUDA.
        providers: what runs it: the sessions' first providers, or "torch DEVICE".
        detail: e.g. the engine form and its rows per run.
    """

    call: Call
    providers: list[str]
    detail: str = ""


def _synchronised(call: Call, device: Device) -> Call:
    if not device.cuda:
        return call

    def run(inputs: Any, num_samples: int) -> object:
        device.sync()
        out = call(inputs, num_samples)
        device.sync()
        return out

    return run


#: Random ops replaced by a constant in the deterministic graph (Dropout is ONNX Runtime's).
_RANDOM_LIKE = ("RandomUniformLike", "RandomNormalLike")


def deterministic_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with its random draws made constant: each RandomUniformLike /
    RandomNormalLike of the main graph becomes a tensor of its ``low`` (uniform) or ``mean``
    (normal) value of the same shape and type.

    torchvision's in-place dropout exports as RandomUniformLike + Less + Cast + Mul + Div
    rather than a Dropout node, which ONNX Runtime's ``EliminateDropout`` would remove; with
    the draw at ``low`` (0) its mask keeps everything, so the pass costs what one pass of the
    network costs and is deterministic (its output is the kept features scaled by 1/keep, not
    the eval-mode output: this graph is a timing reference). Dropout nodes are left to ONNX
    Runtime. Other random ops (in subgraphs, RandomUniform with a fixed shape) stay, and the
    determinism check refuses the session.

    Args:
        model: an exported MC dropout graph (not modified).

    Returns:
        The rewritten copy.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes: list[onnx.NodeProto] = []
    for index, node in enumerate(out.graph.node):
        if node.op_type not in _RANDOM_LIKE or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        value = (
            attributes.get("low", 0.0)
            if node.op_type == "RandomUniformLike"
            else (attributes.get("mean", 0.0))
        )
        stem = f"_bench_constant_{index}"
        dtype = attributes.get("dtype")
        constant = onnx.helper.make_tensor(
            f"{stem}_value",
            int(dtype) if dtype is not None else onnx.TensorProto.FLOAT,
            [1],
            [float(value)],
        )
        filled = node.output[0] if dtype is not None else f"{stem}_filled"
        nodes += [
            onnx.helper.make_node("Shape", [node.input[0]], [f"{stem}_shape"]),
            onnx.helper.make_node("ConstantOfShape", [f"{stem}_shape"], [filled], value=constant),
        ]
        if dtype is None:  # the input's type, whatever it is
            nodes.append(
                onnx.helper.make_node("CastLike", [filled, node.input[0]], [node.output[0]])
            )
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def deterministic_session(model: Path, config: SessionConfig) -> tuple[ort.InferenceSession, int]:
    """One deterministic pass of ``model``: :func:`deterministic_graph` in ONNX Runtime with its
    default optimizations, Dropout removal included.

    Returns:
        The session, and how many random draws were made constant.

    The server's sessions (``service.engine.onnx_session.create_session``) disable
    ``EliminateDropout`` to keep dropout stochastic; this one lets it run, with the server's
    other settings (threads, spinning, providers).
    """
    original = onnx.load(str(model))
    replaced = sum(n.op_type in _RANDOM_LIKE for n in original.graph.node)
    graph = deterministic_graph(original)
    del original
    every_optimization = dataclasses.replace(config, graph_optimization_level="all")
    session = create_session(graph.SerializeToString(), every_optimization, keep_dropout=False)
    return session, replaced


class NotDeterministic(RuntimeError):
    """A "deterministic" session gave different answers to the same row."""


def _torch_inputs(
    inputs: Mapping[str, npt.NDArray[Any]], names: Sequence[str], target: torch.device, half: bool
) -> list[torch.Tensor]:
    tensors = []
    for name in names:
        tensor = torch.from_numpy(np.ascontiguousarray(inputs[name])).to(target)
        if half and tensor.is_floating_point():
            tensor = tensor.half()
        tensors.append(tensor)
    return tensors


def _tile(tensors: Sequence[torch.Tensor], copies: int) -> list[torch.Tensor]:
    """(B, ...) -> (copies*B, ...), sample-major: copy s of row b is row s*B + b."""
    return [t.repeat(copies, *([1] * (t.dim() - 1))) for t in tensors]


def _on_device(model: nn.Module, target: torch.device, half: bool) -> nn.Module:
    moved = copy.deepcopy(model).to(target)
    return moved.half() if half else moved


@contextlib.contextmanager
def _autocast(device: Device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.torch_device, dtype=dtype):
        yield


def _runs(num_samples: int, num_rows: int, budget_rows: int) -> Iterator[int]:
    """Samples per run: runs of at most ``budget_rows`` tile rows (at least one sample)."""
    chunk = chunk_samples(num_samples, num_rows, budget_rows)
    done = 0
    while done < num_samples:
        t = min(chunk, num_samples - done)
        yield t
        done += t


def _prefix_once(
    prepared: PreparedReal,
    mc: nn.Module,
    *,
    target: torch.device,
    half: bool,
    budget_rows: int,
    autocast: Callable[[], contextlib.AbstractContextManager[None]],
) -> Call:
    """(b): the backbone once, the head on the tile (head family); the whole model on the
    tile otherwise."""
    spec = prepared.spec
    names = spec.input_names
    split = spec.split(mc) if spec.split is not None else None

    def run(inputs: Inputs, num_samples: int) -> DeviceStats:
        tensors = _torch_inputs(inputs, names, target, half)
        rows = tensors[0].shape[0]
        accumulator = _Accumulator()
        with torch.inference_mode(), autocast():
            if split is not None:
                features = split.backbone(tensors[0])
                head_input = [features]
            else:
                head_input = tensors
            head = split.head if split is not None else mc
            for t in _runs(num_samples, rows, budget_rows):
                logits = head(*_tile(head_input, t))
                accumulator.update(logits.reshape(t, rows, *logits.shape[1:]))
        return accumulator.result()

    return run


def _loop(prepared: PreparedReal, mc: nn.Module, target: torch.device, half: bool) -> Call:
    names = prepared.spec.input_names

    def run(inputs: Inputs, num_samples: int) -> DeviceStats:
        tensors = _torch_inputs(inputs, names, target, half)
        accumulator = _Accumulator()
        with torch.inference_mode():
            for _ in range(num_samples):
                accumulator.update(mc(*tensors)[None])
        return accumulator.result()

    return run


def _eval_pass(prepared: PreparedReal, model: nn.Module, target: torch.device, half: bool) -> Call:
    names = prepared.spec.input_names

    def run(inputs: Inputs, num_samples: int) -> torch.Tensor:
        del num_samples  # one pass whatever T
        tensors = _torch_inputs(inputs, names, target, half)
        with torch.inference_mode():
            out: torch.Tensor = model(*tensors)
        return out

    return run


def _ort_pass(session: ort.InferenceSession, names: Sequence[str]) -> Call:
    def run(inputs: Inputs, num_samples: int) -> list[Any]:
        del num_samples  # one pass whatever T
        out: list[Any] = session.run(None, {name: inputs[name] for name in names})
        return out

    return run


def _engine_call(engine: McEngine) -> Call:
    def run(inputs: Inputs, num_samples: int) -> object:
        return engine.run(inputs, num_samples)[0]

    return run


def check_deterministic(call: Call, inputs: Inputs) -> None:
    """Copies of one row in one run, and two runs, give the same outputs: no dropout is left.

    (Two runs alone would not do: ONNX Runtime's CPU Dropout can draw the same mask in every
    run of a session.)
    """
    copies = {name: np.repeat(x[:1], 4, axis=0) for name, x in inputs.items()}
    first, second = call(copies, 1), call(copies, 1)
    assert isinstance(first, list)
    assert isinstance(second, list)
    for a, b in zip(first, second, strict=True):
        if not np.allclose(a, b, rtol=1e-3, atol=1e-5) or not np.allclose(
            a, a[:1], rtol=1e-3, atol=1e-5
        ):
            raise NotDeterministic(
                "copies of one row, or two runs, differ: ONNX Runtime kept a stochastic node, "
                "so this is not a deterministic pass"
            )


def _check_provider(key: str, found: str, device: Device) -> None:
    if found != device.provider:
        raise NotOnDevice(f"{key} runs on {found}, not {device.provider}: refused")


def build_real_variants(
    prepared: PreparedReal,
    variants: Sequence[str],
    *,
    device: Device,
    tile_memory_bytes: int,
) -> tuple[dict[str, RealBuilt], dict[str, str]]:
    """Build the variants of one exported model (sessions, device copies: once, not per call).

    Args:
        prepared: the exported model and its PyTorch module.
        variants: keys of :data:`REAL_VARIANTS`.
        device: where they run.
        tile_memory_bytes: the engine's memory budget of one run; (b) runs the same rows.

    Returns:
        ({variant: built}, {variant: one-line error}); a variant that cannot be built (or does
        not run where it must) is left out with its error, the others are still built.
    """
    built: dict[str, RealBuilt] = {}
    errors: dict[str, str] = {}
    target = torch.device(device.torch_device)
    half = prepared.precision == "fp16"
    probe_inputs = prepared.inputs(2)
    engine: McEngine | None = None
    engine_error = ""
    budget_rows = 1
    try:  # also when (e) is not asked for: (b) runs the engine's rows per run
        config = SessionConfig(use_gpu=device.cuda)
        engine = build_engine(prepared.source, config, tile_memory_bytes)
        _check_provider("engine", engine.provider, device)
        budget_rows = engine.budget_rows(prepared.inputs(1))
    except Exception as exc:  # the anchors still run; (e) and (b) say why they do not
        engine_error = describe_error(exc)
        engine = None
    mc: nn.Module | None = None
    for key in variants:
        if key in built or key in errors:
            continue
        try:
            if key == "engine":
                if engine is None:
                    raise RuntimeError(engine_error)
                detail = f"{engine.kind}, {budget_rows} tile rows per run"
                built[key] = RealBuilt(_engine_call(engine), [engine.provider], detail)
            elif key == "ort_deterministic":
                session, replaced = deterministic_session(
                    prepared.source.model_path, SessionConfig(use_gpu=device.cuda)
                )
                _check_provider(key, session.get_providers()[0], device)
                ort_call = _ort_pass(session, prepared.spec.input_names)
                check_deterministic(ort_call, probe_inputs)
                built[key] = RealBuilt(
                    ort_call,
                    [session.get_providers()[0]],
                    "default optimizations (EliminateDropout runs)"
                    + (f", {replaced} random draw(s) made constant" if replaced else ""),
                )
            elif key == "torch_eval":
                model = _on_device(prepared.model, target, half).eval()
                built[key] = RealBuilt(
                    _synchronised(_eval_pass(prepared, model, target, half), device),
                    [f"torch {target.type}"],
                    "eval mode, float16" if half else "eval mode",
                )
            else:
                if engine is None and key.startswith("torch_prefix_once"):
                    raise RuntimeError(f"no engine to take its rows per run from: {engine_error}")
                if mc is None:
                    mc = _on_device(mc_dropout_copy(prepared.model), target, half)
                if key == "torch_loop":
                    call_ = _loop(prepared, mc, target, half)
                    detail = "MC mode" + (", float16" if half else "")
                elif key == "torch_prefix_once":
                    call_ = _prefix_once(
                        prepared,
                        mc,
                        target=target,
                        half=half,
                        budget_rows=budget_rows,
                        autocast=contextlib.nullcontext,
                    )
                    detail = _prefix_detail(prepared, budget_rows, "float16" if half else "")
                elif key == "torch_prefix_once_bf16":
                    fp32_mc = _on_device(mc_dropout_copy(prepared.model), target, half=False)
                    call_ = _prefix_once(
                        prepared,
                        fp32_mc,
                        target=target,
                        half=False,
                        budget_rows=budget_rows,
                        autocast=lambda: _autocast(device, torch.bfloat16),
                    )
                    detail = _prefix_detail(prepared, budget_rows, "bf16 autocast")
                else:
                    raise ValueError(f"unknown variant {key!r} (one of {REAL_VARIANT_KEYS})")
                built[key] = RealBuilt(
                    _synchronised(call_, device), [f"torch {target.type}"], detail
                )
        except Exception as exc:  # one variant must not stop the others (recorded)
            errors[key] = describe_error(exc)
    return built, errors


def _prefix_detail(prepared: PreparedReal, budget_rows: int, precision: str) -> str:
    what = (
        "backbone once, head on the tile"
        if prepared.spec.family == "head"
        else "the whole model on the tile"
    )
    return f"{what}, {budget_rows} tile rows per run" + (f", {precision}" if precision else "")
