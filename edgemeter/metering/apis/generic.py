"""Any other POST on a metered path (`generic`): billed when its 2xx answer carries a usage
object with counts (what the seed billed), read open-world; never estimated.
"""

from __future__ import annotations

from typing import Any

from edgemeter.metering.apis.shape import Shape
from edgemeter.metering.usage import Usage, bounded, count

ANY_COUNTS = frozenset(
    {"prompt_tokens", "completion_tokens", "input_tokens", "output_tokens", "total_tokens"}
)


def normalize_any(usage: dict[str, Any]) -> Usage:
    """A usage object of unknown shape: OpenAI's (`prompt_tokens`, `completion_tokens`), the
    Responses and Anthropic names (`input_tokens`, `output_tokens`; Anthropic's cache reads and
    writes added when it names them beside `input_tokens`), or a `total_tokens` alone (Jina,
    Voyage: all input). Output is at least `total - input`, as for OpenAI."""
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        inp = count(usage, "prompt_tokens")
        out = count(usage, "completion_tokens")
        cached = count(usage, "prompt_tokens_details", "cached_tokens")
        write = 0
    else:
        read = count(usage, "cache_read_input_tokens")
        write = count(usage, "cache_creation_input_tokens")
        inp = count(usage, "input_tokens") + read + write
        out = count(usage, "output_tokens")
        cached = read or count(usage, "input_tokens_details", "cached_tokens")
    total = count(usage, "total_tokens")
    if not inp and not out:
        inp = total
    output = max(out, total - inp)
    return bounded(
        Usage(
            input_tokens=inp,
            cached_input_tokens=min(cached, inp),
            cache_write_tokens=min(write, inp - min(cached, inp)),
            output_tokens=output,
            raw=usage,
        )
    )


class Generic(Shape):
    api = "generic"
    estimates = False
    counts = ANY_COUNTS

    def normalize(self, usage: dict[str, Any], *, anthropic_counts: bool = False) -> Usage:
        return normalize_any(usage)


SHAPE = Generic()
