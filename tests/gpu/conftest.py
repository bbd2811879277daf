"""Fixtures of the CUDA tests: the integration suite's test models, and one real server started
with ``--device gpu`` on them.

Nothing heavy is imported unless CUDA really runs here (tests/gpu/cuda.py): without it every
module of this folder skips at collection, and these fixtures are never defined.

The test models come from tests/integration/conftest.py's session fixture (exported in the test
session), or, when ``GPU_TEST_MODELS`` names a folder prepared by ``python -m tests.gpu.bundle``,
from that folder (no export on the GPU host).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gpu import cuda

if cuda.skip_reason() is None:
    from mcdropout_client import Client
    from tests.gpu import bundle
    from tests.integration.conftest import ExportedModels
    from tests.support.server import RunningServer, start_server, stop_server

    if os.environ.get(bundle.ENV):

        @pytest.fixture(scope="session")
        def test_models() -> ExportedModels:
            """The bundle ``GPU_TEST_MODELS`` names (python -m tests.gpu.bundle)."""
            models: ExportedModels = bundle.load(Path(os.environ[bundle.ENV]))
            return models

    else:
        # The session-scoped export of the integration suite, re-exported so that tests here
        # see it (a conftest's fixtures only reach its own folder).
        from tests.integration.conftest import test_models

    __all__ = ["gpu_client", "gpu_server", "test_models"]

    @pytest.fixture(scope="session")
    def gpu_server(
        test_models: ExportedModels, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[RunningServer]:
        """``python -m service --device gpu`` with the integration suite's limits and models
        (the flag given last wins over SERVER_FLAGS' ``--device``)."""
        workdir = tmp_path_factory.mktemp("gpu-server")
        running = start_server(test_models.repository, workdir, "--device", cuda.DEVICE)
        yield running
        code = stop_server(running)
        assert code == 0, f"server exited with {code} on SIGTERM:\n{running.log()}"

    @pytest.fixture(scope="session")
    def gpu_client(gpu_server: RunningServer) -> Iterator[Client]:
        with Client(gpu_server.target, timeout=60) as client:
            yield client
