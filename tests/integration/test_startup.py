"""Start-up failures of the real server: one line on stderr naming the flag, exit status 2, no
traceback; and ``--log-level`` in lower case. The servers here serve an empty repository, so
no model is exported."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.__main__ import EXIT_STARTUP_ERROR
from service.settings import Settings
from tests.support.server import start_server, stop_server
from tools.launcher import ROOT, child_environment, service_command


def run_server(repository: Path, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """``python -m service`` (launcher defaults: 127.0.0.1, port 0) that must exit by itself."""
    command = service_command(repository, tmp_path / "ports.json", flags)
    return subprocess.run(
        command, cwd=ROOT, env=child_environment(), capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip


def assert_one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == EXIT_STARTUP_ERROR, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines() == [f"error: {expected}"], result.stderr
    assert result.stdout == ""


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that something else listens on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


@pytest.fixture
def empty_repository(tmp_path: Path) -> Path:
    folder = tmp_path / "repository"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("flag", ["--grpc-port", "--http-port", "--metrics-port"])
def test_a_port_in_use_names_the_flag_and_the_port(
    empty_repository: Path, tmp_path: Path, busy_port: int, flag: str
) -> None:
    result = run_server(empty_repository, tmp_path, flag, str(busy_port))
    assert_one_line_error(
        result, f"{flag} {busy_port} is in use on 127.0.0.1 (choose another port, or 0 for any)"
    )
    assert not (tmp_path / "ports.json").exists()


def test_a_missing_repository_names_the_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-repository"
    result = run_server(missing, tmp_path)
    assert_one_line_error(result, f"--model-repository {missing}: no such folder")


def test_a_file_as_repository_is_refused(tmp_path: Path) -> None:
    a_file = tmp_path / "models.txt"
    a_file.write_text("not a folder")
    result = run_server(a_file, tmp_path)
    assert_one_line_error(result, f"--model-repository {a_file}: is not a folder")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--max-batch-rows", "0"], "max_batch_rows must be an integer >= 1, got 0"),
        (["--grpc-port", "70000"], "grpc_port must be in 0..65535, got 70000"),
        (
            ["--log-level", "loud"],
            "argument --log-level: invalid choice: 'LOUD' (choose from 'DEBUG', 'INFO', "
            "'WARNING', 'ERROR')",
        ),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_a_bad_setting_is_one_line(
    empty_repository: Path, tmp_path: Path, flags: list[str], expected: str
) -> None:
    assert_one_line_error(run_server(empty_repository, tmp_path, *flags), expected)


@pytest.mark.parametrize("level", ["debug", "DEBUG"])
def test_log_level_in_any_case(empty_repository: Path, tmp_path: Path, level: str) -> None:
    server = start_server(empty_repository, tmp_path, "--log-level", level, "--allow-empty-start")
    assert stop_server(server) == 0, server.log()
    # asyncio logs its selector at DEBUG when the server's loop starts: only seen at DEBUG.
    assert "DEBUG asyncio: Using selector" in server.log(), server.log()


@pytest.mark.parametrize("field", ["grpc_port", "http_port"])
def test_a_port_taken_after_the_checks_is_still_a_startup_error(
    empty_repository: Path, busy_port: int, field: str
) -> None:
    # The race __main__'s check cannot see: the port is taken between the check and the bind.
    from service.app import App, StartupError

    ports = {"grpc_port": 0, "http_port": 0, field: busy_port}
    settings = Settings(model_repository=empty_repository, metrics_port=0, device="cpu", **ports)

    apps: list[App] = []

    async def start() -> None:
        apps.append(App(settings))  # built in the running loop, as __main__ does (grpc.aio)
        await apps[0].start()

    with pytest.raises(StartupError) as info:
        asyncio.run(start())
    flag = "--" + field.replace("_", "-")
    assert str(info.value) == (
        f"{flag} {busy_port} is in use on 127.0.0.1 (choose another port, or 0 for any)"
    )
    # What had started is closed: the metrics port it had bound is free again.
    assert apps[0].metrics_port > 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", apps[0].metrics_port))
