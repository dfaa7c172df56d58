"""Token usage per API shape: classify a request path, read the provider's usage object (JSON body
or SSE events) open-world, and normalise it into the envelope's token fields (SPEC §4).
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from edgemeter.errors import InvalidUsage
from edgemeter.metering.estimate import text_chars, text_pattern
from edgemeter.metering.sse import SSEEvent

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

# The kinds of token an envelope counts (metadata.<kind>_tokens), priced each at its own rate.
TOKEN_KINDS = ("input", "cached_input", "cache_write", "output", "reasoning")

# A token count above this is not a count but garbage (or an attack on an invoice).
MAX_TOKENS = 2**40
# Model names and ids are short (the longest recorded: 84 characters); past this, garbage.
MAX_NAME_CHARS = 256
# Anthropic usage is merged over events: past this many keys it is not usage but an attack on
# the meter's memory, and only the latest event's usage is kept.
_MAX_MERGED_KEYS = 64
_USAGE_KEY = re.compile(rb'"usage"\s*:\s*\{')


@dataclass(frozen=True, slots=True)
class CountRule:
    """A route whose OpenAI-shaped usage follows Anthropic's token convention."""

    path_prefix: str
    model_glob: str

    def matches(self, path: str, model: str) -> bool:
        return path.startswith(self.path_prefix) and fnmatch.fnmatchcase(
            model.lower(), self.model_glob
        )


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


