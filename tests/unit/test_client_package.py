"""The client is its own distribution: its dependencies, its imports, its command line.

The slow end-to-end check (``pip install ./client`` into a clean venv) is ``.ci/client-install``;
these are the fast ones, in the project's environment.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "client"
ALLOWED = {"grpcio", "grpcio-health-checking", "protobuf", "numpy"}
#: Top-level modules the client must never import: the server and its heavy dependencies.
FORBIDDEN = {"onnxruntime", "onnx", "torch", "prometheus_client", "service", "export", "tests"}


def requirements(pyproject: Path) -> dict[str, Requirement]:
    project = tomllib.loads(pyproject.read_text())["project"]
    parsed = [Requirement(text) for text in project["dependencies"]]
    return {r.name.lower(): r for r in parsed}


def test_client_depends_on_grpc_protobuf_and_numpy_only_at_the_servers_pins() -> None:
    client = requirements(CLIENT / "pyproject.toml")
    assert set(client) == ALLOWED
    server = requirements(ROOT / "pyproject.toml")
    for name, requirement in client.items():
        # One exact pin each, the server's, so that both install into one environment.
        assert [s.operator for s in requirement.specifier] == ["=="], requirement
        assert requirement.specifier == server[name].specifier, (requirement, server[name])


def test_the_command_line_ships_with_the_client_not_the_server() -> None:
    client = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert client["scripts"] == {"mcdropout": "mcdropout_client.cli:main"}
    assert "mcdropout" not in server["scripts"]
    assert not (ROOT / "service" / "client").exists()


def test_client_sources_import_nothing_of_the_server() -> None:
    """Parsed, not executed: also catches imports in functions and rarely taken branches."""
    bad = []
    for path in sorted((CLIENT / "mcdropout_client").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            bad += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not bad


def test_importing_the_client_loads_no_server_module() -> None:
    code = (
        "import sys, mcdropout_client, mcdropout_client.cli, mcdropout_client.oip; "
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r}); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"mcdropout_client imported {result.stdout} {result.stderr}"


def test_the_command_line_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mcdropout_client", "--help"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "python -m mcdropout_client" in result.stdout


def test_client_and_server_messages_share_one_process() -> None:
    """Both copies register mcdropout/v1/mcdropout.proto identically: one set of classes."""
    from mcdropout_client._gen.mcdropout.v1 import mcdropout_pb2 as client_pb
    from service.gen.mcdropout.v1 import mcdropout_pb2 as server_pb

    assert client_pb.DESCRIPTOR.name == server_pb.DESCRIPTOR.name == "mcdropout/v1/mcdropout.proto"
    assert client_pb.PredictRequest is server_pb.PredictRequest


def test_client_and_tritonclient_share_one_process() -> None:
    """tritonclient registers its own inference.* messages: the client must not clash."""
    code = (
        "import tritonclient.grpc, mcdropout_client, mcdropout_client.oip; "
        "from mcdropout_client import Client; Client('127.0.0.1:1').close()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
