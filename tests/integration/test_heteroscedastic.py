"""Heteroscedastic regression end to end: a model that predicts a mean and a log-variance per
target. The server answers the aleatoric variance (mean of the predicted variances over the T
samples), the epistemic variance (variance of the predicted means) and their sum, through both
protocols. Reference: PyTorch MC dropout of the same network; z-tests as in parity.py
(false-failure probability 1e-4 each)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from export import export_model
from export.mc_mode import mc_dropout_copy
from export.stats import Moments, mean_z_test
from mcdropout_client import Client
from tests.integration.conftest import RunningServer, start_server, stop_server
from tests.integration.parity import ALPHA, assert_matches_torch

T = 4000
N_TORCH = 4000


class MeanAndLogVariance(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.body = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Dropout(0.3))
        self.mu = nn.Linear(32, 2)
        self.log_var = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.mu(h), self.log_var(h)


@pytest.fixture(scope="module")
def het_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningServer, nn.Module]]:
    repository = tmp_path_factory.mktemp("het_repository")
    model = MeanAndLogVariance()
    export_model(model, torch.randn(8, 3), repository=repository, name="het", task="regression",
                 input_names=["x"], output_names=["mu", "log_var"],
                 output_semantics=["values", "log_variance"], variance_of={"log_var": "mu"},
                 verify_samples=1000)  # fmt: skip
    running = start_server(repository, Path(tmp_path_factory.mktemp("het_server")))
    yield running, model
    assert stop_server(running) == 0


def test_aleatoric_epistemic_and_total_variance(
    het_server: tuple[RunningServer, nn.Module],
) -> None:
    server, model = het_server
    x = np.random.default_rng(5).standard_normal((4, 3)).astype(np.float32)
    with Client(server.target, timeout=60) as client:
        mu = client.predict("het", x, num_samples=T).outputs["mu"]
    epistemic, aleatoric, total = mu.variance, mu.aleatoric_variance, mu.total_variance
    assert aleatoric is not None
    assert total is not None
    np.testing.assert_allclose(total, epistemic + aleatoric, rtol=1e-12)

    mc = mc_dropout_copy(model)
    with torch.no_grad():
        means, log_vars = mc(torch.from_numpy(x).repeat(N_TORCH, 1))
    means = means.double().reshape(N_TORCH, 4, 2).numpy()
    variances = log_vars.double().exp().reshape(N_TORCH, 4, 2).numpy()
    # Epistemic: mean and variance of the predicted means agree with PyTorch.
    assert_matches_torch({"mean": mu.mean, "variance": epistemic}, means, T)
    # Aleatoric: the server's mean of exp(log_var) against PyTorch's (z-test on the mean; the
    # server's own spread of exp(log_var) is estimated by PyTorch's, the same distribution).
    reference = Moments.from_samples(variances.reshape(N_TORCH, -1))
    ours = Moments(n=T, mean=aleatoric.reshape(-1), m2=reference.m2, m4=reference.m4)
    result = mean_z_test(ours, reference, ALPHA)
    assert result.passed, result


def test_homoscedastic_outputs_have_no_decomposition(
    het_server: tuple[RunningServer, nn.Module],
) -> None:
    server, _ = het_server
    with Client(server.target, timeout=60) as client:
        answer = client.predict("het", np.zeros((1, 3), np.float32), num_samples=10)
        meta = client.model_metadata("het")
    assert answer.outputs["log_var"].aleatoric_variance is None
    assert answer.outputs["log_var"].total_variance is None
    assert [o.semantics for o in meta.outputs] == ["values", "log_variance"]


def test_open_inference_protocol_lists_the_decomposition(
    het_server: tuple[RunningServer, nn.Module],
) -> None:
    import subprocess
    import sys

    server, _ = het_server
    # The OIP stubs live in their own process (see test_tritonclient.py for why).
    code = (
        "import grpc, sys\n"
        "from service.gen.inference import grpc_service_pb2 as oip, grpc_service_pb2_grpc as g\n"
        "stub = g.GRPCInferenceServiceStub(grpc.insecure_channel(sys.argv[1]))\n"
        "meta = stub.ModelMetadata(oip.ModelMetadataRequest(name='het'))\n"
        "print(' '.join(o.name for o in meta.outputs))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, server.target],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    names = out.stdout.split()
    assert "mu_aleatoric_variance" in names
    assert "mu_total_variance" in names
    assert "log_var_aleatoric_variance" not in names


def test_empirical_interval_of_the_normal_mixture(
    het_server: tuple[RunningServer, nn.Module],
) -> None:
    """The empirical interval of a heteroscedastic output holds exactly the requested mass of
    the mixture of the T predicted normals (checked with math.erf on the returned samples)."""
    import math

    server, _ = het_server
    x = np.random.default_rng(6).standard_normal((2, 3)).astype(np.float32)
    with Client(server.target, timeout=60) as client:
        answer = client.predict(
            "het", x, num_samples=300, interval_levels=[0.8], return_samples=True
        )
    mu = answer.outputs["mu"]
    means = mu.samples  # (B, T, 2)
    log_var_samples = answer.outputs["log_var"].samples
    assert means is not None
    assert log_var_samples is not None
    variances = np.exp(log_var_samples)
    lower, upper = mu.interval(0.8, "empirical").lower, mu.interval(0.8, "empirical").upper
    for b in range(2):
        for d in range(2):

            def cdf(value: float, b: int = b, d: int = d) -> float:
                return float(np.mean([0.5 * (1 + math.erf((value - m) / math.sqrt(2 * v)))
                                      for m, v in zip(means[b, :, d], variances[b, :, d], strict=True)]))  # fmt: skip

            assert cdf(lower[b, d]) == pytest.approx(0.1, abs=1e-6)
            assert cdf(upper[b, d]) == pytest.approx(0.9, abs=1e-6)
    gaussian = mu.interval(0.8, "gaussian")
    assert mu.total_variance is not None
    np.testing.assert_allclose(gaussian.upper - mu.mean, 1.2815515655446004 * np.sqrt(mu.total_variance),
                               rtol=1e-9)  # fmt: skip
