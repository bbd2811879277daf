"""Regression guard: the server's sessions must keep their Dropout nodes stochastic.

ONNX Runtime's EliminateDropout optimizer deletes every Dropout whose mask output is unused,
whatever training_mode says. The control test shows that the trap is real in the pinned
onnxruntime; the guard test fails if service.engine.onnx_session ever stops disabling it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from service.engine.onnx_session import (
    DISABLED_OPTIMIZERS,
    SessionConfig,
    create_session,
    seed_process_rng,
)


def dropout_model(p: float = 0.5, opset: int = 18) -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])
    ratio = helper.make_tensor("ratio", TensorProto.FLOAT, [], [p])
    training = helper.make_tensor("training_mode", TensorProto.BOOL, [], [True])
    relu = helper.make_node("Relu", ["x"], ["h"])
    drop = helper.make_node("Dropout", ["h", "ratio", "training_mode"], ["d"])
    # A node after the Dropout, as in real models: ONNX Runtime never deletes a node whose
    # output is a graph output, so the trap only shows when something consumes it.
    after = helper.make_node("Relu", ["d"], ["y"])
    graph = helper.make_graph([relu, drop, after], "g", [x], [y], initializer=[ratio, training])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model)
    return model.SerializeToString()


X = np.abs(np.random.default_rng(0).standard_normal((4, 64))).astype(np.float32) + 0.1


def test_control_default_onnxruntime_deletes_dropout() -> None:
    session = ort.InferenceSession(dropout_model(), providers=["CPUExecutionProvider"])
    a, b = (session.run(None, {"x": X})[0] for _ in range(2))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, X)  # Dropout became identity


@pytest.mark.parametrize("level", ["basic", "extended", "all"])
def test_server_sessions_keep_dropout_at_every_optimization_level(level: str) -> None:
    assert "EliminateDropout" in DISABLED_OPTIMIZERS
    session = create_session(
        dropout_model(), SessionConfig(use_gpu=False, graph_optimization_level=level)
    )
    a, b = (session.run(None, {"x": X})[0] for _ in range(2))
    assert not np.array_equal(a, b), "repeated runs gave identical outputs: Dropout was removed"
    # Inverted dropout: kept elements are scaled by 1/(1-p), dropped ones are 0.
    kept = a != 0
    np.testing.assert_allclose(a[kept], 2 * X[kept], rtol=1e-6)
    # P(drop) = 0.5 over 256 elements: the kept fraction is within 6 sigma of 0.5
    # (false-failure probability < 2e-9).
    assert abs(kept.mean() - 0.5) < 6 * np.sqrt(0.25 / kept.size)


def test_sessions_of_one_process_draw_different_masks() -> None:
    # The process is seeded once: were it seeded again for every session, each new session
    # would restart the same random stream and its first masks would repeat the last one's
    # (probability 2^-256 by chance for 256 elements at p = 0.5).
    seed = seed_process_rng()
    first, second = (
        create_session(dropout_model(), SessionConfig(use_gpu=False)).run(None, {"x": X})[0]
        for _ in range(2)
    )
    assert seed_process_rng() == seed
    assert not np.array_equal(first, second), "two sessions drew the same dropout masks"


SEED_OF_A_PROCESS = "from service.engine.onnx_session import seed_process_rng as s; print(s())"


def test_every_process_and_forked_child_draws_its_own_seed() -> None:
    # Seeds are 63 random bits: two equal by chance with probability 2^-63.
    seeds = [seed_process_rng()]
    for _ in range(2):
        child = subprocess.run(
            [sys.executable, "-c", SEED_OF_A_PROCESS],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        seeds.append(int(child.stdout))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the forked child: report its seed, never return into pytest
        try:
            os.write(write_end, str(seed_process_rng()).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + 30
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the forked child did not finish in 30 s")
        time.sleep(0.01)
    with os.fdopen(read_end) as pipe:
        seeds.append(int(pipe.read()))
    assert len(set(seeds)) == len(seeds), f"processes share a seed: {seeds}"
