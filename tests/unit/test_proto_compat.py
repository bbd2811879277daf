"""The server's ``inference`` protos against tritonclient's own copies: every message, field
(number, type, label, message type), enum value and RPC the server declares exists in Triton's
with the same number and type, so tritonclient decodes every answer (ModelConfig included)
with its own code. Run in two subprocesses: the two sets cannot share a descriptor pool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "support" / "proto_fields.py"


def dump(which: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), which],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    loaded: dict[str, Any] = json.loads(result.stdout)
    return loaded


def test_every_declaration_matches_tritons() -> None:
    ours, triton = dump("service"), dump("triton")
    assert "rpc ModelConfig" in ours
    assert "ModelConfig" in ours
    mismatches = []
    for name, declared in ours.items():
        if name not in triton:
            mismatches.append(f"{name}: not in Triton's protos")
        elif name.startswith("rpc "):
            if declared != triton[name]:
                mismatches.append(f"{name}: {declared} != {triton[name]}")
        else:
            for key, value in declared.items():
                if triton[name].get(key) != value:
                    mismatches.append(f"{name}.{key}: {value} != {triton[name].get(key)}")
    assert mismatches == []
