"""The graphs an engine runs (service.engine.sampler) and the noise they are fed
(service.engine.noise), on hand-built graphs.

Statistical assertions state their false-failure probability; exact ones feed chosen noise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.engine.graph_split import plan_split
from service.engine.noise import (
    PARALLEL_MIN_VALUES,
    NoiseRewriteError,
    NoiseSpec,
    SeededNoise,
    StreamNoise,
)
from service.engine.onnx_session import SessionConfig, create_session
from service.engine.runtime import McEngine
from service.engine.sampler import NUM_SAMPLES_INPUT, build_sampler
from service.engine.shapes import GraphShapes, UnknownShape, evaluate_dim
from service.errors import ModelLoadError
from service.repository import parse_config
from tests.unit.test_graph_split import (
    W1,
    W2,
    _model,
    head_graph,
    shape_graph,
    weight_derived_graph,
)

RNG = np.random.default_rng(1)
CPU = SessionConfig(use_gpu=False)
FORMS = ("tiled", "split-graph", "split-sessions")


def config_for(model: onnx.ModelProto, semantics: str = "values") -> Any:
    """A config.json for a hand-built graph: float32 inputs and outputs, batch first."""

    def spec(value: onnx.ValueInfoProto) -> dict[str, Any]:
        dims = [d.dim_value or -1 for d in value.type.tensor_type.shape.dim]
        return {"name": value.name, "dtype": "float32", "shape": [-1, *dims[1:]]}

    outputs = [{**spec(o), "semantics": semantics} for o in model.graph.output]
    return parse_config(
        {"task": "regression" if semantics == "values" else "classification",
         "inputs": [spec(i) for i in model.graph.input], "outputs": outputs},
        "m",
    )  # fmt: skip


def engine_for(model: onnx.ModelProto, kind: str = "auto", budget: int = 2**24) -> McEngine:
    return McEngine(model, config_for(model), "m/1", session_config=CPU,
                    tile_memory_bytes=budget, kind=kind)  # type: ignore[arg-type]  # fmt: skip


@pytest.mark.parametrize("kind", FORMS)
@pytest.mark.parametrize("make", [head_graph, weight_derived_graph])
def test_every_form_samples_the_same_function(kind: str, make: Any) -> None:
    """d @ W2 with d = dropout(relu(x @ W1), 0.5): the mean over T samples has expectation
    relu @ W2. A 6-sigma band per element (9 elements; false-failure probability < 1e-8 with
    the normal approximation of a mean of 400 bounded samples)."""
    engine = engine_for(make(), kind)
    assert engine.kind == kind
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    samples = engine.sample({"x": x}, 400)[0]
    assert samples.shape == (400, 3, 3)
    mean, se = samples.mean(axis=0), samples.std(axis=0, ddof=1) / np.sqrt(400)
    assert (np.abs(mean - np.maximum(x @ W1, 0) @ W2) < 6 * se).all()


@pytest.mark.parametrize("kind", FORMS)
def test_shape_computations_run_on_the_tile(kind: str) -> None:
    """Every sample of every element is 0 or exactly 2x the deterministic value, row b of each
    sample coming from input row b, and each element is kept in some samples and dropped in
    others (all 200 agreeing has probability 2^-199 per element)."""
    engine = engine_for(shape_graph(), kind)
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    samples = engine.sample({"x": x}, 200)[0].reshape(200, 3, 8)
    relu = np.maximum(x @ W1, 0)
    kept = samples != 0
    np.testing.assert_allclose(samples[kept], np.broadcast_to(2 * relu, samples.shape)[kept],
                               rtol=1e-5)  # fmt: skip
    fraction = kept.mean(axis=0)[relu > 0]
    assert (fraction > 0).all()
    assert (fraction < 1).all()


def inplace_dropout_graph() -> onnx.ModelProto:
    """torchvision's in-place dropout as exported: uniforms drawn for a tensor computed only
    for its shape (``e``), compared with the keep probability, the mask scaled and applied."""
    return _model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Sub", ["r", "r"], ["e"]),
         helper.make_node("RandomUniformLike", ["e"], ["u"]),
         helper.make_node("Less", ["u", "ratio"], ["keep"]),
         helper.make_node("Cast", ["keep"], ["keep_x"], to=TensorProto.FLOAT),
         helper.make_node("Div", ["keep_x", "ratio"], ["mask"]),
         helper.make_node("Mul", ["r", "mask"], ["d"]),
         helper.make_node("MatMul", ["d", "w2"], ["y"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["split-graph", "split-sessions"])
def test_a_tensor_read_only_for_its_shape_is_not_tiled(kind: str) -> None:
    """``e`` crosses the cut, but the fed graph reads only its shape: one Tile (``r``'s), and
    each element is kept exactly where its fed uniform is below the keep probability."""
    model = inplace_dropout_graph()
    plan = plan_split(model)
    assert set(plan.cut) == {"r", "e"}
    graph = build_sampler(model, config_for(model), plan, kind,  # type: ignore[arg-type]
                          GraphShapes(model), native=False)  # fmt: skip
    tiles = [n for n in graph.model.graph.node if n.op_type == "Tile"]
    assert [n.input[0] for n in tiles] == ["r__mcd_tiled__flat"]
    assert {name for made, _ in graph.tile_steps[:1] for name in made} == {"r"}
    session = create_session(graph.model.SerializeToString(), CPU)
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    data = {"x": x} if kind == "split-graph" else {
        "r": np.maximum(x @ W1, 0), "e": np.zeros((2, 8), np.float32)}  # fmt: skip
    uniforms = np.tile(np.array([0.25, 0.75], np.float32), 3 * 2 * 4)  # t = 3 samples
    feed = {**data, NUM_SAMPLES_INPUT: np.array([3], np.int64), graph.noise[0].name: uniforms}
    y = session.run([graph.raw[0]], feed)[0]
    kept = np.where(uniforms.reshape(6, 8) < 0.5, 2.0 * np.tile(np.maximum(x @ W1, 0), (3, 1)), 0)
    np.testing.assert_allclose(y, kept @ W2, rtol=1e-5)
    samples = engine_for(model, kind).sample({"x": x}, 50)[0]
    assert samples.shape == (50, 2, 3)


def test_deterministic_outputs_are_tiled_with_the_others() -> None:
    model = _model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Dropout", ["r", "ratio", "training"], ["d"]),
         helper.make_node("MatMul", ["d", "w2"], ["y"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, ["batch", 8])],
    )  # fmt: skip
    assert plan_split(model).tiled_outputs == ("r",)
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    for kind in FORMS:
        y, r = engine_for(model, kind).sample({"x": x}, 5)
        assert y.shape == (5, 2, 3)
        np.testing.assert_allclose(r, np.broadcast_to(np.maximum(x @ W1, 0), (5, 2, 8)),
                                   rtol=1e-6)  # fmt: skip


def _fed_session(model: onnx.ModelProto) -> tuple[Any, Any]:
    graph = build_sampler(model, config_for(model), plan_split(model), "tiled",
                          GraphShapes(model), native=False)  # fmt: skip
    return graph, create_session(graph.model.SerializeToString(), CPU)


def test_fed_dropout_keeps_where_the_draw_reaches_the_rate() -> None:
    """p = 0.5: an element is kept (scaled by 2) exactly where its 32-bit draw >= 2^31."""
    graph, session = _fed_session(head_graph())
    (noise,) = graph.noise
    assert (noise.kind, noise.dims) == ("bits", ("batch", 8))
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    bits = np.array([2**31 - 1, 2**31] * 8, np.uint32)  # drop, keep, drop, keep...
    feed = {"x": x, NUM_SAMPLES_INPUT: np.array([1], np.int64), noise.name: bits}
    y = session.run([graph.raw[0]], feed)[0]
    kept = np.where(bits.reshape(2, 8) >= 2**31, 2.0 * np.maximum(x @ W1, 0), 0.0)
    np.testing.assert_allclose(y, kept @ W2, rtol=1e-5)


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.9])
def test_fed_dropout_uses_the_graphs_rate(rate: float) -> None:
    """The keep threshold is round(rate * 2^32): draws just below it drop, at it keep."""
    model = head_graph()
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.array(rate, np.float32),
                                                                "ratio"))  # fmt: skip
    graph, session = _fed_session(model)
    threshold = round(float(np.float32(rate)) * 2**32)
    bits = np.array([threshold - 1, threshold] * 4, np.uint32)
    x = np.ones((1, 4), np.float32)
    feed = {"x": x, NUM_SAMPLES_INPUT: np.array([1], np.int64), graph.noise[0].name: bits}
    y = session.run([graph.raw[0]], feed)[0]
    relu = np.maximum(x @ W1, 0)[0]
    kept = np.where(np.arange(8) % 2 == 1, relu / (1 - np.float32(rate)), 0.0)
    np.testing.assert_allclose(y[0], kept @ W2, rtol=1e-5)


def test_fed_random_uniform_like_maps_the_uniforms_to_its_range() -> None:
    model = _model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("RandomUniformLike", ["h"], ["r"], low=2.0, high=6.0),
         helper.make_node("Add", ["h", "r"], ["y"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
    )  # fmt: skip
    graph, session = _fed_session(model)
    assert graph.noise[0].kind == "uniform"
    x = RNG.standard_normal((1, 4)).astype(np.float32)
    u = np.full(8, 0.25, np.float32)
    feed = {"x": x, NUM_SAMPLES_INPUT: np.array([1], np.int64), graph.noise[0].name: u}
    y = session.run([graph.raw[0]], feed)[0]
    np.testing.assert_allclose(y, x @ W1 + 3.0, rtol=1e-5)  # 2 + 0.25 * (6 - 2)


def test_fed_random_normal_like_scales_the_normals() -> None:
    model = _model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("RandomNormalLike", ["h"], ["r"], mean=1.0, scale=3.0),
         helper.make_node("Add", ["h", "r"], ["y"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
    )  # fmt: skip
    graph, session = _fed_session(model)
    assert graph.noise[0].kind == "normal"
    x = RNG.standard_normal((1, 4)).astype(np.float32)
    z = np.linspace(-1, 1, 8, dtype=np.float32)
    feed = {"x": x, NUM_SAMPLES_INPUT: np.array([1], np.int64), graph.noise[0].name: z}
    y = session.run([graph.raw[0]], feed)[0]
    np.testing.assert_allclose(y[0], (x @ W1)[0] + 1.0 + 3.0 * z, rtol=1e-5)


def test_random_nodes_that_cannot_draw_per_element_are_refused() -> None:
    model = _model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("RandomUniform", [], ["r"], shape=[8]),
         helper.make_node("Add", ["h", "r"], ["y"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
    )  # fmt: skip
    with pytest.raises(NoiseRewriteError, match="RandomUniform node"):
        _fed_session(model)
    with pytest.raises(ModelLoadError, match="cannot draw per element"):
        engine_for(model)


def test_randomness_inside_a_subgraph_is_refused() -> None:
    branch = helper.make_graph(
        [helper.make_node("Dropout", ["x", "ratio", "training"], ["o"])], "b", [],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["batch", 4])],
    )  # fmt: skip
    model = _model(
        [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
         helper.make_node("Cast", ["m"], ["c"], to=TensorProto.BOOL),
         helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )  # fmt: skip
    with pytest.raises(NoiseRewriteError, match="inside the If"):
        _fed_session(model)


def test_seeded_noise_depends_on_the_seed_and_the_row_only() -> None:
    graph, _ = _fed_session(head_graph())
    row = np.arange(4, dtype=np.float32)

    def draw(seed: int, values: np.ndarray) -> np.ndarray:
        source = SeededNoise(seed, [values], len(graph.noise))
        return source.draw(graph.noise, [8], samples=3, rows=1)[graph.noise[0].name]

    first = draw(7, row)
    assert first.shape == (24,)
    np.testing.assert_array_equal(first, draw(7, row.copy()))
    assert not np.array_equal(first, draw(8, row))
    assert not np.array_equal(first, draw(7, row + 1))
    with pytest.raises(ValueError, match="one row at a time"):
        SeededNoise(7, [row], 1).draw(graph.noise, [8], samples=1, rows=2)


def test_unseeded_streams_are_per_thread_and_continue() -> None:
    """Two threads never share a stream, and one thread's successive draws differ."""
    import threading

    streams = StreamNoise()
    seen: list[np.ndarray] = []

    def grab() -> None:
        generator = streams.generator()
        assert generator is streams.generator()  # the same stream on every call of a thread
        seen.append(generator.bit_generator.random_raw(4))

    threads = [threading.Thread(target=grab) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not np.array_equal(seen[0], seen[1])
    generator = streams.generator()
    assert not np.array_equal(generator.bit_generator.random_raw(4),
                              generator.bit_generator.random_raw(4))  # fmt: skip


@pytest.mark.parametrize("kind", ["bits", "uniform", "normal"])
def test_several_threads_fill_each_kind_of_noise(kind: str) -> None:
    """Above PARALLEL_MIN_VALUES a draw is cut into one segment per thread: every value is
    filled (an odd count of bits too), in its kind's range, and the segments come from
    different streams: the sign agreement of values i and i + half is a fair coin, within
    Hoeffding's bound at 1e-6 (one stream would agree everywhere)."""
    count = 2 * PARALLEL_MIN_VALUES + 1
    spec = NoiseSpec("n", kind, "t", (None,), "node")  # type: ignore[arg-type]
    streams = StreamNoise(threads=2)
    (values,) = streams.draw([spec], [count], 1, 1).values()
    assert values.shape == (count,)
    assert values.dtype == (np.uint32 if kind == "bits" else np.float32)
    centred = values.astype(np.float64) - {"bits": 2.0**31, "uniform": 0.5, "normal": 0.0}[kind]
    if kind == "uniform":
        assert values.min() >= 0.0
        assert values.max() < 1.0
    assert np.all(np.isfinite(centred))
    half = count // 2
    agree = np.sign(centred[:half]) == np.sign(centred[half : 2 * half])
    bound = np.sqrt(2 * np.log(2 / 1e-6) / half)
    assert abs(2 * agree.mean() - 1) < bound
    again = streams.draw([spec], [count], 1, 1)["n"]
    assert not np.array_equal(values, again)


@pytest.mark.parametrize(
    ("dim", "expected"), [(5, 5), ("seq", 16), ("2*seq", 32), ("(seq+1)//2", 8), ("batch*seq", 16)]
)
def test_dims_evaluate_from_the_request_symbols(dim: Any, expected: int) -> None:
    assert evaluate_dim(dim, {"batch": 1, "seq": 16}) == expected


@pytest.mark.parametrize("dim", [None, "", "other", "seq**2", "__import__('os')"])
def test_dims_that_cannot_be_evaluated_say_so(dim: Any) -> None:
    with pytest.raises(UnknownShape):
        evaluate_dim(dim, {"batch": 1, "seq": 16})


def test_chunks_are_sized_from_the_part_on_the_tile() -> None:
    """A prefix 512 wide before a dropout on 4 values: the split forms' tile holds only the
    suffix's tensors, so their runs take many more rows than the tiled form's."""
    wide = RNG.standard_normal((4, 512)).astype(np.float32)
    narrow = RNG.standard_normal((512, 4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "wide"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "narrow"], ["c"]),
        helper.make_node("Dropout", ["c", "ratio", "training"], ["y"]),
    ]
    init = [numpy_helper.from_array(wide, "wide"), numpy_helper.from_array(narrow, "narrow"),
            numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
            numpy_helper.from_array(np.array(True), "training")]  # fmt: skip
    graph = helper.make_graph(
        nodes, "wide_prefix", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])], init,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    x = np.ones((1, 4), np.float32)
    tiled = engine_for(model, "tiled").budget_rows({"x": x})
    for kind in ("split-graph", "split-sessions"):
        assert engine_for(model, kind).budget_rows({"x": x}) > 20 * tiled


