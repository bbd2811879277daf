"""tools/launcher.py stops exactly what it started, by PID: SIGTERM, a bounded wait, SIGKILL of
the child's own process group; it never touches another process, even one with the same
command line; and it refuses a port file written by another process. Nothing in the repository
stops processes by name. Small Python children stand in for servers (no model, no gRPC)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools.launcher import ROOT, ChildProcess, LaunchError, ServiceProcess

#: Exits 3 on SIGTERM; the marker makes its command line unique to this test module.
ON_TERM_EXIT_3 = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(3)); "
    "print('ready', flush=True); time.sleep(120)  # mcd-launcher-test"
)
IGNORES_TERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(120)"
)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie that nobody reaped yet counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


def ready(child: ChildProcess) -> None:
    child.wait_until(lambda: "ready" in child.log(), timeout_s=30)


def test_stop_sends_sigterm_and_returns_the_exit_code(tmp_path: Path) -> None:
    child = ChildProcess("t", python(ON_TERM_EXIT_3), log_path=tmp_path / "log")
    ready(child)
    assert child.stop(timeout_s=30) == 3


def test_a_child_that_ignores_sigterm_is_killed_after_the_bounded_wait(tmp_path: Path) -> None:
    child = ChildProcess("t", python(IGNORES_TERM), log_path=tmp_path / "log")
    ready(child)
    started = time.monotonic()
    assert child.stop(timeout_s=0.5) == -9
    assert time.monotonic() - started < 20


def test_stop_ends_what_the_child_left_in_its_own_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('ready', flush=True); "
        "time.sleep(120)"
    )
    with ChildProcess("t", python(code), log_path=tmp_path / "log") as child:
        ready(child)
        grandchild = int(pid_file.read_text())
        assert not gone(grandchild)
    deadline = time.monotonic() + 10
    while not gone(grandchild):
        assert time.monotonic() < deadline, "the child's worker survived stop()"
        time.sleep(0.05)


def test_stop_never_touches_another_process_with_the_same_command(tmp_path: Path) -> None:
    # Stopping by command-line pattern (the old smoke script) also ended another server that
    # ran the same command; stop() must end only the process it started.
    with (tmp_path / "other.log").open("wb") as log:
        other = subprocess.Popen(python(ON_TERM_EXIT_3), stdout=log, stderr=subprocess.STDOUT)
    try:
        child = ChildProcess("t", python(ON_TERM_EXIT_3), log_path=tmp_path / "log")
        ready(child)
        assert child.stop() == 3
        time.sleep(0.2)
        assert other.poll() is None, "stop() ended a process it did not start"
    finally:
        other.kill()
        other.wait(30)


@pytest.mark.parametrize(("pid", "shown"), [(", 'pid': 1", "1"), ("", "None")])
def test_a_port_file_written_by_another_process_is_refused(
    pid: str, shown: str, tmp_path: Path
) -> None:
    """Another process's port file, or one that does not say whose it is."""
    port_file = tmp_path / "ports.json"
    code = (
        f"import json, time; json.dump({{'grpc_port': 1, 'metrics_port': 2{pid}}}, "
        f"open({str(port_file)!r}, 'w')); time.sleep(120)"
    )
    server = ServiceProcess("t", python(code), port_file=port_file, log_path=tmp_path / "log")
    try:
        with pytest.raises(LaunchError, match=f"written by pid {shown}"):
            server.wait_until(server.port_file_ready, timeout_s=30)
    finally:
        server.stop()


def test_an_early_exit_is_reported_with_the_log_tail(tmp_path: Path) -> None:
    code = "import sys; print('error: --grpc-port 8001 is in use'); sys.exit(2)"
    child = ChildProcess("t", python(code), log_path=tmp_path / "log")
    with pytest.raises(LaunchError, match=r"exited with 2 while starting(.|\n)*8001 is in use"):
        child.wait_until(lambda: False, timeout_s=30)


def test_nothing_in_the_repository_stops_processes_by_name() -> None:
    tracked = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    # The words are assembled, so that this file does not contain them either.
    words = ("p" + "kill", "kill" + "all", "p" + "grep")
    offenders = []
    for name in tracked:
        path = ROOT / name
        if not path.is_file() or path.suffix in (".md", ".png", ".onnx"):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        offenders += [f"{name}: {word}" for word in words if word in text]
    assert not offenders, offenders


def test_the_port_file_carries_the_server_pid(tmp_path: Path) -> None:
    from service.app import _write_port_file

    _write_port_file(tmp_path / "ports.json", 8001, 8000, 8002)
    ports = json.loads((tmp_path / "ports.json").read_text())
    assert ports == {"grpc_port": 8001, "http_port": 8000, "metrics_port": 8002, "pid": os.getpid()}
