"""Model control under load with the real tritonclient[grpc] (and plain HTTP): callers keep
inferring on ``tiny_reg`` while the script reloads it (its files touched, so a new copy is
built and swapped in) and unloads and loads ``tiny_cls``, through gRPC and through the REST
routes. Prints what it saw as JSON (test_model_control.py asserts; tritonclient runs in its own
process, see tritonclient_checks.py).

    python tests/integration/tritonclient_control_checks.py 127.0.0.1:GRPC http://127.0.0.1:HTTP REPO
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

CALLERS = 4
ROUNDS = 3


def features() -> grpcclient.InferInput:
    infer_input = grpcclient.InferInput("features", [2, 5], "FP32")
    infer_input.set_data_from_numpy(np.ones((2, 5), np.float32))
    return infer_input


def post(url: str) -> int:
    request = urllib.request.Request(url, data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return int(response.status)


def main(target: str, http_url: str, repository: Path) -> dict[str, Any]:
    stop = threading.Event()
    failures: list[str] = []
    calls = [0] * CALLERS

    def caller(index: int) -> None:
        client = grpcclient.InferenceServerClient(target)
        while not stop.is_set():
            try:
                client.infer("tiny_reg", [features()], parameters={"mc_samples": 50})
            except InferenceServerException as error:
                failures.append(f"{error.status()}: {error.message()}")
            calls[index] += 1
        client.close()

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(CALLERS)]
    for thread in threads:
        thread.start()
    control = grpcclient.InferenceServerClient(target)
    seen: dict[str, Any] = {"unloaded_ready": [], "loaded_ready": [], "index_after_unload": None}
    try:
        for round_ in range(ROUNDS):
            for path in (repository / "tiny_reg").rglob("model.onnx"):
                os.utime(path, (time.time(), time.time() + round_ + 1))  # a new fingerprint
            if round_ % 2:
                assert post(f"{http_url}/v2/repository/models/tiny_reg/load") == 200
            else:
                control.load_model("tiny_reg")
            control.unload_model("tiny_cls") if round_ % 2 == 0 else post(
                f"{http_url}/v2/repository/models/tiny_cls/unload"
            )
            seen["unloaded_ready"].append(control.is_model_ready("tiny_cls"))
            if seen["index_after_unload"] is None:
                index = control.get_model_repository_index(as_json=True)["models"]
                seen["index_after_unload"] = sorted(
                    (m["name"], m.get("version", ""), m["state"], m.get("reason", ""))
                    for m in index
                )
            control.load_model("tiny_cls")
            seen["loaded_ready"].append(control.is_model_ready("tiny_cls"))
        stats = control.get_inference_statistics("tiny_reg", as_json=True)["model_stats"]
        seen["stats_versions"] = sorted(s["version"] for s in stats)
        x = grpcclient.InferInput("x", [1, 6], "FP32")
        x.set_data_from_numpy(np.zeros((1, 6), np.float32))
        seen["tiny_cls_answers"] = control.infer("tiny_cls", [x]).as_numpy("logits").shape[0] == 1
    finally:
        time.sleep(0.5)  # callers are mid-call on the last reload's copy
        stop.set()
        for thread in threads:
            thread.join(60)
        control.close()
    seen["calls"] = sum(calls)
    seen["every_caller_ran"] = all(c > 0 for c in calls)
    seen["failures"] = failures
    return seen


if __name__ == "__main__":
    facts = main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
    json.dump(facts, sys.stdout, indent=1, sort_keys=True)
