"""Closing the server's client connections from under grpcio, for the end of a graceful stop.

grpcio's ``stop()`` answers every call that reaches the server after it begins with CANCELLED,
until the clients have seen its GOAWAY (grpc core "zombifies" calls that arrive once shutdown is
called): a client still sending at that instant gets a code it does not retry. A connection that
closes under a call, on the other hand, fails it with UNAVAILABLE, which clients retry. So the
server ends a stop by shutting down (``shutdown(2)``, not ``close``: grpc still owns the
descriptors) the TCP connections accepted on its ports, once no request runs, and only then
calls grpcio's ``stop()``.

Linux only (``/proc/self/fd``); elsewhere nothing is cut and grpcio's stop behaves as before.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Collection

__all__ = ["cut_connections"]

_FD_DIR = "/proc/self/fd"


def _cut(fd: int, ports: Collection[int], listening: bool) -> bool:
    """Shut down the socket ``fd`` if it is bound to one of ``ports`` and is a listening
    socket (``listening``) or a connection (not ``listening``)."""
    try:
        if not os.readlink(f"{_FD_DIR}/{fd}").startswith("socket:"):
            return False
        sock = socket.socket(fileno=os.dup(fd))  # a duplicate: closing it leaves grpc's fd open
    except OSError:  # closed meanwhile, or not a socket after all
        return False
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        if sock.getsockname()[1] not in ports:
            return False
        try:
            sock.getpeername()
            connected = True
        except OSError:  # no peer: a listening socket
            connected = False
        if connected == listening:
            return False
        sock.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def _sockets(ports: Collection[int], listening: bool) -> int:
    try:
        fds = [int(name) for name in os.listdir(_FD_DIR)]
    except OSError:
        return 0
    return sum(_cut(fd, ports, listening) for fd in fds)


def cut_connections(ports: Collection[int]) -> int:
    """Stop accepting on ``ports``, then shut down every TCP connection accepted on them.

    Blocking (reads ``/proc``): call it off the event loop.

    Returns:
        How many connections were shut down (0 where ``/proc/self/fd`` does not exist).
    """
    _sockets(ports, listening=True)
    return _sockets(ports, listening=False)
