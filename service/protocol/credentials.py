"""Credentials read from files and re-read when the files change, without a restart.

The TLS certificate, key and CA files and the token file are checked every
``credentials_check_interval_s`` by :func:`watch`: a ``stat`` of each file (device, inode,
size, modification time in ns) tells whether it changed, so a Kubernetes secret update (a
symlink swapped to a new folder) and a file rewritten in place are both seen. The checks and
reads run on a worker thread, one at a time: a slow or hung disk never blocks the event loop,
and checks never pile up. A changed file that cannot be used (half written, malformed) is
refused with one warning, and the previous credentials stay in use until a good one appears.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from service.errors import CredentialsError

__all__ = ["FileSignature", "Reloadable", "file_signature", "watch"]

log = logging.getLogger(__name__)

#: (device, inode, size, mtime in ns) of each file: what changes when a file is replaced.
FileSignature = tuple[tuple[int, int, int, int], ...]


def file_signature(paths: Sequence[Path]) -> FileSignature:
    """The signature of ``paths`` (symlinks followed).

    Raises:
        CredentialsError: a file is missing or cannot be examined.
    """
    signature = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise CredentialsError(f"{path}: {exc.strerror or exc}") from None
        signature.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(signature)


class Reloadable(Protocol):
    """Credentials kept in memory and re-read from their files when these change."""

    #: What the credentials are, for the log ("bearer tokens from /etc/tokens").
    description: str

    def reload(self) -> bool:
        """Re-read the files if they changed (blocking I/O: never on the event loop).

        Returns:
            Whether new credentials are now in use.

        Raises:
            CredentialsError: the files changed but cannot be used; the previous credentials
                stay in use.
        """
        ...


async def watch(items: Sequence[Reloadable], interval_s: float) -> None:
    """Reload ``items`` whenever their files change, until cancelled.

    Each check runs on a worker thread; the next starts ``interval_s`` after the previous one
    ended. A refused change is logged once (until the error changes or a good file comes).
    """
    refused: dict[int, str] = {}
    while True:
        await asyncio.sleep(interval_s)
        for index, item in enumerate(items):
            try:
                changed = await asyncio.to_thread(item.reload)
            except CredentialsError as exc:
                if refused.get(index) != str(exc):
                    log.warning("%s: change refused, still using the previous ones: %s",
                                item.description, exc)  # fmt: skip
                    refused[index] = str(exc)
                continue
            except Exception:  # a bug must not end the watch: the next change gets its chance
                log.exception("%s: reload failed", item.description)
                continue
            refused.pop(index, None)
            if changed:
                log.info("%s: reloaded", item.description)
