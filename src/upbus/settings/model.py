"""The settings model, and the functions that load and explain it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources import DefaultSettingsSource

from upbus.core._errors import ConfigError
from upbus.settings.sources import (
    Layer,
    build_sources,
    check_env_names,
    describe_errors,
    display,
    dotted,
    leaves,
    mask,
    origin,
)

__all__ = (
    "NatsSettings",
    "RateLimitSettings",
    "ReconnectSettings",
    "Settings",
    "explain_settings",
    "load_settings",
)

M = TypeVar("M", bound=BaseModel)

Region = Literal["kr", "sg", "id", "th"]

# Public and private endpoints of each venue (docs/protocol.md, Endpoints).
REGION_URLS: dict[str, tuple[str, str]] = {
    region: (f"wss://{host}/websocket/v1", f"wss://{host}/websocket/v1/private")
    for region, host in {
        "kr": "api.upbit.com",
        "sg": "sg-api.upbit.com",
        "id": "id-api.upbit.com",
        "th": "th-api.upbit.com",
    }.items()
}
_URL_FIELDS = ("public_url", "private_url")


class RateLimitSettings(BaseModel):
    """Upbit's WebSocket request limits and how the limiter keeps under them."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    connect_per_second: int = Field(
        default=5, ge=1, description="New connections per rolling second."
    )
    messages_per_second: int = Field(
        default=5, ge=1, description="Messages sent per rolling second."
    )
    messages_per_minute: int = Field(
        default=100, ge=1, description="Messages sent per rolling minute."
    )
    max_wait: float = Field(
        default=15.0,
        gt=0,
        description="Longest single wait, in seconds, for a free slot; then the wait starts again.",
    )
    margin: float = Field(
        default=0.1,
        ge=0,
        description="Seconds added to each rolling window for clock and network skew.",
    )
    backoff_initial: float = Field(
        default=1.0,
        gt=0,
        description="First pause, in seconds, after the exchange reports a limit hit.",
    )
    backoff_max: float = Field(
        default=10.0, gt=0, description="Longest such pause, in seconds; at least backoff_initial."
    )

    @field_validator("backoff_max")
    @classmethod
    def _max_not_below_initial(cls, value: float, info: ValidationInfo) -> float:
        initial = info.data.get("backoff_initial")
        if initial is not None and value < initial:
            raise ValueError(f"must be at least backoff_initial ({initial})")
        return value


class ReconnectSettings(BaseModel):
    """Exponential back-off between reconnect attempts."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    initial: float = Field(
        default=0.5,
        gt=0,
        description=(
            "Upper bound, in seconds, of the random delay before the first retry (a "
            "connection that carried data reconnects at once)."
        ),
    )
    maximum: float = Field(
        default=30.0, gt=0, description="Longest delay, in seconds, between attempts."
    )
    multiplier: float = Field(
        default=2.0, gt=1, description="Factor the delay grows by after a failure."
    )
    max_attempts: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Give up after this many failed connects in a row (the bus then stops with "
            "an error); unset: never give up."
        ),
    )

    @field_validator("maximum")
    @classmethod
    def _max_not_below_initial(cls, value: float, info: ValidationInfo) -> float:
        initial = info.data.get("initial")
        if initial is not None and value < initial:
            raise ValueError(f"must be at least initial ({initial})")
        return value


class NatsSettings(BaseModel):
    """How buses and gateways share one upstream over NATS (docs/scale-out.md)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prefix: str = Field(
        default="upbus",
        pattern=r"^[A-Za-z0-9_-]+$",
        description="First token of every subject and name of every KV bucket upbus uses.",
    )
    lease_ttl: float = Field(
        default=6.0,
        ge=0.5,
        le=10,
        description=(
            "Seconds a remote bus's subscriptions outlive its last renewal (renewed every "
            "third of it); a killed process's wishes leave the upstream this long after."
        ),
    )
    leader_ttl: float = Field(
        default=1.0,
        ge=0.2,
        le=30,
        description=(
            "Seconds without a renewal after which a standby gateway takes over, and after "
            "which a leader that cannot renew stops publishing."
        ),
    )
    publish_private: bool = Field(
        default=False,
        description=(
            "Let a gateway with API keys publish myOrder and myAsset, to subjects of its "
            "account only; off, private data never crosses NATS."
        ),
    )
    account: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]+$",
        description=(
            "Account name in private subjects; default: derived from the access key. A "
            "remote bus without keys sets it to read that account's private data."
        ),
    )
    host: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]+$",
        description=(
            "Name of the connect budget this process shares with the others on its IP; "
            "default: the host name."
        ),
    )
    connect_timeout: float = Field(
        default=2.0, gt=0, description="Seconds to wait for the NATS server at each connect."
    )
    credentials: str | None = Field(
        default=None,
        description="Path of a NATS .creds file (JWT and nkey seed) to authenticate with.",
    )


