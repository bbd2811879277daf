"""The command line client (``python -m mcdropout_client``) against the real server."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tests.integration.conftest import RunningServer
from tests.integration.test_client import (
    LABELS,
    RequireToken,
    closed_port,
    health_server,
    make_certificate,
)

ROOT = Path(__file__).resolve().parents[2]


def cli(
    target: str, *args: str, stdin: str | bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    environment = {k: v for k, v in os.environ.items() if k != "MCDROPOUT_TOKEN"} | (env or {})
    result = subprocess.run(
        [sys.executable, "-m", "mcdropout_client", "--target", target, "--timeout", "60", *args],
        cwd=ROOT, input=data, capture_output=True, timeout=120, check=False, env=environment,
    )  # fmt: skip
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def table_rows(stdout: str) -> list[list[str]]:
    """The data lines of a table: after the header line, without the flag count line."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("row "))
    return [line.split() for line in lines[start + 1 :] if " rows flagged: " not in line]


@pytest.fixture(scope="module")
def cls_rows() -> np.ndarray:
    return np.random.default_rng(5).normal(size=(10, 6)).astype(np.float32)


def test_predict_npy_prints_a_table(
    server: RunningServer, tmp_path: Path, cls_rows: np.ndarray
) -> None:
    path = tmp_path / "rows.npy"
    np.save(path, cls_rows)
    result = cli(server.target, "predict", "--model", "tiny_cls", "--samples", "20", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "tiny_cls v1, T=20, 10 rows"
    assert lines[1].split() == ["row", "prediction", "p(pred)", "+-std", "entropy", "MI"]
    rows = table_rows(result.stdout)
    assert [r[0] for r in rows] == [str(i) for i in range(10)]
    assert {r[1] for r in rows} <= set(LABELS)


def test_predict_csv_reshapes_flat_rows(server: RunningServer, tmp_path: Path) -> None:
    images = np.random.default_rng(6).uniform(0, 1, (3, 64))
    path = tmp_path / "digits.csv"
    header = ",".join(f"pixel{i}" for i in range(64))
    np.savetxt(path, images, delimiter=",", header=header, comments="")
    result = cli(server.target, "predict", "-m", "digits", "-T", "10", "--json", str(path))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["rows"] == 3
    logits = document["outputs"]["logits"]
    assert np.asarray(logits["mean"]).shape == (3, 10)
    assert all(label in {str(d) for d in range(10)} for label in logits["predicted_label"])


def test_predict_json_file_with_json_output(
    server: RunningServer, tmp_path: Path, cls_rows: np.ndarray
) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(cls_rows.tolist()))
    result = cli(server.target, "predict", "-m", "tiny_cls", "--json", str(path))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert (document["model"], document["version"], document["num_samples"]) == (
        "tiny_cls",
        "1",
        50,
    )
    out = document["outputs"]["logits"]
    mean = np.asarray(out["mean"])
    assert mean.shape == (10, 4)
    np.testing.assert_allclose(mean.sum(axis=1), 1.0, rtol=1e-6)
    assert out["predicted_label"] == [LABELS[c] for c in out["predicted_class"]]
    assert out["uncertainty"]["measure"] == "mutual_information"
    assert out["uncertainty"]["values"] == out["mutual_information"]
    assert out["uncertainty"]["flagged"] is None


def test_predict_named_inputs_from_json(server: RunningServer, tmp_path: Path) -> None:
    image = np.random.default_rng(7).normal(size=(2, 2, 5, 5))
    path = tmp_path / "image.json"
    path.write_text(json.dumps({"image": image.tolist()}))
    result = cli(server.target, "predict", "-m", "tiny_d2", "--threshold", "1e9", str(path))
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert len(rows) == 2
    assert "0 of 2 rows flagged: std > 1e+09" in result.stdout


def test_predict_stdin_json_and_csv(server: RunningServer, cls_rows: np.ndarray) -> None:
    result = cli(
        server.target, "predict", "-m", "tiny_cls", "-", stdin=json.dumps(cls_rows[:3].tolist())
    )
    assert result.returncode == 0, result.stderr
    assert len(table_rows(result.stdout)) == 3
    csv_text = "\n".join(",".join(str(v) for v in row) for row in cls_rows[:4].tolist())
    result = cli(server.target, "predict", "-m", "tiny_cls", "--format", "csv", "-", stdin=csv_text)
    assert result.returncode == 0, result.stderr
    assert len(table_rows(result.stdout)) == 4


def test_threshold_flags_rows(server: RunningServer, tmp_path: Path, cls_rows: np.ndarray) -> None:
    path = tmp_path / "rows.npy"
    np.save(path, cls_rows)
    # With dropout active, every row's mutual information is positive: all above 0, none above 1e9.
    everything = cli(server.target, "predict", "-m", "tiny_cls", "--threshold", "0", str(path))
    assert everything.returncode == 0, everything.stderr
    assert all(row[-1] == "!" for row in table_rows(everything.stdout))
    assert "10 of 10 rows flagged: mutual information > 0" in everything.stdout
    nothing = cli(
        server.target, "predict", "-m", "tiny_cls", "--threshold", "1e9", "--json", str(path)
    )
    flags = json.loads(nothing.stdout)["outputs"]["logits"]["uncertainty"]["flagged"]
    assert flags == [False] * 10


