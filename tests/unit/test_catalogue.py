"""The statistics catalogue: statistics per output semantics, answer names, load-time name
collisions, selection of requested outputs, and agreement with the maths' statistics."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.core.catalogue import SAMPLES_PER_ROW_NAME, Catalogue, statistics_of
from service.core.dataplane import DataPlane
from service.core.registry import State
from service.errors import InvalidInput, ModelLoadError
from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.maths.predictive import gaussian_interval
from service.maths.uncertainty import classification_stats, regression_stats
from service.repository import ModelConfig, Semantics, TensorSpec, parse_config
from service.settings import Settings

CLASSES = ["mean", "variance", "std", "predicted_class", "predicted_label", "entropy",
           "expected_entropy", "mutual_information", "variation_ratio"]  # fmt: skip
X = [{"name": "features", "dtype": "float32", "shape": [-1, 3]}]


def regressor(*outputs: dict[str, Any]) -> ModelConfig:
    return parse_config({"task": "regression", "inputs": X, "outputs": list(outputs)}, "reg")


def classifier(labels: list[str]) -> ModelConfig:
    output = {"name": "p", "dtype": "float32", "shape": [-1, 2], "semantics": "logits"}
    raw = {"task": "classification", "inputs": X, "outputs": [output], "labels": labels}
    return parse_config(raw, "cls")


def values(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "dtype": "float32", "shape": [-1, 2], "semantics": "values", **extra}


def variance(name: str, of: str) -> dict[str, Any]:
    return {"name": name, "dtype": "float32", "shape": [-1, 2], "semantics": "variance", "of": of}


def names(catalogue: Catalogue) -> list[str]:
    return [a.name for a in catalogue.answers]


def test_classification_outputs() -> None:
    assert names(Catalogue(classifier(["a", "b"]))) == ["p"] + [f"p_{s}" for s in CLASSES]
    unlabelled = ["p"] + [f"p_{s}" for s in CLASSES if s != "predicted_label"]
    assert names(Catalogue(classifier([]))) == unlabelled
    shapes = {a.name: a.shape for a in Catalogue(classifier(["a", "b"])).answers}
    assert shapes["p_mean"] == (-1, 2)
    assert shapes["p_entropy"] == (-1,)


def test_values_outputs_and_their_variance_output() -> None:
    plain = Catalogue(regressor(values("y")))
    assert names(plain) == ["y", "y_mean", "y_variance", "y_std"]
    hetero = Catalogue(regressor(values("y"), variance("s", of="y")))
    assert names(hetero) == [
        "y", "y_mean", "y_variance", "y_std", "y_aleatoric_variance", "y_total_variance",
        "s", "s_mean", "s_variance", "s_std",
    ]  # fmt: skip


def test_statistics_follow_the_output_semantics_not_the_task() -> None:
    """A model mixing a classification head and a regression head: each output gets its own
    semantics' statistics."""
    config = regressor(values("y"))
    logits = TensorSpec("p", np.dtype("float32"), (-1, 3), Semantics.LOGITS, labels=("a", "b", "c"))
    mixed = dataclasses.replace(config, outputs=(logits, *config.outputs))
    catalogue = Catalogue(mixed)
    assert names(catalogue) == ["p", *(f"p_{s}" for s in CLASSES), "y", "y_mean", "y_variance",
                                "y_std"]  # fmt: skip
    assert [s.name for s in statistics_of(logits, mixed)] == CLASSES
    assert catalogue.has_intervals  # the values head has them


def test_colliding_statistic_names_refuse_the_version_at_load_time() -> None:
    config = regressor(values("x"), variance("s", of="x"), values("x_total"))
    with pytest.raises(ModelLoadError, match="'x_total_variance' would be both total_variance"):
        Catalogue(config)
    Catalogue(regressor(values("x"), values("x_total")))  # without the variance: no collision


def test_each_output_answers_under_its_own_name_with_its_mean_in_the_graph_dtype() -> None:
    """A script written for the deterministic model asks for the graph's own output name."""
    half = TensorSpec("h", np.dtype("float16"), (-1, 2), Semantics.VALUES)
    count = TensorSpec("n", np.dtype("int64"), (-1, 2), Semantics.VALUES)
    config = dataclasses.replace(regressor(values("y")), outputs=(values_spec("y"), half, count))
    catalogue = Catalogue(config)
    own = {a.name: a for a in catalogue.answers if a.output is not None and a.name == a.output.name}
    assert {n: (a.statistic.dtype.oip, a.shape) for n, a in own.items()} == {
        "y": ("FP32", (-1, 2)), "h": ("FP16", (-1, 2)), "n": ("FP64", (-1, 2)),
    }  # fmt: skip
    stats = regression_stats(np.random.default_rng(0).standard_normal((5, 3, 2)))
    assert own["y"].statistic.read(stats, ()) is stats.mean
    options: dict[str, Any] = {"return_samples": False, "interval_levels": (), "adaptive": False}
    assert [a.name for a in catalogue.select(["y", "y_mean"], **options)] == ["y", "y_mean"]


