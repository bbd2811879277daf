"""Predict through the real server, checked against PyTorch MC dropout of the same models.

Statistical tests: every comparison is a per-element two-sample z-test (mean) and a
log-variance-ratio z-test (variance, standard error from the kurtosis), with a Bonferroni
threshold over the K elements compared, each test at false-failure probability ALPHA = 1e-4
(export/stats.py). The whole file then fails by chance with probability below 2e-3.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from export.stats import Moments, mean_z_test, variance_ratio_test
from mcdropout_client import (
    Client,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.gen.mcdropout.v1 import mcdropout_pb2_grpc as pb_grpc
from tests.integration.conftest import ExportedModels
from tests.integration.parity import (
    ALPHA,
    N_TORCH,
    assert_matches_torch,
    measured,
    server_moments,
    torch_mc_samples,
)


def inputs_for(name: str, rows: int, seed: int = 0) -> dict[str, NDArray[Any]]:
    rng = np.random.default_rng(seed)
    shapes = {
        "tiny_cls": ("x", (6,)),
        "tiny_reg": ("features", (5,)),
        "tiny_d2": ("image", (2, 5, 5)),
    }
    key, shape = shapes[name]
    return {key: rng.standard_normal((rows, *shape)).astype(np.float32)}


@pytest.mark.parametrize(
    ("name", "output"), [("tiny_cls", "logits"), ("tiny_reg", "y"), ("tiny_d2", "y")]
)
def test_mean_and_variance_match_pytorch_mc_dropout(
    client: Client, test_models: ExportedModels, name: str, output: str
) -> None:
    x = inputs_for(name, rows=5)
    t = 4000
    answer = client.predict(name, x, num_samples=t)
    assert answer.num_samples == t
    reference = torch_mc_samples(test_models.torch_models[name], next(iter(x.values())), N_TORCH,
                                 softmax=name == "tiny_cls")  # fmt: skip
    assert_matches_torch(measured(answer.outputs[output]), reference, t)


@pytest.mark.parametrize(
    ("name", "input_name", "output"),
    [("digits", "image", "logits"), ("housing", "features", "medv")],
)
def test_bundled_examples_match_pytorch_mc_dropout(
    client: Client, test_models: ExportedModels, name: str, input_name: str, output: str
) -> None:
    x = test_models.examples[name].numpy()
    t = 3000  # with its samples (return_samples) the answer stays under the 1 MiB message limit
    answer = client.predict(name, {input_name: x}, num_samples=t, return_samples=True)
    reference = torch_mc_samples(
        test_models.torch_models[name], x, N_TORCH, softmax=name == "digits"
    )
    assert_matches_torch(measured(answer.outputs[output]), reference, t)


def test_two_identical_requests_differ_but_agree(
    client: Client, test_models: ExportedModels
) -> None:
    x = inputs_for("tiny_reg", rows=4, seed=1)
    a = client.predict("tiny_reg", x, num_samples=2000).outputs["y"]
    b = client.predict("tiny_reg", x, num_samples=2000).outputs["y"]
    assert not np.array_equal(a.mean, b.mean), "two requests drew the same samples"
    reference = Moments.from_samples(
        torch_mc_samples(
            test_models.torch_models["tiny_reg"], x["features"], N_TORCH, False
        ).reshape(N_TORCH, -1)
    )
    first, second = (server_moments(r.mean, r.variance, 2000, reference) for r in (a, b))
    assert mean_z_test(first, second, ALPHA).passed
    assert variance_ratio_test(first, second, ALPHA).passed


def test_classification_answer_is_consistent(client: Client) -> None:
    answer = client.predict("tiny_cls", inputs_for("tiny_cls", rows=7), num_samples=300)
    out = answer.outputs["logits"]
    assert out.semantics == "logits"
    assert out.mean.shape == (7, 4)
    np.testing.assert_allclose(out.mean.sum(axis=1), 1.0, rtol=1e-6)  # float32 softmax
    assert out.predicted_class is not None
    np.testing.assert_array_equal(out.predicted_class, out.mean.argmax(axis=1))
    assert out.predicted_label == tuple(
        ["ant", "bee", "cat", "dog"][c] for c in out.predicted_class
    )
    np.testing.assert_allclose(out.std**2, out.variance, rtol=1e-9)
    entropy = -(out.mean * np.log(out.mean)).sum(axis=1)
    assert out.predictive_entropy is not None
    assert out.expected_entropy is not None
    assert out.mutual_information is not None
    assert out.variation_ratio is not None
    np.testing.assert_allclose(out.predictive_entropy, entropy, rtol=1e-9)
    np.testing.assert_allclose(
        out.mutual_information, out.predictive_entropy - out.expected_entropy, atol=1e-12
    )
    assert np.all(out.mutual_information >= 0)
    assert np.all((out.variation_ratio >= 0) & (out.variation_ratio <= 0.75))


def test_default_samples_and_newest_version(client: Client, test_models: ExportedModels) -> None:
    answer = client.predict("tiny_cls", inputs_for("tiny_cls", rows=1))
    assert answer.num_samples == 50  # the model's default
    assert client.predict("tiny_reg", inputs_for("tiny_reg", rows=1), num_samples=10).version == "2"


def test_an_older_version_is_served_on_request(client: Client, test_models: ExportedModels) -> None:
    x = inputs_for("tiny_reg", rows=3, seed=4)
    answer = client.predict("tiny_reg", x, num_samples=3000, version="1")
    assert answer.version == "1"
    reference = torch_mc_samples(
        test_models.torch_models["tiny_reg@1"], x["features"], N_TORCH, False
    )
    assert_matches_torch(measured(answer.outputs["y"]), reference, 3000)


def test_one_sample(client: Client) -> None:
    answer = client.predict("tiny_cls", inputs_for("tiny_cls", rows=3), num_samples=1)
    out = answer.outputs["logits"]
    assert answer.num_samples == 1
    assert np.isnan(out.variance).all()  # unbiased variance is undefined at T = 1
    # H[mean] - mean H over one sample: 0 up to the float32 rounding of the per-sample
    # entropies (service/engine/summaries.py states the accuracy).
    assert out.mutual_information is not None
    np.testing.assert_allclose(out.mutual_information, 0.0, atol=1e-6)
    np.testing.assert_array_equal(out.variation_ratio, 0.0)  # type: ignore[arg-type]
    np.testing.assert_allclose(out.mean.sum(axis=1), 1.0, rtol=1e-6)  # float32 softmax


def test_large_number_of_samples_in_many_chunks(
    client: Client, test_models: ExportedModels
) -> None:
    """T = 20,000 with a 4 MiB tile budget: many session runs folded into one answer."""
    x = inputs_for("tiny_d2", rows=2, seed=5)
    t = 20_000
    answer = client.predict("tiny_d2", x, num_samples=t)
    assert answer.num_samples == t
    reference = torch_mc_samples(test_models.torch_models["tiny_d2"], x["image"], N_TORCH, False)
    assert_matches_torch(measured(answer.outputs["y"]), reference, t)


def test_model_without_active_dropout_is_refused(client: Client, server: Any) -> None:
    models = {m.name: m for m in client.list_models()}
    ready = {name for name, m in models.items() if m.ready}
    assert ready == {"tiny_cls", "tiny_reg", "tiny_d2", "digits", "housing"}
    assert (models["deterministic"].ready, models["deterministic"].versions) == (False, ())
    listed = pb_grpc.MCDropoutServiceStub(client.channel).ListModels(pb.ListModelsRequest())
    [refused] = [m for m in listed.models if m.name == "deterministic"]
    assert "deterministic/1: copies of one row gave identical outputs" in refused.reason
    assert "deterministic/1: copies of one row gave identical outputs" in server.log()


def test_metadata_describes_the_model(client: Client) -> None:
    meta = client.model_metadata("tiny_cls")
    assert (meta.name, meta.version, meta.versions) == ("tiny_cls", "1", ("1",))
    assert meta.task == "classification"
    assert [(i.name, i.dtype, i.shape) for i in meta.inputs] == [
        ("x", np.dtype(np.float32), (-1, 6))
    ]
    assert meta.outputs[0].semantics == "logits"
    assert meta.labels == ("ant", "bee", "cat", "dog")
    assert (meta.default_num_samples, meta.max_num_samples) == (50, 20_000)
    assert meta.provider in {"CPUExecutionProvider", "CUDAExecutionProvider"}
    assert meta.opset == 18
    assert meta.verified
    assert sorted((d.type, round(d.p, 3)) for d in meta.dropout) == [
        ("Dropout", 0.3),
        ("Dropout", 0.4),
    ]
    assert len(meta.weights_sha256) == 64
    old = client.model_metadata("tiny_reg", version="1")
    assert (old.version, old.versions) == ("1", ("2", "1"))


def test_raw_samples_on_request(client: Client) -> None:
    x = inputs_for("tiny_reg", rows=3, seed=9)
    assert client.predict("tiny_reg", x, num_samples=40).samples is None  # not asked: not sent
    y = client.predict("tiny_reg", x, num_samples=40, return_samples=True).output
    assert y.samples is not None
    assert y.samples.shape == (3, 40, 2)  # (B, T, outputs), rows first
    np.testing.assert_allclose(y.mean, y.samples.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(y.variance, y.samples.var(axis=1, ddof=1), rtol=1e-10)
    assert len({tuple(s) for s in y.samples[0]}) > 1  # the samples differ


def test_raw_samples_are_bounded(client: Client) -> None:
    # 64 x 6000 x 4 = 1,536,000 values > 1,000,000 (the test server's limit)
    x = {"x": np.zeros((64, 6), np.float32)}
    with pytest.raises(ResourceExhaustedError, match="returning the samples"):
        client.predict("tiny_cls", x, num_samples=6000, return_samples=True)


def test_prediction_intervals(client: Client) -> None:
    from statistics import NormalDist

    x = inputs_for("tiny_reg", rows=3, seed=10)
    y = client.predict(
        "tiny_reg", x, num_samples=500, interval_levels=[0.9, 0.5], return_samples=True
    ).output
    assert y.samples is not None  # (B, T, 2)
    assert [(i.level, i.method) for i in y.intervals] == [
        (0.9, "gaussian"),
        (0.9, "empirical"),
        (0.5, "gaussian"),
        (0.5, "empirical"),
    ]
    for interval in y.intervals:
        lower, upper = interval.lower, interval.upper
        assert lower.shape == upper.shape == (3, 2)
        if interval.method == "gaussian":
            z = NormalDist().inv_cdf((1 + interval.level) / 2)
            np.testing.assert_allclose(upper, y.mean + z * y.std, rtol=1e-12)
            np.testing.assert_allclose(lower, y.mean - z * y.std, rtol=1e-12)
        else:  # quantiles of the very samples answered
            level = interval.level
            q = np.quantile(y.samples, [(1 - level) / 2, (1 + level) / 2], axis=1)
            np.testing.assert_allclose(lower, q[0], rtol=1e-12)
            np.testing.assert_allclose(upper, q[1], rtol=1e-12)
    assert y.interval(0.5, "gaussian") is y.intervals[2]


@pytest.mark.parametrize(
    ("model", "levels", "samples", "fragment"),
    [
        ("tiny_cls", [0.9], 10, "prediction intervals are for regression models"),
        ("tiny_reg", [1.5], 10, "interval levels must be in (0, 1)"),
        ("tiny_reg", [0.9], 1, "need num_samples >= 2"),
        ("tiny_reg", [0.1] * 9, 10, "at most 8 interval levels"),
    ],
)
def test_bad_interval_requests(
    client: Client, model: str, levels: list[float], samples: int, fragment: str
) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        client.predict(
            model, inputs_for(model, rows=1), num_samples=samples, interval_levels=levels
        )
    assert fragment in info.value.details
