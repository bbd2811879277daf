"""KServe v2 / the Open Inference Protocol over HTTP/1.1 and JSON, with Triton's binary tensor
data extension and the REST forms of Triton's extensions: a third protocol layer over the one
:class:`DataPlane`, as thin as the two gRPC ones.

Routes (``{m}`` a model, ``{v}`` a version; ``/versions/{v}`` may be left out everywhere)::

    GET  /v2/health/live                     {"live": true}                         200
    GET  /v2/health/ready                    {"ready": bool}                        200 / 503
    GET  /v2                                 server metadata
    GET  /v2/models/{m}/versions/{v}         model metadata
    GET  /v2/models/{m}/versions/{v}/ready   {"name", "ready"}        200 / 503 (404 unknown)
    POST /v2/models/{m}/versions/{v}/infer   inference (JSON, or JSON + binary tensor data)
    GET  /v2/models/{m}/versions/{v}/config  Triton's model configuration
    GET  /v2/models/{m}/versions/{v}/stats   Triton's statistics (GET /v2/models/stats: all)
    POST /v2/repository/index                Triton's repository index ({"ready": bool})
    POST /v2/repository/models/{m}/load      load or reload a model
    POST /v2/repository/models/{m}/unload    unload a model

Requests are decoded here only as far as finding each input's datatype, shape and data
(``service.tensors.WireTensor``); the parameters are read by ``service.protocol.parameters``,
the documents built by ``service.protocol.oip_json``, the error tree mapped by
``service.protocol.status`` (``{"error": "..."}`` with the HTTP status of the canonical code),
and every request is counted by the same :func:`~service.protocol.status.observe` as a gRPC
call, labelled with the name of its gRPC twin (``ModelInfer``, ``ServerReady``, ...).

Binary tensor data: with the header ``Inference-Header-Content-Length: N`` the body is N bytes
of JSON followed by the raw inputs that declare ``parameters.binary_data_size``, in input
order. An output is answered binary when its ``parameters.binary_data`` is true, or when the
request's ``parameters.binary_data_output`` is (tritonclient.http's default); the answer then
carries the same header and the outputs' raw bytes after its JSON.

The stack is aiohttp: an asyncio HTTP/1.1 server (C parser) that runs on the application's own
event loop beside grpc.aio (``AppRunner``/``TCPSite``, no thread, no second loop), reads whole
bodies with a size cap, and cancels a handler whose client went away. JSON bodies and answers
larger than :data:`OFF_LOOP_BYTES` are parsed and built on a worker thread, so a large JSON
tensor never blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from service.core.dataplane import DataPlane, PredictInput
from service.errors import InvalidInput, NotFound, ResourceExhausted, quote
from service.protocol import oip_json
from service.protocol.http_codec import (
    HEADER_LENGTH,
    encode_answer,
    json_object,
    parameters_of,
    parse_json,
    requested_outputs,
    wire_inputs,
)
from service.protocol.parameters import request_options
from service.protocol.status import http_status, observe
from service.protocol.tls import ServerCertificates
from service.settings import Settings

__all__ = [
    "HEADER_LENGTH",
    "OFF_LOOP_BYTES",
    "Authenticator",
    "HttpServer",
    "build_app",
]

log = logging.getLogger(__name__)

#: JSON parts above this size are parsed (and JSON answers above it built) off the event loop.
OFF_LOOP_BYTES = 64 * 1024
#: Checks a request's ``Authorization`` header value (None when absent) and raises
#: ``service.errors.Unauthenticated`` unless it is accepted; health routes are not checked.
Authenticator = Callable[[str | None], None]

_JSON = "application/json"
_BINARY = "application/octet-stream"
_PLANE = web.AppKey("plane", DataPlane)


@dataclass
class _State:
    """What the handlers share besides the plane."""

    max_body_bytes: int
    authenticate: Authenticator | None
    draining: bool = False


_STATE = web.AppKey("state", _State)


# -- errors and bookkeeping ------------------------------------------------------------------


def _json_response(document: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(document, separators=(",", ":")).encode(),
        status=status,
        content_type=_JSON,
    )


def _error(message: str, status: int, headers: Mapping[str, str] | None = None) -> web.Response:
    response = _json_response({"error": message}, status)
    response.headers.update(headers or {})
    return response


Handler = Callable[[web.Request], Awaitable[web.Response]]


def _endpoint(method: str, handler: Handler, *, public: bool = False) -> Handler:
    """A route with the bookkeeping of every request (``observe``), the error mapping and, unless
    ``public`` (health), the authentication hook."""

    async def endpoint(request: web.Request) -> web.Response:
        plane = request.app[_PLANE]
        state = request.app[_STATE]
        name = request.match_info.get("model")
        model = "" if name is None else plane.model_label(name)

        failures: list[Exception] = []

        async def call() -> web.Response:
            try:
                if not public and state.authenticate is not None:
                    state.authenticate(request.headers.get("Authorization"))
                return await handler(request)
            except Exception as exc:
                failures.append(exc)
                raise

        outcome = await observe(
            method,
            model,
            lambda: None,  # HTTP requests carry no deadline (Triton's timeout is a parameter)
            call,
            version_of=lambda response: str(response.get(_ANSWERED_VERSION, "")),
        )
        if outcome.response is not None:
            return outcome.response
        status = http_status(outcome.status)
        if failures and isinstance(failures[0], _TooLarge):
            status = 413  # not 429: retrying the same body cannot succeed
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        return _error(outcome.message, status, headers)

    return endpoint


#: The key under which a handler leaves the version that answered (the metrics label).
_ANSWERED_VERSION = web.ResponseKey("answered_version", int)


class _TooLarge(ResourceExhausted):
    """A body above ``--max-message-bytes``: RESOURCE_EXHAUSTED, answered 413."""


async def _body(request: web.Request, limit: int) -> bytes:
    """The whole body. aiohttp inflates ``Content-Encoding: gzip``, ``deflate`` (and ``br``)
    bodies, tritonclient's request compression, and counts the limit on what they inflate to.

    Raises:
        ResourceExhausted: the body (inflated) is above the limit (answered HTTP 413).
    """
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _TooLarge(
            f"the request body is larger than the limit of {limit} bytes (--max-message-bytes)"
        ) from None


async def _load_json(data: bytes | memoryview, what: str) -> Any:
    if len(data) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(parse_json, data, what)
    return parse_json(data, what)


async def _optional_body(request: web.Request) -> dict[str, Any]:
    """A small JSON object body (repository requests); empty when there is none."""
    state = request.app[_STATE]
    body = await _body(request, state.max_body_bytes)
    return {} if not body.strip() else json_object(await _load_json(body, "the body"), "the body")


async def _infer(request: web.Request) -> web.Response:
    plane = request.app[_PLANE]
    state = request.app[_STATE]
    body = await _body(request, state.max_body_bytes)
    length = request.headers.get(HEADER_LENGTH)
    if length is None:
        header_part, binary = memoryview(body), memoryview(b"")
    else:
        try:
            header_length = int(length)
        except ValueError:
            raise InvalidInput(f"{HEADER_LENGTH} must be an integer, got {quote(length)}") from None
        if not 0 <= header_length <= len(body):
            raise InvalidInput(
                f"{HEADER_LENGTH} {header_length} is outside the body of {len(body)} bytes"
            )
        view = memoryview(body)
        header_part, binary = view[:header_length], view[header_length:]
    document = json_object(await _load_json(header_part, "the request's JSON"), "the request")
    parameters = parameters_of(document, "the request")
    options = request_options(parameters)
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInput("parameter 'binary_data_output' must be a boolean")
    requested = requested_outputs(document)
    result = await plane.predict(
        PredictInput(
            model=request.match_info["model"],
            version=request.match_info.get("version"),
            inputs=wire_inputs(document, binary),
            num_samples=options.num_samples,
            return_samples=options.return_samples,
            interval_levels=options.interval_levels,
            target_standard_error=options.target_standard_error,
            seed=options.seed,
            outputs=requested.names,
        ),
        timeout_s=options.timeout_s,
    )
    request_id = document.get("id")
    values = sum(result.read(a).size for a in result.answer)
    if values * 8 > OFF_LOOP_BYTES:  # about 8 bytes a value, more as JSON text
        header, blobs = await asyncio.to_thread(
            encode_answer, result, request_id, requested, binary_default
        )
    else:
        header, blobs = encode_answer(result, request_id, requested, binary_default)
    if blobs is None:
        response = web.Response(body=header, content_type=_JSON)
    else:
        response = web.Response(
            body=header + blobs, content_type=_BINARY, headers={HEADER_LENGTH: str(len(header))}
        )
    response[_ANSWERED_VERSION] = result.version
    return response


# -- the other routes ------------------------------------------------------------------------


def _version(request: web.Request) -> str | None:
    return request.match_info.get("version")


async def _live(request: web.Request) -> web.Response:
    return _json_response({"live": True})


async def _ready(request: web.Request) -> web.Response:
    ready = request.app[_PLANE].ready and not request.app[_STATE].draining
    return _json_response({"ready": ready}, 200 if ready else 503)


async def _server_metadata(request: web.Request) -> web.Response:
    return _json_response(oip_json.server_metadata())


async def _model_ready(request: web.Request) -> web.Response:
    plane = request.app[_PLANE]
    name = request.match_info["model"]
    ready = plane.model_ready(name, _version(request)) and not request.app[_STATE].draining
    if not ready and not plane.has_model(name):
        raise NotFound(f"model {quote(name)} not found")
    return _json_response({"name": name, "ready": ready}, 200 if ready else 503)


async def _model_metadata(request: web.Request) -> web.Response:
    metadata = request.app[_PLANE].metadata(request.match_info["model"], _version(request))
    return _json_response(oip_json.model_metadata(metadata))


async def _model_config(request: web.Request) -> web.Response:
    metadata = request.app[_PLANE].metadata(request.match_info["model"], _version(request))
    return _json_response(oip_json.model_config(metadata))


async def _statistics(request: web.Request) -> web.Response:
    entries = request.app[_PLANE].statistics(request.match_info.get("model", ""), _version(request))
    return _json_response(oip_json.model_statistics(entries))


async def _index(request: web.Request) -> web.Response:
    body = await _optional_body(request)
    ready = body.get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidInput("'ready' must be a boolean")
    return _json_response(oip_json.repository_index(request.app[_PLANE].index(), ready))


async def _load(request: web.Request) -> web.Response:
    body = await _optional_body(request)
    oip_json.check_load_parameters(json_object(body.get("parameters", {}), "'parameters'"))
    await request.app[_PLANE].load(request.match_info["model"])
    return _json_response({})


async def _unload(request: web.Request) -> web.Response:
    body = await _optional_body(request)
    oip_json.check_unload_parameters(json_object(body.get("parameters", {}), "'parameters'"))
    await request.app[_PLANE].unload(request.match_info["model"], wait=True)
    return _json_response({})


@web.middleware
async def _unmatched(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Unknown routes and methods get the protocol's ``{"error": ...}`` too."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return _error(f"no route {request.path} (see docs/http.md)", 404)
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return _error(
            f"{request.method} is not allowed on {request.path} (allowed: {allowed})",
            405,
            {"Allow": allowed},
        )


def build_app(
    plane: DataPlane, settings: Settings, authenticate: Authenticator | None = None
) -> web.Application:
    """The aiohttp application of the routes above (tests serve it in process).

    Args:
        plane: the data plane.
        settings: ``max_message_bytes`` caps a request body.
        authenticate: the token check (None: no authentication).
    """
    app = web.Application(client_max_size=settings.max_message_bytes, middlewares=[_unmatched])
    app[_PLANE] = plane
    app[_STATE] = _State(settings.max_message_bytes, authenticate)
    model_routes: list[tuple[str, str, str, Handler]] = [
        ("GET", "", "ModelMetadata", _model_metadata),
        ("GET", "/ready", "ModelReady", _model_ready),
        ("POST", "/infer", "ModelInfer", _infer),
        ("GET", "/config", "ModelConfig", _model_config),
        ("GET", "/stats", "ModelStatistics", _statistics),
    ]
    routes = [
        web.get("/v2/health/live", _endpoint("ServerLive", _live, public=True)),
        web.get("/v2/health/ready", _endpoint("ServerReady", _ready, public=True)),
        web.get("/v2", _endpoint("ServerMetadata", _server_metadata)),
        # Before /v2/models/{model}: "stats" is not a model's name here.
        web.get("/v2/models/stats", _endpoint("ModelStatistics", _statistics)),
        web.post("/v2/repository/index", _endpoint("RepositoryIndex", _index)),
        web.post("/v2/repository/models/{model}/load", _endpoint("RepositoryModelLoad", _load)),
        web.post(
            "/v2/repository/models/{model}/unload", _endpoint("RepositoryModelUnload", _unload)
        ),
    ]
    for verb, suffix, method, handler in model_routes:
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            routes.append(web.route(verb, prefix + suffix, _endpoint(method, handler)))
    app.add_routes(routes)
    return app


class HttpServer:
    """The REST server, on the application's event loop.

    Args:
        settings: host, ``http_port``, body limit, grace period.
        plane: the data plane.
        authenticate: the token check (None: no authentication).
        certificates: the TLS certificates (``service.protocol.tls``): the port serves HTTPS
            with them, reloaded when their files change; None: plain HTTP.
    """

    def __init__(
        self,
        settings: Settings,
        plane: DataPlane,
        authenticate: Authenticator | None = None,
        certificates: ServerCertificates | None = None,
    ) -> None:
        self._settings = settings
        self._certificates = certificates
        self.app = build_app(plane, settings, authenticate)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> int:
        """Bind and serve.

        Returns:
            The bound port (useful with port 0).

        Raises:
            OSError: the port cannot be bound.
        """
        runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,  # a client that leaves frees its queue slot
            shutdown_timeout=self._settings.grace_period_s,
        )
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(
            runner,
            self._settings.host,
            self._settings.http_port,
            reuse_address=True,
            ssl_context=None if self._certificates is None else self._certificates.ssl_context(),
        )
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            self._runner = None
            raise
        self.port = int(runner.addresses[0][1])
        return self.port

    def begin_shutdown(self) -> None:
        """Answer readiness 503 from now on (the drain: load balancers move away)."""
        self.app[_STATE].draining = True

    async def stop(self, drain_s: float = 0.0, end_drain: asyncio.Event | None = None) -> None:
        """Readiness 503; keep serving for ``drain_s`` or until ``end_drain`` is set; then stop
        accepting connections and let requests in flight finish within the grace period."""
        self.begin_shutdown()
        if drain_s > 0:
            end = end_drain or asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(end.wait(), drain_s)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
