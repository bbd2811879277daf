"""Real architectures served: every zoo model (export.zoo: BERT, ViT, TransformerEncoder,
LSTM, EfficientNet-B0, MobileNetV3, a heteroscedastic and a two-head model, random weights),
exported once per session (tests/conftest.py), answers like PyTorch MC dropout of the same
model: through every engine form in process, through the server, a text model at two
sequence lengths, mixed heads through both APIs.

Parity (tests/integration/parity.py): per output element, a two-sample z-test of the mean and
a log-variance-ratio test whose standard error comes from the kurtosis (heavy tails), each with
a Bonferroni threshold at false-failure probability ALPHA = 1e-5 per comparison. Class outputs
compare the per-sample softmax probabilities. About 90 comparisons (two per output, per form,
per model, and the server's): the file fails by chance with probability below 1e-3 (the
weights and inputs are seeded; the PyTorch and server samples are fresh each run).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from export import ExportReport, mc_dropout_copy, zoo
from export.mc_mode import fastpath_disabled
from mcdropout_client import Client
from service.engine.onnx_session import SessionConfig
from service.engine.runtime import build_engine
from service.repository import load_version
from service.settings import EngineKind
from tests.integration.parity import assert_matches_torch, measured
from tests.support.server import RunningServer, start_server, stop_server

pytestmark = pytest.mark.export

NAMES = list(zoo.ZOO)
FORMS: list[EngineKind] = ["tiled", "split-graph", "split-sessions"]
#: T of the answers, and the PyTorch samples they are compared with.
T = 400
N_TORCH = 1000
CPU = SessionConfig(use_gpu=False)
#: False-failure probability of each comparison. At 1e-4 the file failed once by chance (the
#: two-head value mean at z = 4.44 against a threshold of 4.06); 150 runs of each form of that
#: model then gave z with mean within 0.3 of 0 and deviation 1.0: no bias.
ALPHA = 1e-5


def semantics(report: ExportReport) -> list[str]:
    return [o["semantics"] for o in report.config["outputs"]]


@torch.no_grad()
def torch_reference(
    name: str, inputs: tuple[torch.Tensor, ...], report: ExportReport, n: int = N_TORCH
) -> list[np.ndarray]:
    """(n, B, ...) PyTorch MC dropout samples per output (probabilities for class outputs)."""
    mc = mc_dropout_copy(zoo.ZOO[name].build())
    rows = inputs[0].shape[0]
    samples: list[list[np.ndarray]] = []
    chunk = max(1, 2000 // rows)
    with fastpath_disabled():
        for done in range(0, n, chunk):
            count = min(chunk, n - done)
            tiled = [t.repeat(count, *([1] * (t.dim() - 1))) for t in inputs]
            result = mc(*tiled)
            outputs = list(result) if isinstance(result, (tuple, list)) else [result]
            for i, (out, kind) in enumerate(zip(outputs, semantics(report), strict=True)):
                value = torch.softmax(out.double(), -1) if kind == "logits" else out.double()
                if len(samples) <= i:
                    samples.append([])
                samples[i].append(value.reshape(count, rows, *out.shape[1:]).numpy())
    return [np.concatenate(s) for s in samples]


def example(name: str, report: ExportReport) -> tuple[torch.Tensor, ...]:
    """The rows the model was exported with (the conv nets were exported from one)."""
    inputs = zoo.ZOO[name].example_inputs()
    rows = (
        report.metadata["verification"]["plan"]["rows"]
        if name in ("efficientnet_b0", "mobilenet_v3_small")
        else 2
    )
    return tuple(t[:rows] for t in inputs)  # fmt: skip


@pytest.fixture(scope="module")
def references(
    zoo_export: Callable[[str], ExportReport],
) -> Callable[[str], tuple[ExportReport, tuple[torch.Tensor, ...], list[np.ndarray]]]:
    cache: dict[str, Any] = {}

    def get(name: str) -> tuple[ExportReport, tuple[torch.Tensor, ...], list[np.ndarray]]:
        if name not in cache:
            report = zoo_export(name)
            inputs = example(name, report)
            cache[name] = (report, inputs, torch_reference(name, inputs, report))
        result: tuple[ExportReport, tuple[torch.Tensor, ...], list[np.ndarray]] = cache[name]
        return result

    return get


@pytest.mark.parametrize("name", NAMES)
def test_every_engine_form_matches_pytorch(name: str, references: Any) -> None:
    report, inputs, reference = references(name)
    source = load_version(report.path.parent, report.version)
    feed = {s.name: t.numpy() for s, t in zip(source.config.inputs, inputs, strict=True)}
    for kind in FORMS:
        engine = build_engine(source, CPU, 256 * 2**20, kind)
        stats = engine.run(feed, T, keep_samples=True)
        for spec, out, ref in zip(source.config.outputs, stats, reference, strict=True):
            mean, variance = assert_matches_torch(measured(out), ref, T, ALPHA)
            # The figures, for `pytest -s` (the closing notes quote them).
            print(
                f"{name} {kind} {spec.name}: mean max|z| {mean.max_abs_z:.2f}, variance max|z| "
                f"{variance.max_abs_z:.2f} (threshold {mean.threshold:.2f}, K={mean.num_elements}), "
                f"variance ratio {variance.min_ratio:.3f}..{variance.max_ratio:.3f}"
            )


def test_many_chunks_of_a_convolutional_net_match_pytorch(references: Any) -> None:
    """EfficientNet-B0 with a tile budget of a few samples: T = 400 in about 100 runs (the
    outside test saw its variance off by 3.5x when T was split into ~110 runs, from ONNX
    Runtime's correlated CPU Dropout masks)."""
    report, inputs, reference = references("efficientnet_b0")
    source = load_version(report.path.parent, report.version)
    feed = {s.name: t.numpy() for s, t in zip(source.config.inputs, inputs, strict=True)}
    probe = build_engine(source, CPU, 256 * 2**20)
    per_row = probe.tile_memory_bytes // probe.budget_rows(feed)
    engine = build_engine(source, CPU, 4 * per_row * inputs[0].shape[0])
    assert engine.budget_rows(feed) // inputs[0].shape[0] == 4  # samples per run
    (stats,) = engine.run(feed, T, keep_samples=True)
    assert_matches_torch(measured(stats), reference[0], T, ALPHA)


@pytest.fixture(scope="module")
def zoo_server(
    zoo_export: Callable[[str], ExportReport],
    zoo_repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningServer]:
    for name in NAMES:
        zoo_export(name)
    _add_padded_bert(zoo_repository)
    server = start_server(zoo_repository, tmp_path_factory.mktemp("zoo_server"))
    yield server
    assert stop_server(server) == 0, server.log()


def _add_padded_bert(repository: Path) -> None:
    """``bert_padded``: the zoo's BERT declared padding-safe (it masks padded tokens), so
    requests of different lengths share runs; a long batching delay merges concurrent ones."""
    target = repository / "bert_padded" / "1"
    if target.exists():
        return
    shutil.copytree(repository / "bert" / "1", target)
    config = json.loads((target / "config.json").read_text())
    config["name"] = "bert_padded"
    config["dynamic_batching"] = {
        "pad": {"input_ids": 0, "attention_mask": 0},
        "max_queue_delay_us": 500_000,
        "max_batch_rows": 4,
    }
    (target / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def zoo_client(zoo_server: RunningServer) -> Iterator[Client]:
    with Client(zoo_server.target, timeout=120) as client:
        yield client


def test_the_server_serves_every_architecture(zoo_client: Client) -> None:
    ready = {m.name: m.ready for m in zoo_client.list_models()}
    assert ready == dict.fromkeys([*NAMES, "bert_padded"], True)
    assert zoo_client.model_metadata("two_head").task == "mixed"
    bert = zoo_client.model_metadata("bert")
    assert [i.shape for i in bert.inputs] == [(-1, -1), (-1, -1)]
    assert [i.max_shape for i in bert.inputs] == [(-1, 64), (-1, 64)]


@pytest.mark.parametrize("name", ["lstm", "vit", "heteroscedastic"])
def test_served_answers_match_pytorch(name: str, zoo_client: Client, references: Any) -> None:
    report, inputs, reference = references(name)
    answer = zoo_client.predict(
        name, {s.name: t.numpy() for s, t in zip(report.inputs, inputs, strict=True)},
        num_samples=T, return_samples=True,
    )  # fmt: skip
    for output, ref in zip(answer.outputs.values(), reference, strict=True):
        assert_matches_torch(measured(output), ref, T, ALPHA)


@pytest.mark.parametrize("length", [16, 24])
def test_a_text_model_is_served_at_two_lengths(
    length: int, zoo_client: Client, references: Any
) -> None:
    report, _, _ = references("bert")
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(0, zoo.BERT_VOCAB, (2, length), generator=generator)
    mask = torch.ones(2, length, dtype=torch.int64)
    mask[1, length - 3 :] = 0  # a padded row
    answer = zoo_client.predict(
        "bert",
        {"input_ids": ids.numpy(), "attention_mask": mask.numpy()},
        num_samples=T,
        return_samples=True,
    )
    reference = torch_reference("bert", (ids, mask), report)
    logits = answer.outputs["logits"]
    assert_matches_torch(measured(logits), reference[0], T, ALPHA)


def test_texts_of_different_lengths_share_runs_when_the_model_pads(
    zoo_server: RunningServer, references: Any
) -> None:
    """Two concurrent requests at lengths 16 and 24 for ``bert_padded`` run as one batch (the
    16-token request padded to 24 with attention mask 0); each answer matches PyTorch MC
    dropout of its own, unpadded, text."""
    import asyncio

    from mcdropout_client import AsyncClient

    report, _, _ = references("bert")
    texts = []
    for length in (16, 24):
        generator = torch.Generator().manual_seed(100 + length)
        ids = torch.randint(0, zoo.BERT_VOCAB, (1, length), generator=generator)
        texts.append((ids, torch.ones(1, length, dtype=torch.int64)))

    async def both() -> list[Any]:
        async with AsyncClient(zoo_server.target, timeout=120) as client:
            calls = [
                client.predict("bert_padded", {"input_ids": i.numpy(), "attention_mask": m.numpy()},
                               num_samples=T, return_samples=True)
                for i, m in texts
            ]  # fmt: skip
            return list(await asyncio.gather(*calls))

    runs_before, requests_before = _batch_requests(zoo_server)
    answers = asyncio.run(both())
    runs, requests = _batch_requests(zoo_server)
    assert (runs - runs_before, requests - requests_before) == (1, 2)  # one run, two requests
    for (ids, mask), answer in zip(texts, answers, strict=True):
        reference = torch_reference("bert", (ids, mask), report)
        logits = answer.outputs["logits"]
        assert_matches_torch(measured(logits), reference[0], T, ALPHA)


def _batch_requests(server: RunningServer) -> tuple[float, float]:
    """(runs, requests) of bert_padded so far, from the server's metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as answer:
        text = answer.read().decode()
    values = {"count": 0.0, "sum": 0.0}
    for line in text.splitlines():
        for part in values:
            if line.startswith(f"mcd_batch_requests_{part}") and 'model="bert_padded"' in line:
                values[part] = float(line.rsplit(" ", 1)[1])
    return values["count"], values["sum"]


def test_a_longer_text_than_the_model_allows_is_refused(zoo_client: Client) -> None:
    from mcdropout_client import InvalidArgumentError

    ids = np.zeros((1, 65), np.int64)
    with pytest.raises(InvalidArgumentError, match=r"axis 1 must have size 1..64, got 65"):
        zoo_client.predict("bert", {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    with pytest.raises(InvalidArgumentError, match="must be equal"):
        zoo_client.predict(
            "bert", {"input_ids": ids[:, :20], "attention_mask": np.ones((1, 21), np.int64)}
        )


def test_mixed_heads_answer_each_heads_statistics(zoo_client: Client, references: Any) -> None:
    _, inputs, reference = references("two_head")
    answer = zoo_client.predict(
        "two_head", {"features": inputs[0].numpy()}, num_samples=T, return_samples=True
    )
    logits, value = answer.outputs["logits"], answer.outputs["value"]
    assert logits.semantics == "logits"
    assert value.semantics == "values"
    assert logits.predicted_label is not None
    assert set(logits.predicted_label) <= {"low", "mid", "high"}
    assert logits.mutual_information is not None
    assert value.mutual_information is None  # a values head has no class measures
    assert_matches_torch(measured(logits), reference[0], T, ALPHA)
    assert_matches_torch(measured(value), reference[1], T, ALPHA)


def test_mixed_heads_through_the_open_inference_protocol(zoo_server: RunningServer) -> None:
    import grpc

    from service.gen.inference import grpc_service_pb2 as oip
    from service.gen.inference import grpc_service_pb2_grpc as oip_grpc

    features = zoo.ZOO["two_head"].example_inputs()[0][:3].numpy()
    with grpc.insecure_channel(zoo_server.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        metadata = stub.ModelMetadata(oip.ModelMetadataRequest(name="two_head"))
        names = {o.name for o in metadata.outputs}
        assert {"logits_entropy", "logits_predicted_label", "value_mean"} <= names
        assert "value_entropy" not in names
        request = oip.ModelInferRequest(model_name="two_head")
        request.inputs.add(name="features", datatype="FP32", shape=list(features.shape))
        request.raw_input_contents.append(features.astype("<f4").tobytes())
        request.outputs.add(name="logits_mean")
        request.outputs.add(name="value_mean")
        response = stub.ModelInfer(request)
    shapes = {o.name: list(o.shape) for o in response.outputs}
    assert shapes == {"logits_mean": [3, 3], "value_mean": [3, 1]}
    logits_mean = np.frombuffer(response.raw_output_contents[0], "<f8").reshape(3, 3)
    np.testing.assert_allclose(logits_mean.sum(axis=1), 1.0, rtol=1e-6)
