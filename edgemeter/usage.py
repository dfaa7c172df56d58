"""Token usage per API shape: classify a request path, read the provider's usage object (JSON body
or SSE events) open-world, and normalise it into the envelope's token fields (SPEC §4).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from edgemeter.estimate import text_chars
from edgemeter.sse import SSEEvent

Api = Literal[
    "openai.chat",
    "openai.completions",
    "openai.embeddings",
    "openai.responses",
    "anthropic.messages",
]

# Longest suffix first: "/chat/completions" must win over "/completions".
_API_SUFFIXES: tuple[tuple[str, Api], ...] = (
    ("/chat/completions", "openai.chat"),
    ("/completions", "openai.completions"),
    ("/embeddings", "openai.embeddings"),
    ("/responses", "openai.responses"),
    ("/messages", "anthropic.messages"),
)

# Which fields carry generated text in each shape (see estimate.text_chars).
_TEXT_FAMILY = {"anthropic.messages": "anthropic", "openai.responses": "responses"}

# A token count above this is not a count but garbage (or an attack on an invoice).
MAX_TOKENS = 2**40


def classify(path: str) -> Api | None:
    """The API shape of a request path (query ignored), None for paths that are not billable."""
    path = path.split("?", 1)[0].rstrip("/")
    for suffix, api in _API_SUFFIXES:
        if path.endswith(suffix):
            return api
    return None


@dataclass(frozen=True, slots=True)
class Usage:
    """Normalised usage: input and output include their cached / reasoning parts."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_used(self) -> int:
        return self.input_tokens + self.output_tokens


class InvalidUsage(ValueError):
    """A usage object whose counts are not non-negative integers of a sane size."""


def _count(obj: Any, *path: str) -> int:
    """A token count at `path` in `obj`; absent or null is 0, anything not a count is invalid."""
    for key in path:
        if not isinstance(obj, dict):
            return 0
        obj = obj.get(key)
    if obj is None:
        return 0
    if isinstance(obj, bool) or not isinstance(obj, int | float):
        raise InvalidUsage(f"{'.'.join(path)} is not a number")
    if isinstance(obj, float) and not obj.is_integer():  # also NaN and infinities
        raise InvalidUsage(f"{'.'.join(path)} is not a whole number")
    count = int(obj)
    if not 0 <= count <= MAX_TOKENS:
        raise InvalidUsage(f"{'.'.join(path)} is out of range")
    return count


def normalize_openai(usage: dict[str, Any], *, anthropic_counts: bool = False) -> Usage:
    """OpenAI chat / completions / embeddings: `prompt_tokens` includes cached tokens.

    Output is the larger of `completion_tokens` and `total - prompt`: xAI reports reasoning
    outside `completion_tokens` but inside `total_tokens`, and billing all of it is what the
    provider charged for. `anthropic_counts`: a gateway (NewAPI for Claude) reports Anthropic's
    convention in OpenAI shape, `prompt_tokens` without the cache reads and writes; add them."""
    prompt = _count(usage, "prompt_tokens")
    completion = _count(usage, "completion_tokens")
    total = _count(usage, "total_tokens")
    cached = _count(usage, "prompt_tokens_details", "cached_tokens") or _count(
        usage, "prompt_cache_hit_tokens"
    )
    reasoning = _count(usage, "completion_tokens_details", "reasoning_tokens")
    write = _count(usage, "prompt_tokens_details", "cache_write_tokens")
    output = max(completion, total - prompt)
    if anthropic_counts:
        # total_tokens follows the same convention, so output is unaffected.
        prompt += cached + write
    return Usage(
        input_tokens=prompt,
        cached_input_tokens=min(cached, prompt),
        cache_write_tokens=min(write, prompt),
        output_tokens=output,
        # "Of which reasoning" stays true even when a provider reports more (OpenRouter does).
        reasoning_tokens=min(reasoning, output),
        raw=usage,
    )


def normalize_responses(usage: dict[str, Any]) -> Usage:
    """OpenAI Responses API: `input_tokens` includes cached tokens, output includes reasoning."""
    inp = _count(usage, "input_tokens")
    out = _count(usage, "output_tokens")
    total = _count(usage, "total_tokens")
    cached = _count(usage, "input_tokens_details", "cached_tokens")
    output = max(out, total - inp)
    return Usage(
        input_tokens=inp,
        cached_input_tokens=min(cached, inp),
        output_tokens=output,
        reasoning_tokens=min(_count(usage, "output_tokens_details", "reasoning_tokens"), output),
        raw=usage,
    )


def normalize_anthropic(usage: dict[str, Any]) -> Usage:
    """Anthropic Messages: `input_tokens` excludes cache reads and cache writes; add them.

    With server-side compaction the top-level counts leave out the compaction iterations; the
    billed total is the sum over `usage.iterations`, so sum those when present."""
    iterations = usage.get("iterations")
    parts = [i for i in iterations if isinstance(i, dict)] if isinstance(iterations, list) else []
    base = write = read = out = 0
    for part in parts or [usage]:
        base += _count(part, "input_tokens")
        write += _count(part, "cache_creation_input_tokens")
        read += _count(part, "cache_read_input_tokens")
        out += _count(part, "output_tokens")
    return Usage(
        input_tokens=base + write + read,
        cached_input_tokens=read,
        cache_write_tokens=write,
        output_tokens=out,
        reasoning_tokens=min(_count(usage, "output_tokens_details", "thinking_tokens"), out),
        raw=usage,
    )


