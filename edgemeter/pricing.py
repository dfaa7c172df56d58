"""Prices a normalised usage in integer micro-units of the currency; amounts are debits (< 0).

Flat pricing is tokens times micro-per-token, exact; per-model price tables slot in beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgemeter.usage import Usage


@dataclass(frozen=True, slots=True)
class Price:
    amount_micro: int
    """Negative: a debit of the customer's ledger (the seed's convention)."""
    version: str
    """Which price rule produced the amount, e.g. "flat:156"."""


def flat_price(usage: Usage, micro_per_token: int) -> Price:
    return Price(-(usage.tokens_used * micro_per_token), f"flat:{micro_per_token}")
