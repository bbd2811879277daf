"""The real server started with ``--device gpu`` (tests/support/server.py's start_server,
the integration suite's models and limits): it serves every model on CUDA, its answers are MC
dropout, large T goes through many chunks, and seeded requests are bit-identical on the GPU.

For the whole integration suite against a GPU server: ``MCD_TEST_DEVICE=gpu pytest
tests/integration``. Statistical tests as in tests/integration/test_predict.py: 6 comparisons
at ALPHA = 1e-4 per test, so a correct server fails this module by chance with probability
below 1.2e-3.
"""

# The imports follow the module-level CUDA skip, so that a host without CUDA skips at once.
# ruff: noqa: E402
from __future__ import annotations

import pytest

from tests.gpu.cuda import require_cuda

require_cuda()

import re

import numpy as np

from mcdropout_client import Client
from tests.gpu.cuda import PROVIDER
from tests.integration.conftest import ExportedModels, RunningServer
from tests.integration.parity import N_TORCH, assert_matches_torch, measured, torch_mc_samples
from tests.integration.test_predict import inputs_for
from tests.integration.test_seeded import row_bytes, seeded

pytestmark = pytest.mark.gpu

SERVED = ("digits", "housing", "tiny_cls", "tiny_reg", "tiny_d2")


@pytest.mark.parametrize("model", SERVED)
def test_metadata_reports_cuda(gpu_client: Client, model: str) -> None:
    assert gpu_client.model_metadata(model).provider == PROVIDER


def test_server_log_names_cuda_for_every_model(
    gpu_client: Client, gpu_server: RunningServer
) -> None:
    del gpu_client  # only for its server being up
    loaded = dict(re.findall(r"loaded (\S+) version \d+ on (\S+)", gpu_server.log()))
    assert {model: loaded.get(model) for model in SERVED} == dict.fromkeys(SERVED, PROVIDER)


@pytest.mark.parametrize(("name", "input_name"), [("digits", "image"), ("housing", "features")])
def test_bundled_examples_match_pytorch_on_gpu(
    gpu_client: Client, test_models: ExportedModels, name: str, input_name: str
) -> None:
    # housing answers "medv", or "target" where its data fell back to scikit-learn's diabetes.
    output = gpu_client.model_metadata(name).outputs[0].name
    x = test_models.examples[name].numpy()
    t = 3000  # with its samples the answer stays under the 1 MiB message limit
    answer = gpu_client.predict(name, {input_name: x}, num_samples=t, return_samples=True)
    assert answer.num_samples == t
    reference = torch_mc_samples(
        test_models.torch_models[name], x, N_TORCH, softmax=name == "digits"
    )
    stats = answer.outputs[output]
    assert_matches_torch(measured(stats), reference, t)
    if name == "digits":
        assert stats.predicted_class is not None
        assert stats.mutual_information is not None
        assert stats.predicted_class.shape == (x.shape[0],)
        assert np.all(stats.mutual_information >= -1e-12)
        np.testing.assert_allclose(stats.mean.sum(axis=1), 1.0, rtol=1e-9)


@pytest.mark.parametrize(
    ("name", "output"), [("tiny_cls", "logits"), ("tiny_reg", "y"), ("tiny_d2", "y")]
)
def test_test_models_match_pytorch_on_gpu(
    gpu_client: Client, test_models: ExportedModels, name: str, output: str
) -> None:
    x = inputs_for(name, rows=5)
    t = 4000
    answer = gpu_client.predict(name, x, num_samples=t, return_samples=True)
    reference = torch_mc_samples(test_models.torch_models[name], next(iter(x.values())), N_TORCH,
                                 softmax=name == "tiny_cls")  # fmt: skip
    assert_matches_torch(measured(answer.outputs[output]), reference, t)


def test_large_t_goes_through_many_chunks_on_gpu(
    gpu_client: Client, test_models: ExportedModels
) -> None:
    """T = 10,000 (the digits model's maximum) on 4 rows: about 34 samples per session run
    under the test server's 4 MiB budget, so some 300 runs folded into one answer."""
    x = test_models.examples["digits"].numpy()
    t = 10_000
    answer = gpu_client.predict("digits", {"image": x}, num_samples=t, timeout=120)
    assert answer.num_samples == t
    # As many reference samples as the server's (see test_large_t_in_many_chunks_on_cuda).
    reference = torch_mc_samples(test_models.torch_models["digits"], x, t, softmax=True)
    # Its 10,000 samples would not fit a 1 MiB message: the kurtosis is borrowed from a
    # reference as large as the answer (the estimate the guard distrusts comes from 4,000).
    assert_matches_torch(measured(answer.outputs["logits"]), reference, t, borrow_kurtosis=True)


@pytest.mark.parametrize(
    ("model", "name"),
    [("digits", "image"), ("housing", "features"), ("tiny_cls", "x"), ("tiny_d2", "image")],
)
def test_seeded_requests_are_bit_identical_on_gpu(
    gpu_client: Client, model: str, name: str
) -> None:
    shape = gpu_client.model_metadata(model).input().row_shape
    batch = np.random.default_rng(3).random((12, *shape)).astype(np.float32)
    alone = seeded(gpu_client, model, name, batch[4:5], seed=7)
    again = seeded(gpu_client, model, name, batch[4:5], seed=7)
    assert row_bytes(alone, 0) == row_bytes(again, 0), "a repeated seeded request differs on GPU"
    in_batch = seeded(gpu_client, model, name, batch, seed=7)
    moved = seeded(gpu_client, model, name, batch[::-1].copy(), seed=7)  # row 4 -> row 7
    assert row_bytes(alone, 0) == row_bytes(in_batch, 4) == row_bytes(moved, 7)
    other = seeded(gpu_client, model, name, batch[4:5], seed=8)
    assert row_bytes(alone, 0) != row_bytes(other, 0)