def _chain(width: int, layers: int, *, skip: bool = False, outer_read: bool = False) -> Any:
    """x -> Relu -> ... (``layers`` tensors of ``width`` float32 per row) -> Dropout -> y; with
    ``skip``, y = dropout(h_last) + x (x read at the end); with ``outer_read``, the last node
    is an If whose branches read x from the outer scope."""
    nodes, previous = [], "x"
    for k in range(layers):
        nodes.append(helper.make_node("Relu", [previous], [f"h{k}"]))
        previous = f"h{k}"
    nodes.append(helper.make_node("Dropout", [previous, "ratio", "training"], ["d"]))
    initializers = [numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
                    numpy_helper.from_array(np.array(True), "training")]  # fmt: skip
    if skip:
        nodes.append(helper.make_node("Add", ["d", "x"], ["y"]))
    elif outer_read:
        branch = helper.make_graph(
            [helper.make_node("Add", ["d", "x"], ["z"])], "branch", [],
            [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        )  # fmt: skip
        initializers.append(numpy_helper.from_array(np.array(True), "cond"))
        nodes.append(helper.make_node("If", ["cond"], ["y"], then_branch=branch,
                                      else_branch=branch))  # fmt: skip
    else:
        nodes.append(helper.make_node("Identity", ["d"], ["y"]))
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], initializers,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


