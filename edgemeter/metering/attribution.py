"""Who a request is billed to: tenant and customer from trusted headers or from the key map, and
a fingerprint of the API key that identifies the key without ever carrying it.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar, overload

from edgemeter.metering.usage import clean_name

# Header names carrying an API key, in the order gateways use them (OpenAI, Anthropic, Azure).
_KEY_HEADERS = ("authorization", "x-api-key", "api-key")
FINGERPRINT_HEX_CHARS = 16
# Tenant, customer and correlation ids land in every envelope and on the customer's invoice:
# bounded and printable, or not taken at all.
MAX_ID_CHARS = 128
# Marks a fingerprint made with meter_fingerprint_secret: a key map written for one scheme is
# refused by a meter using the other, instead of silently matching no key at all.
KEYED_PREFIX = "hmac:"
_PLAIN = re.compile(rf"^[0-9a-f]{{{FINGERPRINT_HEX_CHARS}}}$")
_KEYED = re.compile(rf"^{KEYED_PREFIX}[0-9a-f]{{{FINGERPRINT_HEX_CHARS}}}$")

# Where an envelope's tenant and customer came from (metadata.attribution).
Source = Literal["headers", "keymap", "unknown_key"]
Mode = Literal["headers", "keymap"]

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Spec:
    """How requests are attributed (meter_attribution and the options it reads)."""

    mode: Mode = "headers"
    tenant_header: str = "x-tenant-id"
    customer_header: str = "x-customer-id"
    # Secret of the HMAC fingerprint; kept out of repr, so a logged Spec carries none.
    fingerprint_secret: bytes = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class Account:
    """A key map entry: whom the requests made with one API key are billed to."""

    tenant_id: str
    customer_id: str


@dataclass(frozen=True, slots=True)
class Attribution:
    tenant_id: str
    customer_id: str
    fingerprint: str
    source: Source
    # Headers whose values were refused (not a bounded printable id) and left out.
    refused: tuple[str, ...] = ()


def header_names(spec: Spec, *extra: str) -> frozenset[str]:
    """The lower-case names of the request headers `attribute` reads under `spec`, and `extra`
    ones: what `picked_headers` is to pick. Compute it once per configuration."""
    names = {*_KEY_HEADERS, spec.tenant_header, spec.customer_header, *extra}
    return frozenset(_lower(name) for name in names)


class PickedHeaders(Mapping[str, str]):
    """The values of some request headers, read like mitmproxy's `Headers`: names are
    case-insensitive, `get` folds a repeated header into one value (", "-joined) and `get_all`
    keeps them apart. Reading a header that was not picked raises ValueError (it would
    otherwise read as absent, and bill a request to nobody)."""

    __slots__ = ("_names", "_values")

    def __init__(self, values: dict[str, list[str]], names: frozenset[str]) -> None:
        self._values = values
        self._names = names

    def _all(self, name: str) -> list[str] | None:
        values = self._values.get(name)
        if values is None and name not in self._names:
            lower = _lower(name)
            if lower not in self._names:
                raise ValueError(f"header {name!r} was not picked")
            values = self._values.get(lower)
        return values

    def __getitem__(self, name: str) -> str:
        values = self._all(name)
        if values is None:
            raise KeyError(name)
        return values[0] if len(values) == 1 else ", ".join(values)

    # Mapping.get and __contains__ would go through a KeyError for every absent header.
    @overload
    def get(self, name: str, /) -> str | None: ...
    @overload
    def get(self, name: str, /, default: str | _T) -> str | _T: ...
    def get(self, name: str, /, default: object = None) -> object:
        values = self._all(name)
        if values is None:
            return default
        return values[0] if len(values) == 1 else ", ".join(values)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._all(name) is not None

    def get_all(self, name: str) -> list[str]:
        """Every value of the header, in request order; [] when absent."""
        return list(self._all(name) or ())

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        # Never the values: an authorization header carries an API key.
        return f"PickedHeaders({sorted(self._values)!r})"


def picked_headers(fields: Iterable[tuple[bytes, bytes]], names: frozenset[str]) -> PickedHeaders:
    """The headers named in `names` (see `header_names`) among a request's raw
    `headers.fields`, decoded as mitmproxy decodes them. One pass over the fields, where each
    `Headers.get` or `get_all` lower-cases every field name again."""
    known = _wanted.get(names)
    if known is None:
        if len(_wanted) > 16:  # names are made once per configuration; this is just a bound
            _wanted.clear()
        lowered = frozenset(_lower(name) for name in names)
        known = _wanted[names] = ({_native_bytes(name): name for name in lowered}, lowered)
    wanted, lowered = known
    values: dict[str, list[str]] = {}
    for raw_name, raw_value in fields:
        name = wanted.get(raw_name.lower())
        if name is not None:
            value = raw_value.decode("utf-8", "surrogateescape")
            seen = values.get(name)
            if seen is None:
                values[name] = [value]
            else:
                seen.append(value)
    return PickedHeaders(values, lowered)


# Per names set: the byte names picked_headers compares field names with, and the names.
_wanted: dict[frozenset[str], tuple[dict[bytes, str], frozenset[str]]] = {}


def _native_bytes(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _lower(name: str) -> str:
    # As mitmproxy compares header names: ASCII letters only, as bytes.lower() does.
    return _native_bytes(name).lower().decode("utf-8", "surrogateescape")


def header_id(headers: Mapping[str, str], name: str) -> str | None:
    """The id a header carries: "" when absent, None when it is not fit for an envelope
    (control or format characters, surrounding spaces, more than MAX_ID_CHARS)."""
    value = headers.get(name, "")
    return clean_name(value, MAX_ID_CHARS) if value else ""


def api_keys(headers: Mapping[str, str], own: Sequence[str] = ()) -> list[str]:
    """Every API key the request carries, in header order, then `own`: the keys only the
    route's API sends (Gemini's x-goog-api-key and ?key=), read by the caller where that API is
    served. A client may send several, and repeat a header (which a plain lookup would fold
    into one value)."""
    # PickedHeaders' own lists, not get_all's copies: 0.8 -> 0.4 µs a request.
    picked, names = (
        (headers._values, headers._names) if type(headers) is PickedHeaders else (None, None)
    )
    get_all = getattr(headers, "get_all", None)
    keys: list[str] = []
    for name in _KEY_HEADERS:
        if picked is not None and names is not None and name in names:
            values = picked.get(name, ())
        else:
            values = get_all(name) if get_all is not None else [headers.get(name, "")]
        for raw in values:
            value = raw.strip()
            if name == "authorization":
                scheme, _, rest = value.partition(" ")
                if scheme.lower() != "bearer":
                    continue
                value = rest.strip()
            if value and value not in keys:
                keys.append(value)
    for raw in own:
        value = raw.strip()
        if value and value not in keys:
            keys.append(value)
    return keys


def api_key(headers: Mapping[str, str]) -> str:
    """The key the request authenticates with: the first of `api_keys`."""
    return next(iter(api_keys(headers)), "")


def fingerprint(key: str, secret: bytes = b"") -> str:
    """Enough of a hash to tell keys apart, useless to call the API with: an HMAC-SHA256 with
    the secret ("hmac:" and 16 hex digits) or, without one, a SHA-256 prefix (16 hex digits).
    Without a secret, whoever holds a list of candidate keys can test them against a
    fingerprint; with one, only whoever also holds the secret can."""
    if not key:
        return ""
    data = key.encode("utf-8", "surrogateescape")
    if secret:
        mac = _keyed(secret).copy()
        mac.update(data)
        return KEYED_PREFIX + mac.hexdigest()[:FINGERPRINT_HEX_CHARS]
    return hashlib.sha256(data).hexdigest()[:FINGERPRINT_HEX_CHARS]


@functools.lru_cache(maxsize=4)
def _keyed(secret: bytes) -> hmac.HMAC:
    # The HMAC keyed once per secret, then copied per key: a third less than hmac.new.
    return hmac.new(secret, digestmod=hashlib.sha256)


def is_fingerprint(text: str, *, keyed: bool) -> bool:
    """Whether `text` is a fingerprint of the scheme a meter with (keyed) or without a
    fingerprint secret computes."""
    return bool((_KEYED if keyed else _PLAIN).match(text))


def attribute(
    headers: Mapping[str, str],
    spec: Spec,
    lookup: Callable[[str], Account | None] | None = None,
    own: Sequence[str] = (),
) -> Attribution:
    """Whom the request is billed to, under spec.mode.

    headers: the tenant and customer headers, as the trusted ingress set them. keymap: the key
    map's entry for the first of the request's keys that has one (a client cannot escape its
    own key's account by adding a made-up key in another header); the client's tenant and
    customer headers are not read at all. No key in the map: tenant and customer are empty and
    the source says unknown_key, so the usage is still billed, visibly unattributed."""
    secret = spec.fingerprint_secret
    keys = api_keys(headers, own)
    if spec.mode == "headers":
        tenant = header_id(headers, spec.tenant_header)
        customer = header_id(headers, spec.customer_header)
        refused: tuple[str, ...] = (spec.tenant_header,) if tenant is None else ()
        refused += (spec.customer_header,) if customer is None else ()
        return Attribution(
            tenant_id=tenant or "",
            customer_id=customer or "",
            fingerprint=fingerprint(keys[0], secret) if keys else "",
            source="headers",
            refused=refused,
        )
    prints = [fingerprint(key, secret) for key in keys]
    for fp in prints:
        account = lookup(fp) if lookup is not None else None
        if account is not None:
            return Attribution(account.tenant_id, account.customer_id, fp, "keymap")
    return Attribution("", "", prints[0] if prints else "", "unknown_key")
