"""Normalised token usage (`Usage`) and the checks every provider's numbers and names pass
before they reach an envelope: counts are bounded integers, names are printable and short.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from edgemeter.errors import InvalidUsage

# The kinds of token an envelope counts (metadata.<kind>_tokens), priced each at its own rate.
TOKEN_KINDS = ("input", "cached_input", "cache_write", "output", "reasoning")
# Parts of those counts by modality (metadata.tokens_detail): providers price audio, image and
# video tokens, and Anthropic's 1-hour cache writes, at rates of their own.
DETAIL_KINDS = (
    "input_text",
    "input_audio",
    "input_image",
    "input_video",
    "output_text",
    "output_audio",
    "output_image",
    "cache_write_1h",
)
# The parts that are not what input/output/cache_write already price: tokens_detail is only
# written when one of them is reported (> 0), so a text-only answer's envelope stays as it was.
PRICED_DETAIL = frozenset(DETAIL_KINDS) - {"input_text", "output_text"}
# What providers bill besides tokens (metadata.units), all integers: images made, milliseconds
# of audio, characters spoken, rerank search units, web searches run.
UNIT_KINDS = ("images", "audio_ms", "characters", "search_units", "web_search_calls")
# Per-image models also bill by the image's size and quality (strings beside the counts).
IMAGE_FACTS = ("image_size", "image_quality")
# Service tiers every amount without metadata.service_tier means (the provider's list price).
BASE_TIERS = frozenset({"default", "standard", "auto"})
# A unit count past this is garbage, like a token count past MAX_TOKENS.
MAX_UNITS = 2**40

# A token count above this is not a count but garbage (or an attack on an invoice).
MAX_TOKENS = 2**40
# Model names and ids are short (the longest recorded: 84 characters); past this, garbage.
MAX_NAME_CHARS = 256


@dataclass(frozen=True, slots=True)
class CountRule:
    """A route whose OpenAI-shaped usage follows Anthropic's token convention."""

    path_prefix: str
    model_glob: str

    def matches(self, path: str, model: str) -> bool:
        return path.startswith(self.path_prefix) and fnmatch.fnmatchcase(
            model.lower(), self.model_glob
        )


@dataclass(frozen=True, slots=True)
class Usage:
    """Normalised usage: input and output include their cached / reasoning parts."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    raw: dict[str, Any] = field(default_factory=dict)
    # Parts by modality (DETAIL_KINDS, only those > 0); empty unless a PRICED_DETAIL is reported.
    detail: dict[str, int] = field(default_factory=dict)
    # UNIT_KINDS counts (> 0) and IMAGE_FACTS; empty when the answer bills tokens only.
    units: dict[str, int | str] = field(default_factory=dict)
    # The service tier the answer names, "" for a base tier (BASE_TIERS) or none.
    service_tier: str = ""

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


def count(obj: Any, *path: str) -> int:
    """A token count at `path` in `obj`; absent or null is 0, anything not a count is invalid."""
    for key in path:
        if not isinstance(obj, dict):
            return 0
        obj = obj.get(key)
    if obj is None:
        return 0
    # Nearly every count is a plain int in range: 0.55 -> 0.2 µs a count, ~7 counts an answer.
    if type(obj) is int and 0 <= obj <= MAX_TOKENS:
        return obj
    return token_count(obj, ".".join(path))


def detail(**counts: int) -> dict[str, int]:
    """tokens_detail from counts by kind: the kinds > 0, or {} when none of them is a
    PRICED_DETAIL (text alone is what input and output tokens already say)."""
    found = {kind: n for kind, n in counts.items() if n > 0}
    return found if not PRICED_DETAIL.isdisjoint(found) else {}


def modalities(obj: Any, side: str) -> dict[str, int]:
    """`<side>_text|audio|image|video` counts of an OpenAI-style details object
    (`text_tokens`, `audio_tokens`, `image_tokens`, `video_tokens`); {} when not an object."""
    if not isinstance(obj, dict):
        return {}
    return {f"{side}_{kind}": count(obj, f"{kind}_tokens") for kind in _MODALITIES}


_MODALITIES = ("text", "audio", "image", "video")


def split(inp: Any, out: Any) -> dict[str, int]:
    """tokens_detail from OpenAI-style input and output details objects. Nearly every answer
    reports no audio, image or video (or zeros): that is told by three lookups a side, and
    costs the old shapes nothing more (a full split measured 8 µs on the bench machine)."""
    # Any value but an absent or zero one takes the full path, which also checks it is a count.
    if not (
        (
            type(inp) is dict
            and (inp.get("audio_tokens") or inp.get("image_tokens") or inp.get("video_tokens"))
        )
        or (
            type(out) is dict
            and (out.get("audio_tokens") or out.get("image_tokens") or out.get("video_tokens"))
        )
    ):
        return {}
    return detail(**modalities(inp, "input"), **modalities(out, "output"))


def unit_count(value: object, name: str) -> int:
    """A unit count (images, search units, web searches): a whole number like token_count."""
    n = token_count(value, name)
    if n > MAX_UNITS:
        raise InvalidUsage(f"{name} is out of range")
    return n


def seconds_ms(value: object, name: str = "seconds") -> int:
    """Seconds of audio (a number, fractions allowed) as whole milliseconds, rounded half up."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidUsage(f"{name} is not a number")
    if value != value or not 0 <= value <= MAX_UNITS / 1000:  # NaN, negatives, infinities
        raise InvalidUsage(f"{name} is out of range")
    if isinstance(value, int):
        return value * 1000
    # Exact for the decimal a provider wrote: 7.0005 s is 7001 ms, never 7000 by binary error.
    return int((Decimal(repr(value)) * 1000).to_integral_value(ROUND_HALF_UP))


def tier(value: object) -> str:
    """The service tier an answer names, "" for a base tier or anything not a short name."""
    if type(value) is str and value in BASE_TIERS:  # nearly every answer: one lookup
        return ""
    name = clean_name(value, 64)
    return "" if name is None or name.lower() in BASE_TIERS else name


def bounded(usage: Usage) -> Usage:
    """Sums of valid counts can still pass the cap: the parts are capped by these two."""
    if usage.input_tokens > MAX_TOKENS:
        raise InvalidUsage("input_tokens is out of range")
    if usage.output_tokens > MAX_TOKENS:
        raise InvalidUsage("output_tokens is out of range")
    return usage


def as_dict(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def as_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def json_object(data: bytes) -> dict[str, Any] | None:
    """`data` parsed as a JSON object, None for anything else (open-world: never raises, also
    not on nesting deeper than the interpreter's recursion limit)."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None
