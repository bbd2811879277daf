"""Where the randomness of the stochastic passes comes from: noise drawn by numpy, fed to the
graph.

ONNX Runtime's CPU Dropout kernel reseeds a minstd_rand0 engine with consecutive seeds every
run, so its masks are strongly correlated across runs (docs/sampling.md). So at load time
every stochastic node of the graph is rewritten to take its randomness from a graph input
(:func:`feed_noise`), and the engine draws that input with numpy:

* ``Dropout(x, ratio, training_mode=true)`` keeps an element where a uniform 32-bit draw is at
  least ``round(ratio * 2**32)`` (so P(keep) = 1 - ratio within 2**-33) and scales the kept
  ones by ``1 / (1 - ratio)``: inverted dropout with the graph's own rate, per element.
* ``RandomUniformLike`` takes float32 uniforms in [0, 1) with 24 random bits (numpy's and
  PyTorch's float32 uniforms), mapped to [low, high); the exporter writes dropout this way
  for in-place dropout (``rand < keep``, then scaling) and channel dropout (Dropout2d/3d, on an
  (N, C, 1, 1) tensor, so the masks stay per channel).
* ``RandomNormalLike`` takes float32 standard normals, scaled and shifted.

Each noise input is a flat vector, reshaped in the graph to the shape of the node's input, so
the engine only needs its element count per input row (``service.engine.shapes``), which
follows the request's sequence length and the like.

Two sources fill it, with one mechanism (:class:`NoiseSource`):

* unseeded: one PCG64DXSM stream per worker thread, spawned from a root ``SeedSequence`` drawn
  from fresh OS entropy once per process (again after fork), never reseeded: draws are
  independent across elements, samples, rows, chunks, runs, requests and processes;
* seeded: per row, streams seeded by (seed, the row's bytes, the noise input's index), so a row
  gets the same noise wherever it sits (``Predict.seed``).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from service.engine.shapes import Dim, GraphShapes, row_elements

__all__ = [
    "STOCHASTIC_OPS",
    "NoiseRewriteError",
    "NoiseSource",
    "NoiseSpec",
    "SeededNoise",
    "StreamNoise",
    "feed_noise",
    "is_stochastic",
]

STOCHASTIC_OPS = frozenset(
    {"Dropout", "RandomUniformLike", "RandomNormalLike", "RandomUniform", "RandomNormal",
     "Multinomial", "Bernoulli"}
)  # fmt: skip

NoiseKind = Literal["bits", "uniform", "normal"]
_NOISE_KIND: dict[str, NoiseKind] = {
    "Dropout": "bits",
    "RandomUniformLike": "uniform",
    "RandomNormalLike": "normal",
}


def is_stochastic(node: onnx.NodeProto) -> bool:
    """Whether a node draws random numbers (a Dropout without a training_mode input is an
    identity at inference)."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in STOCHASTIC_OPS:
        return False
    return node.op_type != "Dropout" or (len(node.input) >= 3 and bool(node.input[2]))


class NoiseRewriteError(ValueError):
    """The graph has a random node whose noise cannot be fed from outside."""


@dataclass(frozen=True)
class NoiseSpec:
    """One noise input of a rewritten graph.

    Attributes:
        name: the graph input, a flat vector (uint32 for ``bits``, float32 otherwise).
        kind: ``bits``: uniform 32-bit integers; ``uniform``: float32 in [0, 1) with 24 random
            bits (numpy's and PyTorch's float32 uniforms); ``normal``: float32 standard normals.
        tensor: the tensor whose shape the noise takes (the stochastic node's input).
        dims: that tensor's dims in the original graph (batch symbol first).
        node: the name of the node that was rewritten, for messages.
    """

    name: str
    kind: NoiseKind
    tensor: str
    dims: tuple[Dim, ...]
    node: str

    def row_elements(self, symbols: Mapping[str, int]) -> int:
        """Noise values per input row and sample."""
        return row_elements(self.dims, symbols)


