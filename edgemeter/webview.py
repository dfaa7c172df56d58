"""What a person settling a billing dispute in mitmweb sees: what the meter recorded on each flow
(the envelope it billed, what it changed), the flow's comment and mark, and the "LLM usage" view.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from mitmproxy import contentviews, http

from edgemeter.metering.apis import classify
from edgemeter.metering.contract import Routed
from edgemeter.metering.extraction import Extraction
from edgemeter.metering.sse import SSEDecoder

# flow.metadata keys. The envelope billed for the flow (kept by mitmweb's save and export);
# and what the meter did to the flow: what it changed in the request and the response
# (injected, stripped, trimmed, decoded), what it billed despite ("despite") or why it billed
# nothing ("not_billed": non_2xx, replayed, loaded, ...).
ENVELOPE: Final = "edgemeter"
RECORD: Final = "edgemeter.meter"

MARK_REPORTED: Final = ":moneybag:"
MARK_ESTIMATED: Final = ":heavy_dollar_sign:"
# Not booked as it came: sent to reconciliation, or booked to the house account.
MARK_UNBILLABLE: Final = ":warning:"
MARK_HOUSE: Final = ":house:"
# Flows this run did not bill although they carry an envelope.
MARK_REPLAYED: Final = ":repeat:"
MARK_LOADED: Final = ":floppy_disk:"
NOT_BILLED_MARKS: Final = {"replayed": MARK_REPLAYED, "loaded": MARK_LOADED}
_SEP: Final = " · "
_NOT_BILLED: Final = ": not billed by this run"
# Bodies larger than this are not parsed for the view (mitmweb renders on the proxy's loop).
_MAX_VIEW_BYTES: Final = 16 * 1024 * 1024

# The envelope's fields in the order a dispute reads them; every other field follows.
_WHO: Final = ("request_id", "customer_id", "tenant_id", "attribution", "model")
_BILL: Final = (
    "outcome",
    "usage_source",
    "amount_micro_omr",
    "amount_omr",
    "currency",
    "price_version",
    "reason",
)


def _decimal(micro: int) -> str:
    """Micro-units as an exact decimal (no float rounding)."""
    whole, frac = divmod(abs(micro), 1_000_000)
    return f"{'-' if micro < 0 else ''}{whole}.{frac:06d}"


def _billed(envelope: Mapping[str, Any]) -> str:
    """The amount debited, positive, with its currency: what the customer was billed."""
    meta = envelope.get("metadata", {})
    amount = envelope.get("amount_micro_omr", 0)
    amount = -amount if isinstance(amount, int) else 0
    return f"{_decimal(amount)} {meta.get('currency', '')}".rstrip()


def annotation(
    envelope: Mapping[str, Any], destination: str = "billing", reason: str = ""
) -> tuple[str, str]:
    """The comment and mark of a flow billed by this run, and where its envelope went
    (contract.route): billing, reconciliation (why) or the house account (why).
    The comment starts with what fits the flow list's narrow column (amount, outcome, request
    id) and carries the request id in full, so `~comment <request_id>` finds the flow."""
    meta = envelope["metadata"]
    micro = -envelope["amount_micro_omr"]
    # One f-string: this runs for every billed request, and joining parts took twice as long.
    amount = f"{micro // 1_000_000}.{micro % 1_000_000:06d}" if micro >= 0 else _decimal(micro)
    comment = (
        f"{amount} {meta['currency']} {meta['outcome']} {meta['request_id']}{_SEP}"
        f"{meta['input_tokens']} in / {meta['output_tokens']} out tokens "
        f"({meta['usage_source']}){_SEP}{meta['price_version']}{_SEP}"
        f"customer {envelope['customer_id'] or '-'} tenant {meta['tenant_id'] or '-'}"
        f"{_SEP}edgemeter"
    )
    if destination == "reconciliation":
        return f"{comment}; UNBILLABLE ({reason}): sent to reconciliation", MARK_UNBILLABLE
    if destination == "house":
        return (
            f"{comment}; booked to the house account {envelope['customer_id']} ({reason})",
            MARK_HOUSE,
        )
    mark = MARK_REPORTED if meta["usage_source"] == "reported" else MARK_ESTIMATED
    return comment, mark


def record(flow: http.HTTPFlow, routed: Routed | None, done: dict[str, Any]) -> None:
    """What the meter did to a flow it metered, kept on the flow: the envelope it billed and
    where it went (with comment and mark), or in `done["not_billed"]` why there is none."""
    flow.metadata[RECORD] = done
    if routed is not None:
        flow.metadata[ENVELOPE] = routed.envelope
        flow.comment, flow.marked = annotation(routed.envelope, routed.destination, routed.reason)


def not_billed(flow: http.HTTPFlow, why: str) -> None:
    """A flow this run sees again without billing it (`why`: replayed, loaded from a file): its
    comment says so first and its mark changes, the envelope it was billed with stays."""
    if ENVELOPE not in flow.metadata:
        return  # never billed: what the record says (why not) stays true
    done = flow.metadata.get(RECORD)
    if not isinstance(done, dict):
        done = flow.metadata[RECORD] = {}
    done["not_billed"] = why
    comment = flow.comment
    for earlier in NOT_BILLED_MARKS:
        comment = comment.removeprefix(earlier + _NOT_BILLED + _SEP)
    flow.comment = why + _NOT_BILLED + _SEP + comment
    billed_marks = (MARK_REPORTED, MARK_ESTIMATED, MARK_UNBILLABLE, MARK_HOUSE)
    if flow.marked in (*billed_marks, *NOT_BILLED_MARKS.values()):
        flow.marked = NOT_BILLED_MARKS.get(why, flow.marked)


# -- the "LLM usage" view -----------------------------------------------------------------------


def _value(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _changes(done: Mapping[str, Any], stream: bool) -> list[str]:
    """What the meter changed in the request and the response, in words (short lines: the
    view is half of mitmweb's window)."""
    lines = []
    if done.get("injected"):
        lines += [
            '  request: added "stream_options": {"include_usage": true}',
            "    (the client did not ask for usage; the Request tab shows what the upstream got)",
        ]
    else:
        lines.append("  request: unchanged")
    stripped, trimmed = done.get("stripped", 0), done.get("trimmed", 0)
    if stripped or trimmed:
        parts = []
        if stripped:
            parts.append(f"{stripped} usage-only event{'s' if stripped != 1 else ''} dropped")
        if trimmed:
            parts.append(f"the usage key of {trimmed} event{'s' if trimmed != 1 else ''} removed")
        lines += [
            "  response: the usage the meter asked for taken out of the client's stream:",
            f"    {', '.join(parts)} (the Response tab shows what the client got,",
            "    usage_raw what the upstream reported)",
        ]
    elif done.get("injected") and stream:
        lines.append("  response: unchanged (the usage the meter asked for reached the client)")
    else:
        lines.append("  response: unchanged")
    if done.get("decoded"):
        lines.append("  response: sent decoded, without its Content-Encoding (to strip it)")
    return lines


def _status(flow: http.HTTPFlow, envelope: Mapping[str, Any], done: Mapping[str, Any]) -> str:
    why = done.get("not_billed") or ("replayed" if flow.is_replay else "")
    billed = _billed(envelope)
    if why == "replayed":
        return f"replayed{_NOT_BILLED}; the original request was billed {billed}"
    if why == "loaded":
        return f"loaded from a file{_NOT_BILLED}; billed {billed} when it was recorded"
    return f"billed {billed} by this meter run"


def describe(flow: http.HTTPFlow) -> str | None:
    """The envelope billed for the flow and what the meter changed; None when it has none.
    Every field of the envelope is shown (new token kinds and units included): first those a
    dispute reads, then counts, then the rest."""
    envelope = flow.metadata.get(ENVELOPE)
    if not isinstance(envelope, dict) or not isinstance(envelope.get("metadata"), dict):
        return None
    done = flow.metadata.get(RECORD)
    done = done if isinstance(done, dict) else {}
    meta: dict[str, Any] = envelope["metadata"]
    fields = {**{k: v for k, v in envelope.items() if k != "metadata"}, **meta}
    lines = [f"status: {_status(flow, envelope, done)}"]
    shown: set[str] = set()

    def show(name: str, indent: str = "") -> None:
        if name in fields and name not in shown:
            shown.add(name)
            lines.append(f"{indent}{name}: {_value(fields[name])}")

    for name in (*_WHO, *_BILL):
        show(name)
    lines.append("tokens:")
    show("tokens_used", "  ")
    for name in meta:
        if name.endswith("_tokens") and isinstance(meta[name], int):
            show(name, "  ")
    # Counts the envelope carries as objects (token details, units, ...), each in full.
    for name, value in meta.items():
        if isinstance(value, dict) and name != "usage_raw" and name not in shown:
            shown.add(name)
            lines.append(f"{name}:")
            lines += [f"  {key}: {_value(item)}" for key, item in value.items()]
    show("usage_raw")
    lines.append("the meter changed:")
    lines += _changes(done, bool(meta.get("stream")))
    if done.get("despite"):
        lines.append(f"billed despite: {done['despite']}")
    lines.append("more of the envelope:")
    for name in fields:
        show(name, "  ")
    return "\n".join(lines) + "\n"


def extract(path: str, data: bytes, event_stream: bool) -> Extraction | None:
    """The usage, model and error found in a response body to `path`; None if not metered."""
    api = classify(path)
    if api is None:
        return None
    found = Extraction(api)
    if event_stream:
        decoder = SSEDecoder(max_event_bytes=len(data) + 1)
        for event in [*decoder.feed(data), *decoder.close()]:
            found.event(event)
    else:
        found.body(data)
    return found


def describe_body(found: Extraction) -> str:
    """What a response body reports, as the meter would read it (for flows it did not bill)."""
    usage = found.usage
    lines = [f"api: {found.api}", f"model: {found.model or '(not reported)'}"]
    if found.upstream_id:
        lines.append(f"upstream_id: {found.upstream_id}")
    if found.error:
        lines.append(f"upstream error: {found.error}")
    if found.invalid:
        lines.append(f"invalid usage: {found.invalid}")
    if usage is None:
        lines.append("usage: none reported in this body")
        return "\n".join(lines) + "\n"
    lines += [
        f"tokens_used: {usage.tokens_used}",
        f"input_tokens: {usage.input_tokens}",
        f"cached_input_tokens: {usage.cached_input_tokens}",
        f"cache_write_tokens: {usage.cache_write_tokens}",
        f"output_tokens: {usage.output_tokens}",
        f"reasoning_tokens: {usage.reasoning_tokens}",
        "usage_raw: " + _value(usage.raw),
    ]
    return "\n".join(lines) + "\n"


def _unbilled(flow: http.HTTPFlow) -> str:
    done = flow.metadata.get(RECORD)
    why = done.get("not_billed") if isinstance(done, dict) else None
    if why:
        return f"status: not billed ({why})\n"
    return "status: no envelope on this flow (not metered by this meter run)\n"


def _body_missing(flow: http.HTTPFlow) -> bool:
    return flow.response is None or flow.response.raw_content is None


class UsageContentview(contentviews.Contentview):
    """Shows what the meter billed for a flow (the envelope it recorded, what it changed), on
    the response and on the request; for a flow it did not bill, what the body reports."""

    @property
    def name(self) -> str:
        return "LLM usage"

    @property
    def syntax_highlight(self) -> contentviews.SyntaxHighlight:
        return "yaml"

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        message, flow = metadata.http_message, metadata.flow
        if not isinstance(flow, http.HTTPFlow) or message is None:
            raise ValueError("not an HTTP flow")
        if (text := describe(flow)) is not None:
            return text
        if isinstance(message, http.Request):
            if RECORD in flow.metadata:
                return _unbilled(flow)
            raise ValueError("no envelope on this flow")
        if len(data) > _MAX_VIEW_BYTES:
            raise ValueError("body too large to inspect")
        event_stream = (metadata.content_type or "").startswith("text/event-stream")
        found = extract(flow.request.path, data, event_stream)
        if found is None:
            raise ValueError("not a metered LLM API path")
        return _unbilled(flow) + "this body reports (not billed):\n" + describe_body(found)

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        message, flow = metadata.http_message, metadata.flow
        if not isinstance(flow, http.HTTPFlow):
            return -1
        if isinstance(message, http.Request):
            # mitmproxy shows "Content is missing." for a response whose body it did not keep
            # (an aborted stream, or store_streamed_bodies off): the request shows the bill.
            return 2 if ENVELOPE in flow.metadata and _body_missing(flow) else -1
        if not isinstance(message, http.Response):
            return -1
        if ENVELOPE not in flow.metadata and classify(flow.request.path) is None:
            return -1
        # SSE has no better view; for JSON the JSON view stays the default, this one a choice.
        event_stream = (metadata.content_type or "").startswith("text/event-stream")
        return 2 if event_stream else 0.5


__all__ = [
    "ENVELOPE",
    "RECORD",
    "UsageContentview",
    "annotation",
    "describe",
    "extract",
    "not_billed",
    "record",
]