def _as_dict(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _as_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class Extraction:
    """What one response told us: usage, model, id, and whether it ended in an error.

    Feed it a whole JSON body (`body`) or SSE events (`event`); both parse open-world."""

    __slots__ = (
        "_raw",
        "api",
        "error",
        "events",
        "invalid",
        "model",
        "output_chars",
        "upstream_id",
        "usage",
    )

    def __init__(self, api: Api) -> None:
        self.api: Api = api
        self.usage: Usage | None = None
        self.model: str | None = None
        self.upstream_id: str | None = None
        self.error: str | None = None
        self.invalid: str | None = None
        self.events = 0
        # Characters of generated text seen, for an estimate when no usage is ever reported.
        self.output_chars = 0
        # Anthropic streams report usage in two halves; keep the merged raw object.
        self._raw: dict[str, Any] = {}

    # -- whole bodies -------------------------------------------------------------------------

    def body(self, content: bytes) -> None:
        try:
            obj = json.loads(content)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        if self.api == "openai.responses" and _as_dict(obj.get("response")):
            obj = obj["response"]
        self._identity(obj)
        if "error" in obj and obj["error"] and not obj.get("usage"):
            self.error = "error"
        if (usage := _as_dict(obj.get("usage"))) is not None:
            self._set(usage)
        if self.usage is None:
            self.output_chars += text_chars(content, _TEXT_FAMILY.get(self.api, "openai"))

    # -- streams ------------------------------------------------------------------------------

    def event(self, ev: SSEEvent) -> None:
        self.events += 1
        data = ev.data
        self.output_chars += text_chars(data, _TEXT_FAMILY.get(self.api, "openai"))
        if self.api == "anthropic.messages":
            self._anthropic_event(ev)
        elif self.api == "openai.responses":
            self._responses_event(ev)
        elif self.model is None or _may_carry_usage(data) or b'"error"' in data:
            # Parsing every chunk of a long stream would cost more than mitmproxy itself; only
            # chunks up to the first that names the model (Azure's first one names none) and
            # chunks that can carry usage or errors matter.
            self._openai_event(data)

    def _openai_event(self, data: bytes) -> None:
        if data == b"[DONE]":
            return
        obj = json_object(data)
        if obj is None:
            return
        self._identity(obj)
        if obj.get("error"):
            self.error = "error"
        usage = _as_dict(obj.get("usage"))
        if usage is None and (x_groq := _as_dict(obj.get("x_groq"))) is not None:
            usage = _as_dict(x_groq.get("usage"))
        if usage is not None:
            self._set(usage)

    def _responses_event(self, ev: SSEEvent) -> None:
        data = ev.data
        if self.events > 1 and not (b'"usage"' in data or b'"error"' in data or b"failed" in data):
            return
        obj = json_object(data)
        if obj is None:
            return
        kind = _as_str(obj.get("type")) or ev.event
        response = _as_dict(obj.get("response"))
        if response is not None:
            self._identity(response)
            if (usage := _as_dict(response.get("usage"))) is not None:
                self._set(usage)
        if kind in ("error", "response.failed"):
            self.error = kind

    def _anthropic_event(self, ev: SSEEvent) -> None:
        data = ev.data
        if not (b"message_start" in data or b'"usage"' in data or b'"error"' in data):
            return
        obj = json_object(data)
        if obj is None:
            return
        kind = _as_str(obj.get("type")) or ev.event
        if kind == "message_start":
            message = _as_dict(obj.get("message")) or {}
            self._identity(message)
            if (usage := _as_dict(message.get("usage"))) is not None:
                self._raw = dict(usage)
                self._set(self._raw)
        elif kind == "message_delta":
            if (usage := _as_dict(obj.get("usage"))) is not None:
                # Cumulative: any count the delta carries replaces the message_start one.
                self._raw = {**self._raw, **usage}
                self._set(self._raw)
        elif kind == "error":
            self.error = "error"

    # -- shared ---------------------------------------------------------------------------------

    def _identity(self, obj: dict[str, Any]) -> None:
        if self.model is None and (model := _as_str(obj.get("model"))):
            self.model = model
        if self.upstream_id is None and (upstream_id := _as_str(obj.get("id"))):
            self.upstream_id = upstream_id

    def _set(self, usage: dict[str, Any]) -> None:
        try:
            if self.api == "anthropic.messages":
                self.usage = normalize_anthropic(usage)
            elif self.api == "openai.responses":
                self.usage = normalize_responses(usage)
            else:
                self.usage = normalize_openai(usage)
        except InvalidUsage as e:
            self.invalid = str(e)


def _may_carry_usage(data: bytes) -> bool:
    # OpenAI include_usage streams put "usage":null in every chunk: only an object counts.
    # An unescaped quote only occurs as JSON structure, so text content never matches.
    return b'"usage":{' in data or b'"usage": {' in data


def json_object(data: bytes) -> dict[str, Any] | None:
    """`data` parsed as a JSON object, None for anything else (open-world: never raises)."""
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None
