"""Who a request is billed to: tenant and customer headers, the client's correlation id, and a
fingerprint of the API key that identifies the key without ever carrying it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

# Header names carrying an API key, in the order gateways use them (OpenAI, Anthropic, Azure).
_KEY_HEADERS = ("authorization", "x-api-key", "api-key")
FINGERPRINT_HEX_CHARS = 16


def api_key(headers: Mapping[str, str]) -> str:
    for name in _KEY_HEADERS:
        value = headers.get(name, "").strip()
        if not value:
            continue
        scheme, _, rest = value.partition(" ")
        if name == "authorization":
            if scheme.lower() != "bearer" or not rest.strip():
                continue
            value = rest.strip()
        return value
    return ""


def fingerprint(key: str) -> str:
    """A SHA-256 prefix of the key: enough to tell keys apart, useless to call the API with."""
    if not key:
        return ""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[
        :FINGERPRINT_HEX_CHARS
    ]
