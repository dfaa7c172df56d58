"""Prices a usage in integer micro-units of the currency (debits, < 0): flat per token, or by a
per-model price table (`meter_prices`: token kinds, modalities, units, service tiers) that is
validated, exact, and reloaded when it changes.
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
from edgemeter.metering.usage import TOKEN_KINDS, UNIT_KINDS, Usage

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

# Per 1,000,000 tokens of a tokens_detail kind; unset, the kind costs its base rate.
DETAIL_RATES = {
    "input_audio": "input",
    "input_image": "input",
    "input_video": "input",
    "output_audio": "output",
    "output_image": "output",
    "cache_write_1h": "cache_write",
}
# Per unit of metadata.units, and how many of the unit a rate is for (the scale that keeps
# the arithmetic in whole numbers: micro-units x 1,000,000 like a token rate).
UNIT_RATES = {
    "per_image": "images",
    "per_audio_second": "audio_ms",
    "per_million_characters": "characters",
    "per_search_unit": "search_units",
    "per_thousand_web_search_calls": "web_search_calls",
}
_UNIT_SCALE = {
    "images": TOKENS_PER_RATE,  # a rate per image, to the token scale
    "audio_ms": 1000,  # a rate per second, counted in ms: x 1,000,000 / 1,000
    "characters": 1,  # a rate per 1,000,000 characters, like tokens
    "search_units": TOKENS_PER_RATE,
    "web_search_calls": 1000,  # a rate per 1,000 calls: x 1,000,000 / 1,000
}
TIERS_KEY = "service_tiers"
RATE_KEYS = (*TOKEN_KINDS, *DETAIL_RATES, *UNIT_RATES, TIERS_KEY)
_REQUIRED_RATES = ("input", "output")
_TOP_KEYS = ("version", "currency", TIERS_KEY, "models")
# A service tier multiplies token charges by per-mille: 500 halves them (flex), 2000 doubles.
PER_MILLE = 1000
MAX_PER_MILLE = 100_000
# The consumer keeps amounts in an int64.
MAX_AMOUNT = 2**63 - 1
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
    unpriced: tuple[str, ...] = ()
    """The units of the usage (UNIT_KINDS) the rule has no price for: billed nothing for them."""


def flat_price(usage: Usage, micro_per_token: int) -> Price:
    """Tokens times micro-per-token, exact. Units have no flat price."""
    return Price(
        -(usage.tokens_used * micro_per_token),
        f"flat:{micro_per_token}",
        _counted_units(usage) if usage.units else (),
    )


def _counted_units(usage: Usage) -> tuple[str, ...]:
    return tuple(kind for kind in UNIT_KINDS if usage.units.get(kind))


@dataclass(frozen=True, slots=True)
class Rates:
    """Micro-units of the currency per 1,000,000 tokens of each kind; per unit (UNIT_RATES,
    None: no price); service-tier multipliers in per-mille (the entry's own)."""

    input: int
    cached_input: int
    cache_write: int
    output: int
    reasoning: int
    # None: the base rate (input, output, cache_write), as a table without the key says.
    input_audio: int | None = None
    input_image: int | None = None
    input_video: int | None = None
    output_audio: int | None = None
    output_image: int | None = None
    cache_write_1h: int | None = None
    # (size/quality, size or "*", rate per image), most specific key first.
    per_image: tuple[tuple[str, int], ...] = ()
    per_audio_second: int | None = None
    per_million_characters: int | None = None
    per_search_unit: int | None = None
    per_thousand_web_search_calls: int | None = None
    service_tiers: tuple[tuple[str, int], ...] = ()


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

    __slots__ = ("_cache", "currency", "entries", "exact", "patterns", "service_tiers", "version")

    def __init__(
        self,
        version: str,
        currency: str | None,
        entries: tuple[Entry, ...],
        service_tiers: tuple[tuple[str, int], ...] = (),
    ) -> None:
        self.version = version
        self.currency = currency
        self.entries = entries
        self.service_tiers = service_tiers
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
        return (
            self.currency == other.currency
            and self.service_tiers == other.service_tiers
            and [(e.key, e.rates) for e in self.entries]
            == [(e.key, e.rates) for e in other.entries]
        )


# -- pricing (pure) ---------------------------------------------------------------------------


def charge_micro(usage: Usage, rates: Rates, tier_per_mille: int = PER_MILLE) -> int:
    """The charge in micro-units (>= 0): every token priced once at its kind's rate, every unit
    at its rate, summed exactly, then one division rounded half up. A service tier multiplies
    the token part (per-mille, inside the same single division).

    Counts are clamped so each token is priced exactly once even if a provider reports parts
    larger than their whole: cache reads are taken from the input first, then cache writes (of
    which 1-hour writes), then audio, image and video input from what is left; reasoning is
    taken from the output, then audio and image output from what is left."""
    units = _unit_charge(usage, rates)[0] if usage.units else 0
    return _rounded(_token_charge(usage, rates) * tier_per_mille + units * PER_MILLE)


def _token_charge(usage: Usage, rates: Rates) -> int:
    """The tokens' charge in micro-units x 1,000,000, exact."""
    cached = min(usage.cached_input_tokens, usage.input_tokens)
    written = min(usage.cache_write_tokens, usage.input_tokens - cached)
    plain_input = usage.input_tokens - cached - written
    reasoning = min(usage.reasoning_tokens, usage.output_tokens)
    plain_output = usage.output_tokens - reasoning
    total = cached * rates.cached_input + reasoning * rates.reasoning
    detail = usage.detail
    if detail:
        # Each modality's tokens leave the plain count at their own rate (the helper clamps).
        written_1h = min(detail.get("cache_write_1h", 0), written)
        total += written_1h * _or(rates.cache_write_1h, rates.cache_write)
        written -= written_1h
        for kind, rate in (
            ("input_audio", rates.input_audio),
            ("input_image", rates.input_image),
            ("input_video", rates.input_video),
        ):
            n = min(detail.get(kind, 0), plain_input)
            total += n * _or(rate, rates.input)
            plain_input -= n
        for kind, rate in (
            ("output_audio", rates.output_audio),
            ("output_image", rates.output_image),
        ):
            n = min(detail.get(kind, 0), plain_output)
            total += n * _or(rate, rates.output)
            plain_output -= n
    return (
        total
        + plain_input * rates.input
        + written * rates.cache_write
        + plain_output * rates.output
    )


def _or(rate: int | None, base: int) -> int:
    return base if rate is None else rate


def _unit_charge(usage: Usage, rates: Rates) -> tuple[int, tuple[str, ...]]:
    """(charge of the units in micro-units x 1,000,000, the units with no price)."""
    units = usage.units
    total = 0
    unpriced: list[str] = []
    for kind in UNIT_KINDS:
        n = units.get(kind)
        if not isinstance(n, int) or n <= 0:
            continue
        rate = _unit_rate(kind, units, rates)
        if rate is None:
            unpriced.append(kind)
        else:
            total += n * rate * _UNIT_SCALE[kind]
    return total, tuple(unpriced)


def _unit_rate(kind: str, units: Mapping[str, int | str], rates: Rates) -> int | None:
    if kind == "images":
        size, quality = str(units.get("image_size", "")), str(units.get("image_quality", ""))
        wanted = (f"{size}/{quality}".lower(), size.lower(), "*")
        by_key = dict(rates.per_image)
        return next((by_key[k] for k in wanted if k in by_key), None)
    if kind == "audio_ms":
        return rates.per_audio_second
    if kind == "characters":
        return rates.per_million_characters
    if kind == "search_units":
        return rates.per_search_unit
    return rates.per_thousand_web_search_calls


def _rounded(total: int) -> int:
    # Round half up on the (non-negative) charge: the rule of a calculator or a spreadsheet's
    # ROUND, so a billing team reproduces every amount by hand. Python's round() is half-even.
    scale = TOKENS_PER_RATE * PER_MILLE
    return min((total + scale // 2) // scale, MAX_AMOUNT)


def tier_per_mille(usage: Usage, rates: Rates, table_tiers: tuple[tuple[str, int], ...]) -> int:
    """The multiplier of the usage's service tier: the entry's, else the table's, else 1x."""
    if not usage.service_tier:
        return PER_MILLE
    name = usage.service_tier.lower()
    for tiers in (rates.service_tiers, table_tiers):
        for key, per_mille in tiers:
            if key == name:
                return per_mille
    return PER_MILLE


def table_price(
    usage: Usage, entry: Entry, table_version: str, table_tiers: tuple[tuple[str, int], ...] = ()
) -> Price:
    """The debit for `usage` under `entry`; the version names the table and the entry."""
    rates = entry.rates
    tokens = _token_charge(usage, rates)
    units, unpriced = _unit_charge(usage, rates) if usage.units else (0, ())
    per_mille = tier_per_mille(usage, rates, table_tiers)
    amount = _rounded(tokens * per_mille + units * PER_MILLE)
    return Price(-amount, f"{table_version}:{entry.key}", unpriced)


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

    if TIERS_KEY in doc and not isinstance(doc[TIERS_KEY], dict):
        raise fail(f"[{TIERS_KEY}] must be a table of tier = per-mille", key=TIERS_KEY)

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
    tiers = _tiers(doc.get(TIERS_KEY, {}), None, fail)
    return PriceTable(version, currency, tuple(entries), tiers)


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
        if key in (TIERS_KEY, "per_image") and isinstance(value, dict):
            continue  # tables, checked below
        values[key] = _rate(value, key, name, fail)
    per_image = body.get("per_image")
    images: tuple[tuple[str, int], ...] = ()
    if isinstance(per_image, dict):
        images = tuple(
            (str(k).lower(), _rate(v, f"per_image.{k}", name, fail)) for k, v in per_image.items()
        )
    elif per_image is not None:
        images = (("*", values["per_image"]),)
    return Rates(
        input=values["input"],
        cached_input=values.get("cached_input", values["input"]),
        cache_write=values.get("cache_write", values["input"]),
        output=values["output"],
        reasoning=values.get("reasoning", values["output"]),
        input_audio=values.get("input_audio"),
        input_image=values.get("input_image"),
        input_video=values.get("input_video"),
        output_audio=values.get("output_audio"),
        output_image=values.get("output_image"),
        cache_write_1h=values.get("cache_write_1h"),
        per_image=images,
        per_audio_second=values.get("per_audio_second"),
        per_million_characters=values.get("per_million_characters"),
        per_search_unit=values.get("per_search_unit"),
        per_thousand_web_search_calls=values.get("per_thousand_web_search_calls"),
        service_tiers=_tiers(body.get(TIERS_KEY, {}), name, fail),
    )


def _rate(value: Any, key: str, entry: str, fail: Callable[..., PriceTableError]) -> int:
    # bool is an int in Python; floats and strings would make the arithmetic inexact.
    if isinstance(value, bool) or not isinstance(value, int):
        unit = "per 1,000,000 tokens" if key in TOKEN_KINDS or key in DETAIL_RATES else "as named"
        raise fail(
            f"{key!r} must be a whole number of micro-units {unit}, "
            f"not {type(value).__name__} {value!r}",
            entry=entry,
            key=key.split(".", 1)[0],
        )
    if not 0 <= value <= MAX_RATE:
        raise fail(f"{key!r} must be between 0 and {MAX_RATE}", entry=entry, key=key.split(".")[0])
    return value


def _tiers(
    value: Any, entry: str | None, fail: Callable[..., PriceTableError]
) -> tuple[tuple[str, int], ...]:
    """service_tiers: tier name = per-mille multiplier of token charges (500 halves them)."""
    if not isinstance(value, dict):
        raise fail(f"{TIERS_KEY!r} must be a table of tier = per-mille", entry=entry, key=TIERS_KEY)
    tiers = []
    for tier, per_mille in value.items():
        if isinstance(per_mille, bool) or not isinstance(per_mille, int):
            raise fail(
                f"service tier {tier!r} must be a whole per-mille multiplier (1000 is 1x), "
                f"not {type(per_mille).__name__} {per_mille!r}",
                entry=entry,
                key=TIERS_KEY,
            )
        if not 0 <= per_mille <= MAX_PER_MILLE:
            raise fail(
                f"service tier {tier!r} must be between 0 and {MAX_PER_MILLE} per mille",
                entry=entry,
                key=TIERS_KEY,
            )
        tiers.append((str(tier).lower(), per_mille))
    return tuple(tiers)


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
        return table_price(usage, entry, table.version, table.service_tiers)

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
