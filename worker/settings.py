"""Configuration: one TOML file plus `LINKWORKER_*` environment variables, read once at start.

Precedence: environment over file over defaults. Nested keys use `__` in the environment, so
`[providers.cheqpay] api_key` is `LINKWORKER_PROVIDERS__CHEQPAY__API_KEY`. Unknown keys and bad
values fail at start with a `ConfigError` whose message names each bad key; secrets are `SecretStr`
and never printed.

Each provider section is the default account's lane; `[providers.<name>.accounts.<account>]`
adds lanes with their own credentials. An account inherits the section's non-secret keys
(base_url, limits) unless it sets its own, and never its credentials.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from worker.errors import ConfigError

ENV_PREFIX = "LINKWORKER_"
DEFAULT_ACCOUNT = "default"


class LaneSettings(BaseModel):
    """What every provider account has: where to call and how fast."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(pattern=r"^https?://[^\s/]+")
    rate_per_s: float = Field(default=5.0, gt=0, description="provider's limit, any 1 s window")
    burst: int = Field(default=1, ge=1, description="requests that may go back to back")
    max_in_flight: int = Field(default=5, ge=1, le=10_000)
    timeout_s: float = Field(default=30.0, gt=0, description="whole call, sending to last byte")
    connect_timeout_s: float = Field(default=5.0, gt=0)
    rate_headroom: float = Field(
        default=0.01, ge=0, lt=0.5, description="fraction kept free for network jitter"
    )
    adaptive: bool = Field(
        default=False, description="lower the rate on 429 and raise it slowly while calls succeed"
    )
    on_unknown_outcome: Literal["retry", "fail"] = "retry"
    breaker_threshold: int = Field(default=5, ge=1, description="consecutive failures to open")
    breaker_cooldown_s: float = Field(default=2.0, gt=0, description="first open period")

    credential_fields: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _inherit(cls, data: Any) -> Any:
        """A provider section's accounts inherit its non-secret keys (a no-op for an account)."""
        return _inherit_into_accounts(data, cls.credential_fields)

    def secrets(self) -> list[str]:
        """The secret values of this account, for scrubbing text before it is stored or logged."""
        values = (getattr(self, name) for name in self.credential_fields)
        return [v.get_secret_value() for v in values if isinstance(v, SecretStr) and v]


class BillpocketAccount(LaneSettings):
    """Billpocket custom links: `X-Api-Key` (integrator) and `BP-User-Token` (merchant user)."""

    api_key: SecretStr
    user_token: SecretStr
    credential_fields: ClassVar[tuple[str, ...]] = ("api_key", "user_token")


class CheqpayAccount(LaneSettings):
    """Cheqpay payment links: `x-api-key`."""

    base_url: str = Field(default="https://api.cheqpay.dev", pattern=r"^https?://[^\s/]+")
    api_key: SecretStr
    credential_fields: ClassVar[tuple[str, ...]] = ("api_key",)


class KushkiAccount(LaneSettings):
    """Kushki Smartlinks v2: `Private-Merchant-Id`; the public id fills bodies that lack it."""

    base_url: str = Field(default="https://api-uat.kushkipagos.com", pattern=r"^https?://[^\s/]+")
    private_merchant_id: SecretStr
    public_merchant_id: str | None = None
    credential_fields: ClassVar[tuple[str, ...]] = ("private_merchant_id",)


def _inherit_into_accounts(section: Any, credential_fields: tuple[str, ...]) -> Any:
    """Copy a section's non-secret keys into each of its accounts that does not set them."""
    if not isinstance(section, dict) or not isinstance(section.get("accounts"), dict):
        return section
    inherited = {
        key: value
        for key, value in section.items()
        if key != "accounts" and key not in credential_fields
    }
    accounts = {
        name: {**inherited, **body} if isinstance(body, dict) else body
        for name, body in section["accounts"].items()
    }
    return {**section, "accounts": accounts}


class BillpocketSection(BillpocketAccount):
    accounts: dict[str, BillpocketAccount] = Field(default_factory=dict)


