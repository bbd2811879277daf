"""The Python client (``mcdropout_client``) against the real server, sync and asyncio."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from mcdropout_client import (
    AccessDeniedError,
    AsyncClient,
    Client,
    ClientError,
    DeadlineExceededError,
    InvalidArgumentError,
    ModelInfo,
    NotFoundError,
    Prediction,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from tests.integration.conftest import TEST_MAX_SAMPLES, RunningServer

LABELS = ("ant", "bee", "cat", "dog")


@pytest.fixture(scope="module")
def mc(server: RunningServer) -> Iterator[Client]:
    with Client(server.target, timeout=60) as client:
        yield client


def rows(n: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, width)).astype(np.float32)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class CountingInterceptor(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        self.methods: list[str] = []

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        self.methods.append(details.method)
        return continuation(details, request)


class AsyncCountingInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        self.methods.append(details.method)
        return await continuation(details, request)


def check_classification(result: Prediction, rows_sent: int) -> None:
    assert result.model == "tiny_cls"
    assert result.num_samples == 50  # the model's default T
    assert result.mean.shape == (rows_sent, 4)
    np.testing.assert_allclose(result.mean.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(result.std, np.sqrt(result.variance))
    assert result.predicted_class is not None
    assert result.predicted_label is not None
    np.testing.assert_array_equal(result.predicted_class, result.mean.argmax(axis=1))
    assert result.predicted_label == tuple(LABELS[c] for c in result.predicted_class)
    assert result.mutual_information is not None
    assert result.mutual_information.shape == (rows_sent,)
    assert (result.mutual_information >= -1e-9).all()


# --- the sync client -----------------------------------------------------------------------


def test_predict_classifier(mc: Client) -> None:
    check_classification(mc.predict("tiny_cls", rows(5, 6)), 5)


def test_predict_regressor_with_two_values(mc: Client) -> None:
    result = mc.predict("tiny_reg", rows(3, 5), num_samples=30)
    assert (result.version, result.num_samples) == ("2", 30)
    assert result.mean.shape == result.std.shape == (3, 2)
    assert result.output.semantics == "values"
    assert result.predicted_class is None
    assert result.predicted_label is None
    assert result.mutual_information is None


def test_version_selection(mc: Client) -> None:
    assert mc.predict("tiny_reg", rows(2, 5), version=1).version == "1"
    assert mc.predict("tiny_reg", rows(2, 5), version="2").version == "2"
    info = mc.model_metadata("tiny_reg", version=1)
    assert (info.version, info.versions) == ("1", ("2", "1"))


def test_dict_list_and_single_row_inputs(mc: Client) -> None:
    image = np.random.default_rng(1).normal(size=(2, 2, 5, 5)).astype(np.float32)
    assert mc.predict("tiny_d2", {"image": image}).mean.shape == (2, 3)
    listed = mc.predict("tiny_cls", rows(3, 6).tolist())
    check_classification(listed, 3)
    one = mc.predict("digits", np.zeros((1, 8, 8), np.float32), num_samples=10)
    assert one.mean.shape == (1, 10)
    assert one.predicted_label is not None
    assert one.predicted_label[0] in {str(d) for d in range(10)}


def test_wrong_dtype_is_refused_before_sending(server: RunningServer) -> None:
    counter = CountingInterceptor()
    with Client(server.target, interceptors=[counter]) as client:
        with pytest.raises(ValueError, match="float32, got float64"):
            client.predict("tiny_cls", rows(2, 6).astype(np.float64))
        assert not any(m.endswith("/Predict") for m in counter.methods)


@pytest.mark.parametrize(
    ("call", "family", "code"),
    [
        (lambda c: c.predict("no_such_model", rows(1, 6)), NotFoundError, grpc.StatusCode.NOT_FOUND),
        (lambda c: c.predict("tiny_reg", rows(1, 5), version=9), NotFoundError, grpc.StatusCode.NOT_FOUND),
        (lambda c: c.model_metadata("no_such_model"), NotFoundError, grpc.StatusCode.NOT_FOUND),
        (lambda c: c.predict("tiny_cls", rows(2, 5)), InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
        (lambda c: c.predict("tiny_cls", rows(1, 6), num_samples=TEST_MAX_SAMPLES + 1), InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
        (lambda c: c.predict("tiny_cls", rows(1, 6), version="x"), InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
        (lambda c: c.predict("tiny_cls", rows(1, 6), interval_levels=[0.9]), InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
        (lambda c: c.predict("tiny_cls", rows(64, 6), num_samples=1000, return_samples=True), ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)  # fmt: skip
def test_errors_carry_their_family_and_status_code(
    mc: Client, call: Callable[[Client], Any], family: type[ClientError], code: grpc.StatusCode
) -> None:
    with pytest.raises(family) as info:
        call(mc)
    assert info.value.code == code
    assert info.value.details
    assert str(info.value).startswith(code.name)


def test_deadline_exceeded(mc: Client) -> None:
    mc.model_metadata("tiny_cls")
    with pytest.raises(DeadlineExceededError) as info:
        mc.predict("tiny_cls", rows(20, 6), num_samples=TEST_MAX_SAMPLES, timeout=0.001)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_other_codes_are_never_retried(server: RunningServer) -> None:
    counter = CountingInterceptor()
    client = Client(server.target, interceptors=[counter], max_retries=5)
    with client, pytest.raises(ClientError):
        client.predict("no_such_model", rows(1, 6))
    assert counter.methods == ["/mcdropout.v1.MCDropoutService/GetModelMetadata"]


def test_unavailable_is_retried_a_bounded_number_of_times() -> None:
    counter = CountingInterceptor()
    target = f"127.0.0.1:{closed_port()}"
    client = Client(target, max_retries=2, retry_backoff_s=0.01, interceptors=[counter])
    with client, pytest.raises(UnavailableError) as info:
        client.list_models()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(counter.methods) == 3


def test_retries_stop_at_the_deadline() -> None:
    counter = CountingInterceptor()
    target = f"127.0.0.1:{closed_port()}"
    client = Client(target, max_retries=50, retry_backoff_s=0.05, interceptors=[counter])
    with client, pytest.raises(ClientError) as info:
        client.health(timeout=0.3)
    assert info.value.code in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    # 0.05 + 0.1 + 0.2 s of back-off already reach the 0.3 s deadline
    assert 1 <= len(counter.methods) <= 4


class RequireToken(grpc.ServerInterceptor):  # type: ignore[misc]
    """Answers UNAUTHENTICATED unless a call carries ``authorization: Bearer <token>``; keeps
    the metadata of every call."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.seen: list[dict[str, str]] = []

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        metadata = dict(details.invocation_metadata)
        self.seen.append(metadata)
        if metadata.get("authorization") == f"Bearer {self.token}":
            return continuation(details)

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required")

        return grpc.unary_unary_rpc_method_handler(deny)