def test_regression_table(server: RunningServer) -> None:
    rows = np.random.default_rng(8).normal(size=(2, 5)).tolist()
    result = cli(server.target, "predict", "-m", "tiny_reg", "--version", "1", "--threshold", "0", "-",
                 stdin=json.dumps(rows))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("tiny_reg v1, T=")
    assert result.stdout.splitlines()[1].split() == ["row", "mean", "+-std", "flag"]
    assert "2 of 2 rows flagged: std > 0" in result.stdout


def test_batches_with_a_progress_bar(
    server: RunningServer, tmp_path: Path, cls_rows: np.ndarray
) -> None:
    path = tmp_path / "rows.npy"
    np.save(path, cls_rows)
    result = cli(server.target, "predict", "-m", "tiny_cls", "--batch-size", "3", "--progress",
                 "--json", str(path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "10/10 rows 100%" in result.stderr
    assert "3/10 rows" in result.stderr
    assert json.loads(result.stdout)["rows"] == 10
    quiet = cli(server.target, "predict", "-m", "tiny_cls", "--batch-size", "3", str(path))
    assert quiet.returncode == 0
    assert quiet.stderr == ""  # stderr is not a terminal here


def test_intervals_seed_and_samples(server: RunningServer) -> None:
    rows = json.dumps(np.random.default_rng(9).normal(size=(3, 5)).tolist())
    args = ["predict", "-m", "tiny_reg", "-T", "50", "--seed", "7", "--interval", "0.9",
            "--interval", "0.5", "-"]  # fmt: skip
    table = cli(server.target, *args, stdin=rows)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0] == "tiny_reg v2, T=50, 3 rows, seed 7"
    assert table.stdout.splitlines()[1].split() == [
        "row", "mean", "+-std", "0.9", "empirical", "0.5", "empirical",
    ]  # fmt: skip
    again = cli(server.target, *args, stdin=rows)
    assert again.stdout == table.stdout  # seeded: the same answer
    document = json.loads(
        cli(server.target, *args, "--json", "--return-samples", stdin=rows).stdout
    )
    y = document["outputs"]["y"]
    assert document["seed"] == 7
    assert np.asarray(y["samples"]).shape == (3, 50, 2)
    assert [(i["level"], i["method"]) for i in y["intervals"]] == [
        (0.9, "gaussian"), (0.9, "empirical"), (0.5, "gaussian"), (0.5, "empirical"),
    ]  # fmt: skip


def test_adaptive_sampling_shows_each_rows_t(server: RunningServer) -> None:
    rows = json.dumps(np.random.default_rng(10).normal(size=(4, 5)).tolist())
    result = cli(server.target, "predict", "-m", "tiny_reg", "-T", "128", "--target-se", "0.01",
                 "--batch-size", "2", "--json", "-", stdin=rows)  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    per_row = document["num_samples_per_row"]
    assert len(per_row) == 4
    assert document["num_samples"] == max(per_row) <= 128
    table = cli(server.target, "predict", "-m", "tiny_reg", "--target-se", "0.01", "-", stdin=rows)
    assert table.stdout.splitlines()[1].split()[-1] == "T"


def test_the_token_comes_from_a_file_or_the_environment(tmp_path: Path) -> None:
    guard = RequireToken("cli-token")
    port = closed_port()
    token_server = health_server(port, interceptors=(guard,))
    try:
        target = f"127.0.0.1:{port}"
        refused = cli(target, "health")
        assert refused.returncode == 1
        assert refused.stderr.startswith("error: UNAUTHENTICATED: ")
        path = tmp_path / "token"
        path.write_text("cli-token\n")
        assert cli(target, "--token-file", str(path), "health").returncode == 0
        assert cli(target, "health", env={"MCDROPOUT_TOKEN": "cli-token"}).returncode == 0
    finally:
        token_server.stop(None)


def test_models_metadata_and_health(server: RunningServer) -> None:
    models = cli(server.target, "models")
    assert models.returncode == 0, models.stderr
    assert models.stdout.splitlines()[0].split() == ["model", "versions", "task", "ready"]
    assert any(
        line.split()[:4] == ["tiny_reg", "2,", "1", "regression"]
        for line in models.stdout.splitlines()
    )
    listed = {m["name"]: m for m in json.loads(cli(server.target, "models", "--json").stdout)}
    assert listed["tiny_cls"] | {"version_states": None} == {
        "name": "tiny_cls",
        "versions": ["1"],
        "task": "classification",
        "ready": True,
        "reason": "",
        "version_states": None,
    }
    assert listed["tiny_cls"]["version_states"] == [["1", "ready", ""]]
    assert not listed["deterministic"]["ready"]
    assert "identical outputs" in listed["deterministic"]["reason"]

    metadata = json.loads(cli(server.target, "metadata", "-m", "tiny_cls", "--json").stdout)
    assert metadata["labels"] == list(LABELS)
    assert metadata["inputs"] == [
        {"name": "x", "dtype": "float32", "shape": [-1, 6], "semantics": None,
         "max_shape": None, "labels": []}
    ]  # fmt: skip
    assert metadata["outputs"][0]["labels"] == list(LABELS)
    text = cli(server.target, "metadata", "-m", "digits")
    assert text.returncode == 0
    assert "input image: float32 [-1, 1, 8, 8]" in text.stdout

    health = cli(server.target, "health")
    assert (health.returncode, health.stdout) == (0, "SERVING\n")
    assert cli(server.target, "health", "tiny_cls").returncode == 0


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["predict", "-m", "no_such_model", "-"], "[[1, 2, 3, 4, 5, 6]]", "NOT_FOUND"),
        (["predict", "-m", "tiny_cls", "-"], "[[1, 2, 3, 4, 5]]", "INVALID_ARGUMENT"),
        (
            ["predict", "-m", "tiny_cls", "-T", "100000", "-"],
            "[[1, 2, 3, 4, 5, 6]]",
            "INVALID_ARGUMENT",
        ),
        (["health", "no_such_model"], None, "NOT_FOUND"),
    ],
)
def test_server_errors_exit_1(
    server: RunningServer, args: list[str], stdin: str | None, message: str
) -> None:
    result = cli(server.target, *args, stdin=stdin)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {message}: ")


