"""TLS, mutual TLS, bearer tokens and connection limits against the real server, with
certificates made by the test (tests/certs.py).

The launcher's readiness check speaks plaintext gRPC, so these servers are ready when their
port file appears (the server writes it once serving).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.gen.inference import grpc_service_pb2 as oip
from service.gen.inference import grpc_service_pb2_grpc as oip_grpc
from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.gen.mcdropout.v1 import mcdropout_pb2_grpc as pb_grpc
from tests.certs import Authority, Issued
from tests.integration import hostile
from tests.integration.conftest import ExportedModels
from tests.integration.test_battery import sample, scrape, slim_repository
from tests.support.server import SERVER_FLAGS
from tools.launcher import ServiceProcess, service_command

Code = grpc.StatusCode
TOKEN = "first-token-0123456789abcdef"
ROTATED = "rotated-token-abcdef0123456789"
WAIT_S = 20.0  # bound on the waits for a reload (checked every 0.2 s here)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(repository: Path, workdir: Path, *flags: str) -> ServiceProcess:
    """The server with SERVER_FLAGS and ``flags``, ready once its port file is written."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "server-ports.json"
    command = service_command(repository, port_file, [*SERVER_FLAGS, *flags])
    server = ServiceProcess(
        "secure server", command, port_file=port_file, log_path=workdir / "server.log"
    )
    try:
        server.wait_until(server.port_file_ready, 60)
    except BaseException:
        server.stop()
        raise
    return server


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen in {WAIT_S} s"
        time.sleep(0.1)


@dataclass
class Pki:
    folder: Path
    ca: Authority
    ca_file: Path
    cert: Path
    key: Path
    client_ca_file: Path
    client: Issued
    rogue_client: Issued
    tokens: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority("server CA")
    cert, key = ca.issue("mcdropout", server=True).write(folder, "server")
    client_ca = Authority("client CA")
    tokens = folder / "tokens"
    tokens.write_text(f"# clients\n{TOKEN}\n")
    return Pki(
        folder=folder, ca=ca, ca_file=ca.write(folder), cert=cert, key=key,
        client_ca_file=client_ca.write(folder, "client-ca"),
        client=client_ca.issue("a client", server=False),
        rogue_client=Authority("rogue CA").issue("rogue", server=False), tokens=tokens,
    )  # fmt: skip


def tls_channel(server: ServiceProcess, root: bytes, client: Issued | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    return grpc.secure_channel(server.target, credentials)


def auth(token: str, scheme: str = "Bearer") -> list[tuple[str, str]]:
    return [("authorization", f"{scheme} {token}")]


def predict(channel: grpc.Channel, metadata: Any = None) -> pb.PredictResponse:
    request = hostile.predict(num_samples=5)
    response: pb.PredictResponse = pb_grpc.MCDropoutServiceStub(channel).Predict(
        request, timeout=10, metadata=metadata
    )
    return response


def code_of(call: Callable[[], object]) -> Code:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return Code.OK


# -- TLS and tokens -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secure(
    test_models: ExportedModels, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    workdir = tmp_path_factory.mktemp("secure")
    health_port = free_port()
    server = start(
        slim_repository(test_models, workdir / "repository"), workdir,
        "--tls-cert-file", str(pki.cert), "--tls-key-file", str(pki.key),
        "--auth-token-file", str(pki.tokens), "--health-port", str(health_port),
        "--credentials-check-interval-s", "0.2",
    )  # fmt: skip
    server.health_port = health_port  # type: ignore[attr-defined]
    yield server
    assert server.stop() == 0, server.log_tail()


def test_plaintext_clients_cannot_talk_to_the_tls_port(secure: ServiceProcess) -> None:
    with grpc.insecure_channel(secure.target) as channel:
        assert code_of(lambda: predict(channel, auth(TOKEN))) == Code.UNAVAILABLE


def test_a_client_that_does_not_trust_the_server_ca_cannot_connect(
    secure: ServiceProcess,
) -> None:
    with tls_channel(secure, Authority("unrelated").cert) as channel:
        assert code_of(lambda: predict(channel, auth(TOKEN))) == Code.UNAVAILABLE


def test_both_apis_and_reflection_answer_over_tls_with_a_token(
    secure: ServiceProcess, pki: Pki
) -> None:
    with tls_channel(secure, pki.ca.cert) as channel:
        assert predict(channel, auth(TOKEN)).outputs
        # The standard call credentials send the same metadata.
        call_credentials = grpc.access_token_call_credentials(TOKEN)
        stub = pb_grpc.MCDropoutServiceStub(channel)
        listed = stub.ListModels(pb.ListModelsRequest(), timeout=10, credentials=call_credentials)
        assert {m.name for m in listed.models} == {"tiny_cls", "tiny_reg"}
        infer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            hostile.infer(), timeout=10, metadata=auth(TOKEN)
        )
        assert infer.outputs
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = reflection.ServerReflectionInfo(iter([request]), metadata=auth(TOKEN))
        names = {s.name for s in answer.list_services_response.service}
        assert "mcdropout.v1.MCDropoutService" in names


