from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from edgemeter.errors import MeterError
from edgemeter.metering import tomlfile as watched
from edgemeter.metering.tomlfile import Watched, did_you_mean, line_of, load_toml

LOG = logging.getLogger("tests.watched")


class NumberError(MeterError):
    pass


def parse_number(data: bytes) -> int:
    """The watched value of these tests: a file holding one integer."""
    doc, _ = load_toml(data, source="n.toml", max_bytes=100, error=NumberError)
    value = doc.get("n")
    if not isinstance(value, int):
        raise NumberError("n must be an integer", file="n.toml")
    return value


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float = 1.0) -> Clock:
        self.now += seconds
        return self


def number_file(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def watch(path: Path, clock: Clock, **kwargs: Any) -> Watched[int]:
    return Watched(
        path,
        parse_number,
        what="number file",
        doing="counting",
        describe=lambda n: f"n={n}",
        logger=LOG,
        error=NumberError,
        max_bytes=100,
        clock=clock,
        **kwargs,
    )


# -- TOML with located errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "words", "fields"),
    [
        (b"a = \n", "not valid TOML", {"file": "f", "line": 1, "column": 5}),
        (b"\xff", "not UTF-8", {"file": "f", "offset": 0}),
        (b"#" * 11, "larger than 10 bytes", {"file": "f"}),
    ],
)
def test_a_file_that_is_not_small_toml_is_refused_with_the_place_named(
    data: bytes, words: str, fields: dict[str, Any]
) -> None:
    with pytest.raises(NumberError) as caught:
        load_toml(data, source="f", max_bytes=10, error=NumberError)
    assert words in caught.value.message
    assert caught.value.fields == fields


def test_a_byte_order_mark_is_not_an_error() -> None:
    assert load_toml("\ufeffn = 1".encode(), source="f", max_bytes=10, error=NumberError)[0] == {
        "n": 1
    }


TEXT = """version = "1"
[keys."ab"]
tenant = "t"
[keys.cd]
customer = "c"
"""


@pytest.mark.parametrize(
    ("entry", "key", "line"),
    [
        (None, "version", 1),
        (None, "keys", 2),
        ("ab", None, 2),
        ("ab", "tenant", 3),
        ("cd", "customer", 5),
        ("cd", "tenant", 4),  # not in this entry: its header
        ("zz", None, None),
        (None, None, None),
    ],
)
def test_line_of_finds_entries_and_keys(
    entry: str | None, key: str | None, line: int | None
) -> None:
    assert line_of(TEXT, "keys", entry, key) == line


def test_did_you_mean_suggests_a_close_name_only() -> None:
    assert did_you_mean("ouput", ("input", "output")) == " (did you mean 'output'?)"
    assert did_you_mean("zzz", ("input", "output")) == ""


# -- the live value ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"), [(None, "cannot read the number file"), ("n = 'x'", "integer")]
)
def test_a_missing_or_bad_file_raises_at_construction(
    tmp_path: Path, text: str | None, words: str
) -> None:
    path = tmp_path / "n.toml"
    if text is not None:
        number_file(path, text)
    with pytest.raises(NumberError, match=words):
        watch(path, Clock())


def test_a_negative_interval_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NumberError, match="must not be negative"):
        watch(number_file(tmp_path / "n.toml", "n = 1"), Clock(), check_interval_s=-1)


def test_a_change_is_seen_once_the_interval_has_passed_and_reported_to_the_owner(
    tmp_path: Path,
) -> None:
    clock, changes = Clock(), []
    value = watch(
        number_file(tmp_path / "n.toml", "n = 1"),
        clock,
        check_interval_s=5,
        on_reload=lambda old, new: changes.append((old, new)),
    )
    number_file(value.path, "n = 22")
    assert value.get() == 1
    assert clock.tick(4.9) and value.get() == 1
    assert clock.tick(0.1) and value.get() == 22
    assert changes == [(1, 22)]


def test_each_distinct_problem_is_logged_once_and_recovery_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    value = watch(number_file(tmp_path / "n.toml", "n = 1"), clock)
    steps = [
        ("n = 'x'", 1),  # bad: ERROR
        ("n = 'x'", 1),  # the same bad content again: nothing
        ("n = 'y'", 1),  # another bad content: ERROR
        (None, 1),  # deleted: ERROR
        ("n = 1", 1),  # the loaded content is back: INFO
        ("n = 3", 3),  # a new good content: INFO
    ]
    with caplog.at_level(logging.INFO, logger=LOG.name):
        for text, expected in steps:
            if text is None:
                value.path.unlink()
            else:
                number_file(value.path, text)
            for _ in range(3):
                assert clock.tick() and value.get() == expected
    assert [r.levelname for r in caplog.records] == ["ERROR", "ERROR", "ERROR", "INFO", "INFO"]
    first = caplog.records[0].getMessage()
    assert first.startswith(f"number file {value.path} not reloaded, still counting with n=1: ")
    assert "cannot read the file" in caplog.records[2].getMessage()
    assert caplog.records[3].getMessage().endswith("is good again, n=1")
    assert caplog.records[4].getMessage().endswith("reloaded: n=3")


def test_a_rewrite_keeping_size_and_mtime_is_seen_while_the_file_is_young(tmp_path: Path) -> None:
    clock = Clock()
    value = watch(number_file(tmp_path / "n.toml", "n = 1"), clock)
    before = value.path.stat()
    with value.path.open("r+b") as f:
        f.write(b"n = 2")
    os.utime(value.path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert watched.Signature.of(value.path.stat()) == watched.Signature.of(before)
    assert clock.tick() and value.get() == 2


def test_an_old_file_whose_signature_is_unchanged_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = number_file(tmp_path / "n.toml", "n = 1")
    os.utime(path, ns=(0, 10**18))
    clock, reads = Clock(), []
    value = watch(path, clock)
    monkeypatch.setattr(watched, "read", lambda *args: reads.append(args))
    for _ in range(3):
        assert clock.tick() and value.get() == 1
    assert reads == []


def test_an_unexpected_failure_keeps_the_value_and_is_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    value = watch(number_file(tmp_path / "n.toml", "n = 1"), clock)

    def read_fails(*_: object) -> tuple[bytes, watched.Signature]:
        raise RuntimeError("disk on fire")

    number_file(value.path, "n = 20")
    monkeypatch.setattr(watched, "read", read_fails)
    with caplog.at_level(logging.ERROR, logger=LOG.name):
        for _ in range(4):
            assert clock.tick() and value.get() == 1
    assert len(caplog.records) == 1
    assert "disk on fire" in caplog.records[0].getMessage()
