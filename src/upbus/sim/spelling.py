"""How the simulator writes numbers on the wire, matching the exchange's spellings.

The exchange's JSON numbers come from two Java serialisers (docs/protocol.md,
Messages, and the recorded samples):

* ``BigDecimal.toString`` of a value with a fixed scale, e.g. ``31883000.00000000``;
  tiny values switch to exponent form (``6E-8``), and zero with scale 8 is ``0E-8``.
* ``Double.toString``, e.g. ``127.0``, ``1.16539E8``, ``7.9276E-4``, ``5.0E-4``.

Some fields are printed plainly (``31883000``, ``1386929.37231066771348207123``) or
plainly with at least one fractional digit (``109715000.0``). Each function here turns
an exact :class:`~decimal.Decimal` into one of these spellings.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Context, Decimal
from functools import partial

__all__ = (
    "F5",
    "F8",
    "F10",
    "F16",
    "Spelling",
    "fixed",
    "java_bigdecimal",
    "java_double",
    "plain",
    "plain_dot0",
    "rate",
)

Spelling = Callable[[Decimal], str]

# Spelling must never round: turnover with scale 16 and exact balances exceed the
# default 28 digits.
_EXACT = Context(prec=100)


def java_bigdecimal(value: Decimal) -> str:
    """``java.math.BigDecimal.toString`` of ``value``, keeping its scale."""
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):
        raise ValueError(f"not a finite number: {value}")
    coefficient = "".join(map(str, digits)).lstrip("0") or "0"
    scale = -exponent
    adjusted = -scale + (len(coefficient) - 1)
    minus = "-" if sign and coefficient != "0" else ""
    if scale >= 0 and adjusted >= -6:
        if scale == 0:
            return minus + coefficient
        if len(coefficient) > scale:
            return f"{minus}{coefficient[:-scale]}.{coefficient[-scale:]}"
        return f"{minus}0.{coefficient.rjust(scale, '0')}"
    mantissa = coefficient[0] + (f".{coefficient[1:]}" if len(coefficient) > 1 else "")
    exp_sign = "+" if adjusted > 0 else ""
    return f"{minus}{mantissa}E{exp_sign}{adjusted}"


def fixed(value: Decimal, scale: int) -> str:
    """A ``BigDecimal`` with ``scale`` decimals: ``404000.00000000``, ``6E-8``, ``0E-8``."""
    return java_bigdecimal(value.quantize(Decimal(1).scaleb(-scale), context=_EXACT))


def java_double(value: Decimal) -> str:
    """``java.lang.Double.toString`` (shortest digits, as Java 19+ prints them)."""
    number = float(value)
    if number == 0.0:
        return "0.0"
    _sign, digits, exponent = Decimal(repr(abs(number))).normalize(_EXACT).as_tuple()
    if not isinstance(exponent, int):
        raise ValueError(f"not a finite number: {value}")
    coefficient = "".join(map(str, digits))
    adjusted = exponent + len(coefficient) - 1
    minus = "-" if number < 0 else ""
    if 1e-3 <= abs(number) < 1e7:
        if adjusted >= 0:
            whole = coefficient[: adjusted + 1].ljust(adjusted + 1, "0")
            fraction = coefficient[adjusted + 1 :] or "0"
        else:
            whole = "0"
            fraction = "0" * (-adjusted - 1) + coefficient
        return f"{minus}{whole}.{fraction}"
    fraction = coefficient[1:] or "0"
    return f"{minus}{coefficient[0]}.{fraction}E{adjusted}"


def plain(value: Decimal) -> str:
    """Plain digits without trailing zeros: ``31883000``, ``0.00145372``, ``0``."""
    if value == 0:
        return "0"
    return format(value.normalize(_EXACT), "f")


def plain_dot0(value: Decimal) -> str:
    """Plain digits with at least one decimal: ``109715000.0``, ``0.71326612``."""
    text = plain(value)
    return text if "." in text else f"{text}.0"


def rate(value: Decimal) -> str:
    """A change rate: scale 10 (``0.0000063211``), but a zero rate is ``0``."""
    return "0" if value == 0 else fixed(value, 10)


F5: Spelling = partial(fixed, scale=5)
F8: Spelling = partial(fixed, scale=8)
F10: Spelling = partial(fixed, scale=10)
F16: Spelling = partial(fixed, scale=16)