class Settings(BaseSettings):
    """Everything upbus can be configured with.

    Build it with :func:`load_settings`, which reads, lowest precedence first: the
    defaults, ``[tool.upbus]`` in ``./pyproject.toml``, ``./upbus.toml`` (or the file
    ``UPBUS_CONFIG`` names), ``UPBUS_…`` environment variables, and keyword arguments.
    Nested values merge across sources. Calling ``Settings()`` reads the same sources
    but raises pydantic's ``ValidationError``, and :func:`explain_settings` cannot
    tell where its values came from.
    """

    model_config = SettingsConfigDict(
        env_prefix="UPBUS_",
        env_nested_delimiter="__",
        extra="forbid",
        allow_inf_nan=False,
    )

    region: Region = Field(
        default="kr",
        description=(
            "Which Upbit venue: 'kr' (Korea), 'sg' (Singapore), 'id' (Indonesia) or 'th' "
            "(Thailand); picks public_url and private_url unless they are set."
        ),
    )
    public_url: str = Field(
        default=REGION_URLS["kr"][0],
        description=(
            "WebSocket endpoint for public market data (ticker, trade, orderbook); "
            "default: the region's."
        ),
    )
    private_url: str = Field(
        default=REGION_URLS["kr"][1],
        description=(
            "WebSocket endpoint for private data (myOrder, myAsset); needs the keys; "
            "default: the region's."
        ),
    )
    access_key: SecretStr | None = Field(
        default=None, description="Upbit Open API access key; needed only for private data."
    )
    secret_key: SecretStr | None = Field(
        default=None, description="Upbit Open API secret key, used to sign the JWT; never printed."
    )
    jwt_algorithm: Literal["HS256", "HS384", "HS512"] = Field(
        default="HS512", description="HMAC algorithm that signs the private endpoint's JWT."
    )
    format: Literal["DEFAULT", "SIMPLE", "JSON_LIST", "SIMPLE_LIST"] = Field(
        default="DEFAULT",
        description="Wire format asked of Upbit: SIMPLE* abbreviate keys, *_LIST send arrays.",
    )
    debounce: float = Field(
        default=0.1,
        ge=0,
        le=10,
        description="Seconds to gather subscription changes into one request.",
    )
    heartbeat_interval: float = Field(
        default=30.0, gt=0, description="Seconds between protocol pings on each connection."
    )
    heartbeat_timeout: float = Field(
        default=10.0,
        gt=0,
        description=(
            "Seconds to wait for a pong before the connection counts as dead; also bounds "
            "the upgrade request and each closing step."
        ),
    )
    transport: str = Field(
        default="auto",
        description=(
            "Which transport plugin opens connections: 'auto' lets an installed fast "
            "transport plugin take over where it can run, else the default (an httpx "
            "upgrade, then wsproto framing); a plugin's name ('httpx', 'picows') asks "
            "for that one."
        ),
    )
    text_ping: bool = Field(
        default=False,
        description=(
            "Also send the text PING every heartbeat interval (the exchange answers with "
            '{"status":"UP"}); each one is charged to the message limit.'
        ),
    )
    verify_subscriptions: bool = Field(
        default=False,
        description=(
            "After each request, ask the exchange for its view (LIST_SUBSCRIPTIONS, charged "
            "to the message limit) and re-send the state if it differs."
        ),
    )
    verify_delay: float = Field(
        default=1.0, gt=0, description="Seconds after a request before verifying it."
    )
    shutdown_drain: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description=(
            "Seconds components get at shutdown to handle what their buffers hold; "
            "a component still busy then is named in a warning."
        ),
    )
    upstream: Literal["exchange", "gateway"] = Field(
        default="exchange",
        description=(
            "'exchange': this process connects to Upbit. 'gateway': it is a remote bus; "
            "`upbus gateway` processes hold the connections and it talks to them over "
            "nats_url."
        ),
    )
    nats_url: str | None = Field(
        default=None,
        description=(
            "NATS server(s), comma-separated nats:// or tls:// URLs: needed by remote buses "
            "and gateways; when set, exchange-mode buses share the host's connect budget."
        ),
    )
    nats: NatsSettings = Field(
        default_factory=NatsSettings, description="Leases, leadership and subjects over NATS."
    )
    rate_limit: RateLimitSettings = Field(
        default_factory=RateLimitSettings, description="Exchange request limits."
    )
    reconnect: ReconnectSettings = Field(
        default_factory=ReconnectSettings,
        description="Back-off between reconnect attempts.",
    )
    autoload_plugins: bool = Field(
        default=True,
        description="Load every plugin registered under the 'upbus' entry-point group.",
    )
    disabled_plugins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Plugin names not to load; from the environment, JSON or 'a,b'.",
    )
    plugins: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-plugin sections keyed by plugin name; each plugin validates its own.",
    )

    # What each source supplied, highest precedence first; set by load_settings.
    _layers: tuple[Layer, ...] = PrivateAttr(default=())

    @model_validator(mode="before")
    @classmethod
    def _region_urls(cls, data: Any) -> Any:
        # Only a URL no source set follows the region; an invalid region is left for
        # the field's own validation to report.
        if not isinstance(data, dict):
            return data
        region = data.get("region", "kr")
        urls = REGION_URLS.get(region) if isinstance(region, str) else None
        if urls is None:
            return data
        derived = {name: url for name, url in zip(_URL_FIELDS, urls, strict=True)}
        return {**derived, **data}

    @field_validator("public_url", "private_url")
    @classmethod
    def _websocket_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("ws", "wss") or not parts.netloc:
            raise ValueError("must be a ws:// or wss:// URL")
        return value

    @field_validator("nats_url")
    @classmethod
    def _nats_urls(cls, value: str | None) -> str | None:
        if value is None:
            return None
        for url in value.split(","):
            parts = urlsplit(url.strip())
            if parts.scheme not in ("nats", "tls", "ws", "wss") or not parts.netloc:
                raise ValueError(f"{url.strip()!r} is not a nats://, tls:// or ws(s):// URL")
        return value

    @field_validator("disabled_plugins", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        # NoDecode hands us the raw environment string, which may be JSON or comma-separated.
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("["):
            return json.loads(value)
        return [name.strip() for name in value.split(",") if name.strip()]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No dotenv or secrets-directory sources: only the documented files are read.
        return build_sources(settings_cls, init_settings, env_settings, Path.cwd())

    def plugin_section(self, name: str, model: type[M]) -> M:
        """Validate the ``plugins.<name>`` section with the plugin's own ``model``.

        A missing section validates as ``{}``, so the model's defaults apply. Keys
        set through the environment arrive lower-cased.

        Raises:
            ConfigError: naming ``plugins.<name>.<field>``, its source and the reason.
        """
        try:
            return model.model_validate(self.plugins.get(name, {}))
        except ValidationError as exc:
            prefix = ("plugins", name)
            raise ConfigError(describe_errors(exc, model, self._layers, prefix)) from None

    def __eq__(self, other: object) -> bool:
        # Where the values came from is not part of what the settings are.
        if not isinstance(other, Settings):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # Plugin sections are plain dicts, so their secrets are only recognisable by key
        # name; a URL's password (nats_url's, say) is masked in any value.
        for key, value in super().__repr_args__():
            yield key, mask(value)


def load_settings(*, _cwd: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Build :class:`Settings` from every source, with ``overrides`` taking precedence.

    ``_cwd`` is the directory holding ``pyproject.toml`` and ``upbus.toml``
    (default: the current directory); a relative ``UPBUS_CONFIG`` is resolved
    against it.

    Raises:
        ConfigError: one error listing every bad setting with its source, for an
            invalid value, an unknown key, an unreadable TOML file or a missing
            ``UPBUS_CONFIG`` file; or one listing every ``UPBUS_…`` environment
            variable that names no setting, with the closest valid name.
    """
    check_env_names(Settings, os.environ)
    cwd = Path.cwd() if _cwd is None else Path(_cwd)
    init = InitSettingsSource(Settings, init_kwargs=overrides)
    sources = build_sources(Settings, init, EnvSettingsSource(Settings), cwd)
    built = ((*sources, DefaultSettingsSource(Settings)), overrides)
    try:
        # mypy builds Settings' signature from its fields and misses BaseSettings' own keywords.
        settings = Settings(_build_sources=built)  # type: ignore[call-arg]
    except ValidationError as exc:
        layers = [source.layer for source in sources]
        raise ConfigError(describe_errors(exc, Settings, layers)) from None
    settings._layers = tuple(source.layer for source in sources)
    return settings


def explain_settings(settings: Settings) -> list[tuple[str, str, str]]:
    """Each setting as ``(dotted name, display value, source)``, secrets masked.

    Sources are ``default``, ``pyproject.toml [tool.upbus]``, the path of the
    ``upbus.toml`` in use, ``environment variable UPBUS_…`` or ``argument``; a URL
    that follows a ``region`` some source set is ``default for region sg`` (say); for
    settings not built by :func:`load_settings` every source is ``unknown``.
    """
    rows = []
    for loc, value in leaves(settings.model_dump()):
        source = origin(settings._layers, loc) if settings._layers else "unknown"
        if loc[0] in _URL_FIELDS and source == "default" and _region_chosen(settings):
            source = f"default for region {settings.region}"
        rows.append((dotted(loc), display(Settings, loc, value), source))
    return rows


def _region_chosen(settings: Settings) -> bool:
    # A URL that follows a region some source set says so; Korea by default is just "default".
    return origin(settings._layers, ("region",)) != "default"
