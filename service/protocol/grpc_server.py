"""The gRPC server: both protocols on one port, health, reflection (v1 and v1alpha), TLS,
tokens and limits.

Services: ``mcdropout.v1.MCDropoutService`` (the project's own API) and
``inference.GRPCInferenceService`` (the Open Inference Protocol), both thin layers over one
:class:`DataPlane`. Every call goes through ``service.protocol.interceptor.StatusInterceptor``
(admission, tokens, tolerant decoding, status codes, request metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.core.dataplane import DataPlane
from service.errors import CredentialsError
from service.gen.inference import grpc_service_pb2_grpc as oip_grpc
from service.gen.mcdropout.v1 import mcdropout_pb2_grpc as pb_grpc
from service.protocol.auth import BearerTokens
from service.protocol.credentials import Reloadable, watch
from service.protocol.interceptor import SERVICE_NAME, StatusInterceptor
from service.protocol.mcdropout_servicer import MCDropoutServicer
from service.protocol.oip_servicer import OIP_SERVICE_NAME, OpenInferenceServicer
from service.protocol.reflection import enable_reflection
from service.protocol.sockets import cut_connections
from service.protocol.status import Gate, status_of
from service.protocol.tls import ServerCertificates
from service.settings import Settings

__all__ = [
    "OIP_SERVICE_NAME",
    "SERVICE_NAME",
    "GrpcServer",
    "StatusInterceptor",
    "server_options",
    "status_of",
]

log = logging.getLogger(__name__)

HEALTH_SERVICE_NAME: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
#: After the last request is answered and before the connections are cut: time for the answers
#: still in grpc's buffers to leave (one lost would reach its client as UNAVAILABLE, retried).
_FLUSH_S = 0.2


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    """The grpc.aio server options: message sizes and the connection limits of the settings."""
    s = settings
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", s.max_message_bytes),
        ("grpc.max_send_message_length", s.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.max_concurrent_streams", s.max_concurrent_streams),
        ("grpc.max_allowed_incoming_connections", s.max_connections),
        ("grpc.keepalive_time_ms", _ms(s.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(s.keepalive_timeout_s)),
        # The server's side of keepalive enforcement: pings closer than this on a connection
        # without data are strikes, and two strikes close it (GOAWAY too_many_pings).
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(s.keepalive_min_ping_interval_s)),
        ("grpc.keepalive_permit_without_calls", int(s.keepalive_permit_without_calls)),
    ]
    if s.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", _ms(s.max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", _ms(s.max_connection_age_grace_s)),
        ]
    return options


class GrpcServer:
    """The grpc.aio server with the project's services, health and reflection.

    Raises:
        CredentialsError: a TLS or token file of the settings cannot be used.
    """

    def __init__(self, settings: Settings, plane: DataPlane) -> None:
        self._settings = settings
        self._plane = plane
        self._gate = Gate()
        s = settings
        self._tokens: BearerTokens | None = None
        self._certificates: ServerCertificates | None = None
        try:
            if s.auth_token_file is not None:
                self._tokens = BearerTokens(s.auth_token_file)
        except CredentialsError as exc:
            raise CredentialsError(f"--auth-token-file {exc}") from None
        try:
            if s.tls_cert_file is not None and s.tls_key_file is not None:
                self._certificates = ServerCertificates(
                    s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file
                )
        except CredentialsError as exc:
            raise CredentialsError(f"--tls-cert-file / --tls-key-file: {exc}") from None
        options = server_options(s)
        interceptor = StatusInterceptor(plane.model_label, gate=self._gate, tokens=self._tokens)
        self._server = grpc.aio.server(interceptors=[interceptor], options=options)
        pb_grpc.add_MCDropoutServiceServicer_to_server(  # type: ignore[no-untyped-call]
            MCDropoutServicer(plane), self._server
        )
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            OpenInferenceServicer(plane, self._gate), self._server
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if s.reflection:
            # v1alpha and v1 (service.protocol.reflection)
            enable_reflection(
                (SERVICE_NAME, OIP_SERVICE_NAME, HEALTH_SERVICE_NAME),
                self._server,
            )
        # Plaintext, health only: for probes that cannot speak TLS or send tokens.
        self._health_server: grpc.aio.Server | None = None
        if s.health_port >= 0:
            self._health_server = grpc.aio.server(
                interceptors=[StatusInterceptor(plane.model_label)], options=options
            )
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
        self._watch: asyncio.Task[None] | None = None
        self.port = 0
        self.health_port = -1
        self._health_models: set[str] = set()

    @property
    def certificates(self) -> ServerCertificates | None:
        """The TLS certificates of the settings (the HTTP port serves them too)."""
        return self._certificates

    @property
    def tokens(self) -> BearerTokens | None:
        """The accepted bearer tokens of the settings (the HTTP port checks them too)."""
        return self._tokens

    async def start(self) -> int:
        """Bind and start serving; health reports NOT_SERVING until :meth:`update_health`
        finds the data plane ready.

        Returns:
            The bound port (useful with port 0).
        """
        s = self._settings
        address = f"{s.host}:{s.grpc_port}"
        if self._certificates is not None:
            self.port = self._server.add_secure_port(address, self._certificates.credentials())
        else:
            self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC to {address}")
        if self._health_server is not None:
            health_address = f"{s.host}:{s.health_port}"
            self.health_port = self._health_server.add_insecure_port(health_address)
            if self.health_port == 0:
                raise OSError(f"cannot bind the health port to {health_address}")
        for service in ("", SERVICE_NAME, OIP_SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
        if self._health_server is not None:
            await self._health_server.start()
        watched: list[Reloadable] = [c for c in (self._certificates, self._tokens) if c]
        if watched:
            self._watch = asyncio.create_task(watch(watched, s.credentials_check_interval_s))
        log.info(
            "gRPC port %d: %s%s%s", self.port,
            "plaintext" if self._certificates is None
            else "mutual TLS" if self._certificates.mutual else "TLS",
            ", bearer tokens required" if self._tokens else "",
            f"; health only on plaintext port {self.health_port}" if self._health_server else "",
        )  # fmt: skip
        return self.port

    async def update_health(self) -> None:
        """Health from the data plane (it calls this after every model change): overall and
        both services SERVING when the plane is ready, else NOT_SERVING; per model (service =
        model name) SERVING while it serves, NOT_SERVING when it failed to load, was unloaded
        or its folder was removed. A name never seen stays NOT_FOUND. Ignored once shutting
        down (the health servicer keeps NOT_SERVING)."""
        serving, not_serving = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        overall = serving if self._plane.ready else not_serving
        for service in ("", SERVICE_NAME, OIP_SERVICE_NAME):
            await self.health.set(service, overall)
        models = self._plane.model_health()
        for name in sorted(self._health_models - models.keys()):
            await self.health.set(name, not_serving)
        for name, ready in models.items():
            await self.health.set(name, serving if ready else not_serving)
        self._health_models |= models.keys()

    async def stop(
        self, grace_s: float, drain_s: float = 0.0, end_drain: asyncio.Event | None = None
    ) -> None:
        """Stop without a CANCELLED answer to any call.

        1. Health NOT_SERVING; keep serving for ``drain_s`` or until ``end_drain`` is set
           (health-checking clients and load balancers leave meanwhile).
        2. Answer every new call UNAVAILABLE (health excepted), and let the requests running
           finish, within ``grace_s``.
        3. Cut the client connections (``service.protocol.sockets``): a call arriving now fails
           with UNAVAILABLE, where grpcio's stop would answer CANCELLED; then stop grpcio.
        """
        await self.health.enter_graceful_shutdown()
        if drain_s > 0:
            end = end_drain or asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(end.wait(), drain_s)
        self._gate.close()
        if not await self._gate.wait_idle(grace_s):
            log.warning("%d request(s) still running after the grace period", self._gate.running)
        if self._watch is not None:
            self._watch.cancel()
        await asyncio.sleep(_FLUSH_S)
        ports = [p for p in (self.port, self.health_port) if p > 0]
        cut = await asyncio.to_thread(cut_connections, ports)
        log.info("closed %d client connection(s)", cut)
        servers = [self._server, *([self._health_server] if self._health_server else [])]
        await asyncio.gather(*(server.stop(0) for server in servers))

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()