def test_an_output_named_like_another_outputs_statistic_is_refused() -> None:
    with pytest.raises(
        ModelLoadError, match="'y_std' would be both std of 'y' and output 'y_std' itself"
    ):
        Catalogue(regressor(values("y"), values("y_std")))


def values_spec(name: str) -> TensorSpec:
    return TensorSpec(name, np.dtype("float32"), (-1, 2), Semantics.VALUES)


def test_colliding_classification_heads_are_refused() -> None:
    config = regressor(values("y"))
    heads = tuple(
        TensorSpec(name, np.dtype("float32"), (-1, 3), Semantics.PROBABILITIES)
        for name in ("p", "p_expected")
    )
    with pytest.raises(ModelLoadError, match="'p_expected_entropy'"):
        Catalogue(dataclasses.replace(config, outputs=heads))


def test_extras_exist_only_with_their_options() -> None:
    catalogue = Catalogue(regressor(values("y"), variance("s", of="y")))
    extra = catalogue.extras(return_samples=True, interval_levels=(0.9,), adaptive=True)
    assert [(a.name, a.shape) for a in extra] == [
        ("y_samples", (-1, -1, 2)),
        ("y_interval_gaussian_0.9_lower", (-1, 2)),
        ("y_interval_gaussian_0.9_upper", (-1, 2)),
        ("y_interval_empirical_0.9_lower", (-1, 2)),
        ("y_interval_empirical_0.9_upper", (-1, 2)),
        ("s_samples", (-1, -1, 2)),  # no intervals for a variance output
        (SAMPLES_PER_ROW_NAME, (-1,)),
    ]
    assert catalogue.extras(return_samples=False, interval_levels=(), adaptive=False) == ()


def test_select_answers_the_requested_outputs_in_order() -> None:
    catalogue = Catalogue(regressor(values("y"), values("z")))
    options: dict[str, Any] = {"return_samples": False, "interval_levels": (), "adaptive": False}
    assert catalogue.select(None, **options) == catalogue.answers
    assert catalogue.select([], **options) == catalogue.answers
    chosen = catalogue.select(["z_std", "y_mean"], **options)
    assert [a.name for a in chosen] == ["z_std", "y_mean"]
    with pytest.raises(InvalidInput, match=r"model 'reg' has no output 'w' \(outputs: y, y_mean,"):
        catalogue.select(["w"], **options)
    with pytest.raises(InvalidInput, match="output 'y_mean' is requested twice"):
        catalogue.select(["y_mean", "y_mean"], **options)
    with pytest.raises(InvalidInput, match="has no output 'y_samples'"):
        catalogue.select(["y_samples"], **options)
    adaptive = catalogue.select([SAMPLES_PER_ROW_NAME], **{**options, "adaptive": True})
    assert [a.output for a in adaptive] == [None]


def test_every_statistic_reads_from_the_maths_statistics() -> None:
    """The catalogue names attributes the maths really computes (and mcdropout.v1 fields)."""
    rng = np.random.default_rng(0)
    probs = classification_stats(rng.standard_normal((5, 4, 2)), from_logits=True)
    config = classifier(["a", "b"])
    catalogue = Catalogue(config)
    fields = pb.OutputStatistics.DESCRIPTOR.fields_by_name
    for statistic in catalogue.statistics("p"):
        value = statistic.read(probs, config.labels)
        assert value.shape[0] == 4
        assert statistic.field in fields
    labels = catalogue.statistics("p")[4].read(probs, config.labels)
    assert labels.tolist() == [config.labels[c] for c in probs.predicted_class]

    reg = regression_stats(rng.standard_normal((5, 4, 2)))
    interval = gaussian_interval(reg.mean, reg.variance, 0.9)
    reg = dataclasses.replace(reg, intervals=(interval,))
    config = regressor(values("y"))
    catalogue = Catalogue(config)
    for statistic in catalogue.statistics("y"):
        assert statistic.read(reg, ()).shape == (4, 2)
        assert statistic.field in fields
    [lower, upper, *_] = catalogue.extras(
        return_samples=False, interval_levels=(0.9,), adaptive=False
    )
    np.testing.assert_array_equal(lower.statistic.read(reg, ()), interval.lower)
    np.testing.assert_array_equal(upper.statistic.read(reg, ()), interval.upper)
    assert lower.statistic.field in fields


def test_loading_refuses_a_version_with_colliding_names_before_building_its_engine(
    tmp_path: Path,
) -> None:
    """The repository loader checks the names first: model.onnx here is not even a model."""
    folder = tmp_path / "reg" / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"not onnx")
    outputs = [values("x"), variance("s", of="x"), values("x_total")]
    config = {"task": "regression", "inputs": X, "outputs": outputs}
    (folder / "config.json").write_text(json.dumps(config))

    def build(_: object) -> Any:
        raise AssertionError("an engine was built for a version refused by its names")

    plane = DataPlane(Settings(model_repository=tmp_path), build)

    async def scenario() -> None:
        await plane.start()
        await plane.close()

    asyncio.run(scenario())
    assert plane.model_names() == []
    [state] = plane.index()
    assert (state.model, state.version, state.state) == ("reg", 1, State.UNAVAILABLE)
    assert "'x_total_variance' would be both" in state.reason