def token_count(value: object, name: str = "count") -> int:
    """`value` as a token count: a non-negative whole number up to MAX_TOKENS. A float with no
    fraction (12.0, 1e3) counts, since JSON has one number type and gateways re-serialise;
    booleans, strings ("12"), fractions, NaN, infinities and negatives raise InvalidUsage."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidUsage(f"{name} is not a number")
    if isinstance(value, float) and not value.is_integer():  # also NaN and infinities
        raise InvalidUsage(f"{name} is not a whole number")
    count = int(value)
    if not 0 <= count <= MAX_TOKENS:
        raise InvalidUsage(f"{name} is out of range")
    return count


def clean_name(value: object, max_chars: int = MAX_NAME_CHARS) -> str | None:
    """`value` if it is a name fit for an envelope (a model, an id): a string of 1 to `max_chars`
    printable characters without surrounding whitespace; None otherwise. Names are refused,
    never repaired: a repaired model name could be priced as another model.

    Printable excludes control characters, bidi and zero-width format characters, surrogates,
    private-use and unassigned code points, and every space but the ASCII one."""
    if not isinstance(value, str) or not 0 < len(value) <= max_chars:
        return None
    if not value.isprintable() or value != value.strip():
        return None
    return value


def _count(obj: Any, *path: str) -> int:
    """A token count at `path` in `obj`; absent or null is 0, anything not a count is invalid."""
    for key in path:
        if not isinstance(obj, dict):
            return 0
        obj = obj.get(key)
    if obj is None:
        return 0
    return token_count(obj, ".".join(path))


def _bounded(usage: Usage) -> Usage:
    """Sums of valid counts can still pass the cap: the parts are capped by these two."""
    if usage.input_tokens > MAX_TOKENS:
        raise InvalidUsage("input_tokens is out of range")
    if usage.output_tokens > MAX_TOKENS:
        raise InvalidUsage("output_tokens is out of range")
    return usage


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
    return _bounded(
        Usage(
            input_tokens=prompt,
            cached_input_tokens=min(cached, prompt),
            cache_write_tokens=min(write, prompt),
            output_tokens=output,
            # "Of which reasoning" stays true even when a provider reports more (OpenRouter does).
            reasoning_tokens=min(reasoning, output),
            raw=usage,
        )
    )


def normalize_responses(usage: dict[str, Any]) -> Usage:
    """OpenAI Responses API: `input_tokens` includes cached tokens, output includes reasoning."""
    inp = _count(usage, "input_tokens")
    out = _count(usage, "output_tokens")
    total = _count(usage, "total_tokens")
    cached = _count(usage, "input_tokens_details", "cached_tokens")
    output = max(out, total - inp)
    return _bounded(
        Usage(
            input_tokens=inp,
            cached_input_tokens=min(cached, inp),
            output_tokens=output,
            reasoning_tokens=min(
                _count(usage, "output_tokens_details", "reasoning_tokens"), output
            ),
            raw=usage,
        )
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
    return _bounded(
        Usage(
            input_tokens=base + write + read,
            cached_input_tokens=read,
            cache_write_tokens=write,
            output_tokens=out,
            reasoning_tokens=min(_count(usage, "output_tokens_details", "thinking_tokens"), out),
            raw=usage,
        )
    )


def _as_dict(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _as_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# The events that end a Responses API stream.
_RESPONSES_FINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


class Extraction:
    """What one response told us: usage, model, id, and whether it ended in an error.

    Feed it a whole JSON body (`body`) or SSE events (`event`); both parse open-world."""

    __slots__ = (
        "_raw",
        "_text",
        "api",
        "bad_model",
        "error",
        "events",
        "final",
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
        # The upstream named a model that is not fit for an envelope (see clean_name).
        self.bad_model = False
        self.events = 0
        # The stream's last event was seen ([DONE], response.completed/incomplete/failed,
        # message_stop): the usage is final, the envelope can be spooled before the client
        # gets that event.
        self.final = False
        # Characters of generated text seen, for an estimate when no usage is ever reported.
        self.output_chars = 0
        # Anthropic streams report usage in two halves; keep the merged raw object.
        self._raw: dict[str, Any] = {}
        self._text = text_pattern(_TEXT_FAMILY.get(api, "openai"))

    # -- whole bodies -------------------------------------------------------------------------

    def body(self, content: bytes) -> None:
        obj = json_object(content)
        if obj is None:
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

    def tail(self, data: bytes) -> None:
        """The end of a body too large to parse whole. Every API shape puts its usage object
        near the end: the first `"usage":{` whose object decodes is taken (an unescaped quote
        is JSON structure, so generated text never matches)."""
        decoder = json.JSONDecoder()
        for m in _USAGE_KEY.finditer(data):
            try:
                obj, _ = decoder.raw_decode(data[m.end() - 1 :].decode("utf-8", "replace"))
            except (ValueError, RecursionError):
                continue
            if isinstance(obj, dict):
                self._set(obj)
                return

    # -- streams ------------------------------------------------------------------------------

    def event(self, ev: SSEEvent) -> None:
        self.data(ev.data, ev.event)

    def data(self, data: bytes, event: str = "") -> None:
        """One event by its data and `event:` name: `event` without building an SSEEvent, for
        the stream callable's path of whole events, where every call counts."""
        self.events += 1
        # One C call for the text of the whole event: a generator over the matches would cost
        # as much as the search itself.
        self.output_chars += len(b"".join(self._text.findall(data)))
        api = self.api
        if api == "anthropic.messages":
            self._anthropic_event(data, event)
        elif api == "openai.responses":
            self._responses_event(data, event)
        elif data == b"[DONE]":
            self.final = True
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

    def _responses_event(self, data: bytes, event: str) -> None:
        if self.events > 1 and not (b'"usage"' in data or b'"error"' in data or b"failed" in data):
            return
        obj = json_object(data)
        if obj is None:
            return
        kind = _as_str(obj.get("type")) or event
        response = _as_dict(obj.get("response"))
        if response is not None:
            self._identity(response)
            if (usage := _as_dict(response.get("usage"))) is not None:
                self._set(usage)
        if kind in ("error", "response.failed"):
            self.error = kind
        if kind in _RESPONSES_FINAL:
            self.final = True

    def _anthropic_event(self, data: bytes, event: str) -> None:
        if not (
            b"message_start" in data
            or b'"usage"' in data
            or b'"error"' in data
            or b"message_stop" in data
        ):
            return
        obj = json_object(data)
        if obj is None:
            return
        kind = _as_str(obj.get("type")) or event
        if kind == "message_start":
            message = _as_dict(obj.get("message")) or {}
            self._identity(message)
            if (usage := _as_dict(message.get("usage"))) is not None:
                self._raw = dict(usage)
                self._set(self._raw)
        elif kind == "message_delta":
            if (usage := _as_dict(obj.get("usage"))) is not None:
                # Cumulative: any count the delta carries replaces the message_start one.
                merged = {**self._raw, **usage}
                self._raw = merged if len(merged) <= _MAX_MERGED_KEYS else usage
                self._set(self._raw)
        elif kind == "message_stop":
            self.final = True
        elif kind == "error":
            self.error = "error"

    # -- shared ---------------------------------------------------------------------------------

    def _identity(self, obj: dict[str, Any]) -> None:
        if self.model is None and (value := obj.get("model")) is not None and value != "":
            self.model = clean_name(value)
            self.bad_model = self.bad_model or self.model is None
        if self.upstream_id is None:
            self.upstream_id = clean_name(obj.get("id"))

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
    """`data` parsed as a JSON object, None for anything else (open-world: never raises, also
    not on nesting deeper than the interpreter's recursion limit)."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None
