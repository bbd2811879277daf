"""``python -m service``: settings -> checks -> logging -> App.serve().

Exit status: 0 after a graceful stop (SIGTERM, SIGINT); 2 when the server cannot start as
configured: a bad flag or variable, the model repository missing, a port in use, a TLS or
token file that cannot be used. Each of these is one line on stderr, ``error: ...``, naming
the flag, never a traceback.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sys

from service.errors import CredentialsError
from service.settings import Settings, SettingsError, load_settings

#: The exit status of every start-up error (as argparse uses for a usage error).
EXIT_STARTUP_ERROR = 2


def check_startup(settings: Settings) -> None:
    """What can be checked before anything starts, so that the operator reads one line.

    The binds are tried with a throw-away socket: gRPC's own bind failure also writes a
    C-level log line. ``App.start`` still turns a bind that fails later (a race) into a
    :class:`service.app.StartupError`.

    Raises:
        SettingsError: the model repository is not a folder, or a port is in use.
    """
    repository = settings.model_repository
    if not repository.is_dir():
        what = "is not a folder" if repository.exists() else "no such folder"
        raise SettingsError(f"--model-repository {repository}: {what}")
    ports = {
        "--grpc-port": settings.grpc_port,
        "--http-port": settings.http_port,
        "--metrics-port": settings.metrics_port,
        "--health-port": settings.health_port,
    }
    for flag, port in ports.items():
        if port > 0 and _in_use(settings.host, port):
            raise SettingsError(
                f"{flag} {port} is in use on {settings.host} (choose another port, or 0 for any)"
            )


def _in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails because something else has it (SO_REUSEADDR, as
    both servers bind: a port left in TIME_WAIT is free for them)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False  # the server's own bind reports the bad host
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
        check_startup(settings)
    except SettingsError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_STARTUP_ERROR
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from service.app import App, StartupError  # noqa: PLC0415 (after logging: loads onnxruntime)

    async def serve() -> None:
        # Built inside the running loop: grpc.aio binds its server to the current loop.
        await App(settings).serve()

    try:
        asyncio.run(serve())
    except (StartupError, CredentialsError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_STARTUP_ERROR
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