UNAUTHENTICATED_CALLS: list[tuple[str, Callable[[grpc.Channel, Any], object]]] = [
    ("Predict", predict),
    ("ListModels", lambda ch, md: pb_grpc.MCDropoutServiceStub(ch).ListModels(pb.ListModelsRequest(), timeout=10, metadata=md)),
    ("GetModelMetadata", lambda ch, md: pb_grpc.MCDropoutServiceStub(ch).GetModelMetadata(pb.GetModelMetadataRequest(model="tiny_cls"), timeout=10, metadata=md)),
    ("ModelInfer", lambda ch, md: oip_grpc.GRPCInferenceServiceStub(ch).ModelInfer(hostile.infer(), timeout=10, metadata=md)),
    ("ServerLive", lambda ch, md: oip_grpc.GRPCInferenceServiceStub(ch).ServerLive(oip.ServerLiveRequest(), timeout=10, metadata=md)),
    ("ModelStreamInfer", lambda ch, md: list(oip_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer(iter([hostile.infer()]), timeout=10, metadata=md))),
    ("reflection", lambda ch, md: list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10, metadata=md))),
]  # fmt: skip


@pytest.mark.parametrize("metadata", [None, auth("wrong-token"), auth(TOKEN, "Basic"),
                                      [("authorization", TOKEN)]],
                         ids=["none", "wrong", "basic", "no scheme"])  # fmt: skip
@pytest.mark.parametrize(("name", "call"), UNAUTHENTICATED_CALLS, ids=[c[0] for c in UNAUTHENTICATED_CALLS])  # fmt: skip
def test_every_rpc_but_health_needs_an_accepted_token(
    secure: ServiceProcess, pki: Pki, name: str, call: Any, metadata: Any
) -> None:
    with tls_channel(secure, pki.ca.cert) as channel:
        with pytest.raises(grpc.RpcError) as info:
            call(channel, metadata)
        assert info.value.code() == Code.UNAUTHENTICATED, info.value.details()
        assert TOKEN not in (info.value.details() or "")
        # Health needs no token: probes work.
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_refused_calls_are_counted_and_logged_rate_limited(
    secure: ServiceProcess, pki: Pki
) -> None:
    labels = 'method="Predict",model=""'
    text = scrape(secure)
    before = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith("mcd_request_errors_total{") and 'code="UNAUTHENTICATED"' in line
                 and labels.split(",", maxsplit=1)[0] in line)  # fmt: skip
    with tls_channel(secure, pki.ca.cert) as channel:
        for _ in range(5):
            assert code_of(lambda: predict(channel, auth("nope"))) == Code.UNAUTHENTICATED
    text = scrape(secure)
    after = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("mcd_request_errors_total{") and 'code="UNAUTHENTICATED"' in line
                and labels.split(",", maxsplit=1)[0] in line)  # fmt: skip
    assert after - before == 5
    lines = [line for line in secure.log().splitlines() if "unauthenticated call" in line]
    assert 1 <= len(lines) <= 3, lines
    assert "nope" not in secure.log()  # a token is never logged


def test_the_plaintext_health_port_serves_health_only(secure: ServiceProcess) -> None:
    target = f"127.0.0.1:{secure.health_port}"  # type: ignore[attr-defined]
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "mcdropout.v1.MCDropoutService", "tiny_cls"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert code_of(lambda: predict(channel, auth(TOKEN))) == Code.UNIMPLEMENTED


