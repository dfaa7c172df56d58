from __future__ import annotations

import uuid

import pytest

from edgemeter import ids
from edgemeter.ids import uuid7


def test_ids_are_version_7_with_the_rfc_variant() -> None:
    u = uuid.UUID(uuid7())
    assert u.version == 7
    assert u.variant == uuid.RFC_4122


def test_ids_carry_the_millisecond_timestamp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids, "_last", 0)
    assert uuid.UUID(uuid7(now_ms=1_795_000_000_123)).int >> 80 == 1_795_000_000_123


def test_ids_increase_even_when_the_clock_steps_back() -> None:
    minted = [uuid7(now_ms=2_000_000_000_000), uuid7(now_ms=1_000), uuid7(now_ms=1_000)]
    minted += [uuid7() for _ in range(1000)]
    assert minted == sorted(minted)
    assert len(set(minted)) == len(minted)
