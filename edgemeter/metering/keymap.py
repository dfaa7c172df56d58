"""The key map of meter_attribution=keymap: the tenant and customer each API key is billed to,
by the key's fingerprint, read from a TOML file and reloaded when the file changes.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from edgemeter.errors import KeyMapError
from edgemeter.metering.attribution import KEYED_PREFIX, MAX_ID_CHARS, Account, is_fingerprint
from edgemeter.metering.tomlfile import Watched, did_you_mean, line_of, load_toml
from edgemeter.metering.usage import clean_name

logger = logging.getLogger(__name__)

# Room for one entry per key of a large gateway. The whole file is parsed on a reload, on the
# proxy's event loop: 20-40 µs a key, so a very large map stalls the proxy (docs/SECURITY.md).
MAX_FILE_BYTES = 32 << 20
MAX_ENTRIES = 200_000
# Distinct unknown fingerprints logged; beyond that only meter.status counts them.
MAX_UNKNOWN_LOGGED = 100
_TOP_KEYS = ("version", "keys")
_ACCOUNT_KEYS = ("tenant", "customer")


@dataclass(frozen=True, slots=True)
class KeyMap:
    """A validated key map: immutable, so a reload swaps the whole object."""

    version: str
    accounts: Mapping[str, Account]
    """By fingerprint, in the scheme of the meter that loaded it (see `keyed`)."""
    keyed: bool
    """Fingerprints are HMACs with meter_fingerprint_secret ("hmac:…"), not SHA-256 prefixes."""


def parse_keymap(data: str | bytes, *, keyed: bool, source: str = "<string>") -> KeyMap:
    """Parse and validate a key map. Unknown keys (top level and in entries) are allowed, for
    the operator's notes; an error names the file and line and never quotes what stands where a
    fingerprint should be (it may be a raw API key pasted by mistake)."""
    doc, text = load_toml(data, source=source, max_bytes=MAX_FILE_BYTES, error=KeyMapError)

    def fail(message: str, entry: str | None = None, key: str | None = None) -> KeyMapError:
        fields: dict[str, object] = {"file": source}
        line = line_of(text, "keys", entry, key)
        if line is not None:
            fields["line"] = line
        if key is not None:
            fields["key"] = key
        return KeyMapError(message, **fields)

    version = doc.get("version", "")
    if isinstance(version, datetime.date) and not isinstance(version, datetime.datetime):
        version = version.isoformat()  # `version = 2026-11-01` unquoted is a TOML date
    if not isinstance(version, str) or _bad_id(version, allow_empty=True):
        raise fail(f"'version' must be a string of at most {MAX_ID_CHARS} printable characters")
    keys = doc.get("keys")
    if not isinstance(keys, dict):
        typos = [k for k in doc if k not in _TOP_KEYS and did_you_mean(k, ("keys",))]
        hint = f" (found {typos[0]!r}: did you mean 'keys'?)" if typos else ""
        raise fail(
            f'missing the [keys."<fingerprint>"] tables{hint}', key=next(iter(typos), "keys")
        )
    if len(keys) > MAX_ENTRIES:
        raise fail(f"more than {MAX_ENTRIES} entries", key="keys")

    accounts: dict[str, Account] = {}
    for name, body in keys.items():
        fp = name.lower()
        if not is_fingerprint(fp, keyed=keyed):
            raise fail(_not_a_fingerprint(fp, keyed), entry=name)
        if fp in accounts:
            raise fail(f"fingerprint {fp} appears twice", entry=name)
        if not isinstance(body, dict):
            raise fail(f"{fp} must be a table with tenant and customer", entry=name)
        ids = []
        for key in _ACCOUNT_KEYS:
            value = body.get(key)
            if value is None:
                raise fail(f"{fp} is missing {key!r}", entry=name)
            if not isinstance(value, str) or _bad_id(value):
                raise fail(
                    f"{fp}: {key!r} must be a string of 1-{MAX_ID_CHARS} printable characters "
                    "without surrounding spaces",
                    entry=name,
                    key=key,
                )
            ids.append(value)
        accounts[fp] = Account(tenant_id=ids[0], customer_id=ids[1])
    return KeyMap(version=version, accounts=accounts, keyed=keyed)


def _not_a_fingerprint(fp: str, keyed: bool) -> str:
    if keyed and is_fingerprint(fp, keyed=False):
        return (
            f"{fp} is a fingerprint made without a secret, but meter_fingerprint_secret is set: "
            "compute every fingerprint with the same secret (edgemeter fingerprint)"
        )
    if not keyed and is_fingerprint(fp, keyed=True):
        return f"{fp} is a fingerprint made with a secret, but meter_fingerprint_secret is not set"
    expected = f"{KEYED_PREFIX} and 16 hex digits" if keyed else "16 hex digits"
    return (
        f"an entry is not a fingerprint ({expected}); never put an API key itself in the map, "
        "compute its fingerprint with `edgemeter fingerprint`"
    )


def _bad_id(value: str, *, allow_empty: bool = False) -> bool:
    # Ids land in every envelope: a typo must not smuggle control characters or bidirectional
    # overrides into a ledger or a log line.
    if not value:
        return not allow_empty
    return clean_name(value, MAX_ID_CHARS) is None


class KeyBook:
    """The current key map for a path, reloaded when the file changes (see `Watched`: a bad
    file at construction raises KeyMapError; later, a bad file keeps the last good map and
    logs one ERROR per distinct problem)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        keyed: bool,
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path).expanduser()
        self.keyed = keyed
        self._unknown_logged: set[str] = set()
        self._file: Watched[KeyMap] = Watched(
            self.path,
            lambda data: parse_keymap(data, keyed=keyed, source=str(self.path)),
            what="key map",
            doing="attributing",
            describe=lambda m: f"version {m.version or '(none)'}, {len(m.accounts)} keys",
            logger=logger,
            error=KeyMapError,
            max_bytes=MAX_FILE_BYTES,
            check_interval_s=check_interval_s,
            clock=clock,
        )

    @property
    def map(self) -> KeyMap:
        return self._file.value

    def lookup(self, fingerprint: str) -> Account | None:
        """The account of a fingerprint in the current map (reloaded if the file changed)."""
        return self._file.get().accounts.get(fingerprint)

    def report_unknown(self, fingerprint: str) -> None:
        """Log a request billed unattributed, once per fingerprint (bounded): the operator
        needs the fingerprint to add the key to the map."""
        logged = self._unknown_logged
        if fingerprint in logged or len(logged) > MAX_UNKNOWN_LOGGED:
            return
        logged.add(fingerprint)
        if len(logged) > MAX_UNKNOWN_LOGGED:
            logger.warning(
                "more than %d unknown API keys: not logging more (meter.status counts them)",
                MAX_UNKNOWN_LOGGED,
            )
        elif fingerprint:
            logger.warning(
                "API key %s is not in the key map %s: billed with customer_id '' "
                "(metadata.attribution unknown_key)",
                fingerprint,
                self.path,
            )
        else:
            logger.warning(
                "request without an API key in keymap mode: billed with customer_id '' "
                "(metadata.attribution unknown_key)"
            )
