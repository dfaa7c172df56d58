"""Metering of one Realtime session (a WebSocket), independent of mitmproxy: server events in, an
envelope per billed event out; a response cut off by the session's end is billed as aborted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgemeter.errors import InvalidUsage
from edgemeter.metering import envelope, estimate
from edgemeter.metering.apis.openai_audio_transcriptions import normalize_transcription
from edgemeter.metering.apis.openai_realtime import REALTIME_COUNTS, normalize_realtime
from edgemeter.metering.envelope import Facts, Outcome
from edgemeter.metering.flow import Request, Result
from edgemeter.metering.prices import Price
from edgemeter.metering.usage import Usage, as_dict, as_str, clean_name, detail, json_object

API = "openai.realtime"
TRANSCRIPTION_API = "openai.realtime.transcription"
# What a WebSocket upgrade is answered with: the envelopes' status_code.
SWITCHING_PROTOCOLS = 101
# Open responses and transcriptions tracked at once: past this, the oldest are forgotten (a
# session has one response at a time, a few out-of-band ones at most).
MAX_OPEN = 64

# Estimates of a response cut off before response.done. OpenAI counts audio input at one token
# per 100 ms and output at one per 50 ms; the default format (pcm16, 24 kHz, mono) is 48 bytes a
# millisecond, and base64 carries 3 bytes in 4 characters.
PCM_BYTES_PER_MS = 48
INPUT_AUDIO_MS_PER_TOKEN = 100
OUTPUT_AUDIO_MS_PER_TOKEN = 50

# Audio deltas are most of a session's bytes: they are recognised by their type near the start
# and only counted, never parsed (OpenAI writes "type" first).
_OUTPUT_AUDIO = (b'"response.output_audio.delta"', b'"response.audio.delta"')
_INPUT_AUDIO = b'"input_audio_buffer.append"'
_HEAD = 96
_TEXT_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.text.delta",
        "response.output_audio_transcript.delta",
        "response.audio_transcript.delta",
    }
)
_DELTA = re.compile(rb'"delta"\s*:\s*"((?:[^"\\]|\\.)*)"')


@dataclass(slots=True)
class _Open:
    """A response between response.created and response.done."""

    started_at: float
    first_at: float | None = None
    text_chars: int = 0
    audio_chars: int = 0
    # What the client sent for it (text characters, base64 audio characters), for estimates.
    asked_chars: int = 0
    asked_audio_chars: int = 0


@dataclass(slots=True)
class _Pending:
    """What the client sent since the last response began."""

    text_chars: int = 0
    audio_chars: int = 0
    items: dict[str, float] = field(default_factory=dict)


PriceOf = Callable[[Usage, str], Price]


class RealtimeMeter:
    """One session. `server` and `client` take each message's bytes as they pass; `end` bills
    what is still open (the client left, the connection broke) like an aborted stream:
    `client_aborted`, on an estimate of what was streamed. Each envelope gets its own request id
    from `mint`."""

    def __init__(self, request: Request, model: str, mint: Callable[[], str]) -> None:
        self.request = request
        self.model = clean_name(model) or ""
        self.transcriber = ""
        self.mint = mint
        self.open: dict[str, _Open] = {}
        self.pending = _Pending()
        self.latest: str | None = None

    # -- messages ------------------------------------------------------------------------------

    def client(self, data: bytes) -> None:
        """A client event: only counted, for estimates of a response cut off."""
        if _INPUT_AUDIO in data[:_HEAD]:
            self.pending.audio_chars += len(data)
        else:
            self.pending.text_chars += estimate.text_chars(data)

    def server(self, data: bytes, *, now: float, currency: str, price_of: PriceOf) -> list[Result]:
        """A server event: the results of the events it bills (none for most)."""
        head = data[:_HEAD]
        if _OUTPUT_AUDIO[0] in head or _OUTPUT_AUDIO[1] in head:
            if (current := self._current()) is not None:
                current.audio_chars += len(data)
                current.first_at = current.first_at or now
            return []
        obj = json_object(data)
        if obj is None:
            return []
        kind = as_str(obj.get("type")) or ""
        if kind in _TEXT_DELTAS:
            if (current := self._open(obj.get("response_id"))) is not None:
                current.text_chars += len(b"".join(_DELTA.findall(data)))
                current.first_at = current.first_at or now
        elif kind in ("session.created", "session.updated"):
            self._session(as_dict(obj.get("session")) or {})
        elif kind == "response.created":
            self._created(as_dict(obj.get("response")) or {}, now)
        elif kind == "response.done":
            result = self._done(as_dict(obj.get("response")) or {}, now, currency, price_of)
            return [result] if result is not None else []
        elif kind == "conversation.item.input_audio_transcription.delta":
            item = clean_name(obj.get("item_id"))
            if item is not None and item not in self.pending.items:
                self._remember(self.pending.items, item, now)
        elif kind == "conversation.item.input_audio_transcription.completed":
            result = self._transcribed(obj, now, currency, price_of)
            return [result] if result is not None else []
        return []

    def end(self, *, now: float, currency: str, price_of: PriceOf) -> list[Result]:
        """The session is over: every response still open, billed as cut off."""
        results = [
            self._bill(
                API,
                self.model,
                self._estimate(response),
                response_id,
                response.started_at,
                response.first_at,
                now,
                "client_aborted",
                False,
                currency,
                price_of,
            )
            for response_id, response in self.open.items()
        ]
        self.open.clear()
        return results

    # -- events ---------------------------------------------------------------------------------

    def _session(self, session: dict[str, Any]) -> None:
        model = clean_name(session.get("model"))
        if model is not None:
            self.model = model
        # GA: session.audio.input.transcription.model; beta: input_audio_transcription.model.
        audio_in = as_dict((as_dict(session.get("audio")) or {}).get("input")) or {}
        transcription = as_dict(audio_in.get("transcription")) or as_dict(
            session.get("input_audio_transcription")
        )
        if transcription is not None and (name := clean_name(transcription.get("model"))):
            self.transcriber = name

    def _created(self, response: dict[str, Any], now: float) -> None:
        response_id = clean_name(response.get("id")) or f"response-{len(self.open)}"
        pending = self.pending
        self._remember(
            self.open,
            response_id,
            _Open(now, asked_chars=pending.text_chars, asked_audio_chars=pending.audio_chars),
        )
        pending.text_chars = pending.audio_chars = 0
        self.latest = response_id

    def _done(
        self, response: dict[str, Any], now: float, currency: str, price_of: PriceOf
    ) -> Result | None:
        response_id = clean_name(response.get("id")) or ""
        opened = self.open.pop(response_id, None) or _Open(now)
        status = as_str(response.get("status")) or ""
        outcome: Outcome = {"cancelled": "client_aborted", "failed": "upstream_error"}.get(
            status, "complete"
        )  # type: ignore[assignment]
        usage_obj = as_dict(response.get("usage"))
        usage: Usage | None = None
        reason = ""
        if usage_obj is not None and not REALTIME_COUNTS.isdisjoint(usage_obj):
            try:
                usage = normalize_realtime(usage_obj)
            except InvalidUsage:
                reason = "invalid_usage"
        if usage is None and outcome == "upstream_error" and not reason:
            return Result(None, "upstream_error_without_usage")
        reported = usage is not None
        result = self._bill(
            API,
            self.model,
            usage if usage is not None else self._estimate(opened),
            response_id,
            opened.started_at,
            opened.first_at,
            now,
            outcome,
            reported,
            currency,
            price_of,
        )
        return Result(result.envelope, reason, result.data) if reason else result

    def _transcribed(
        self, obj: dict[str, Any], now: float, currency: str, price_of: PriceOf
    ) -> Result | None:
        usage_obj = as_dict(obj.get("usage"))
        if usage_obj is None:
            return None  # only a transcription that reports usage is billed
        item = clean_name(obj.get("item_id")) or ""
        started = self.pending.items.pop(item, now)
        try:
            usage = normalize_transcription(usage_obj)
        except InvalidUsage:
            return Result(None, "invalid_usage")
        return self._bill(
            TRANSCRIPTION_API,
            self.transcriber or self.model,
            usage,
            item,
            started,
            started,
            now,
            "complete",
            True,
            currency,
            price_of,
        )

    # -- helpers --------------------------------------------------------------------------------

    def _current(self) -> _Open | None:
        return self.open.get(self.latest) if self.latest is not None else None

    def _open(self, response_id: Any) -> _Open | None:
        found = self.open.get(response_id) if isinstance(response_id, str) else None
        return found or self._current()

    @staticmethod
    def _remember(table: dict[str, Any], key: str, value: Any) -> None:
        if len(table) >= MAX_OPEN:
            del table[next(iter(table))]
        table[key] = value

    @staticmethod
    def _estimate(response: _Open) -> Usage:
        """A response cut off before its usage: text four characters a token, audio by its
        length (see the constants above); at least one output token, as for streams."""
        audio_in = _audio_ms(response.asked_audio_chars) // INPUT_AUDIO_MS_PER_TOKEN
        audio_out = _audio_ms(response.audio_chars) // OUTPUT_AUDIO_MS_PER_TOKEN
        text_in = estimate.tokens(response.asked_chars)
        text_out = estimate.tokens(response.text_chars)
        return Usage(
            input_tokens=max(1, text_in + audio_in),
            output_tokens=max(1, text_out + audio_out),
            detail=detail(
                input_text=text_in,
                input_audio=audio_in,
                output_text=text_out,
                output_audio=audio_out,
            ),
        )

    def _bill(
        self,
        api: str,
        model: str,
        usage: Usage,
        upstream_id: str,
        started_at: float,
        first_at: float | None,
        now: float,
        outcome: Outcome,
        reported: bool,
        currency: str,
        price_of: PriceOf,
    ) -> Result:
        req = self.request
        facts = Facts(
            request_id=self.mint(),
            api=api,
            path=req.path,
            stream=True,
            status_code=SWITCHING_PROTOCOLS,
            model=model or "unknown",
            tenant_id=req.tenant_id,
            customer_id=req.customer_id,
            started_at=started_at,
            completed_at=now,
            first_byte_at=first_at,
            outcome=outcome,
            usage_source="reported" if reported else "estimated",
            currency=currency,
            client_request_id=req.client_request_id,
            upstream_id=upstream_id,
            api_key_fingerprint=req.api_key_fingerprint,
            attribution=req.attribution,
        )
        built = envelope.build(facts, usage, price_of(usage, facts.model))
        return Result(built, "", envelope.encode(built))


def _audio_ms(base64_chars: int) -> int:
    return base64_chars * 3 // 4 // PCM_BYTES_PER_MS
