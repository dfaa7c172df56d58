"""The durable spool of usage envelopes and the JetStream publisher that drains it."""

from __future__ import annotations

from spool.publisher import NatsConfig, Publisher, PublisherStats, redact_url
from spool.store import MAX_VALUE_SIZE, Spool
from spool.streams import ensure_stream, stream_messages

__all__ = [
    "MAX_VALUE_SIZE",
    "NatsConfig",
    "Publisher",
    "PublisherStats",
    "Spool",
    "ensure_stream",
    "redact_url",
    "stream_messages",
]
