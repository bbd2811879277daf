from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.errors import ModelLoadError
from service.repository import (
    Semantics,
    Task,
    find_versions,
    fingerprint,
    load_version,
    parse_config,
)

GOOD: dict[str, Any] = {
    "format_version": 1,
    "name": "digits",
    "task": "classification",
    "inputs": [{"name": "image", "dtype": "float32", "shape": [-1, 1, 8, 8]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, 10], "semantics": "logits"}],
    "labels": [str(i) for i in range(10)],
    "num_samples": {"default": 100, "max": 10000},
    "activation_bytes_per_row": 4096,
}


def test_parses_a_good_config() -> None:
    c = parse_config(GOOD, "digits")
    assert c.task is Task.CLASSIFICATION
    assert c.inputs[0].dtype == np.float32
    assert c.inputs[0].row_shape == (1, 8, 8)
    assert c.inputs[0].row_bytes == 256
    assert c.outputs[0].semantics is Semantics.LOGITS
    assert (c.default_num_samples, c.max_num_samples) == (100, 10000)
    assert c.labels[3] == "3"


def _broken(path: str, value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(GOOD)
    target: Any = raw
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if key.isdigit() else target[key]
    last = keys[-1]
    if value is KeyError:
        del target[last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return raw


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        ("task", "ranking", "task must be classification, regression or mixed"),
        ("name", "other", "differs from the folder name"),
        ("inputs.0.dtype", "complex64", "dtype must be one of"),
        ("inputs.0.shape", [1, 1, 8, 8], "first dimension must be -1"),
        ("inputs.0.shape", [-1, -1, 8, 8], "gives their largest sizes in 'max_shape'"),
        ("inputs.0.shape", [-1, 0, 8, 8], "sizes must be >= 1, or -1 for a dynamic axis"),
        ("inputs.0.max_shape", [-1, 2, 8, 8], "max_shape must be the shape"),
        (
            "outputs.0.semantics",
            "scores",
            "semantics must be logits, probabilities, values, variance",
        ),
        ("outputs.0.semantics", "values", "does not match the outputs' semantics"),
        ("outputs.0.shape", [-1], "classes on a fixed last axis"),
        ("outputs.0.shape", [-1, 10, 2], "labels has 10 entries for 2 classes"),
        ("labels", ["a", "b"], "labels has 2 entries for 10 classes"),
        ("num_samples", {"default": 0, "max": 10}, "1 <= default <= max"),
        ("num_samples", {"default": 20, "max": 10}, "1 <= default <= max"),
        ("activation_bytes_per_row", -5, "activation_bytes_per_row must be a positive integer"),
        ("inputs", [], "needs inputs"),
        ("format_version", 2, "format_version must be 1"),
    ],
)
def test_config_errors_name_the_problem(path: str, value: Any, fragment: str) -> None:
    with pytest.raises(ModelLoadError, match=fragment):
        parse_config(_broken(path, value), "digits")


def test_the_task_must_match_the_outputs() -> None:
    raw = _broken("task", "regression")
    raw["labels"] = []
    with pytest.raises(ModelLoadError, match="make it 'classification'"):
        parse_config(raw, "digits")
    raw["outputs"][0]["semantics"] = "values"
    assert parse_config(raw, "digits").task is Task.REGRESSION
    del raw["task"]  # optional: derived from the outputs
    assert parse_config(raw, "digits").task is Task.REGRESSION


MIXED: dict[str, Any] = {
    "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3]}],
    "outputs": [
        {"name": "kind", "dtype": "float32", "shape": [-1, 3], "semantics": "logits",
         "labels": ["cat", "dog", "eel"]},
        {"name": "size", "dtype": "float32", "shape": [-1, 1], "semantics": "values"},
    ],
}  # fmt: skip


