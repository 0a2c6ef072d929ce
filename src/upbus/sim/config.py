"""Simulator settings.

Defaults follow docs/protocol.md; [U] marks a choice where it calls the exchange's
behaviour unverified, so a test can set the other plausible answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from upbus.core._errors import ConfigError
from upbus.sim.markets import QUOTES, REGIONS, Region

__all__ = ("DEFAULT_FUNDS", "AccountConfig", "Rate", "SimConfig", "default_balances")

Rate = float | Literal["max"] | None
"""Realtime messages/s per connection; ``None``: generate each message as fast as
possible (about 2,000/s); ``"max"``: repeat a pre-encoded ring as fast as the socket
takes it (see :mod:`upbus.sim.flood`)."""


#: What an account starts with in the venue's own currency, unless its balances are
#: given: about 100,000,000 KRW's worth, and 1 BTC besides (:func:`default_balances`).
DEFAULT_FUNDS: Mapping[str, Decimal] = {
    "KRW": Decimal(100_000_000),
    "SGD": Decimal(100_000),
    "IDR": Decimal(1_000_000_000),
    "THB": Decimal(2_500_000),
}


def default_balances(region: str = "kr") -> dict[str, Decimal]:
    """An account's starting balances on ``region``'s venue: its currency and 1 BTC."""
    quote = QUOTES[region]
    return {quote: DEFAULT_FUNDS[quote], "BTC": Decimal(1)}


@dataclass(frozen=True, slots=True)
class AccountConfig:
    """A private-API account: the key pair and starting balances (currency → amount).

    Without ``balances`` it starts as ``upbus sim --account`` does, with
    :func:`default_balances` of the simulator's region (100,000,000 KRW and 1 BTC
    in Korea); pass ``{}`` for an empty account.
    """

    access_key: str
    secret_key: str
    balances: Mapping[str, Decimal] | None = None

    def starting_balances(self, region: str = "kr") -> Mapping[str, Decimal]:
        """``balances``, or the default ones of ``region`` when none were given."""
        return default_balances(region) if self.balances is None else self.balances


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Everything the simulator does that a test may want to change."""

    # -- venue
    region: Region = "kr"  # which venue's markets are served: kr, sg, id or th

    # -- network
    port: int = 0  # 0 picks a free port; the host is always 127.0.0.1
    handshake_timeout: float = 5.0
    max_message_bytes: int = 1 << 20  # larger client messages close with 1009
    deflate: bool = True  # accept permessage-deflate when the client offers it

    # -- market data
    seed: int = 0
    rate: Rate = 50.0  # realtime messages/s per connection; None / "max": flood (see Rate)
    start_ms: int | None = None  # None: wall-clock timestamps; else a seeded virtual clock
    list_batch: int = 1  # [U] messages per *_LIST frame when several are ready at once
    flood_ring: int = 4096  # rate="max": realtime frames generated per subscription, repeated
    flood_write_bytes: int = 1 << 18  # rate="max": about this many bytes per socket write

    # -- keepalive
    idle_timeout: float | None = 120.0  # no traffic either way for this long: abrupt close
    up_interval: float = 10.0  # {"status":"UP"} period after a text PING

    # -- errors
    language: Literal["ko", "en"] = "ko"
    error_close_delay: float = 0.15  # error frame, then close 1000 this much later
    close_timeout: float = 1.0  # wait for the client's close reply, then drop TCP
    binary_control_frames: bool = True  # [U] UP and error frames binary like data frames
    # A test knob, not exchange behaviour (the exchange ignores unknown codes): a data
    # object carrying one of these codes (depth suffix ignored) is refused with
    # INVALID_PARAM, so a test can make the exchange refuse what validation allows.
    reject_codes: frozenset[str] = frozenset()

    # -- connect limits (per IP for public, per access key for private)
    connect_limit: tuple[int, float] = (5, 1.0)
    connect_strikes_before_ban: int = 3  # [U] 429s within strike_window before a 418 ban
    connect_strike_window: float = 60.0
    ban_base: float = 1.0  # [U] first ban in seconds; each next one ban_factor times longer
    ban_factor: float = 2.0
    ban_max: float = 600.0
    origin_limit: tuple[int, float] | None = (1, 10.0)  # upgrades carrying Origin, per IP

    # -- message limits (per connection, rolling windows)
    message_limits: tuple[tuple[int, float], ...] = ((5, 1.0), (100, 60.0))
    count_text_ping: bool = False  # [U] whether text PING counts toward message limits
    too_many_name: str = "TOO_MANY_REQUEST"  # [U] no source shows the breach frame
    too_many_message: str = "Too many requests."

    # -- private endpoint
    accounts: tuple[AccountConfig, ...] = ()
    auth_failure: Literal["http", "frame"] = "http"  # [U] 401 on upgrade, or INVALID_AUTH
    reject_reused_nonce: bool = True  # [U]
    require_uuid_nonce: bool = True
    fee_rate: Decimal = Decimal("0.0005")

    def __post_init__(self) -> None:
        if self.region not in REGIONS:
            raise ConfigError(
                f"SimConfig.region must be one of {', '.join(REGIONS)}, not {self.region!r}"
            )
        check_rate(self.rate, ConfigError, "SimConfig.rate")
        if self.flood_ring < 1 or self.flood_write_bytes < 1:
            raise ConfigError("SimConfig.flood_ring and flood_write_bytes must be at least 1")
        if self.list_batch < 1:
            raise ConfigError("SimConfig.list_batch must be at least 1")
        if not 0 <= self.port <= 65535:
            raise ConfigError("SimConfig.port must be 0..65535")


def check_rate(rate: object, error: type[Exception], name: str = "rate") -> None:
    """Raise ``error`` unless ``rate`` is a positive number, ``None`` or ``"max"``."""
    if rate is None or rate == "max":
        return
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0:
        raise error(f"{name} must be positive, None (generated flood) or 'max' (ring flood)")