def health_server(port: int, credentials: Any = None, interceptors: tuple[Any, ...] = ()) -> Any:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=interceptors)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    address = f"127.0.0.1:{port}"
    bound = (
        server.add_insecure_port(address)
        if credentials is None
        else server.add_secure_port(address, credentials)
    )
    assert bound == port
    server.start()
    return server


def test_retries_reach_a_server_that_comes_up() -> None:
    port = closed_port()
    started: list[Any] = []
    timer = threading.Timer(0.3, lambda: started.append(health_server(port)))
    counter = CountingInterceptor()
    timer.start()
    try:
        with Client(f"127.0.0.1:{port}", max_retries=10, retry_backoff_s=0.05,
                    interceptors=[counter]) as client:  # fmt: skip
            assert client.health(timeout=30) == "SERVING"
    finally:
        timer.join()
        for server in started:
            server.stop(None)
    assert len(counter.methods) >= 2


def test_health_list_models_and_metadata(mc: Client) -> None:
    assert mc.health() == "SERVING"
    assert mc.health("tiny_cls") == "SERVING"
    assert mc.health("mcdropout.v1.MCDropoutService") == "SERVING"
    with pytest.raises(NotFoundError) as error:
        mc.health("no_such_model")
    assert error.value.code == grpc.StatusCode.NOT_FOUND
    assert "no_such_model" in error.value.details

    models = {m.name: m for m in mc.list_models()}
    assert {"tiny_cls", "tiny_reg", "tiny_d2", "digits", "housing"} <= set(models)
    assert models["tiny_reg"].versions == ("2", "1")
    assert (models["tiny_cls"].task, models["tiny_cls"].ready) == ("classification", True)
    assert models["housing"].task == "regression"

    info = mc.model_metadata("tiny_cls")
    assert isinstance(info, ModelInfo)
    assert info.labels == LABELS
    assert info.task == "classification"
    assert (info.inputs[0].name, info.inputs[0].dtype, info.inputs[0].shape) == (
        "x",
        np.dtype(np.float32),
        (-1, 6),
    )
    assert info.outputs[0].semantics == "logits"
    assert info.default_num_samples == 50
    assert info.max_num_samples == TEST_MAX_SAMPLES
    assert info.dropout
    assert info.verified
    assert info.provider.endswith("ExecutionProvider")
    assert info.opset == 18
    assert len(info.weights_sha256) == 64
    assert sorted(layer.type for layer in info.dropout) == ["Dropout", "Dropout"]
    housing = mc.model_metadata("housing")
    assert (housing.input().name, housing.outputs[0].name) == ("features", "medv")


