from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from edgemeter.metering.estimate import text_chars, text_pattern

# The text patterns as first written (one alternative per key, one character or escape per
# step of the value's loop): the unrolled, factored patterns must find exactly what they found.
_REFERENCE_VALUE = rb'"\s*:\s*"((?:[^"\\]|\\.)*)"'
REFERENCE = {
    "openai": re.compile(
        rb'"(?:content|reasoning_content|reasoning|arguments|text)' + _REFERENCE_VALUE
    ),
    "anthropic": re.compile(rb'"(?:text|thinking|partial_json)' + _REFERENCE_VALUE),
    "responses": re.compile(rb'"delta' + _REFERENCE_VALUE),
}
KEYS = [
    b"content",
    b"reasoning",
    b"reasoning_content",
    b"reasoning_contentx",
    b"reason",
    b"text",
    b"delta",
    b"arguments",
    b"thinking",
    b"partial_json",
]
PIECES = [b'"', b"\\", b'\\"', b"\\\\", b":", b" ", b"\n", b"\t", b"x", b"\xc3\xa9", b"{", b","]


@st.composite
def near_json(draw: st.DrawFn) -> bytes:
    """Keys, separators and values with escapes, quotes and line ends, often cut short."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        out.append(b'"' + draw(st.sampled_from(KEYS)) + b'"')
        out.append(draw(st.sampled_from([b"", b" ", b"\n"])) + b":")
        out.append(draw(st.sampled_from([b"", b" "])) + draw(st.sampled_from([b'"', b""])))
        out.append(b"".join(draw(st.lists(st.sampled_from(PIECES), max_size=8))))
        out.append(draw(st.sampled_from([b'"', b"", b'",'])))
    return b"".join(out)


@given(st.one_of(near_json(), st.binary(max_size=60)))
def test_text_patterns_find_what_the_reference_patterns_find(data: bytes) -> None:
    for family, reference in REFERENCE.items():
        assert text_pattern(family).findall(data) == reference.findall(data)
        assert text_chars(data, family) == len(b"".join(reference.findall(data)))


def test_text_of_each_key_counts_and_escapes_count_as_written() -> None:
    data = (
        b'{"content":"ab","reasoning_content":"c\\"d","reasoning":"e",'
        b'"arguments":"{\\"x\\":1}","text" : "f","other":"zzz"}'
    )
    assert text_chars(data) == len(b'abc\\"de{\\"x\\":1}f')
