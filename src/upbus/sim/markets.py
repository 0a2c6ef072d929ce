"""The simulated exchange's markets: about 250 KRW pairs and a few BTC and USDT pairs.

Reference prices are round, realistic levels (KRW, BTC or USDT per unit); the
simulator perturbs them per seed. Tick sizes follow the exchange's KRW price bands.

The regional venues (Singapore, Indonesia, Thailand) are separate exchanges with
their own markets, such as ``SGD-XRP`` (docs/protocol.md, Endpoints): each serves a
few dozen pairs in its own currency, priced from the KRW levels at a round exchange
rate, and the same BTC and USDT pairs. :func:`markets_for` gives a region's table.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from typing import Literal

__all__ = (
    "MARKETS",
    "QUOTES",
    "REGIONS",
    "MarketInfo",
    "Region",
    "markets_for",
    "supported_levels",
    "tick_size",
)

Region = Literal["kr", "sg", "id", "th"]
REGIONS: tuple[Region, ...] = ("kr", "sg", "id", "th")
#: The home currency of each venue: its fiat-quoted markets are ``QUOTE-BASE``.
QUOTES: dict[str, str] = {"kr": "KRW", "sg": "SGD", "id": "IDR", "th": "THB"}

# symbol, reference price in KRW
_KRW = """
BTC 143500000 ETH 4950000 XRP 3120 SOL 268000 DOGE 352 ADA 1045 TRX 352 LINK 27850
AVAX 41200 XLM 452 SUI 5120 BCH 612000 HBAR 318 DOT 7350 SHIB 0.0215 ETC 31250
UNI 13450 NEAR 5310 APT 9620 POL 405 ATOM 7120 ARB 712 OP 1605 SEI 412 STX 1565
IMX 1042 SAND 512 MANA 498 AXS 7150 AAVE 412500 ALGO 352 EOS 1012 VET 41.2
THETA 1532 XTZ 1265 NEO 15420 QTUM 4120 ZIL 24.8 ICX 205 ONT 251 IOST 7.12 STEEM 252
ARDR 102 ARK 612 STORJ 615 SNT 41.5 MTL 1215 POWR 312 KNC 705 LSK 1225 GLM 512
BAT 285 ZRX 512 SC 8.12 ANKR 41.2 ENJ 312 HIVE 402 CVC 215 GAS 6120 IQ 7.45 ELF 612
QKC 12.5 BTT 0.00142 MOC 102 TFUEL 92.5 MVL 4.52 T 32.5 CELO 1025 MED 12.1
1INCH 502 SXP 412 HUNT 412 PUNDIX 612 FLOW 1002 STRAX 82.5 GRT 302 CHZ 112 META 41.2
AHT 3.12 MBL 4.12 CRO 212 HPO 52.5 JST 52.1 ORBS 41.2 BORA 152 XEC 0.0512 SSX 12.5
PLA 212 WAXP 82.1 AERGO 152 FCT2 21.5 CBK 1020 MASK 3120 BLUR 412 ASTR 92.1 ACM 2120
AUDIO 212 GMT 212 MNT 1120 ID 512 HIFI 712 SUN 31.2 ARKM 1020 CTC 812 KAVA 612
BSV 82500 ZETA 712 JTO 3520 PYTH 502 ONDO 1850 W 402 TAIKO 1520 ENS 41200 ZRO 5120
BLAST 12.5 IO 3120 ZK 212 G 25.2 CKB 14.2 BIGTIME 152 UXLINK 612 MEW 9.12 NOT 8.12
EGLD 41200 AKT 4120 STG 512 TT 4.12 GAME2 31.2 INJ 32500 ATH 82.1 CARV 612
DRIFT 1120 HMSTR 4.12 NEIRO 1.12 PENDLE 6120 RENDER 9120 SAFE 1120 SCR 1020
SOLVE 3.12 USDC 1450 USDT 1452 VANA 12500 VIRTUAL 2520 ALT 212 AGLD 1820 ANIME 41.2
BERA 8120 BONK 0.0412 COMP 82500 CRV 912 DEEP 212 EIGEN 2120 ENA 812 ETHFI 2020
FIL 6120 GRND 112 IP 7120 JUP 1220 KAITO 2520 LAYER 1720 ME 2120 MOODENG 312
MOVE 712 NXPC 1520 ORCA 3620 PENGU 15.2 POKT 52.1 RAY 4520 SIGN 112 SONIC 712
SOPH 82.1 STRIKE 12500 TRUMP 17500 USUAL 312 VTHO 4.12 WAL 712 WCT 712 XAI 212
AWE 91.2 BABY 92.1 BOUNTY 41.2 CYBER 2520 DKA 41.2 FLOCK 412 HYPER 412 KERNEL 312
LA 612 LPT 9120 MINA 812 NEWT 612 OBSR 5.12 OM 812 PROVE 1520 QTCON 4.12 RVN 31.2
SAHARA 152 SKY 112 SNX 1820 SPK 112 STMX 5.12 TON 2520 TREE 612 WLD 2520 XEM 41.2
YGG 712 API3 2120 ARPA 52.1 BAND 1820 BEAM 31.2 AQT 1520 AMO 1.12 ALICE 1120
AXL 1120 BOBA 412 CELR 21.5 CHR 312 COW 512 CTSI 212 CVX 4520 DYDX 1520 FET 1820
FXS 3120 GNO 312000 GTC 912 HFT 312 ICP 12500 IOTA 412 JASMY 41.2 KSM 42000 LOOM 82.1
LQTY 1820 MAGIC 712 MANTA 1520 MAV 312 NMR 22000 OGN 152 ONG 512 PAXG 4250000
PEPE 0.0252 POLYX 412 QNT 152000 RLC 2520 ROSE 112 RSR 21.5 SFP 1120 SKL 62.1
SUPER 1320 TAO 720000 TIA 7120 TRB 82500 UMA 3520 WOO 312 XVS 12500 YFI 9500000
ZEC 52500 BAL 3520 BNT 1020 BICO 312 COTI 152 DENT 1.52 DGB 15.2 GLMR 312 HOOK 612
KDA 1020 LRC 252 METIS 52500 NKN 152 OXT 112 PHA 212 POND 21.5 RAD 2020 REQ 152
RIF 102 SUSHI 1520 SYS 152 TWT 1520 VRA 4.12 WIF 3020 XYO 15.2 ZBCN 5.12
"""

# code, reference price in the quote currency
_OTHER = """
BTC-ETH 0.0345 BTC-XRP 0.0000215 BTC-SOL 0.00187 BTC-ADA 0.0000073 BTC-DOGE 0.00000245
BTC-LINK 0.000194 BTC-ARK 0.00000426 BTC-XTZ 0.0000088
USDT-BTC 98750 USDT-ETH 3410.2 USDT-XRP 2.1502 USDT-SOL 184.52 USDT-DOGE 0.24215
"""

# What the regional venues list, priced from the KRW level above at a round rate.
_REGIONAL = """
BTC ETH XRP SOL DOGE ADA TRX LINK AVAX XLM SUI BCH DOT SHIB ETC UNI NEAR APT POL
ATOM ARB OP AAVE SAND MANA AXS USDT USDC
"""
_KRW_PER_UNIT = {"SGD": Decimal(1080), "IDR": Decimal("0.0875"), "THB": Decimal("41.5")}

# KRW price bands: (lower bound, tick). The first band whose bound the price reaches.
_KRW_TICKS = tuple(
    (Decimal(bound), Decimal(tick))
    for bound, tick in (
        ("2000000", "1000"),
        ("1000000", "500"),
        ("500000", "100"),
        ("100000", "50"),
        ("10000", "10"),
        ("1000", "1"),
        ("100", "1"),
        ("10", "0.01"),
        ("1", "0.001"),
        ("0.1", "0.0001"),
        ("0.01", "0.00001"),
        ("0.001", "0.000001"),
        ("0.0001", "0.0000001"),
        ("0", "0.00000001"),
    )
)
_SATOSHI = Decimal("0.00000001")


@dataclass(frozen=True, slots=True)
class MarketInfo:
    """A tradable pair: ``code`` is ``QUOTE-BASE``; ``price`` a reference level."""

    code: str
    quote: str
    base: str
    price: Decimal


def tick_size(quote: str, price: Decimal) -> Decimal:
    """The price step at ``price`` in a ``quote`` market."""
    if quote == "KRW":
        for bound, tick in _KRW_TICKS:
            if price >= bound:
                return tick
        return _SATOSHI
    if quote in ("USDT", "SGD", "IDR", "THB"):
        # About five significant digits, never below one satoshi-sized step.
        if price <= 0:
            return _SATOSHI
        step = Decimal(1).scaleb(price.adjusted() - 4)
        return max(step, _SATOSHI)
    return _SATOSHI


def supported_levels(info: MarketInfo) -> frozenset[Decimal]:
    """The orderbook ``level`` values served for ``info``; KRW markets only (§2.5)."""
    if info.quote != "KRW":
        return frozenset()
    tick = tick_size(info.quote, info.price)
    return frozenset({Decimal(0)} | {tick * 10**power for power in range(4)})


def _build() -> dict[str, MarketInfo]:
    markets: dict[str, MarketInfo] = {}
    words = _KRW.split()
    for symbol, price in zip(words[::2], words[1::2], strict=True):
        markets[f"KRW-{symbol}"] = MarketInfo(f"KRW-{symbol}", "KRW", symbol, Decimal(price))
    words = _OTHER.split()
    for code, price in zip(words[::2], words[1::2], strict=True):
        quote, base = code.split("-")
        markets[code] = MarketInfo(code, quote, base, Decimal(price))
    return markets


MARKETS: dict[str, MarketInfo] = _build()


@cache
def markets_for(region: str) -> dict[str, MarketInfo]:
    """The markets the ``region`` venue serves: ``MARKETS`` for ``kr``, else its own.

    Raises:
        ValueError: for a region other than ``kr``, ``sg``, ``id``, ``th``.
    """
    if region not in QUOTES:
        raise ValueError(f"unknown region {region!r}; expected one of {', '.join(REGIONS)}")
    if region == "kr":
        return MARKETS
    quote = QUOTES[region]
    rate = _KRW_PER_UNIT[quote]
    markets: dict[str, MarketInfo] = {}
    for symbol in _REGIONAL.split():
        price = MARKETS[f"KRW-{symbol}"].price / rate
        # Round to five significant digits: a listed level, not a conversion artefact.
        price = price.quantize(Decimal(1).scaleb(min(price.adjusted() - 4, 0)))
        code = f"{quote}-{symbol}"
        markets[code] = MarketInfo(code, quote, symbol, price)
    for code, info in MARKETS.items():
        if info.quote != "KRW":
            markets[code] = info
    return markets


#: Ten busy KRW markets: the set examples, tests and benchmarks subscribe to.
POPULAR: tuple[str, ...] = (
    "KRW-BTC",
    "KRW-ETH",
    "KRW-XRP",
    "KRW-SOL",
    "KRW-DOGE",
    "KRW-ADA",
    "KRW-TRX",
    "KRW-LINK",
    "KRW-AVAX",
    "KRW-DOT",
)
