"""Calls a running server's HTTP port with the kserve SDK's REST client (kserve 0.21,
``InferenceRESTClient`` with the v2 protocol) and prints what it saw as JSON.

Run by tests/integration/test_kserve.py with the Python of the kserve SDK's own venv
(``make kserve-env``: .venv-kserve), never the project's: kserve pins packages the project
does not share. This script imports neither the service nor the tests.

    .venv-kserve/bin/python tests/integration/kserve_checks.py http://127.0.0.1:8000
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import httpx
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig


def _request(binary: bool, rows: int = 3) -> InferRequest:
    x = InferInput("x", [rows, 6], "FP32")
    x.set_data_from_numpy(np.ones((rows, 6), np.float32), binary_data=binary)
    return InferRequest(
        model_name="tiny_cls", infer_inputs=[x], request_id="k", parameters={"mc_samples": 30}
    )


def _outputs(response: Any) -> dict[str, Any]:
    return {
        o.name: {
            "datatype": o.datatype,
            "shape": list(o.shape),
            "first": np.asarray(o.as_numpy()).ravel()[:1].tolist(),
        }
        for o in response.outputs
    }


async def main(url: str) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    async with InferenceRESTClient(RESTConfig(protocol="v2")) as client:
        facts["live"] = await client.is_server_live(url)
        facts["ready"] = await client.is_server_ready(url)
        facts["model_ready"] = await client.is_model_ready(url, "tiny_cls")
        facts["unknown_ready"] = await client.is_model_ready(url, "nope")
        for form, binary in (("json", False), ("binary", True)):
            response = await client.infer(url, _request(binary), model_name="tiny_cls")
            facts[form] = {
                "id": response.id,
                "model_name": response.model_name,
                "outputs": _outputs(response),
                "parameters": dict(response.parameters or {}),
            }
        try:
            await client.infer(url, _request(False), model_name="nope")
            facts["error"] = None
        except httpx.HTTPStatusError as error:
            facts["error"] = {"status": error.response.status_code, "message": str(error)}
    return facts


if __name__ == "__main__":
    json.dump(asyncio.run(main(sys.argv[1])), sys.stdout, indent=1, sort_keys=True, default=str)
