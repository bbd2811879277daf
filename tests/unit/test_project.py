"""Project rules that are easy to break: generated code in sync, no torch on the serving path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_protobuf_code_matches_the_proto_sources() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tools.protogen", "--check"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_serving_path_never_imports_torch() -> None:
    code = (
        "import sys, service.app, service.__main__, service.core.dataplane, service.protocol.mcdropout_servicer; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'onnxscript', 'export'}); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"serving imported {result.stdout} {result.stderr}"


def test_readme_points_to_the_settings_table() -> None:
    """The table itself is docs/settings.md, checked against Settings in test_settings.py."""
    assert "docs/settings.md" in (ROOT / "README.md").read_text()
