"""Per-model price tables (`meter_prices`): parse and validate the TOML file, price a usage exactly,
and keep the table current by reloading the file when it changes, without a restart.
"""

from __future__ import annotations

import datetime
import difflib
import hashlib
import logging
import os
import re
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemeter.errors import PriceTableError
from edgemeter.pricing import Price, flat_price
from edgemeter.usage import Usage

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
# A file whose mtime is this close to the moment it was read may still be rewritten within the
# same timestamp tick (same size, same inode): re-read its content until it is older than that.
_RACY_NS = 2_000_000_000

RATE_KEYS = ("input", "cached_input", "cache_write", "output", "reasoning")
_REQUIRED_RATES = ("input", "output")
_TOP_KEYS = ("version", "currency", "models")
# The version is an identifier that ends up in every envelope's price_version, before a ":".
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_WILDCARDS = frozenset("*?")


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
    if isinstance(data, bytes):
        if len(data) > MAX_FILE_BYTES:
            raise PriceTableError(f"larger than {MAX_FILE_BYTES} bytes", file=source)
        try:
            # utf-8-sig: an editor's byte-order mark is not a reason to reject a table.
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise PriceTableError("not UTF-8 text", file=source, offset=e.start) from None
    else:
        text = data
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        at = re.search(r"\(at line (\d+), column (\d+)\)$", message)
        if at is None:
            raise PriceTableError(f"not valid TOML: {message}", file=source) from None
        raise PriceTableError(
            f"not valid TOML: {message[: at.start()].strip()}",
            file=source,
            line=int(at.group(1)),
            column=int(at.group(2)),
        ) from None
    return _validate(doc, text, source)


def _validate(doc: dict[str, Any], text: str, source: str) -> PriceTable:
    def fail(message: str, entry: str | None = None, key: str | None = None) -> PriceTableError:
        fields: dict[str, object] = {"file": source}
        if entry is not None:
            fields["entry"] = entry
        if key is not None:
            fields["key"] = key
        line = _line_of(text, entry, key)
        if line is not None:
            fields["line"] = line
        return PriceTableError(message, **fields)

    for key in doc:
        if key not in _TOP_KEYS:
            raise fail(f"unknown top-level key {key!r}{_did_you_mean(key, _TOP_KEYS)}", key=key)

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
    if currency is not None and not (isinstance(currency, str) and _CURRENCY.match(currency)):
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
                hint = _did_you_mean(key, RATE_KEYS)
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