def test_context_manager_closes_the_channel(server: RunningServer) -> None:
    with Client(server.target) as client:
        assert client.health() == "SERVING"
    with pytest.raises(RuntimeError, match="closed"):
        client.health()


def test_every_predict_option_reaches_the_server_and_comes_back_decoded(mc: Client) -> None:
    x = rows(3, 5, seed=4)
    sampled = mc.predict("tiny_reg", x, num_samples=40, return_samples=True, seed=9)
    assert sampled.seed == 9
    assert sampled.samples is not None
    assert sampled.samples.shape == (3, 40, 2)
    np.testing.assert_allclose(sampled.mean, sampled.samples.mean(axis=1), rtol=1e-12)
    again = mc.predict("tiny_reg", x, num_samples=40, return_samples=True, seed=9)
    np.testing.assert_array_equal(again.samples, sampled.samples)  # type: ignore[arg-type]

    intervals = mc.predict("tiny_reg", x, num_samples=200, interval_levels=(0.95, 0.5))
    assert [(i.level, i.method) for i in intervals.intervals] == [
        (0.95, "gaussian"), (0.95, "empirical"), (0.5, "gaussian"), (0.5, "empirical"),
    ]  # fmt: skip
    wide, narrow = intervals.interval(0.95), intervals.interval(0.5)
    assert (wide.lower <= narrow.lower).all()
    assert (narrow.upper <= wide.upper).all()
    assert ((wide.lower < intervals.mean) & (intervals.mean < wide.upper)).all()

    adaptive = mc.predict("tiny_reg", x, num_samples=256, target_standard_error=0.01)
    assert adaptive.num_samples_per_row is not None
    assert adaptive.num_samples_per_row.shape == (3,)
    assert adaptive.num_samples == adaptive.num_samples_per_row.max() <= 256
    assert mc.predict("tiny_reg", x, num_samples=5).num_samples_per_row is None


# --- bearer token ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_target() -> Iterator[tuple[str, RequireToken]]:
    """A health server that requires the bearer token "s3cr3t-token"."""
    guard = RequireToken("s3cr3t-token")
    port = closed_port()
    server = health_server(port, interceptors=(guard,))
    yield f"127.0.0.1:{port}", guard
    server.stop(None)


def test_the_token_is_sent_with_every_call(token_target: tuple[str, RequireToken]) -> None:
    target, guard = token_target
    extra = [("x-request-source", "tests")]
    with Client(target, token="s3cr3t-token", metadata=extra, timeout=10) as client:
        assert client.health() == "SERVING"
    assert guard.seen[-1]["authorization"] == "Bearer s3cr3t-token"
    assert guard.seen[-1]["x-request-source"] == "tests"
    for token in (None, "wrong"):
        with (
            Client(target, token=token, timeout=10) as client,
            pytest.raises(UnauthenticatedError) as info,
        ):
            client.health()
        assert isinstance(info.value, AccessDeniedError)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token is required" in info.value.details

    async def scenario() -> None:
        async with AsyncClient(target, token="s3cr3t-token", timeout=10) as client:
            assert await client.health() == "SERVING"
        async with AsyncClient(target, timeout=10) as client:
            with pytest.raises(UnauthenticatedError):
                await client.health()

    asyncio.run(scenario())


# --- TLS ------------------------------------------------------------------------------------


def test_tls_client_against_the_plaintext_server_is_unavailable(server: RunningServer) -> None:
    client = Client(server.target, tls=True, max_retries=0)
    assert client.is_secure
    with client, pytest.raises(UnavailableError) as info:
        client.health(timeout=10)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def make_certificate(folder: Path) -> tuple[bytes, bytes]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM), made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert.read_bytes(), key.read_bytes()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_target(certificate: tuple[bytes, bytes]) -> Iterator[str]:
    """A TLS health server on 127.0.0.1 (the model server itself speaks plaintext)."""
    cert, key = certificate
    port = closed_port()
    server = health_server(port, grpc.ssl_server_credentials([(key, cert)]))
    yield f"127.0.0.1:{port}"
    server.stop(None)


def test_tls_with_credentials(tls_target: str, certificate: tuple[bytes, bytes]) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=certificate[0])
    with Client(tls_target, credentials=credentials) as client:
        assert client.health(timeout=10) == "SERVING"