@dataclass(frozen=True)
class NoiseRewrite:
    """The nodes of a graph with every stochastic node fed from a noise input."""

    nodes: tuple[onnx.NodeProto, ...]
    initializers: tuple[onnx.TensorProto, ...]
    inputs: tuple[onnx.ValueInfoProto, ...]
    noise: tuple[NoiseSpec, ...]


def _constant_value(name: str, constants: Mapping[str, NDArray[Any]]) -> float | None:
    value = constants.get(name)
    if value is None or value.size != 1:
        return None
    return float(value.reshape(()).item())


def graph_constants(graph: onnx.GraphProto) -> dict[str, NDArray[Any]]:
    """Initializers and Constant node values of a graph, by tensor name."""
    constants: dict[str, NDArray[Any]] = {
        i.name: numpy_helper.to_array(i) for i in graph.initializer
    }
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attribute in node.attribute:
                if attribute.name == "value":
                    constants[node.output[0]] = numpy_helper.to_array(attribute.t)
                elif attribute.name in ("value_float", "value_int"):
                    constants[node.output[0]] = np.asarray(helper.get_attribute_value(attribute))
    return constants


def feed_noise(
    nodes: Sequence[onnx.NodeProto],
    shapes: GraphShapes,
    constants: Mapping[str, NDArray[Any]],
    aliases: Mapping[str, str] | None = None,
) -> NoiseRewrite:
    """Rewrite every stochastic node of ``nodes`` to take its randomness from a noise input.

    Args:
        nodes: the nodes of the graph that runs on the tile, in order.
        shapes: the shapes of the original graph (the dims of each node's input).
        constants: initializer and Constant values (a Dropout's ratio, usually one).
        aliases: tensor names of ``nodes`` -> their names in the original graph (tiled copies
            are renamed), for looking up shapes.

    Raises:
        NoiseRewriteError: a random node other than Dropout, RandomUniformLike and
            RandomNormalLike (RandomUniform/RandomNormal with a fixed shape, Multinomial,
            Bernoulli): they cannot draw per element of the tile.
    """
    out: list[onnx.NodeProto] = []
    initializers: dict[str, onnx.TensorProto] = {}
    noise: list[NoiseSpec] = []

    def const(name: str, value: NDArray[Any]) -> str:
        if name not in initializers:
            initializers[name] = numpy_helper.from_array(value, name)
        return name

    for node in nodes:
        if not is_stochastic(node):
            out.append(node)
            continue
        if node.op_type not in ("Dropout", "RandomUniformLike", "RandomNormalLike"):
            raise NoiseRewriteError(
                f"{node.op_type} node {node.name!r} cannot draw per element of the tile "
                "(only Dropout, RandomUniformLike and RandomNormalLike can)"
            )
        source = node.input[0]
        original = (aliases or {}).get(source, source)
        k = len(noise)
        kind = _NOISE_KIND[node.op_type]
        spec = NoiseSpec(
            name=f"mcd_noise_{k}",
            kind=kind,
            tensor=source,
            dims=shapes.dims(original) or (None,),
            node=node.name or node.op_type,
        )
        noise.append(spec)
        p = f"mcd_noise_{k}_"
        # The flat noise takes the node input's shape at run time.
        out += [
            helper.make_node("Shape", [source], [p + "shape"]),
            helper.make_node("Reshape", [spec.name, p + "shape"], [p + "draws"]),
        ]
        elem = shapes.elem_type(original)
        if node.op_type == "Dropout":
            out += _dropout(node, p, elem, constants, const)
        elif node.op_type == "RandomUniformLike":
            out += _uniform_like(node, p, elem, const)
        else:
            out += _normal_like(node, p, elem, const)
    inputs = tuple(
        helper.make_tensor_value_info(
            n.name, TensorProto.UINT32 if n.kind == "bits" else TensorProto.FLOAT, ["mcd_noise"]
        )
        for n in noise
    )
    return NoiseRewrite(tuple(out), tuple(initializers.values()), inputs, tuple(noise))