def test_a_model_may_mix_class_and_values_heads() -> None:
    config = parse_config(MIXED, "pets")
    assert config.task is Task.MIXED
    assert config.outputs[0].labels == ("cat", "dog", "eel")
    assert config.labels == ("cat", "dog", "eel")  # the one class output's
    assert parse_config({**MIXED, "task": "mixed"}, "pets").task is Task.MIXED
    with pytest.raises(ModelLoadError, match="make it 'mixed'"):
        parse_config({**MIXED, "task": "classification"}, "pets")


def test_labels_belong_to_class_outputs() -> None:
    raw = copy.deepcopy(MIXED)
    raw["outputs"][1]["labels"] = ["small"]
    with pytest.raises(ModelLoadError, match="labels are for class outputs"):
        parse_config(raw, "pets")
    two = copy.deepcopy(MIXED)
    two["outputs"][1] = {**two["outputs"][0], "name": "colour"}
    del two["outputs"][0]["labels"], two["outputs"][1]["labels"]
    with pytest.raises(ModelLoadError, match="exactly one class output"):
        parse_config({**two, "labels": ["a", "b", "c"]}, "pets")


def test_dynamic_axes_carry_their_largest_size() -> None:
    raw = {
        "inputs": [{"name": "ids", "dtype": "int64", "shape": [-1, -1], "max_shape": [-1, 128]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, -1, 4],
                     "semantics": "logits"}],
    }  # fmt: skip
    config = parse_config(raw, "tagger")
    ids = config.inputs[0]
    assert ids.dynamic_axes == (1,)
    assert ids.max_shape == (-1, 128)
    assert ids.row_size == 128  # at the largest shape
    assert config.outputs[0].dynamic_axes == (1,)
    raw["inputs"][0]["max_shape"] = [-1, 0]
    with pytest.raises(ModelLoadError, match="largest size"):
        parse_config(raw, "tagger")


def _version(root: Path, name: str, version: str, config: dict[str, Any] | None) -> Path:
    folder = root / name / version
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"not really onnx")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_versions_found_load_in_numeric_order_and_a_broken_one_says_why(tmp_path: Path) -> None:
    _version(tmp_path, "digits", "1", GOOD)
    _version(tmp_path, "digits", "2", GOOD)
    _version(tmp_path, "digits", "10", GOOD)
    _version(tmp_path, "digits", "3", None)  # no config.json
    _version(tmp_path, "digits", ".tmp-4-abc", GOOD)  # an export in progress: ignored
    _version(tmp_path, "digits", "latest", GOOD)  # not a version number: ignored
    found = find_versions(tmp_path)
    assert sorted(found["digits"]) == [1, 2, 3, 10]
    assert [load_version(tmp_path / "digits", n).version for n in (1, 2, 10)] == [1, 2, 10]
    with pytest.raises(ModelLoadError, match=r"config\.json is missing"):
        load_version(tmp_path / "digits", 3)


def test_find_versions_lists_version_folders_without_parsing_them(tmp_path: Path) -> None:
    _version(tmp_path, "digits", "1", None)  # no config.json: still a version folder
    _version(tmp_path, "digits", "2", GOOD)
    _version(tmp_path, "digits", ".tmp-3-abc", GOOD)
    _version(tmp_path, "other", "latest", GOOD)  # a model folder without versions: left out
    (tmp_path / ".hidden" / "1").mkdir(parents=True)
    found = find_versions(tmp_path)
    assert {name: sorted(v) for name, v in found.items()} == {"digits": [1, 2]}
    assert [f[0] for f in found["digits"][2].fingerprint] == ["config.json", "model.onnx"]
    assert list(find_versions(tmp_path, {"other", "nothing"})) == []


