"""gRPC health probe for the container's HEALTHCHECK (the image has no grpc_health_probe).

Asks the server's ``grpc.health.v1.Health/Check`` and exits 0 when the answer is SERVING, 1
otherwise (NOT_SERVING while models load or during shutdown, unknown service, no answer).
The address comes from the server's own settings, so a probe in the container follows them:
``MCD_HEALTH_PORT`` when it is set to a port (the plaintext health-only port: with TLS or mutual
TLS on the gRPC port, the probe needs no certificate), else ``MCD_GRPC_PORT`` (default 8001);
and ``MCD_HOST``, where a wildcard address (0.0.0.0, ::) means the loopback.

Usage: ``python healthcheck.py [--service NAME] [--target HOST:PORT] [--timeout-s S]``; the
default service ``""`` is the server overall, ``mcdropout.v1.MCDropoutService`` the API, and a
model name that model.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def default_target(environ: Mapping[str, str] = os.environ) -> str:
    """The server's address from its ``MCD_HOST`` and ``MCD_HEALTH_PORT`` (when it names a
    port) or ``MCD_GRPC_PORT`` settings."""
    host = environ.get("MCD_HOST", "127.0.0.1").strip()
    if host in _WILDCARDS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    health_port = environ.get("MCD_HEALTH_PORT", "-1").strip()
    if health_port.isdigit() and int(health_port) > 0:
        return f"{host}:{health_port}"
    return f"{host}:{environ.get('MCD_GRPC_PORT', '8001').strip()}"


def check(target: str, service: str, timeout_s: float) -> tuple[bool, str]:
    """One health check. Returns (serving, a one-line description)."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return False, f"{target} service {service!r}: {exc.code().name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, (
        f"{target} service {service!r}: {status}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=None, help="host:port (default: from MCD_* env)")
    parser.add_argument("--service", default="", help="health service name (default: overall)")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="deadline of the call")
    args = parser.parse_args(argv)
    serving, line = check(args.target or default_target(), args.service, args.timeout_s)
    (sys.stdout if serving else sys.stderr).write(line + "\n")
    return 0 if serving else 1


if __name__ == "__main__":
    raise SystemExit(main())