def test_tls_with_a_private_ca(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    port = closed_port()
    tls_server = health_server(port, grpc.ssl_server_credentials([(key, cert)]))
    try:
        target = f"127.0.0.1:{port}"
        result = cli(target, "--ca-cert", str(tmp_path / "cert.pem"), "health")
        assert (result.returncode, result.stdout) == (0, "SERVING\n"), result.stderr
        plaintext = cli(target, "--retries", "0", "health")
        assert plaintext.returncode == 1
        assert plaintext.stderr.startswith("error: UNAVAILABLE: ")
    finally:
        tls_server.stop(None)


def test_unreachable_server_exits_1() -> None:
    result = cli(f"127.0.0.1:{closed_port()}", "--retries", "0", "health")
    assert result.returncode == 1
    assert result.stderr.startswith("error: UNAVAILABLE: ")


@pytest.mark.parametrize(
    ("args", "stdin", "files", "message"),
    [
        (["predict", "-m", "tiny_cls", "missing.npy"], None, {}, "No such file"),
        (
            ["predict", "-m", "tiny_cls", "bad.csv"],
            None,
            {"bad.csv": "1,2,3,4,5,6\n1,2,x,4,5,6\n"},
            "line 2",
        ),
        (["predict", "-m", "tiny_cls", "rows.txt"], None, {"rows.txt": "1"}, "--format"),
        (["predict", "-m", "tiny_cls", "-"], "not json", {}, "invalid JSON"),
        (
            ["predict", "-m", "tiny_cls", "--batch-size", "0", "-"],
            "[[1,2,3,4,5,6]]",
            {},
            "--batch-size",
        ),
        (["predict", "-m", "tiny_cls", "-"], '{"y": [[1]]}', {}, "no input 'y'"),
        (["predict", "-"], None, {}, "--model"),
        (["frobnicate"], None, {}, "invalid choice"),
    ],
)
def test_usage_and_input_errors_exit_2(  # noqa: PLR0917 (parametrized)
    server: RunningServer,
    tmp_path: Path,
    args: list[str],
    stdin: str | None,
    files: dict[str, str],
    message: str,
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    paths = [str(tmp_path / a) if a in files or a == "missing.npy" else a for a in args]
    result = cli(server.target, *paths, stdin=stdin)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr


def test_readme_cli_examples_parse() -> None:
    """Every ``.venv/bin/mcdropout`` command of README.md and docs/client.md is valid usage."""
    commands: list[str] = []
    for doc in ("README.md", "docs/client.md"):
        text = (ROOT / doc).read_text()
        for block in re.findall(r"^```bash\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                code = line.split(" #", 1)[0]
                commands += [c.strip() for c in re.split(r"\|\||&&|\||;", code)]
        commands += re.findall(r"`(\.venv/bin/mcdropout [^`]+)`", text)
    commands = [c for c in commands if c.startswith(".venv/bin/mcdropout ")]
    assert len(commands) >= 5
    from mcdropout_client.cli import build_parser

    parser = build_parser()
    for command in commands:
        words = shlex.split(command)[1:]
        if ">" in words:  # an output redirection
            words = words[: words.index(">")]
        args: Any = parser.parse_args(words)
        assert args.command in {"predict", "models", "metadata", "health"}