def test_a_fingerprint_changes_with_any_write_or_replacement_not_with_reads(
    tmp_path: Path,
) -> None:
    folder = _version(tmp_path, "digits", "1", GOOD)
    before = fingerprint(folder)
    (folder / "model.onnx").read_bytes()
    assert fingerprint(folder) == before
    # Replaced by a copy with the same size and modification time: a new inode.
    model = folder / "model.onnx"
    stat = model.stat()
    replacement = folder / ".replacement"
    replacement.write_bytes(b"not really onnx")
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, model)
    assert fingerprint(folder) != before
    after_replace = fingerprint(folder)
    with model.open("ab") as file:  # written in place
        file.write(b"!")
    assert fingerprint(folder) != after_replace
    written = fingerprint(folder)
    (folder / ".notes.txt.swp").write_text("hidden: an editor's, a copy's temporary file")
    assert fingerprint(folder) == written
    (folder / "notes.txt").write_text("an added file")
    assert fingerprint(folder) != written


def test_a_missing_repository_folder_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="is not a folder"):
        find_versions(tmp_path / "nowhere")


HETEROSCEDASTIC: dict[str, Any] = {
    "task": "regression",
    "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3]}],
    "outputs": [
        {"name": "mu", "dtype": "float32", "shape": [-1, 2], "semantics": "values"},
        {
            "name": "log_var",
            "dtype": "float32",
            "shape": [-1, 2],
            "semantics": "log_variance",
            "of": "mu",
        },
    ],
}


def test_heteroscedastic_config_links_the_variance_to_its_values_output() -> None:
    c = parse_config(HETEROSCEDASTIC, "het")
    assert c.outputs[1].semantics is Semantics.LOG_VARIANCE
    assert c.outputs[1].variance_of == "mu"
    assert c.variance_output("mu") is c.outputs[1]
    assert c.variance_output("log_var") is None


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"of": None}, "names the values output it describes in 'of'"),
        ({"of": "nope"}, "'log_var' is the variance of 'nope', which is not a values output"),
        ({"of": "log_var"}, "which is not a values output"),
        ({"shape": [-1, 3]}, "has shape [-1, 3], its values output [-1, 2]"),
    ],
)
def test_heteroscedastic_config_errors(change: dict[str, Any], fragment: str) -> None:
    raw = copy.deepcopy(HETEROSCEDASTIC)
    raw["outputs"][1].update(change)
    if change.get("of", "") is None:
        del raw["outputs"][1]["of"]
    with pytest.raises(ModelLoadError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        parse_config(raw, "het")


def test_two_variances_for_one_output_and_of_on_values_are_refused() -> None:
    raw = copy.deepcopy(HETEROSCEDASTIC)
    raw["outputs"].append({**raw["outputs"][1], "name": "var2", "semantics": "variance"})
    with pytest.raises(ModelLoadError, match="'mu' has two variances"):
        parse_config(raw, "het")
    raw = copy.deepcopy(HETEROSCEDASTIC)
    raw["outputs"][0]["of"] = "log_var"
    with pytest.raises(ModelLoadError, match="'of' is only for variance"):
        parse_config(raw, "het")


def test_padding_lets_requests_of_different_lengths_share_runs() -> None:
    raw: dict[str, Any] = {
        "inputs": [
            {"name": "ids", "dtype": "int64", "shape": [-1, -1], "max_shape": [-1, 64]},
            {"name": "mask", "dtype": "int64", "shape": [-1, -1], "max_shape": [-1, 64]},
        ],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 3], "semantics": "logits"}],
        "dynamic_batching": {"pad": {"ids": 0, "mask": 0}},
    }
    assert parse_config(raw, "bert").dynamic_batching.pad == (("ids", 0), ("mask", 0))
    missing = copy.deepcopy(raw)
    missing["dynamic_batching"]["pad"] = {"ids": 0}
    with pytest.raises(ModelLoadError, match="a pad value for each input with dynamic axes"):
        parse_config(missing, "bert")
    tokens = copy.deepcopy(raw)
    tokens["outputs"][0]["shape"] = [-1, -1, 3]
    with pytest.raises(ModelLoadError, match="outputs have no dynamic axis"):
        parse_config(tokens, "bert")
    text = copy.deepcopy(raw)
    text["dynamic_batching"]["pad"] = {"ids": "0", "mask": 0}
    with pytest.raises(ModelLoadError, match="maps input names to numbers"):
        parse_config(text, "bert")