@pytest.mark.parametrize(
    ("options", "held"),
    [
        ({}, 2),  # a chain: the tensor read and the one made (the output kept to the end)
        ({"skip": True}, 3),  # x is read again at the end: it stays
        ({"outer_read": True}, 3),  # read inside the If's branches: it stays too
    ],
)
def test_a_run_holds_the_tensors_not_yet_read_for_the_last_time(
    options: dict[str, bool], held: int
) -> None:
    """The memory estimate of a run is the peak of the tensors alive at once (ONNX Runtime
    reuses a buffer after its last reader), not the sum of every tensor of the tile."""
    width, layers = 256, 12
    engine = engine_for(_chain(width, layers, **options), "tiled")
    sampler = engine._fed
    assert sampler is not None
    steps = sampler.graph.tile_steps
    peak, unknown = engine._shapes.peak_row_bytes(steps, {"batch": 1})
    assert unknown == 0
    assert peak == held * width * 4
    total, _ = engine._shapes.row_bytes([n for made, _ in steps for n in made], {"batch": 1})
    assert total >= (layers + 2) * width * 4  # what the sum would have said


def test_a_deep_chain_gets_chunks_of_its_peak_not_of_its_sum() -> None:
    """A 60-layer chain with a budget of 100 rows at its peak runs 100 rows per run; the sum
    of its 62 tensors alone is over four times that estimate (fewer than 25 rows)."""
    width, layers = 256, 60
    probe = engine_for(_chain(width, layers), "tiled")
    x = np.ones((1, width), np.float32)
    per_row = probe.tile_memory_bytes // probe.budget_rows({"x": x})
    assert (layers + 2) * width * 4 > 4 * per_row
    engine = engine_for(_chain(width, layers), "tiled", budget=100 * per_row)
    assert engine.budget_rows({"x": x}) == 100


