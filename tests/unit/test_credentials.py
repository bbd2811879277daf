"""Bearer tokens and TLS certificates from files, re-read when the files change."""

from __future__ import annotations

import asyncio
import hmac
import os
from pathlib import Path
from typing import Any

import grpc
import pytest

from service.errors import CredentialsError
from service.protocol import auth
from service.protocol.auth import BearerTokens, parse_tokens
from service.protocol.credentials import watch
from service.protocol.tls import ServerCertificates
from tests.certs import Authority

TOKEN = "s3cret-token_1.2~x+y/z=="
OTHER = "another-token-0123456789"


def bearer(token: str, scheme: str = "Bearer") -> list[tuple[str, str]]:
    return [("user-agent", "test"), ("authorization", f"{scheme} {token}")]


def rewrite(path: Path, text: str) -> None:
    """Replace the file (new inode, as an editor or a Kubernetes secret update does)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- tokens ---------------------------------------------------------------------------------------


def test_token_file_lines_comments_and_blanks() -> None:
    text = f"# the clients\n\n  {TOKEN}  \n{OTHER}\n"
    assert parse_tokens(text, "f") == [TOKEN, OTHER]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("", "no token"), ("# only a comment\n\n", "no token"), ("ab cd\n", "f line 1: not a bearer")],
)
def test_a_token_file_without_usable_tokens_is_refused(text: str, fragment: str) -> None:
    with pytest.raises(CredentialsError, match=fragment) as info:
        parse_tokens(text, "f")
    assert "ab cd" not in str(info.value)  # a token is never shown


def test_only_a_listed_bearer_token_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN}\n{OTHER}\n")
    tokens = BearerTokens(path)
    assert tokens.check(bearer(TOKEN)) is None
    assert tokens.check(bearer(OTHER)) is None
    assert tokens.check(bearer(TOKEN, scheme="bearer")) is None  # the scheme is case-insensitive
    assert tokens.check(bearer(TOKEN + "x")) == "the bearer token is not accepted"
    assert tokens.check(bearer(TOKEN[:-1])) == "the bearer token is not accepted"
    assert tokens.check(bearer(TOKEN, scheme="Basic")) is not None
    assert tokens.check([("authorization", "Bearer")]) is not None
    assert tokens.check([("authorization", TOKEN)]) is not None
    assert "needs the metadata" in (tokens.check([("user-agent", "x")]) or "")
    assert tokens.check(None) is not None
    assert tokens.check([("authorization", f"Bearer {TOKEN}".encode())]) is None


def test_every_token_is_compared_in_constant_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hmac.compare_digest on equal-length digests, for every token, whichever matches: the
    time of a check does not depend on which token matched or how much of one was right."""
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN}\n{OTHER}\nthird-token\n")
    tokens = BearerTokens(path)
    compared: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    for given in (TOKEN, "wrong", OTHER * 10):
        compared.clear()
        tokens.check(bearer(given))
        assert compared == [(32, 32)] * 3


def test_the_token_file_is_reloaded_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(TOKEN + "\n")
    tokens = BearerTokens(path)
    assert tokens.reload() is False  # unchanged
    rewrite(path, OTHER + "\n")
    assert tokens.reload() is True
    assert tokens.check(bearer(OTHER)) is None
    assert tokens.check(bearer(TOKEN)) is not None  # revoked


def test_a_bad_change_is_refused_and_the_previous_tokens_stay(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(TOKEN + "\n")
    tokens = BearerTokens(path)
    rewrite(path, "\n")  # emptied (half written?)
    with pytest.raises(CredentialsError, match="no token"):
        tokens.reload()
    assert tokens.check(bearer(TOKEN)) is None
    path.unlink()
    with pytest.raises(CredentialsError, match="No such file"):
        tokens.reload()
    assert tokens.check(bearer(TOKEN)) is None


def test_a_missing_token_file_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="No such file"):
        BearerTokens(tmp_path / "absent")


# -- certificates -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authority() -> Authority:
    return Authority("test CA")


def test_certificates_load_and_a_change_is_handed_to_grpc_once(
    authority: Authority, tmp_path: Path
) -> None:
    cert, key = authority.issue("server", server=True).write(tmp_path, "server")
    certificates = ServerCertificates(cert, key, None)
    assert isinstance(certificates.credentials(), grpc.ServerCredentials)
    assert certificates.mutual is False
    assert certificates._fetch() is None  # the initial configuration is grpc's already
    renewed = authority.issue("server", server=True)
    cert.write_bytes(renewed.cert)
    key.write_bytes(renewed.key)
    assert certificates.reload() is True
    assert isinstance(certificates._fetch(), grpc.ServerCertificateConfiguration)
    assert certificates._fetch() is None  # once
    assert certificates.reload() is False


def test_a_key_that_does_not_match_is_refused_and_the_old_pair_stays(
    authority: Authority, tmp_path: Path
) -> None:
    cert, key = authority.issue("server", server=True).write(tmp_path, "server")
    certificates = ServerCertificates(cert, key, None)
    cert.write_bytes(authority.issue("other", server=True).cert)  # the key is not its key
    with pytest.raises(CredentialsError, match="matching key"):
        certificates.reload()
    assert certificates._fetch() is None  # grpc keeps the old pair


@pytest.mark.parametrize(
    ("broken", "fragment"),
    [("cert", "not a usable PEM"), ("key", "not a usable PEM"), ("ca", "not PEM CA")],
)
def test_unusable_files_are_refused_at_start(
    authority: Authority, tmp_path: Path, broken: str, fragment: str
) -> None:
    cert, key = authority.issue("server", server=True).write(tmp_path, "server")
    ca = authority.write(tmp_path)
    {"cert": cert, "key": key, "ca": ca}[broken].write_text("-----BEGIN garbage-----\n")
    with pytest.raises(CredentialsError, match=fragment):
        ServerCertificates(cert, key, ca)


def test_an_encrypted_key_is_refused_without_asking_for_a_password(
    authority: Authority, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization

    issued = authority.issue("server", server=True)
    cert, key = issued.write(tmp_path, "server")
    private = serialization.load_pem_private_key(issued.key, None)
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(CredentialsError):
        ServerCertificates(cert, key, None)


def test_mutual_tls_needs_the_client_ca(authority: Authority, tmp_path: Path) -> None:
    cert, key = authority.issue("server", server=True).write(tmp_path, "server")
    certificates = ServerCertificates(cert, key, authority.write(tmp_path))
    assert certificates.mutual is True


# -- the watch ----------------------------------------------------------------------------------


class Counting:
    """A reloadable whose reload raises, changes or not, as the test says."""

    description = "counting"

    def __init__(self, results: list[bool | CredentialsError]) -> None:
        self.results = results
        self.calls = 0

    def reload(self) -> bool:
        self.calls += 1
        result = self.results[min(self.calls, len(self.results)) - 1]
        if isinstance(result, Exception):
            raise result
        return result


def test_the_watch_reloads_off_the_loop_and_logs_a_refusal_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = CredentialsError("broken file")
    item = Counting([False, bad, bad, bad, True, False])

    async def scenario() -> None:
        task = asyncio.create_task(watch([item], interval_s=0.01))
        while item.calls < 6:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level("INFO", logger="service.protocol.credentials"):
        asyncio.run(scenario())
    refused = [r for r in caplog.records if "change refused" in r.getMessage()]
    reloaded = [r for r in caplog.records if "reloaded" in r.getMessage()]
    assert len(refused) == 1
    assert "broken file" in refused[0].getMessage()
    assert len(reloaded) == 1
