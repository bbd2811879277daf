"""Reproducible sampling: the same seed, model version and input row give bit-identical
answers whatever else is in the request or the server's batch and wherever the row sits; and
the seeded answers are still MC dropout (parity with PyTorch)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from mcdropout_client import Client, InvalidArgumentError, Prediction
from tests.integration.conftest import ExportedModels
from tests.integration.parity import N_TORCH, assert_matches_torch, measured, torch_mc_samples


def seeded(
    client: Client,
    model: str,
    name: str,
    x: NDArray[Any],
    *,
    seed: int,
    t: int = 200,
    return_samples: bool = False,
) -> Prediction:
    answer = client.predict(model, {name: x}, num_samples=t, seed=seed,
                            return_samples=return_samples)  # fmt: skip
    assert answer.seed == seed
    return answer


def row_bytes(answer: Prediction, row: int) -> list[bytes]:
    """The raw bytes of every statistic of one row (bit-identity, not closeness)."""
    out = []
    for o in answer.outputs.values():
        for field in ("mean", "variance", "predictive_entropy", "mutual_information"):
            value = getattr(o, field)
            if value is not None:
                out.append(value[row].tobytes())
    return out


@pytest.mark.parametrize(
    ("model", "name"), [("digits", "image"), ("housing", "features"), ("tiny_cls", "x")]
)
def test_bit_identical_alone_in_a_batch_and_moved(
    client: Client, test_models: ExportedModels, model: str, name: str
) -> None:
    shape = client.model_metadata(model).input().row_shape
    batch = np.random.default_rng(3).random((12, *shape)).astype(np.float32)
    alone = seeded(client, model, name, batch[4:5], seed=7)
    in_batch = seeded(client, model, name, batch, seed=7)
    moved = seeded(client, model, name, batch[::-1].copy(), seed=7)  # row 4 -> row 7
    again = seeded(client, model, name, batch[4:5], seed=7)
    other = seeded(client, model, name, batch[4:5], seed=8)
    assert (
        row_bytes(alone, 0) == row_bytes(in_batch, 4) == row_bytes(moved, 7) == row_bytes(again, 0)
    )
    assert row_bytes(alone, 0) != row_bytes(other, 0)


def test_bit_identical_when_merged_with_concurrent_requests(client: Client) -> None:
    rows = np.random.default_rng(4).random((8, 6)).astype(np.float32)
    alone = [seeded(client, "tiny_cls", "x", rows[i : i + 1], seed=11) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:  # concurrent requests with the same seed and T share runs
        merged = list(
            pool.map(lambda i: seeded(client, "tiny_cls", "x", rows[i : i + 1], seed=11), range(8))
        )
    for a, m in zip(alone, merged, strict=True):
        assert row_bytes(a, 0) == row_bytes(m, 0)


def test_seeded_answers_are_mc_dropout(client: Client, test_models: ExportedModels) -> None:
    x = test_models.examples["digits"].numpy()
    # T = 3000: with its samples the answer stays under the 1 MiB message limit.
    answer = seeded(client, "digits", "image", x, seed=123, t=3000, return_samples=True)
    reference = torch_mc_samples(test_models.torch_models["digits"], x, N_TORCH, softmax=True)
    assert_matches_torch(measured(answer.output), reference, 3000)


def test_seed_with_adaptive_sampling_is_refused(client: Client) -> None:
    with pytest.raises(InvalidArgumentError, match="cannot be combined"):
        client.predict("tiny_cls", np.zeros((1, 6), np.float32), seed=1, target_standard_error=0.1)


def test_dropout2d_model_samples_with_a_seed(client: Client) -> None:
    """Dropout2d exports as RandomUniformLike over a per-channel shape: fed noise too."""
    x = np.random.default_rng(5).standard_normal((2, 2, 5, 5)).astype(np.float32)
    first = seeded(client, "tiny_d2", "image", x, seed=3)
    assert row_bytes(first, 1) == row_bytes(seeded(client, "tiny_d2", "image", x[1:], seed=3), 0)


def test_the_largest_seed_and_seed_zero_are_seeds(client: Client) -> None:
    x = np.random.default_rng(6).random((2, 6)).astype(np.float32)
    for seed in (0, 2**64 - 1):  # the wire field is a uint64; 0 is a seed, not "no seed"
        first = seeded(client, "tiny_cls", "x", x, seed=seed)
        assert row_bytes(first, 1) == row_bytes(seeded(client, "tiny_cls", "x", x, seed=seed), 1)
    unseeded = [client.predict("tiny_cls", x, num_samples=200) for _ in range(2)]
    assert row_bytes(unseeded[0], 0) != row_bytes(unseeded[1], 0)