def https(
    server: ServiceProcess, path: str, ca: bytes, token: str | None = None, body: Any = None
) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of a request to the server's HTTP port over TLS."""
    context = ssl.create_default_context(cadata=ca.decode())
    request = urllib.request.Request(
        f"https://127.0.0.1:{server.http_port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={} if token is None else {"Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


INFER = {"inputs": [{"name": "features", "shape": [1, 5], "datatype": "FP32", "data": [0.1] * 5}]}


def test_the_http_port_serves_tls_and_checks_the_same_tokens(
    secure: ServiceProcess, pki: Pki
) -> None:
    assert https(secure, "/v2/health/ready", pki.ca.cert) == (200, {"ready": True})
    status, body = https(secure, "/v2/models/tiny_reg/infer", pki.ca.cert, body=INFER)
    assert status == 401, body
    assert "Bearer <token>" in body["error"]
    status, body = https(secure, "/v2/models/tiny_reg/infer", pki.ca.cert, "nope", INFER)
    assert (status, body["error"]) == (401, "the bearer token is not accepted")
    status, body = https(secure, "/v2/models/tiny_reg/infer", pki.ca.cert, TOKEN, INFER)
    assert status == 200, body
    assert body["model_name"] == "tiny_reg"
    # Plain HTTP gets no answer from the TLS port.
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        urllib.request.urlopen(f"http://127.0.0.1:{secure.http_port}/v2/health/ready", timeout=10)


def test_the_token_file_is_rotated_without_a_restart(secure: ServiceProcess, pki: Pki) -> None:
    with tls_channel(secure, pki.ca.cert) as channel:
        tmp = pki.tokens.with_suffix(".new")
        tmp.write_text(f"{ROTATED}\n")
        os.replace(tmp, pki.tokens)
        wait_for(lambda: code_of(lambda: predict(channel, auth(ROTATED))) == Code.OK,
                 "the new token being accepted")  # fmt: skip
        assert code_of(lambda: predict(channel, auth(TOKEN))) == Code.UNAUTHENTICATED
        # A change that leaves no token is refused: the rotated token stays valid.
        pki.tokens.write_text("\n")
        wait_for(lambda: "change refused" in secure.log(), "the empty file being refused")
        assert code_of(lambda: predict(channel, auth(ROTATED))) == Code.OK


def test_the_certificate_is_rotated_without_a_restart(secure: ServiceProcess, pki: Pki) -> None:
    renewed_ca = Authority("renewed server CA")
    renewed = renewed_ca.issue("mcdropout", server=True)
    # Half a change (the new certificate with the old key) is refused: the old pair stays.
    pki.cert.write_bytes(renewed.cert)
    wait_for(lambda: "matching key" in secure.log(), "the mismatched pair being refused")
    with tls_channel(secure, pki.ca.cert) as channel:
        assert predict(channel, auth(ROTATED)).outputs
    pki.key.write_bytes(renewed.key)  # now the pair is whole

    def new_connections_use_the_new_certificate() -> bool:
        with tls_channel(secure, renewed_ca.cert) as channel:
            return code_of(lambda: predict(channel, auth(ROTATED))) == Code.OK

    wait_for(new_connections_use_the_new_certificate, "the renewed certificate being served")
    # The HTTP port follows the same files.
    wait_for(
        lambda: https(secure, "/v2/health/ready", renewed_ca.cert)[0] == 200,
        "the HTTP port serving the renewed certificate",
    )
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        https(secure, "/v2/health/ready", pki.ca.cert)
    with tls_channel(secure, pki.ca.cert) as channel:
        assert code_of(lambda: predict(channel, auth(ROTATED))) == Code.UNAVAILABLE


# -- mutual TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mutual(
    test_models: ExportedModels, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServiceProcess, Authority, Issued, Issued]]:
    workdir = tmp_path_factory.mktemp("mutual")
    ca = Authority("server CA")
    cert, key = ca.issue("mcdropout", server=True).write(workdir, "server")
    client_ca = Authority("client CA")
    server = start(
        slim_repository(test_models, workdir / "repository"), workdir,
        "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-client-ca-file", str(client_ca.write(workdir, "client-ca")),
    )  # fmt: skip
    client = client_ca.issue("a client", server=False)
    rogue = Authority("rogue CA").issue("rogue", server=False)
    yield server, ca, client, rogue
    assert server.stop() == 0, server.log_tail()


