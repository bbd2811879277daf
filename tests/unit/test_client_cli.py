"""The command line's input files and formatting: no sockets."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from mcdropout_client import cli as client_cli
from mcdropout_client._convert import prediction_from_proto
from mcdropout_client._gen.mcdropout.v1 import mcdropout_pb2 as pb
from mcdropout_client._tensors import encode_tensor
from mcdropout_client.files import detect_format, parse, parse_csv, parse_json, shape_rows
from tests.unit.test_client_convert import (
    classification_output,
    info,
    regression_output,
    response,
)


def test_csv_with_and_without_header() -> None:
    np.testing.assert_array_equal(parse_csv("a,b\n1,2\n\n3,4.5\n"), [[1, 2], [3, 4.5]])
    np.testing.assert_array_equal(parse_csv("1,2\n3,4\n"), [[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="line 3: 'x' is not a number"):
        parse_csv("a,b\n1,2\n3,x\n")
    with pytest.raises(ValueError, match="line 2: 3 columns, expected 2"):
        parse_csv("1,2\n3,4,5\n")
    with pytest.raises(ValueError, match="no rows"):
        parse_csv("a,b\n")


def test_json_rows_or_named_inputs() -> None:
    array = parse_json("[[1, 2], [3, 4]]")
    assert isinstance(array, np.ndarray)
    assert array.shape == (2, 2)
    named = parse_json('{"a": [[1]], "b": [[2, 3]]}')
    assert isinstance(named, dict)
    assert set(named) == {"a", "b"}
    for bad, message in (("[[1, 2], [3]]", "different lengths"), ('[["a"]]', "numbers"),
                         ("{", "invalid JSON"), ("3", "list of rows"), ("[]", "no rows")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            parse_json(bad)


def test_npy_and_npz_bytes() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    buffer = io.BytesIO()
    np.save(buffer, x)
    np.testing.assert_array_equal(parse(buffer.getvalue(), "npy"), x)  # type: ignore[arg-type]
    buffer = io.BytesIO()
    np.savez(buffer, a=x, b=x[:, :1])
    named = parse(buffer.getvalue(), "npz")
    assert isinstance(named, dict)
    assert named["b"].shape == (2, 1)
    with pytest.raises(ValueError, match=r"not a valid \.npy"):
        parse(b"junk", "npy")


def test_format_from_suffix_or_flag() -> None:
    assert detect_format("rows.CSV", None) == "csv"
    assert detect_format("-", None) == "json"
    assert detect_format("-", "csv") == "csv"
    with pytest.raises(ValueError, match="--format"):
        detect_format("rows.txt", None)


def test_rows_are_shaped_to_the_model_input() -> None:
    image = info(inputs=(("image", [-1, 1, 8, 8], pb.DATA_TYPE_FLOAT32),))
    flat = np.arange(3 * 64, dtype=np.float64).reshape(3, 64)
    shaped = shape_rows(image, flat)["image"]
    assert (shaped.shape, shaped.dtype) == ((3, 1, 8, 8), np.float32)
    np.testing.assert_array_equal(shaped[1].ravel(), flat[1])
    assert shape_rows(image, flat[0])["image"].shape == (1, 1, 8, 8)
    assert shape_rows(info(), np.ones(6))["x"].shape == (1, 6)
    two = info(inputs=(("a", [-1, 2], pb.DATA_TYPE_FLOAT32), ("b", [-1, 1], pb.DATA_TYPE_FLOAT32)))
    with pytest.raises(ValueError, match="different numbers of rows"):
        shape_rows(two, {"a": np.ones((3, 2)), "b": np.ones((2, 1))})


def test_table_flags_rows_above_the_threshold() -> None:
    result = prediction_from_proto(response(classification_output(4)))
    mi = result.mutual_information
    assert mi is not None
    threshold = float(np.median(mi))
    lines = client_cli.prediction_table(result, info(), threshold)
    assert lines[0] == "m v2, T=50, 4 rows"
    assert lines[1].split() == ["row", "prediction", "p(pred)", "+-std", "entropy", "MI", "flag"]
    flagged = [line.endswith("!") for line in lines[2:6]]
    assert flagged == (mi > threshold).tolist()
    assert lines[-1] == f"{sum(flagged)} of 4 rows flagged: mutual information > {threshold:g}"
    assert all(not line.endswith("!") for line in client_cli.prediction_table(result, info(), None))


def test_regression_uncertainty_is_the_largest_std_of_a_row() -> None:
    result = prediction_from_proto(response(regression_output(2)))
    measure, values = client_cli.row_uncertainty(result.output)
    assert measure == "std"
    np.testing.assert_array_equal(values, [2.0, 2.0])
    document = client_cli.prediction_document(result, threshold=1.0)
    uncertainty = document["outputs"]["y"]["uncertainty"]
    assert uncertainty == {"measure": "std", "values": [2.0, 2.0], "flagged": [True, True]}
    lines = client_cli.prediction_table(result, info(), None)
    assert lines[2].split() == ["0", "0,", "1", "2,", "0.5"]


def test_table_shows_intervals_total_std_per_row_t_and_seed() -> None:
    y = regression_output(2, levels=(0.9,))
    y.total_variance.CopyFrom(encode_tensor(np.full((2, 2), 9.0)))
    proto = response(y)
    proto.num_samples_per_row.CopyFrom(encode_tensor(np.array([50, 7], np.int64)))
    lines = client_cli.prediction_table(prediction_from_proto(proto, seed=3), info(), None)
    assert lines[0] == "m v2, T=50, 2 rows, seed 3"
    assert lines[1].split() == ["row", "mean", "+-std", "+-total", "0.9", "empirical", "T"]
    # row 1: mean (2, 3), empirical interval mean -+ 2 * 0.9, total std 3, T = 7
    assert lines[3].split()[-5:] == ["[0.2,", "3.8],", "[1.2,", "4.8]", "7"]
    assert "3," in lines[3].split()
    gaussian = client_cli.prediction_table(prediction_from_proto(proto), info(), None, "gaussian")
    assert "gaussian" in gaussian[1]


def test_progress_bar_is_silent_without_a_stream() -> None:
    stream = io.StringIO()
    bar = client_cli.Progress(10, stream)
    bar.update(5)
    bar.close()
    assert "5/10 rows  50%" in stream.getvalue()
    client_cli.Progress(10, None).update(5)  # no stream, no output, no error


def test_token_comes_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = client_cli.build_parser()
    monkeypatch.delenv(client_cli.TOKEN_VARIABLE, raising=False)
    assert client_cli._token(parser.parse_args(["health"])) is None
    monkeypatch.setenv(client_cli.TOKEN_VARIABLE, "from-env")
    assert client_cli._token(parser.parse_args(["health"])) == "from-env"
    path = tmp_path / "token"
    path.write_text("from-file\n")
    assert (
        client_cli._token(parser.parse_args(["--token-file", str(path), "health"])) == "from-file"
    )


def test_return_samples_needs_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = client_cli.main(
        ["--target", "127.0.0.1:1", "predict", "-m", "x", "--return-samples", "-"]
    )
    assert code == 2
    assert "--return-samples needs --json" in capsys.readouterr().err