def _did_you_mean(key: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _line_of(text: str, entry: str | None, key: str | None) -> int | None:
    """Best effort: the line of the entry's header or of the key in it (tomllib gives none)."""
    lines = text.splitlines()

    def first(pattern: str, start: int = 0, stop_at_header: bool = False) -> int | None:
        regex = re.compile(pattern)
        for i in range(start, len(lines)):
            if stop_at_header and lines[i].lstrip().startswith("["):
                return None
            if regex.match(lines[i]):
                return i
        return None

    def name(word: str) -> str:
        quoted = re.escape(word)
        return rf"""(?:"{quoted}"|'{quoted}'|{quoted})"""

    if entry is None:
        if key is None:
            return None
        # A top-level key precedes every table header; a misspelt table is a header itself.
        found = first(rf"^\s*{name(key)}\s*=", stop_at_header=True)
        if found is None:
            found = first(rf"^\s*\[\s*{name(key)}\s*[\].]")
        return None if found is None else found + 1
    header = first(rf"^\s*\[\s*models\s*\.\s*{name(entry)}\s*[\].]")
    if header is None:
        return None
    if key is not None:
        found = first(rf"^\s*{name(key)}\s*=", header + 1, stop_at_header=True)
        if found is not None:
            return found + 1
    return header + 1


# -- the live table ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Signature:
    """What changes when a file is edited: replaced (inode), truncated or grown (size), or
    rewritten in place (mtime)."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> _Signature:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read(path: Path) -> tuple[bytes, _Signature]:
    """The file's bytes (at most MAX_FILE_BYTES + 1) and the signature of what was read."""
    with path.open("rb") as f:
        signature = _Signature.of(os.fstat(f.fileno()))
        return f.read(MAX_FILE_BYTES + 1), signature


class PriceBook:
    """The current price table for a path, reloaded when the file changes.

    `price` checks the file's signature at most once per `check_interval_s`, on the caller's
    thread, so no task or thread is needed. A bad file at construction raises PriceTableError
    (startup stops); later, a bad, unreadable or deleted file keeps the previous table and logs
    one ERROR per distinct problem, never per request, and `price` never raises."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        currency: str | None = None,
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if check_interval_s < 0:
            raise PriceTableError("check interval must not be negative", value=check_interval_s)
        self.path: Path | None = Path(path).expanduser() if path else None
        self.currency = currency
        self._interval = check_interval_s
        self._clock = clock
        self._table: PriceTable | None = None
        self._signature: _Signature | None = None
        self._racy = False
        self._digest = b""  # of the content the current table was parsed from
        self._bad_digest: bytes | None = None  # of the last content that failed to parse
        self._problem: object = None  # what was last logged, so it is logged once
        self._next_check = clock() + check_interval_s
        if self.path is None:
            return
        try:
            data, signature = _read(self.path)
        except (OSError, ValueError) as e:
            raise PriceTableError(
                f"cannot read the price table: {e}", file=str(self.path)
            ) from None
        self._install(self._parse(data), data, signature)

    @property
    def table(self) -> PriceTable | None:
        return self._table

    def price(self, usage: Usage, model: str, flat_micro_per_token: int) -> Price:
        """The debit for `usage` of `model`: its table entry, else the flat price."""
        if self.path is not None:
            try:
                self._maybe_reload()
            except Exception as e:
                # Pricing must go on whatever the file system does; the table stays as it was.
                self._report(("unexpected", repr(e)), f"unexpected error while checking: {e!r}")
        table = self._table
        entry = table.lookup(model) if table is not None else None
        if table is None or entry is None:
            return flat_price(usage, flat_micro_per_token)
        return table_price(usage, entry, table.version)

    # -- reloading --------------------------------------------------------------------------

    def _maybe_reload(self) -> None:
        now = self._clock()
        if now < self._next_check or self.path is None:
            return
        self._next_check = now + self._interval
        try:
            signature = _Signature.of(os.stat(self.path))
        except (OSError, ValueError) as e:
            self._signature = None  # whatever appears there next is read
            self._report(("stat", type(e).__name__), f"cannot read the file ({e})")
            return
        if signature == self._signature and not self._racy:
            return
        try:
            data, signature = _read(self.path)
        except (OSError, ValueError) as e:
            self._signature = None
            self._report(("read", type(e).__name__), f"cannot read the file ({e})")
            return
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:
            # Touched, re-read while racy, or restored to what is loaded: nothing to reload.
            self._signature, self._racy = signature, _is_racy(signature)
            if self._problem is not None:
                logger.info("price table %s is good again, version %s", self.path, self._version)
            self._problem = self._bad_digest = None
            return
        if digest == self._bad_digest:
            self._signature, self._racy = signature, _is_racy(signature)
            return
        try:
            table = self._parse(data)
        except PriceTableError as e:
            self._signature, self._racy = signature, _is_racy(signature)
            self._bad_digest = digest
            self._report(("bad", digest), str(e))
            return
        old = self._table
        self._install(table, data, signature)
        if old is not None and old.version == table.version and not old.same_prices(table):
            logger.warning(
                "price table %s changed its prices but kept version %r: envelopes priced "
                "before and after the change carry the same price_version",
                self.path,
                table.version,
            )
        logger.info(
            "price table %s reloaded: version %s, %d entries",
            self.path,
            table.version,
            len(table.entries),
        )

    def _parse(self, data: bytes) -> PriceTable:
        table = parse_table(data, source=str(self.path))
        if self.currency and table.currency and table.currency != self.currency:
            raise PriceTableError(
                f"the table is in {table.currency}, the meter bills in {self.currency}",
                file=str(self.path),
                key="currency",
            )
        return table

    def _install(self, table: PriceTable, data: bytes, signature: _Signature) -> None:
        self._table = table
        self._digest = hashlib.sha256(data).digest()
        self._signature, self._racy = signature, _is_racy(signature)
        self._bad_digest = None
        self._problem = None

    def _report(self, problem: object, detail: str) -> None:
        if problem == self._problem:
            return
        self._problem = problem
        logger.error(
            "price table %s not reloaded, still pricing with version %s: %s",
            self.path,
            self._version,
            detail,
        )

    @property
    def _version(self) -> str:
        return self._table.version if self._table is not None else "none"


def _is_racy(signature: _Signature) -> bool:
    return signature.mtime_ns > time.time_ns() - _RACY_NS