def test_mutual_tls_needs_a_client_certificate_signed_by_the_client_ca(
    mutual: tuple[ServiceProcess, Authority, Issued, Issued],
) -> None:
    server, ca, client, rogue = mutual
    with tls_channel(server, ca.cert) as channel:
        assert code_of(lambda: predict(channel)) == Code.UNAVAILABLE  # no certificate
    with tls_channel(server, ca.cert, rogue) as channel:
        assert code_of(lambda: predict(channel)) == Code.UNAVAILABLE
    with tls_channel(server, ca.cert, client) as channel:
        assert predict(channel).outputs


# -- start-up and limits ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--auth-token-file", "{tmp}/absent"], "error: --auth-token-file {tmp}/absent: No such file"),
        (["--tls-cert-file", "{tmp}/c", "--tls-key-file", "{tmp}/k"], "error: --tls-cert-file / --tls-key-file"),
        (["--tls-client-ca-file", "{tmp}/ca"], "error: tls_client_ca_file (mutual TLS) needs"),
    ],
)  # fmt: skip
def test_unusable_credentials_stop_the_start_with_one_line(
    test_models: ExportedModels, tmp_path: Path, flags: list[str], fragment: str
) -> None:
    flags = [f.format(tmp=tmp_path) for f in flags]
    port_file = tmp_path / "ports.json"
    command = service_command(slim_repository(test_models, tmp_path / "r"), port_file, flags)
    server = ServiceProcess("bad", command, port_file=port_file, log_path=tmp_path / "log")
    assert server.process.wait(60) == 2
    assert fragment.format(tmp=tmp_path) in server.log()
    assert "Traceback" not in server.log()


def test_connections_and_streams_per_connection_are_bounded(
    test_models: ExportedModels, tmp_path: Path
) -> None:
    server = start(
        slim_repository(test_models, tmp_path / "repository"), tmp_path,
        "--max-connections", "2", "--max-concurrent-streams", "2",
    )  # fmt: skip
    own = [("grpc.use_local_subchannel_pool", 1)]
    try:
        first = grpc.insecure_channel(server.target, options=own)
        second = grpc.insecure_channel(server.target, options=own)
        assert predict(first).outputs and predict(second).outputs  # noqa: PT018
        with grpc.insecure_channel(server.target, options=own) as third:
            assert code_of(lambda: predict(third)) == Code.UNAVAILABLE
        second.close()

        def a_third_connection_fits() -> bool:
            with grpc.insecure_channel(server.target, options=own) as third:
                return code_of(lambda: predict(third)) == Code.OK

        wait_for(a_third_connection_fits, "a freed connection slot")

        # 24 calls at once on one connection that allows 2 streams: the client queues the
        # excess or has it refused (REFUSED_STREAM: UNAVAILABLE, retryable), and the server never
        # holds more than 2, so no engine run merges more than 2 requests (with a limit of 200,
        # the 24 queue up together and runs merge many of them: this fails).
        def batches() -> tuple[float, float]:
            text = scrape(server)
            at_most_2 = sample(text, "mcd_batch_requests_bucket", model="tiny_cls", le="2.0")
            return at_most_2, sample(text, "mcd_batch_requests_count", model="tiny_cls")

        small_before, all_before = batches()
        stub = pb_grpc.MCDropoutServiceStub(first)
        one_row = hostile.predict(x=np.ones((1, 6), np.float32), num_samples=500)
        futures = [stub.Predict.future(one_row, timeout=60) for _ in range(24)]
        codes = [code_of(f.result) for f in futures]
        assert set(codes) <= {Code.OK, Code.UNAVAILABLE}, codes
        assert Code.OK in codes
        small_after, all_after = batches()
        assert all_after > all_before
        assert small_after - small_before == all_after - all_before
        first.close()
    finally:
        assert server.stop() == 0, server.log_tail()