def _dropout(
    node: onnx.NodeProto,
    p: str,
    elem: int,
    constants: Mapping[str, NDArray[Any]],
    const: Any,
) -> list[onnx.NodeProto]:
    """y = x * (draws >= threshold) * 1 / (1 - ratio); the mask output is the keep mask."""
    source = node.input[0]
    np_dtype = helper.tensor_dtype_to_np_dtype(elem)
    ratio_name = node.input[1] if len(node.input) > 1 and node.input[1] else ""
    ratio = 0.5 if not ratio_name else _constant_value(ratio_name, constants)
    nodes: list[onnx.NodeProto] = []
    if ratio is not None:
        if not 0.0 <= ratio <= 1.0:
            raise NoiseRewriteError(f"Dropout {node.name!r} has ratio {ratio}, not in [0, 1]")
        threshold = min(round(ratio * 2.0**32), 2**32 - 1)
        nodes.append(
            helper.make_node(
                "GreaterOrEqual",
                [p + "draws", const(p + "threshold", np.array(threshold, np.uint32))],
                [p + "keep"],
            )
        )
        scale = const(p + "scale", np.array(0.0 if ratio >= 1.0 else 1.0 / (1.0 - ratio), np_dtype))
    else:  # a ratio computed in the graph: the threshold and scale are computed there too
        nodes += [
            helper.make_node("Cast", [ratio_name], [p + "ratio64"], to=TensorProto.DOUBLE),
            helper.make_node(
                "Mul", [p + "ratio64", const(p + "two32", np.array(2.0**32))], [p + "thr64"]
            ),
            helper.make_node(
                "Min", [p + "thr64", const(p + "max32", np.array(2.0**32 - 1))], [p + "thr_c"]
            ),
            helper.make_node("Round", [p + "thr_c"], [p + "thr_r"]),
            helper.make_node("Cast", [p + "thr_r"], [p + "threshold"], to=TensorProto.UINT32),
            helper.make_node("GreaterOrEqual", [p + "draws", p + "threshold"], [p + "keep"]),
            helper.make_node("Sub", [const(p + "one", np.array(1.0)), p + "ratio64"], [p + "kf"]),
            helper.make_node("Reciprocal", [p + "kf"], [p + "scale64"]),
            helper.make_node("Cast", [p + "scale64"], [p + "scale"], to=elem),
        ]
        scale = p + "scale"
    nodes += [
        helper.make_node("Cast", [p + "keep"], [p + "keep_x"], to=elem),
        helper.make_node("Mul", [source, p + "keep_x"], [p + "kept"]),
        helper.make_node("Mul", [p + "kept", scale], [node.output[0]]),
    ]
    if len(node.output) > 1 and node.output[1]:
        nodes.append(helper.make_node("Identity", [p + "keep"], [node.output[1]]))
    return nodes


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _uniform_like(node: onnx.NodeProto, p: str, elem: int, const: Any) -> list[onnx.NodeProto]:
    """low + (high - low) * u in the node's dtype, u the fed float32 uniforms in [0, 1); the
    usual [0, 1) float32 case takes the noise as it is."""
    attrs = _attributes(node)
    low, high = float(attrs.get("low", 0.0)), float(attrs.get("high", 1.0))
    dtype = int(attrs.get("dtype", elem))
    value = p + "draws"
    nodes: list[onnx.NodeProto] = []
    if (low, high) != (0.0, 1.0):
        nodes += [
            helper.make_node("Mul", [value, const(p + "width", np.array(high - low, np.float32))],
                             [p + "wide"]),
            helper.make_node("Add", [p + "wide", const(p + "low", np.array(low, np.float32))],
                             [p + "uniform"]),
        ]  # fmt: skip
        value = p + "uniform"
    if dtype == TensorProto.FLOAT:
        nodes.append(helper.make_node("Identity", [value], [node.output[0]]))
    else:
        nodes.append(helper.make_node("Cast", [value], [node.output[0]], to=dtype))
    return nodes


