"""Helpers for data plane tests: a plane over fake engines, wire tensors from arrays."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from numpy.typing import NDArray

from service import tensors
from service.core.catalogue import Catalogue
from service.core.dataplane import DataPlane
from service.core.registry import PreparedVersion, open_version
from service.engine.runtime import Engine
from service.repository import ProvenanceInfo, VersionSource, parse_config
from service.settings import Settings


def source(raw: Mapping[str, Any], name: str = "m", version: int = 1) -> VersionSource:
    """A version of ``raw`` config that exists only in memory."""
    return VersionSource(
        name=name,
        version=version,
        path=Path(f"/nowhere/{name}/{version}"),
        config=parse_config(dict(raw, name=name), name),
        provenance=ProvenanceInfo(),
    )


def make_plane(versions: Iterable[tuple[VersionSource, Engine]], **settings: Any) -> DataPlane:
    """A ready plane serving ``versions``, each opened as at load time."""
    config = Settings(**settings)
    plane = DataPlane(config)
    for version_source, engine in versions:
        prepared = PreparedVersion(version_source, engine, Catalogue(version_source.config), ())
        plane.registry.put(open_version(prepared, plane.batcher, config.max_batch_rows))
    plane.serve()
    return plane


def wire(name: str, array: NDArray[Any]) -> tensors.WireTensor:
    """An array as a protocol layer would find it on the wire."""
    dtype = tensors.from_numpy(array.dtype)
    assert dtype is not None
    return tensors.WireTensor(
        name=name,
        dtype=dtype,
        shape=tuple(array.shape),
        data=tensors.encode(array),
        dtype_name=dtype.numpy.name,
    )
