"""CloudEvents binary-mode headers for an envelope (meter_cloudevents): the attributes travel as
`ce-*` NATS headers beside the unchanged body, so CloudEvents tooling (OpenMeter) reads them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

SPECVERSION: Final = "1.0"
SOURCE: Final = "edgemeter"
# The type of an envelope on the billing subject, and of one sent to reconciliation.
TYPE_RECORDED: Final = "edgemeter.usage.recorded"
TYPE_UNBILLABLE: Final = "edgemeter.usage.unbillable"
# datacontenttype: in binary mode it is the message's content-type (as CloudEvents' HTTP
# binding, and the Go SDK's NATS binding, carry it).
CONTENT_TYPE: Final = "application/json"

# Printable ASCII but space, '"' and '%' goes as it is; every other byte of the UTF-8 form is
# percent-encoded (the HTTP binding's rule for header values, 3.1.3.2).
_KEPT: Final = frozenset(range(0x21, 0x7F)) - {ord('"'), ord("%")}
_ALL_KEPT: Final = re.compile(r"[!#$&-~]*")


def headers(envelope: Mapping[str, Any], *, unbillable: bool = False) -> dict[str, str]:
    """ce-specversion, ce-id (the request id), ce-source, ce-type, ce-time (completed_at),
    ce-subject (the customer, left out when there is none) and content-type."""
    meta = envelope["metadata"]
    # The constants need no encoding; the ids and the time are encoded, should they need it.
    found = {
        "ce-specversion": SPECVERSION,
        "ce-id": percent_encoded(str(meta["request_id"])),
        "ce-source": SOURCE,
        "ce-type": TYPE_UNBILLABLE if unbillable else TYPE_RECORDED,
        "ce-time": percent_encoded(str(meta["completed_at"])),
        "content-type": CONTENT_TYPE,
    }
    if customer := envelope.get("customer_id"):
        found["ce-subject"] = percent_encoded(str(customer))
    return found


def percent_encoded(value: str) -> str:
    """`value` fit for a header: the bytes outside _KEPT of its UTF-8 form as %XX."""
    if _ALL_KEPT.fullmatch(value):
        return value
    data = value.encode("utf-8", "surrogateescape")
    return "".join(chr(byte) if byte in _KEPT else f"%{byte:02X}" for byte in data)


__all__ = [
    "CONTENT_TYPE",
    "SOURCE",
    "SPECVERSION",
    "TYPE_RECORDED",
    "TYPE_UNBILLABLE",
    "headers",
    "percent_encoded",
]