def _normal_like(node: onnx.NodeProto, p: str, elem: int, const: Any) -> list[onnx.NodeProto]:
    """mean + scale * z, z the fed standard normals, in the node's dtype."""
    attrs = _attributes(node)
    mean, scale = float(attrs.get("mean", 0.0)), float(attrs.get("scale", 1.0))
    dtype = int(attrs.get("dtype", elem))
    return [
        helper.make_node("Mul", [p + "draws", const(p + "sd", np.array(scale, np.float32))],
                         [p + "scaled"]),
        helper.make_node("Add", [p + "scaled", const(p + "mean", np.array(mean, np.float32))],
                         [p + "normal"]),
        helper.make_node("Cast", [p + "normal"], [node.output[0]], to=dtype),
    ]  # fmt: skip


# -- drawing the noise ---------------------------------------------------------------------


def _draw(generator: np.random.Generator, kind: NoiseKind, count: int) -> NDArray[Any]:
    """``count`` uniform uint32 values (``bits``), float32 uniforms or float32 normals."""
    if kind == "normal":
        return generator.standard_normal(count, dtype=np.float32)
    if kind == "uniform":
        return generator.random(count, dtype=np.float32)
    # random_raw gives 64 uniform bits per call: two draws each, the cheapest numpy source.
    raw = generator.bit_generator.random_raw((count + 1) // 2)
    bits: NDArray[np.uint32] = np.asarray(raw).view(np.uint32)[:count]
    return bits


class NoiseSource:
    """Fills the noise inputs of one session run."""

    def draw(
        self, noise: Sequence[NoiseSpec], row_sizes: Sequence[int], samples: int, rows: int
    ) -> dict[str, NDArray[Any]]:
        """The noise of ``samples`` samples of ``rows`` rows, sample-major.

        Args:
            noise: the graph's noise inputs.
            row_sizes: elements per input row and sample of each noise input.
            samples: t, the samples in this run.
            rows: B, the rows in this run.
        """
        raise NotImplementedError


#: Values per run below which one thread draws all the noise (handing a part to another
#: thread costs tens of microseconds, drawing 2**17 values about 0.25 ms on one core).
PARALLEL_MIN_VALUES = 1 << 17

_pool_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None


def _draw_pool() -> ThreadPoolExecutor:
    """The process's noise-drawing threads (made again after a fork: threads do not survive
    one); it starts threads on demand, up to one fewer than the usable CPUs (the caller draws
    a segment itself)."""
    global _pool  # noqa: PLW0603 (one pool per process)
    pid = os.getpid()
    with _pool_lock:
        if _pool is None or _pool[0] != pid:
            workers = max(1, usable_cpus() - 1)
            _pool = (pid, ThreadPoolExecutor(workers, thread_name_prefix="mcd-noise"))
        return _pool[1]


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _fill(generator: np.random.Generator, kind: NoiseKind, out: NDArray[Any]) -> None:
    """Fill a segment of a noise input in place (the bits segment has an even length)."""
    if kind == "normal":
        generator.standard_normal(dtype=np.float32, out=out)
    elif kind == "uniform":
        generator.random(dtype=np.float32, out=out)
    else:
        out.view(np.uint64)[...] = generator.bit_generator.random_raw(out.size // 2)


class StreamNoise(NoiseSource):
    """Unseeded noise: one PCG64DXSM stream per thread, spawned from one root SeedSequence of
    fresh OS entropy per process; streams are never reseeded, so consecutive runs continue the
    same stream instead of restarting it.

    A run's noise is drawn by up to ``threads`` threads when it holds at least
    :data:`PARALLEL_MIN_VALUES` values: each noise input is cut into that many contiguous
    segments, and thread j fills segment j of every input from its own stream (numpy draws
    without holding the GIL). The noise is drawn between the request's session runs, while its
    own ONNX Runtime threads wait.

    Args:
        threads: threads that draw one run's noise (0: the CPUs this process may use).
    """

    def __init__(self, threads: int = 1) -> None:
        self._lock = threading.Lock()
        self._root: np.random.SeedSequence | None = None
        self._pid = -1
        self._local = threading.local()
        self.threads = usable_cpus() if threads <= 0 else threads

    def generator(self) -> np.random.Generator:
        """This thread's generator (created on the thread's first call, in this process)."""
        pid = os.getpid()
        local = self._local
        if getattr(local, "pid", None) != pid:
            with self._lock:
                if self._pid != pid:  # a new process (after fork): fresh entropy
                    self._root, self._pid = np.random.SeedSequence(), pid
                assert self._root is not None
                child = self._root.spawn(1)[0]
            local.generator = np.random.Generator(np.random.PCG64DXSM(child))
            local.pid = pid
        generator: np.random.Generator = local.generator
        return generator

    def draw(
        self, noise: Sequence[NoiseSpec], row_sizes: Sequence[int], samples: int, rows: int
    ) -> dict[str, NDArray[Any]]:
        counts = [samples * rows * size for size in row_sizes]
        parts = min(self.threads, sum(counts) // PARALLEL_MIN_VALUES)
        if parts < 2:
            generator = self.generator()
            return {n.name: _draw(generator, n.kind, c) for n, c in zip(noise, counts, strict=True)}
        buffers = [
            np.empty(c + c % 2, np.uint32 if n.kind == "bits" else np.float32)
            for n, c in zip(noise, counts, strict=True)
        ]
        # Segment j of every input goes to thread j; boundaries even (bits fill 64 at a time).
        segments: list[list[tuple[NoiseKind, NDArray[Any]]]] = [[] for _ in range(parts)]
        for spec, buffer in zip(noise, buffers, strict=True):
            bounds = [2 * round(buffer.size * j / parts / 2) for j in range(parts + 1)]
            for j in range(parts):
                if bounds[j + 1] > bounds[j]:
                    segments[j].append((spec.kind, buffer[bounds[j] : bounds[j + 1]]))

        def fill(work: list[tuple[NoiseKind, NDArray[Any]]]) -> None:
            generator = self.generator()
            for kind, out in work:
                _fill(generator, kind, out)

        pool = _draw_pool()
        futures = [pool.submit(fill, work) for work in segments[1:]]
        fill(segments[0])
        for future in futures:
            future.result()
        return {n.name: b[:c] for n, b, c in zip(noise, buffers, counts, strict=True)}


class SeededNoise(NoiseSource):
    """Reproducible noise for one row: per noise input, a stream seeded by (seed, the row's
    bytes, the input's index); successive draws continue the streams. Runs hold this one row
    only (``rows == 1``), so a row's noise never depends on its batch or position.

    Args:
        seed: the request's seed.
        row: the row's input arrays, in the model's input order.
        count: the number of noise inputs.
    """

    def __init__(self, seed: int, row: Sequence[NDArray[Any]], count: int) -> None:
        digest = hashlib.sha256(seed.to_bytes(8, "little"))
        for part in row:
            digest.update(np.ascontiguousarray(part).tobytes())
        words = np.frombuffer(digest.digest(), dtype=np.uint32).tolist()
        self._generators = [
            np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence([*words, k])))
            for k in range(count)
        ]

    def draw(
        self, noise: Sequence[NoiseSpec], row_sizes: Sequence[int], samples: int, rows: int
    ) -> dict[str, NDArray[Any]]:
        if rows != 1:
            raise ValueError(f"seeded noise is drawn for one row at a time, got {rows}")
        return {
            n.name: _draw(g, n.kind, samples * size)
            for n, size, g in zip(noise, row_sizes, self._generators, strict=True)
        }