def test_io_binding_path_gives_the_same_answers() -> None:
    """The CUDA path (prefix outputs left on the device, bound as the sampler's inputs) run on
    the CPU: seeded answers are bit-identical to the plain path's."""
    model = head_graph()
    plain = engine_for(model, "split-sessions")
    bound = McEngine(model, config_for(model), "m/1", session_config=CPU,
                     tile_memory_bytes=2**24, io_binding=True)  # fmt: skip
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    (a,) = plain.run({"x": x}, 70, seed=5)
    (b,) = bound.run({"x": x}, 70, seed=5)
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.variance, b.variance)
    (unseeded,) = bound.run({"x": x}, 400)
    assert unseeded.mean.shape == (3, 3)


def test_batch_buckets_pad_runs_and_answer_the_real_rows() -> None:
    model = head_graph()
    e = McEngine(model, config_for(model), "m/1", session_config=CPU, tile_memory_bytes=2**24,
                 batch_buckets=(8, 4))  # fmt: skip
    assert e.batch_buckets == (4, 8)
    assert [e._bucket(n) for n in (1, 4, 5, 9)] == [4, 4, 8, 9]
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    (stats,) = e.run({"x": x}, 400, keep_samples=True)
    assert stats.mean.shape == (3, 3)
    assert stats.samples is not None
    assert stats.samples.shape == (3, 400, 3)
    # 6-sigma band per element as in test_every_form_samples_the_same_function
    se = np.sqrt(stats.variance / 400)
    assert (np.abs(stats.mean - np.maximum(x @ W1, 0) @ W2) < 6 * se).all()
    assert (
        McEngine(
            model, config_for(model), "m/1", session_config=CPU, tile_memory_bytes=2**24
        ).batch_buckets
        == ()
    )  # none on the CPU by default