# --- the asyncio client --------------------------------------------------------------------


def test_async_client_predicts_and_describes(server: RunningServer) -> None:
    async def scenario() -> None:
        async with AsyncClient(server.target, timeout=60) as client:
            check_classification(await client.predict("tiny_cls", rows(4, 6)), 4)
            results = await asyncio.gather(
                client.predict("tiny_reg", rows(2, 5), version=1),
                client.predict("tiny_d2", {"image": np.zeros((1, 2, 5, 5), np.float32)}),
                client.predict("tiny_cls", rows(2, 6).tolist(), num_samples=7),
            )
            assert results[0].version == "1"
            assert results[1].mean.shape == (1, 3)
            assert results[2].num_samples == 7
            assert await client.health() == "SERVING"
            assert "tiny_cls" in {m.name for m in await client.list_models()}
            assert (await client.model_metadata("tiny_cls")).labels == LABELS
        with pytest.raises(RuntimeError, match="closed"):
            await client.health()

    asyncio.run(scenario())


def test_async_and_sync_clients_give_the_same_seeded_answers(
    server: RunningServer, mc: Client
) -> None:
    """One core, two transports: with a seed, the same bits for every option."""
    x = rows(2, 5, seed=11)
    options: dict[str, Any] = {"num_samples": 30, "seed": 4, "return_samples": True,
                               "interval_levels": [0.8]}  # fmt: skip
    expected = mc.predict("tiny_reg", x, **options)

    async def scenario() -> Prediction:
        async with AsyncClient(server.target, timeout=60) as client:
            return await client.predict("tiny_reg", x, **options)

    got = asyncio.run(scenario())
    assert (got.version, got.num_samples, got.seed) == (expected.version, 30, 4)
    for field in ("mean", "variance", "std", "samples"):
        np.testing.assert_array_equal(getattr(got, field), getattr(expected, field))
    for a, b in zip(got.intervals, expected.intervals, strict=True):
        assert (a.level, a.method) == (b.level, b.method)
        np.testing.assert_array_equal(a.lower, b.lower)
        np.testing.assert_array_equal(a.upper, b.upper)


def test_async_client_errors(server: RunningServer) -> None:
    async def scenario() -> None:
        async with AsyncClient(server.target) as client:
            for call, code in (
                (client.predict("no_such_model", rows(1, 6)), grpc.StatusCode.NOT_FOUND),
                (client.predict("tiny_cls", rows(1, 5)), grpc.StatusCode.INVALID_ARGUMENT),
                (client.health("no_such_model"), grpc.StatusCode.NOT_FOUND),
            ):
                with pytest.raises(ClientError) as info:
                    await call
                assert info.value.code == code
            await client.model_metadata("tiny_cls")
            with pytest.raises(ClientError) as info:
                await client.predict(
                    "tiny_cls", rows(20, 6), num_samples=TEST_MAX_SAMPLES, timeout=0.001
                )
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            with pytest.raises(ValueError, match="float32, got float64"):
                await client.predict("tiny_cls", rows(1, 6).astype(np.float64))

    asyncio.run(scenario())


def test_async_client_retries_unavailable_only(server: RunningServer) -> None:
    async def scenario() -> None:
        down = AsyncCountingInterceptor()
        target = f"127.0.0.1:{closed_port()}"
        async with AsyncClient(target, max_retries=2, retry_backoff_s=0.01,
                               interceptors=[down]) as client:  # fmt: skip
            with pytest.raises(ClientError) as info:
                await client.list_models()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert len(down.methods) == 3

        up = AsyncCountingInterceptor()
        async with AsyncClient(server.target, max_retries=5, interceptors=[up]) as client:
            with pytest.raises(ClientError):
                await client.model_metadata("no_such_model")
        assert len(up.methods) == 1

    asyncio.run(scenario())


def test_readme_client_examples_run(
    server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's Python that calls the server through the client library (the heredocs that
    import mcdropout_client), against the test server's digits and housing models."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    heredocs = re.findall(r"<<'EOF'\n(.*?)^EOF$", readme, re.MULTILINE | re.DOTALL)
    blocks = [h for h in heredocs if "from mcdropout_client import" in h]
    assert blocks
    for block in blocks:
        code = block.replace('"127.0.0.1:8001"', repr(server.target))
        assert code != block, "the example does not call 127.0.0.1:8001"
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    # The examples catch these errors: they must really have happened.
    assert "INVALID_ARGUMENT input 'features'" in printed
    assert "NOT_FOUND model 'no-such-model' not found" in printed
