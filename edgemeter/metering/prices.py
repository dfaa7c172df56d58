"""Prices a usage in integer micro-units of the currency (debits, < 0): flat per token, or by a
per-model price table (`meter_prices`) that is validated, exact, and reloaded when it changes.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemeter.errors import PriceTableError
from edgemeter.metering.tomlfile import Watched, did_you_mean, line_of, load_toml
from edgemeter.metering.usage import TOKEN_KINDS, Usage

logger = logging.getLogger(__name__)

# Rates are micro-units of the currency per this many tokens: providers publish "per 1M tokens".
TOKENS_PER_RATE = 1_000_000
# One currency unit per token. With token counts capped at 2**40 each side (usage.MAX_TOKENS),
# the largest possible amount stays below 2**63, so it fits the billing consumer's int64.
MAX_RATE = 10**12
# A billing file is hand-edited text; anything larger is a mistake (or not a price table).
MAX_FILE_BYTES = 1 << 20
MAX_ENTRIES = 10_000
MAX_KEY_CHARS = 256
# Lookups are cached per table; model strings can come from clients, so the cache is bounded.
_LOOKUP_CACHE_SIZE = 4096

RATE_KEYS = TOKEN_KINDS
_REQUIRED_RATES = ("input", "output")
_TOP_KEYS = ("version", "currency", "models")
# The version is an identifier that ends up in every envelope's price_version, before a ":".
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
# An ISO 4217 code: the price table's and meter_currency's.
CURRENCY = re.compile(r"^[A-Z]{3}$")
_WILDCARDS = frozenset("*?")


@dataclass(frozen=True, slots=True)
class Price:
    amount_micro: int
    """Negative: a debit of the customer's ledger (the seed's convention)."""
    version: str
    """Which price rule produced the amount, e.g. "flat:156"."""


def flat_price(usage: Usage, micro_per_token: int) -> Price:
    """Tokens times micro-per-token, exact."""
    return Price(-(usage.tokens_used * micro_per_token), f"flat:{micro_per_token}")


@dataclass(frozen=True, slots=True)
class Rates:
    """Micro-units of the currency per 1,000,000 tokens of each kind."""

    input: int
    cached_input: int
    cache_write: int
    output: int
    reasoning: int


@dataclass(frozen=True, slots=True)
class Entry:
    """One `[models."…"]` table: its key as written in the file, and its rates."""

    key: str
    rates: Rates
    pattern: re.Pattern[str] | None
    """None for an exact name; else the compiled glob (matched against the lower-cased model)."""
    literal_chars: int
    """Specificity of a pattern: its characters that are not wildcards."""
    order: int
    """Position in the file; breaks ties between equally specific patterns."""


class PriceTable:
    """A validated price table: immutable, so a reload swaps the whole object."""

    __slots__ = ("_cache", "currency", "entries", "exact", "patterns", "version")

    def __init__(self, version: str, currency: str | None, entries: tuple[Entry, ...]) -> None:
        self.version = version
        self.currency = currency
        self.entries = entries
        self.exact: Mapping[str, Entry] = {e.key.lower(): e for e in entries if e.pattern is None}
        # Most specific first, then file order: the first pattern that matches wins.
        self.patterns: tuple[Entry, ...] = tuple(
            sorted(
                (e for e in entries if e.pattern is not None),
                key=lambda e: (-e.literal_chars, e.order),
            )
        )
        self._cache: dict[str, Entry | None] = {}

    def lookup(self, model: str) -> Entry | None:
        """The entry that prices `model`: an exact name, else the most specific pattern."""
        name = model.lower()
        try:
            return self._cache[name]
        except KeyError:
            pass
        entry = self.exact.get(name)
        if entry is None:
            entry = next(
                (e for e in self.patterns if e.pattern is not None and e.pattern.fullmatch(name)),
                None,
            )
        if len(self._cache) >= _LOOKUP_CACHE_SIZE:
            self._cache.clear()
        self._cache[name] = entry
        return entry

    def same_prices(self, other: PriceTable) -> bool:
        return self.currency == other.currency and [(e.key, e.rates) for e in self.entries] == [
            (e.key, e.rates) for e in other.entries
        ]


# -- pricing (pure) ---------------------------------------------------------------------------


def charge_micro(usage: Usage, rates: Rates) -> int:
    """The charge in micro-units (>= 0): every token priced once at its kind's rate, summed
    exactly, then one division by 1,000,000 rounded half up.

    Counts are clamped so each token is priced exactly once even if a provider reports parts
    larger than their whole: cache reads are taken from the input first, then cache writes;
    reasoning is taken from the output."""
    cached = min(usage.cached_input_tokens, usage.input_tokens)
    written = min(usage.cache_write_tokens, usage.input_tokens - cached)
    plain_input = usage.input_tokens - cached - written
    reasoning = min(usage.reasoning_tokens, usage.output_tokens)
    plain_output = usage.output_tokens - reasoning
    total = (
        plain_input * rates.input
        + cached * rates.cached_input
        + written * rates.cache_write
        + plain_output * rates.output
        + reasoning * rates.reasoning
    )
    # Round half up on the (non-negative) charge: the rule of a calculator or a spreadsheet's
    # ROUND, so a billing team reproduces every amount by hand. Python's round() is half-even.
    return (total + TOKENS_PER_RATE // 2) // TOKENS_PER_RATE


def table_price(usage: Usage, entry: Entry, table_version: str) -> Price:
    """The debit for `usage` under `entry`; the version names the table and the entry."""
    return Price(-charge_micro(usage, entry.rates), f"{table_version}:{entry.key}")


# -- parsing ----------------------------------------------------------------------------------


def parse_table(data: str | bytes, *, source: str = "<string>") -> PriceTable:
    """Parse and validate a price table; raise PriceTableError naming the file, entry and key."""
    doc, text = load_toml(data, source=source, max_bytes=MAX_FILE_BYTES, error=PriceTableError)
    return _validate(doc, text, source)


def _validate(doc: dict[str, Any], text: str, source: str) -> PriceTable:
    def fail(message: str, entry: str | None = None, key: str | None = None) -> PriceTableError:
        fields: dict[str, object] = {"file": source}
        if entry is not None:
            fields["entry"] = entry
        if key is not None:
            fields["key"] = key
        line = line_of(text, "models", entry, key)
        if line is not None:
            fields["line"] = line
        return PriceTableError(message, **fields)

    for key in doc:
        if key not in _TOP_KEYS:
            raise fail(f"unknown top-level key {key!r}{did_you_mean(key, _TOP_KEYS)}", key=key)

    version = doc.get("version")
    if isinstance(version, datetime.date) and not isinstance(version, datetime.datetime):
        # `version = 2026-11-01` unquoted is a TOML date; it names the table just as well.
        version = version.isoformat()
    if version is None:
        raise fail("missing 'version' (names this table in every envelope's price_version)")
    if not isinstance(version, str) or not _VERSION.match(version):
        raise fail(
            "'version' must be 1-64 letters, digits, '.', '_', '+' or '-' "
            "(it is followed by ':' and the entry in price_version)",
            key="version",
        )
    if version.lower() == "flat":
        raise fail("'version' must not be 'flat' (reserved for the flat price)", key="version")

    currency = doc.get("currency")
    if currency is not None and not (isinstance(currency, str) and CURRENCY.match(currency)):
        raise fail("'currency' must be an ISO 4217 code such as \"OMR\"", key="currency")

    models = doc.get("models")
    if not isinstance(models, dict):
        raise fail('missing the [models."<name or pattern>"] tables', key="models")
    if not models:
        raise fail("no model is priced (for flat pricing only, leave meter_prices empty)")
    if len(models) > MAX_ENTRIES:
        raise fail(f"more than {MAX_ENTRIES} entries", key="models")

    entries: list[Entry] = []
    seen: dict[str, str] = {}
    for order, (name, body) in enumerate(models.items()):
        _check_name(name, fail)
        folded = name.lower()
        if folded in seen:
            raise fail(
                f"duplicate entry: {seen[folded]!r} and {name!r} differ only in case "
                "(names are matched case-insensitively)",
                entry=name,
            )
        seen[folded] = name
        if not isinstance(body, dict):
            raise fail("an entry must be a table of rates", entry=name)
        rates = _rates(name, body, fail)
        is_pattern = any(c in _WILDCARDS for c in name)
        entries.append(
            Entry(
                key=name,
                rates=rates,
                pattern=_compile(folded) if is_pattern else None,
                literal_chars=sum(c not in _WILDCARDS for c in name),
                order=order,
            )
        )
    return PriceTable(version, currency, tuple(entries))


def _check_name(name: str, fail: Callable[..., PriceTableError]) -> None:
    if not name or name != name.strip() or len(name) > MAX_KEY_CHARS:
        raise fail(
            f"a model name must be 1-{MAX_KEY_CHARS} characters without surrounding spaces",
            entry=name,
        )
    if "[" in name or "]" in name:
        # fnmatch would read these as a character class; a model name never needs one, and a
        # half-understood pattern in a billing file silently prices at the flat rate.
        raise fail(
            "'[' and ']' are not allowed in a model name or pattern (only * and ?)", entry=name
        )


def _rates(name: str, body: dict[str, Any], fail: Callable[..., PriceTableError]) -> Rates:
    for key, value in body.items():
        if key not in RATE_KEYS:
            if isinstance(value, dict):
                # [models.gpt-4.1] is models -> "gpt-4" -> "1": the dot is TOML's key separator.
                hint = f' (a name with dots must be quoted: [models."{name}.{key}"])'
            else:
                hint = did_you_mean(key, RATE_KEYS)
            raise fail(f"unknown key {key!r}{hint}", entry=name, key=key)
    for key in _REQUIRED_RATES:
        if key not in body:
            raise fail(f"missing the required rate {key!r}", entry=name, key=key)
    values: dict[str, int] = {}
    for key, value in body.items():
        # bool is an int in Python; floats and strings would make the arithmetic inexact.
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(
                f"{key!r} must be a whole number of micro-units per 1,000,000 tokens, "
                f"not {type(value).__name__} {value!r}",
                entry=name,
                key=key,
            )
        if not 0 <= value <= MAX_RATE:
            raise fail(f"{key!r} must be between 0 and {MAX_RATE}", entry=name, key=key)
        values[key] = value
    return Rates(
        input=values["input"],
        cached_input=values.get("cached_input", values["input"]),
        cache_write=values.get("cache_write", values["input"]),
        output=values["output"],
        reasoning=values.get("reasoning", values["output"]),
    )


def _compile(pattern: str) -> re.Pattern[str]:
    """A glob as a regex: `*` any run of characters (including '/' and ':'), `?` one character,
    everything else literal."""
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.DOTALL)


# -- the live table ---------------------------------------------------------------------------


class PriceBook:
    """The current price table for a path, reloaded when the file changes (see `Watched`: at
    most one check per `check_interval_s`, on the caller's thread). A bad file at construction
    raises PriceTableError (startup stops); later, a bad, unreadable or deleted file keeps the
    previous table and logs one ERROR per distinct problem, and `price` never raises."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        currency: str | None = None,
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path: Path | None = Path(path).expanduser() if path else None
        self.currency = currency
        self._file: Watched[PriceTable] | None = None
        if self.path is not None:
            self._file = Watched(
                self.path,
                self._parse,
                what="price table",
                doing="pricing",
                describe=lambda t: f"version {t.version}, {len(t.entries)} entries",
                logger=logger,
                error=PriceTableError,
                max_bytes=MAX_FILE_BYTES,
                on_reload=self._reloaded,
                check_interval_s=check_interval_s,
                clock=clock,
            )

    @property
    def table(self) -> PriceTable | None:
        return self._file.value if self._file is not None else None

    def price(self, usage: Usage, model: str, flat_micro_per_token: int) -> Price:
        """The debit for `usage` of `model`: its table entry, else the flat price."""
        table = self._file.get() if self._file is not None else None
        entry = table.lookup(model) if table is not None else None
        if table is None or entry is None:
            return flat_price(usage, flat_micro_per_token)
        return table_price(usage, entry, table.version)

    def _parse(self, data: bytes) -> PriceTable:
        table = parse_table(data, source=str(self.path))
        if self.currency and table.currency and table.currency != self.currency:
            raise PriceTableError(
                f"the table is in {table.currency}, the meter bills in {self.currency}",
                file=str(self.path),
                key="currency",
            )
        return table

    def _reloaded(self, old: PriceTable, new: PriceTable) -> None:
        if old.version == new.version and not old.same_prices(new):
            logger.warning(
                "price table %s changed its prices but kept version %r: envelopes priced "
                "before and after the change carry the same price_version",
                self.path,
                new.version,
            )
