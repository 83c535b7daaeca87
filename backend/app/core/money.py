"""Exact money: USD amounts are stored as integer pico-dollars (USD x 10^12).

Integers sum exactly in SQL on every backend (SQLite has no exact decimal type), and a
picodollar is fine enough that every published per-token price (down to $0.000001 per
million tokens) is an integer number of them, so no rounding happens per token.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

PICO_PER_USD = 10**12
_PICO = Decimal(PICO_PER_USD)


def usd_to_pico(amount: Decimal) -> int:
    """Exact for any amount with at most 12 decimal places; otherwise rounds half-even."""
    return int((amount * _PICO).to_integral_value(rounding=ROUND_HALF_EVEN))


def pico_to_usd(pico: int | None) -> Decimal:
    if not pico:
        return Decimal(0)
    return (
        (Decimal(pico) / _PICO).normalize()
        if pico % PICO_PER_USD
        else Decimal(pico // PICO_PER_USD)
    )
