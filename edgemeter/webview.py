"""What a person debugging in mitmweb sees: a comment and a mark on every metered flow, and the
"LLM usage" contentview that shows the usage the meter finds in a JSON or SSE body.
"""

from __future__ import annotations

import json
from typing import Any, Final

from mitmproxy import contentviews, http

from edgemeter.metering.apis import classify
from edgemeter.metering.extraction import Extraction
from edgemeter.metering.sse import SSEDecoder

MARK_REPORTED: Final = ":moneybag:"
MARK_ESTIMATED: Final = ":heavy_dollar_sign:"
# Not booked as it came: sent to reconciliation, booked to the house account, or free.
MARK_UNBILLABLE: Final = ":warning:"
MARK_HOUSE: Final = ":house:"
MARK_FREE: Final = ":free:"
# Bodies larger than this are not parsed for the view (mitmweb renders on the proxy's loop).
_MAX_VIEW_BYTES: Final = 16 * 1024 * 1024


def annotation(
    envelope: dict[str, Any], destination: str = "billing", reason: str = ""
) -> tuple[str, str]:
    """The flow comment and mark for a metered flow's envelope, and where it went
    (contract.route): billing, reconciliation (why), the house account (why), or nowhere (free)."""
    meta = envelope["metadata"]
    amount = -int(envelope["amount_micro_omr"])
    comment = (
        f"edgemeter: {meta['input_tokens']} in / {meta['output_tokens']} out tokens, "
        f"{amount / 1e6:.6f} {meta.get('currency', '')}".rstrip()
        + f", {meta['outcome']} ({meta['usage_source']}), {meta['price_version']}"
    )
    if destination == "reconciliation":
        return f"{comment}; UNBILLABLE ({reason}): sent to reconciliation", MARK_UNBILLABLE
    if destination == "house":
        return (
            f"{comment}; booked to the house account {envelope['customer_id']} ({reason})",
            MARK_HOUSE,
        )
    if destination == "free":
        return f"{comment}; free call, not published", MARK_FREE
    mark = MARK_REPORTED if meta["usage_source"] == "reported" else MARK_ESTIMATED
    return comment, mark


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


def describe(found: Extraction) -> str:
    usage = found.usage
    lines = [f"api: {found.api}", f"model: {found.model or '(not reported)'}"]
    if found.upstream_id:
        lines.append(f"upstream_id: {found.upstream_id}")
    if found.error:
        lines.append(f"upstream error: {found.error}")
    if found.invalid:
        lines.append(f"invalid usage: {found.invalid}")
    if usage is None:
        lines.append("usage: none reported (the meter would estimate it)")
        return "\n".join(lines) + "\n"
    lines += [
        f"tokens_used: {usage.tokens_used}",
        f"input_tokens: {usage.input_tokens}",
        f"cached_input_tokens: {usage.cached_input_tokens}",
        f"cache_write_tokens: {usage.cache_write_tokens}",
        f"output_tokens: {usage.output_tokens}",
        f"reasoning_tokens: {usage.reasoning_tokens}",
        "usage_raw: " + json.dumps(usage.raw, ensure_ascii=False, sort_keys=True),
    ]
    return "\n".join(lines) + "\n"


class UsageContentview(contentviews.Contentview):
    """Shows what the meter reads from an LLM response: normalised tokens and the raw usage."""

    @property
    def name(self) -> str:
        return "LLM usage"

    @property
    def syntax_highlight(self) -> contentviews.SyntaxHighlight:
        return "yaml"

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        message, flow = metadata.http_message, metadata.flow
        if not isinstance(message, http.Response) or not isinstance(flow, http.HTTPFlow):
            raise ValueError("not an HTTP response")
        if len(data) > _MAX_VIEW_BYTES:
            raise ValueError("body too large to inspect")
        event_stream = (metadata.content_type or "").startswith("text/event-stream")
        found = extract(flow.request.path, data, event_stream)
        if found is None:
            raise ValueError("not a metered LLM API path")
        return describe(found)

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        flow = metadata.flow
        if not isinstance(metadata.http_message, http.Response) or not isinstance(
            flow, http.HTTPFlow
        ):
            return -1
        if classify(flow.request.path) is None:
            return -1
        # SSE has no better view; for JSON the JSON view stays the default, this one a choice.
        event_stream = (metadata.content_type or "").startswith("text/event-stream")
        return 2 if event_stream else 0.5


__all__ = ["UsageContentview", "annotation", "describe", "extract"]
