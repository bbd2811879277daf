"""Bearer-token authentication: every RPC except ``grpc.health.v1`` carries the metadata
``authorization: Bearer <token>`` with a token of the token file (one per line).

Tokens are kept as SHA-256 digests and every accepted digest is compared with
``hmac.compare_digest``, without stopping at the first match: the time a check takes tells
nothing about how much of a token was right, nor which token matched. The file is re-read when
it changes (``service.protocol.credentials.watch``), so tokens are added and revoked without a
restart; a changed file without any token is refused (the previous tokens stay), since an
empty file is more likely a half-written one than a wish to lock every client out.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from service.errors import CredentialsError, Unauthenticated
from service.protocol.credentials import FileSignature, file_signature

__all__ = ["METADATA_KEY", "BearerTokens", "http_authenticator", "parse_tokens"]

#: The metadata key (gRPC keys are lower case).
METADATA_KEY = "authorization"
#: RFC 6750's token68 characters: what a bearer token may contain.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

Metadata = Sequence[tuple[str, str | bytes]]


def parse_tokens(text: str, source: str) -> list[str]:
    """The tokens of a token file: one per line, blank lines and ``#`` comments skipped.

    Args:
        text: the file's text.
        source: the file's name, for error messages (a token is never shown).

    Raises:
        CredentialsError: a line that is not a valid bearer token, or no token at all.
    """
    tokens = []
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not _TOKEN.fullmatch(token):
            raise CredentialsError(
                f"{source} line {number}: not a bearer token (letters, digits and -._~+/ then "
                "optional =, no spaces)"
            )
        tokens.append(token)
    if not tokens:
        raise CredentialsError(f"{source}: no token (one per line)")
    return tokens


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class BearerTokens:
    """The accepted tokens of a token file, re-read when it changes.

    Args:
        path: the token file.

    Raises:
        CredentialsError: the file is unreadable or holds no valid token.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"bearer tokens from {path}"
        self._lock = threading.Lock()
        self._digests: tuple[bytes, ...] = ()
        self._signature: FileSignature | None = None
        self.reload()

    def reload(self) -> bool:
        """Re-read the file if it changed.

        Returns:
            Whether new tokens are now in use.

        Raises:
            CredentialsError: the changed file cannot be used (the previous tokens stay).
        """
        signature = file_signature([self.path])
        if signature == self._signature:
            return False
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CredentialsError(f"{self.path}: {exc}") from None
        digests = tuple(_digest(t.encode("ascii")) for t in parse_tokens(text, str(self.path)))
        if file_signature([self.path]) != signature:
            return False  # rewritten while being read: the next check reads it whole
        with self._lock:
            self._digests = digests
            self._signature = signature
        return True

    def check(self, metadata: Metadata | None) -> str | None:
        """Why the call's metadata is not authenticated, or None when it is.

        Args:
            metadata: the call's invocation metadata.

        Returns:
            None for an accepted token, else a message for the client (never the token).
        """
        value = next((v for k, v in metadata or () if k == METADATA_KEY), None)
        if value is None:
            return "this server needs the metadata 'authorization: Bearer <token>'"
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return "the authorization metadata must be 'Bearer <token>'"
        given = _digest(token.encode("utf-8", "surrogateescape"))
        with self._lock:
            digests = self._digests
        accepted = False
        for digest in digests:  # every one, whatever matched: no early exit to time
            accepted |= hmac.compare_digest(digest, given)
        return None if accepted else "the bearer token is not accepted"


def http_authenticator(tokens: BearerTokens) -> Callable[[str | None], None]:
    """The HTTP port's check of an ``Authorization`` header against the same tokens (the
    ``service.protocol.http.Authenticator`` hook).

    Raises (from the returned function):
        Unauthenticated: no header, not ``Bearer <token>``, or a token not accepted.
    """

    def authenticate(header: str | None) -> None:
        problem = tokens.check([] if header is None else [(METADATA_KEY, header)])
        if problem is not None:
            raise Unauthenticated(problem.replace("metadata", "header"))

    return authenticate
