"""The server's layers and the directions its imports may take (docs/architecture.md).

::

    service.app, service.__main__           composition root: may import every layer
      service.protocol                      gRPC (and later HTTP) translation only
        service.core                        data plane, registry, batching: protocol-neutral
          service.engine                    ONNX Runtime sessions, graph surgery, sampling
            service.repository              config.json and the model folders
            service.maths                   pure numpy statistics
              base: service.errors, .settings, .metrics, .tensors, .gen

A module may import its own layer and the layers below it, never one above: the protocol layer
never reaches into the engine (it goes through the core), the maths never imports anything of
the server. The test parses every module of ``service/`` (no import is executed), so a new
module or a new import is checked the day it is added.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "service"

BASE = {"service", "service.errors", "service.settings", "service.metrics", "service.tensors"}

#: layer -> the layers its modules may import (besides their own layer and the base).
ALLOWED: dict[str, set[str]] = {
    "maths": set(),
    "repository": set(),
    "engine": {"maths", "repository"},
    "core": {"maths", "repository", "engine"},
    "protocol": {"maths", "repository", "core"},
    "app": {"maths", "repository", "engine", "core", "protocol"},
}


def layer_of(module: str) -> str:
    """The layer of a module of the service package ("base" for the shared modules)."""
    if module in BASE or module.startswith("service.gen"):
        return "base"
    parts = module.split(".")
    if parts[1] in ("maths", "engine", "core", "protocol"):
        return parts[1]
    if parts[1] == "repository":
        return "repository"
    if parts[1] in ("app", "__main__"):
        return "app"
    raise AssertionError(f"{module} belongs to no layer: add it to tests/unit/test_architecture.py")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def service_imports(path: Path) -> set[str]:
    """Every ``service.*`` module a file imports (``from service import x`` counts as
    ``service.x`` when x is a module of the package)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "service")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "service":
                continue
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                as_path = ROOT / Path(*candidate.split("."))
                is_module = as_path.with_suffix(".py").is_file() or as_path.is_dir()
                found.add(candidate if is_module else node.module)
    return found


MODULES = sorted(p for p in SERVICE.rglob("*.py") if p.relative_to(SERVICE).parts[0] != "gen")


def test_every_module_belongs_to_a_layer() -> None:
    layers = {module_name(p): layer_of(module_name(p)) for p in MODULES}
    assert {"maths", "engine", "core", "protocol", "repository", "app"} <= set(layers.values())


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_down_the_layers(path: Path) -> None:
    module = module_name(path)
    layer = layer_of(module)
    allowed = {"base", layer} | ALLOWED.get(layer, set())
    wrong = sorted(
        f"{imported} ({layer_of(imported)})"
        for imported in service_imports(path)
        if layer_of(imported) not in allowed
    )
    assert not wrong, f"{module} ({layer}) imports a layer above or beside it: {wrong}"


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The parser sees both import forms (a check that sees nothing would always pass)."""
    source = tmp_path / "x.py"
    source.write_text(
        "from service.protocol import status\nimport service.engine.runtime\n"
        "from service.core.dataplane import InferenceCore\n"
    )
    assert service_imports(source) == {
        "service.protocol.status",
        "service.engine.runtime",
        "service.core.dataplane",
    }
    assert layer_of("service.protocol.status") not in {"base", "maths"} | ALLOWED["maths"]