class CheqpaySection(CheqpayAccount):
    accounts: dict[str, CheqpayAccount] = Field(default_factory=dict)


class KushkiSection(KushkiAccount):
    accounts: dict[str, KushkiAccount] = Field(default_factory=dict)


class ProvidersSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    billpocket: BillpocketSection | None = None
    cheqpay: CheqpaySection | None = None
    kushki: KushkiSection | None = None


def _default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Settings(BaseSettings):
    """Everything the worker reads from its environment; built once and passed down."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )
    toml_path: ClassVar[Path | None] = None

    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    worker_id: str = Field(default_factory=_default_worker_id, min_length=1)
    providers: ProvidersSettings = Field(default_factory=ProvidersSettings)

    lease_s: float = Field(default=20.0, ge=2, description="how long a claim lives unrenewed")
    claim_batch_size: int = Field(default=200, ge=1, le=5000)
    prefetch_s: float = Field(default=2.0, gt=0, description="seconds of a lane's rate to hold")
    poll_interval_s: float = Field(default=1.0, gt=0)
    rate_limit_scope: Literal["fleet", "process"] = Field(
        default="fleet", description="whose limit rate_per_s is: all workers' or this process's"
    )
    fleet_refresh_s: float = Field(
        default=2.0, gt=0, le=60, description="how often a worker says it is alive in its lanes"
    )
    flush_interval_s: float = Field(default=0.02, gt=0)
    write_batch_size: int = Field(default=500, ge=1, le=10_000)
    retry_base_s: float = Field(default=1.0, gt=0)
    retry_cap_s: float = Field(default=300.0, gt=0)
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    fail_unconfigured_accounts: bool = True
    webhook_secret: SecretStr | None = None
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_max_attempts: int = Field(default=12, ge=1, le=100)
    webhook_retry_base_s: float = Field(default=5.0, gt=0)
    webhook_retry_cap_s: float = Field(default=3600.0, gt=0)
    metrics_port: int = Field(default=0, ge=0, le=65535, description="0: no HTTP endpoint")
    # scraped from outside the pod; the endpoint serves counters and health, never a secret
    metrics_host: str = "0.0.0.0"  # noqa: S104
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.toml_path))
        return tuple(sources)

    def lanes(self) -> Iterator[tuple[str, str, LaneSettings]]:
        """Every configured (provider, account, settings), default accounts first."""
        for provider in ("billpocket", "cheqpay", "kushki"):
            section: BillpocketSection | CheqpaySection | KushkiSection | None = getattr(
                self.providers, provider
            )
            if section is None:
                continue
            yield provider, DEFAULT_ACCOUNT, section
            yield from ((provider, name, account) for name, account in section.accounts.items())

    def secrets(self) -> list[str]:
        """Every secret value in the configuration (credentials and the database password)."""
        values = [secret for _, _, lane in self.lanes() for secret in lane.secrets()]
        if self.webhook_secret is not None:
            values.append(self.webhook_secret.get_secret_value())
        password = _url_password(self.database_url)
        return [*values, password] if password else values


def _url_password(url: str) -> str | None:
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).password
    except ValueError:
        return None


def _env_name(loc: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + "__".join(str(part) for part in loc).upper()


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in error.errors(include_input=False, include_url=False):
        loc = tuple(part for part in item["loc"] if part not in ("function-before",))
        key = ".".join(str(part) for part in loc) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  {key}: {message} (environment: {_env_name(loc)})")
    return "\n".join(lines)


def load_settings(config_path: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from a TOML file (or `LINKWORKER_CONFIG`), the environment and overrides.

    Raises ConfigError with one line per bad key.
    """
    path_text = config_path or os.environ.get(ENV_PREFIX + "CONFIG")
    path = Path(path_text) if path_text else None
    if path is not None:
        _check_toml(path)
    bound = type("Settings", (Settings,), {"toml_path": path, "__module__": __name__})
    source = f"file {path} and environment" if path else "environment"
    try:
        settings: Settings = bound(**overrides)
        return settings
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def _check_toml(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (from --config or LINKWORKER_CONFIG)")
    try:
        tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
