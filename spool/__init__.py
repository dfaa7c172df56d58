"""The durable spool of usage envelopes and the JetStream publisher that drains it: a lower layer
that knows nothing of edgemeter (envelopes are bytes under a key, published with Nats-Msg-Id, on
the subject and with the headers a routed value carries).
"""

from __future__ import annotations

from spool.deadletter import DeadLetter, DeadLetters
from spool.errors import PublishError, RouteError, SpoolError, SpoolFullError, describe
from spool.lock import SpoolLock
from spool.publisher import NatsConfig, Publisher, PublisherStats, redact_url
from spool.routing import Route, pack, unpack
from spool.store import MAX_VALUE_SIZE, Spool

__all__ = [
    "MAX_VALUE_SIZE",
    "DeadLetter",
    "DeadLetters",
    "NatsConfig",
    "PublishError",
    "Publisher",
    "PublisherStats",
    "Route",
    "RouteError",
    "Spool",
    "SpoolError",
    "SpoolFullError",
    "SpoolLock",
    "describe",
    "pack",
    "redact_url",
    "unpack",
]
