"""Configuration: TOML plus environment, clear errors that name the key, secrets never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.errors import ConfigError
from worker.settings import load_settings

BASE = """
database_url = "postgresql://u:db-password-9@localhost/x"
[providers.cheqpay]
base_url = "http://127.0.0.1:9"
api_key = "cq-secret-123"
rate_per_s = 50
[providers.cheqpay.accounts.acme]
api_key = "cq-acme-secret"
max_in_flight = 3
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("LINKWORKER_"):
            monkeypatch.delenv(key)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "linkworker.toml"
    path.write_text(text)
    return path


def test_accounts_inherit_limits_but_not_credentials(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, BASE))
    lanes = {(p, a): lane for p, a, lane in settings.lanes()}
    acme = lanes[("cheqpay", "acme")]
    assert acme.rate_per_s == 50 and acme.max_in_flight == 3
    assert acme.base_url == "http://127.0.0.1:9"
    assert acme.api_key.get_secret_value() == "cq-acme-secret"  # type: ignore[attr-defined]
    assert lanes[("cheqpay", "default")].max_in_flight == 5


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINKWORKER_PROVIDERS__CHEQPAY__API_KEY", "from-env")
    monkeypatch.setenv("LINKWORKER_LEASE_S", "7")
    settings = load_settings(write(tmp_path, BASE))
    assert settings.providers.cheqpay is not None
    assert settings.providers.cheqpay.api_key.get_secret_value() == "from-env"
    assert settings.lease_s == 7


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINKWORKER_CONFIG", str(write(tmp_path, BASE)))
    assert load_settings().providers.cheqpay is not None


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, BASE + "rate_per_sec = 3\n"))
    assert "providers.cheqpay.accounts.acme.rate_per_sec: unknown key" in str(caught.value)


def test_missing_credential_names_key_and_env_var(tmp_path: Path) -> None:
    text = BASE.replace('api_key = "cq-acme-secret"\n', "")
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    message = str(caught.value)
    assert "providers.cheqpay.accounts.acme.api_key: Field required" in message
    assert "LINKWORKER_PROVIDERS__CHEQPAY__ACCOUNTS__ACME__API_KEY" in message


def test_bad_value_is_named_and_secrets_never_printed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, BASE.replace("rate_per_s = 50", "rate_per_s = -1")))
    message = str(caught.value)
    assert "providers.cheqpay.rate_per_s: Input should be greater than 0" in message
    assert "cq-secret-123" not in message and "db-password-9" not in message


def test_secrets_are_not_in_repr(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, BASE))
    assert "cq-secret-123" not in repr(settings) and "cq-acme-secret" not in str(settings)
    assert set(settings.secrets()) == {"cq-secret-123", "cq-acme-secret", "db-password-9"}


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "database_url = \n"))


def test_log_lines_mask_configured_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    import structlog

    from worker.logs import configure_logging, get_logger

    configure_logging("info", "json", ["cq-secret-123"])
    try:
        try:
            raise RuntimeError("provider said: bad key cq-secret-123")
        except RuntimeError:
            get_logger().exception("attempt_crashed")
        err = capsys.readouterr().err
    finally:
        structlog.reset_defaults()  # the configuration holds pytest's capture stream
    assert "attempt_crashed" in err and "***" in err and "cq-secret-123" not in err
