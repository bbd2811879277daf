"""TLS on the gRPC and HTTP ports, with certificates reloaded when their files change.

grpc's dynamic server credentials ask a fetcher for a new certificate configuration at each
TLS handshake: :class:`ServerCertificates` answers from memory (never from the disk, since it
runs on grpc's threads for every new connection), and ``service.protocol.credentials.watch``
re-reads the files off the event loop when they change. A new pair is checked with the
standard library's ``ssl`` (the key matches the certificate, the CA file parses) before it
replaces the old one: a half-written pair is refused and the old one stays. Connections already
open keep the certificate they were made with; new ones get the new one.

With a client CA file, clients must present a certificate signed by it (mutual TLS). The
HTTP port's ``ssl.SSLContext`` (:meth:`ServerCertificates.ssl_context`) is loaded from the same
files and updated with them.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from pathlib import Path

import grpc

from service.errors import CredentialsError
from service.protocol.credentials import FileSignature, file_signature

__all__ = ["ServerCertificates"]

log = logging.getLogger(__name__)


def _refuse_password() -> bytes:
    raise CredentialsError("the private key is encrypted; give the server an unencrypted key")


def _check(cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
    """Refuse a certificate, key or CA file that TLS could not use."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file, password=_refuse_password)
    except ssl.SSLError as exc:
        raise CredentialsError(
            f"{cert_file} / {key_file}: not a usable PEM certificate chain and matching key "
            f"({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise CredentialsError(f"{cert_file} / {key_file}: {exc.strerror or exc}") from None
    if client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=client_ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise CredentialsError(f"{client_ca_file}: not PEM CA certificates ({exc})") from None


class ServerCertificates:
    """The server's certificate chain, key and (for mutual TLS) client CA, from PEM files.

    Args:
        cert_file: the certificate chain (leaf first).
        key_file: its private key, unencrypted.
        client_ca_file: CA certificates that sign the clients' certificates; None: clients
            need no certificate.

    Raises:
        CredentialsError: a file is missing, unreadable or unusable.
    """

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self._files = (cert_file, key_file, *((client_ca_file,) if client_ca_file else ()))
        self._cert_file, self._key_file, self._client_ca_file = cert_file, key_file, client_ca_file
        self.mutual = client_ca_file is not None
        self.description = "TLS certificates from " + ", ".join(str(f) for f in self._files)
        self._lock = threading.Lock()
        self._signature: FileSignature | None = None
        self._current: grpc.ServerCertificateConfiguration | None = None
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._ssl: ssl.SSLContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.reload()

    def reload(self) -> bool:
        """Re-read and check the files if they changed.

        Returns:
            Whether a new configuration will be used from the next handshake on.

        Raises:
            CredentialsError: the changed files cannot be used (the previous ones stay).
        """
        signature = file_signature(self._files)
        if signature == self._signature:
            return False
        try:
            pem = [path.read_bytes() for path in self._files]
        except OSError as exc:
            raise CredentialsError(f"{exc.filename}: {exc.strerror or exc}") from None
        _check(self._cert_file, self._key_file, self._client_ca_file)
        if file_signature(self._files) != signature:
            return False  # rewritten while being read: the next check reads the whole set
        config = grpc.ssl_server_certificate_configuration(
            [(pem[1], pem[0])], root_certificates=pem[2] if self.mutual else None
        )
        with self._lock:
            if self._current is None:
                self._current = config
            else:
                self._pending = config
            self._signature = signature
        if self._ssl is not None and self._loop is not None:
            # The HTTP port's context is changed on the event loop, where its handshakes run.
            self._loop.call_soon_threadsafe(self._reload_ssl, self._ssl)
        return True

    def ssl_context(self) -> ssl.SSLContext:
        """The HTTP port's TLS context: the same files, the same client CA rule, and from then
        on updated with them (on the running event loop, between handshakes). Call it on the
        event loop that serves the HTTP port."""
        if self._ssl is None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            self._load_into(context)
            self._loop = asyncio.get_running_loop()
            self._ssl = context
        return self._ssl

    def _reload_ssl(self, context: ssl.SSLContext) -> None:
        try:
            self._load_into(context)
        except (ssl.SSLError, OSError, CredentialsError) as exc:  # changed again since checked
            log.warning("the HTTP port keeps its certificate: %s", exc)

    def _load_into(self, context: ssl.SSLContext) -> None:
        context.load_cert_chain(self._cert_file, self._key_file, password=_refuse_password)
        if self._client_ca_file is not None:
            context.load_verify_locations(cafile=self._client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's fetcher, at each handshake: the new configuration once, else None (keep)."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials for ``add_secure_port`` that follow the files."""
        return grpc.dynamic_ssl_server_credentials(
            self._current, self._fetch, require_client_authentication=self.mutual
        )
