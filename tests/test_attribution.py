from __future__ import annotations

import hashlib

import pytest

from edgemeter.attribution import api_key, fingerprint


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"authorization": "Bearer sk-abc"}, "sk-abc"),
        ({"authorization": "bearer  sk-abc "}, "sk-abc"),
        ({"x-api-key": "sk-ant-1"}, "sk-ant-1"),
        ({"api-key": "azure-1"}, "azure-1"),
        ({"authorization": "Basic dXNlcjpwYXNz", "x-api-key": "k2"}, "k2"),
        ({}, ""),
    ],
)
def test_the_api_key_is_read_from_the_usual_headers(headers: dict[str, str], key: str) -> None:
    assert api_key(headers) == key


def test_fingerprint_is_a_sha256_prefix_and_never_the_key() -> None:
    fp = fingerprint("test")
    assert fp == hashlib.sha256(b"test").hexdigest()[:16] == "9f86d081884c7d65"
    assert "test" not in fp
    assert fingerprint("") == ""
