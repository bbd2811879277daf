from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.settings import Settings, SettingsError, load_settings


def test_defaults_are_documented_ports() -> None:
    s = load_settings([], environ={})
    assert (s.grpc_port, s.metrics_port) == (8001, 8002)
    assert s.model_repository == Path("models")
    assert s.device == "auto"


def test_flag_beats_environment_beats_default() -> None:
    env = {"MCD_GRPC_PORT": "9001", "MCD_MAX_BATCH_ROWS": "64", "MCD_ALLOW_SPINNING": "true"}
    s = load_settings(["--grpc-port", "9002"], environ=env)
    assert s.grpc_port == 9002
    assert s.max_batch_rows == 64
    assert s.allow_spinning is True
    s = load_settings(["--no-allow-spinning", "--port-file", "/tmp/p.json"], environ=env)
    assert s.allow_spinning is False
    assert s.port_file == Path("/tmp/p.json")


def test_lifecycle_settings_from_flags_and_environment() -> None:
    s = load_settings([], environ={})
    assert (s.repository_poll_s, s.allow_empty_start) == (0.0, False)  # off by default
    s = load_settings(["--allow-empty-start"], environ={"MCD_REPOSITORY_POLL_S": "2.5"})
    assert (s.repository_poll_s, s.allow_empty_start) == (2.5, True)


def test_log_level_is_case_insensitive_in_environment() -> None:
    assert load_settings([], environ={"MCD_LOG_LEVEL": "debug"}).log_level == "DEBUG"


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("max_batch_rows", 0, "max_batch_rows must be an integer >= 1, got 0"),
        ("compute_workers", -1, "compute_workers must be an integer >= 1, got -1"),
        ("grpc_port", 70000, "grpc_port must be in 0..65535, got 70000"),
        ("metrics_port", -2, "metrics_port must be in -1..65535"),
        ("grace_period_s", -1.0, "grace_period_s must be >= 0"),
        ("drain_period_s", -0.5, "drain_period_s must be >= 0"),
        ("drain_period_s", float("nan"), "drain_period_s must be >= 0"),
        ("repository_poll_s", -1.0, "repository_poll_s must be >= 0"),
        ("device", "tpu", "device must be one of auto, cpu, gpu, got 'tpu'"),
        (
            "cuda_conv_algo_search",
            "fast",
            "cuda_conv_algo_search must be one of heuristic, exhaustive, default, got 'fast'",
        ),
        ("max_message_bytes", 2**31, "max_message_bytes must be < 2 GiB"),
    ],
)
def test_invalid_values_are_rejected_with_the_value(
    field: str, value: object, fragment: str
) -> None:
    with pytest.raises(SettingsError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        Settings(**{field: value})  # type: ignore[arg-type]


def test_unparsable_environment_value_names_the_setting() -> None:
    with pytest.raises(SettingsError, match="max_queue_size must be a int, got 'lots'"):
        load_settings([], environ={"MCD_MAX_QUEUE_SIZE": "lots"})
    with pytest.raises(SettingsError, match="reflection must be a bool"):
        load_settings([], environ={"MCD_REFLECTION": "maybe"})


def test_every_field_has_a_flag_and_help() -> None:
    from dataclasses import fields

    from service.settings import build_parser

    help_text = build_parser().format_help()
    for f in fields(Settings):
        assert "--" + f.name.replace("_", "-") in help_text
        assert f.metadata["doc"]


# -- security and connection settings, and their documentation ------------------------------------


def test_docs_settings_md_is_the_table_of_every_setting() -> None:
    """docs/settings.md is generated from Settings (python -m tools.settings_doc): a field
    added, renamed or redocumented without regenerating it fails here."""
    from dataclasses import fields

    from tools.settings_doc import DOC, render

    assert DOC.read_text() == render(), "docs/settings.md is stale: python -m tools.settings_doc"
    for f in fields(Settings):
        assert f"`MCD_{f.name.upper()}`" in render()
        assert f"`--{f.name.replace('_', '-')}`" in render()


def test_security_and_limit_settings_come_from_the_environment() -> None:
    env = {
        "MCD_TLS_CERT_FILE": "/run/tls/tls.crt",
        "MCD_TLS_KEY_FILE": "/run/tls/tls.key",
        "MCD_TLS_CLIENT_CA_FILE": "/run/tls/ca.crt",
        "MCD_AUTH_TOKEN_FILE": "/run/auth/tokens",
        "MCD_HEALTH_PORT": "8003",
        "MCD_MAX_CONCURRENT_STREAMS": "64",
        "MCD_MAX_CONNECTIONS": "200",
        "MCD_KEEPALIVE_PERMIT_WITHOUT_CALLS": "false",
        "MCD_KEEPALIVE_MIN_PING_INTERVAL_S": "30",
        "MCD_MAX_CONNECTION_AGE_S": "0",
    }
    s = load_settings([], environ=env)
    assert s.tls_cert_file == Path("/run/tls/tls.crt")
    assert s.tls_client_ca_file == Path("/run/tls/ca.crt")
    assert s.auth_token_file == Path("/run/auth/tokens")
    assert (s.health_port, s.max_concurrent_streams, s.max_connections) == (8003, 64, 200)
    assert s.keepalive_permit_without_calls is False
    assert (s.keepalive_min_ping_interval_s, s.max_connection_age_s) == (30.0, 0.0)


def test_safe_connection_defaults() -> None:
    s = Settings()
    assert s.tls_cert_file is None and s.auth_token_file is None  # noqa: PT018
    assert 0 < s.max_concurrent_streams <= 10_000
    assert 0 < s.max_connections <= 100_000
    assert 0 < s.keepalive_min_ping_interval_s <= s.keepalive_time_s
    assert s.max_connection_age_s > s.max_connection_age_grace_s > s.grace_period_s


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"tls_cert_file": Path("c")}, "tls_cert_file and tls_key_file go together"),
        ({"tls_key_file": Path("k")}, "tls_cert_file and tls_key_file go together"),
        ({"tls_client_ca_file": Path("ca")}, "needs tls_cert_file"),
        ({"health_port": -2}, "health_port must be in -1..65535"),
        ({"health_port": 8001}, "health_port 8001 is also the gRPC or metrics port"),
        ({"max_concurrent_streams": 0}, "max_concurrent_streams must be an integer >= 1"),
        ({"max_connections": 0}, "max_connections must be an integer >= 1"),
        ({"keepalive_time_s": 0.0}, "keepalive_time_s must be > 0"),
        ({"credentials_check_interval_s": float("nan")}, "must be > 0"),
        ({"max_connection_age_s": -1.0}, "max_connection_age_s must be >= 0"),
        ({"max_connection_age_s": float("inf")}, "must be finite"),
    ],
)
def test_invalid_security_and_limit_settings_are_refused(
    values: dict[str, object], fragment: str
) -> None:
    with pytest.raises(SettingsError, match=re.escape(fragment)):
        Settings(**values)  # type: ignore[arg-type]
