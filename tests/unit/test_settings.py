from __future__ import annotations

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
