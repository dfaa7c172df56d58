from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest

from edgemeter.errors import KeyMapError, MeterError
from edgemeter.metering import keymap
from edgemeter.metering.attribution import Account, fingerprint
from edgemeter.metering.keymap import KeyBook, parse_keymap

SECRET = b"keymap-test-secret"
KEY_A, KEY_B = "sk-keymap-a-0001", "sk-keymap-b-0002"
PLAIN_A = fingerprint(KEY_A)
KEYED_A, KEYED_B = fingerprint(KEY_A, SECRET), fingerprint(KEY_B, SECRET)


def entry(fp: str, tenant: str = "t_1", customer: str = "cus_1", extra: str = "") -> str:
    return f'[keys."{fp}"]\ntenant = "{tenant}"\ncustomer = "{customer}"\n{extra}'


def test_a_map_gives_each_fingerprint_its_account() -> None:
    text = 'version = "2026-11-22"\n' + entry(KEYED_A, "t_7", "cus_42") + entry(KEYED_B)
    parsed = parse_keymap(text, keyed=True)
    assert parsed.version == "2026-11-22"
    assert parsed.accounts == {KEYED_A: Account("t_7", "cus_42"), KEYED_B: Account("t_1", "cus_1")}


def test_notes_and_unknown_keys_are_allowed_for_the_operator() -> None:
    text = 'owner = "billing"\n' + entry(PLAIN_A, extra='name = "ACME"\nexpires = 2027-01-01\n')
    assert parse_keymap(text, keyed=False).accounts == {PLAIN_A: Account("t_1", "cus_1")}


def test_upper_case_fingerprints_and_a_date_version_are_accepted() -> None:
    parsed = parse_keymap("version = 2026-11-22\n" + entry(PLAIN_A.upper()), keyed=False)
    assert (parsed.version, list(parsed.accounts)) == ("2026-11-22", [PLAIN_A])


def test_an_empty_map_is_valid_and_bills_every_key_unattributed() -> None:
    assert parse_keymap("[keys]\n", keyed=False).accounts == {}


OK = entry(PLAIN_A)
# file text, keyed, words the message must contain, fields the error must carry
INVALID: list[tuple[str, bool, str, dict[str, Any]]] = [
    ("keys = \n", False, "not valid TOML", {"line": 1, "column": 8}),
    ('version = "v"\n', False, 'missing the [keys."<fingerprint>"] tables', {"key": "keys"}),
    ('[key."x"]\ntenant = "t"\n', False, "found 'key': did you mean 'keys'?", {"key": "key", "line": 1}),
    ("keys = 3\n", False, "missing the [keys.", {"key": "keys", "line": 1}),
    ("version = 3\n" + OK, False, "'version' must be a string", {}),
    (entry("abc"), False, "not a fingerprint (16 hex digits)", {"line": 1}),
    (OK, True, "made without a secret, but meter_fingerprint_secret is set", {"line": 1}),
    (entry(KEYED_A), False, "made with a secret, but meter_fingerprint_secret is not set", {"line": 1}),
    (entry("hmac:" + "g" * 16), True, "not a fingerprint (hmac: and 16 hex digits)", {"line": 1}),
    (OK + entry(PLAIN_A.upper()), False, "appears twice", {"line": 4}),
    (f'[keys]\n"{PLAIN_A}" = "cus_1"\n', False, "must be a table with tenant and customer", {}),
    (f'[keys."{PLAIN_A}"]\ncustomer = "c"\n', False, "missing 'tenant'", {"line": 1}),
    (f'[keys."{PLAIN_A}"]\ntenant = "t"\ncostumer = "c"\n', False, "missing 'customer'", {"line": 1}),
    (entry(PLAIN_A, customer=""), False, "'customer' must be a string of 1-128", {"key": "customer", "line": 3}),
    (entry(PLAIN_A, customer=" c"), False, "without surrounding spaces", {"key": "customer", "line": 3}),
    (entry(PLAIN_A, tenant="t" * 129), False, "'tenant' must be", {"key": "tenant", "line": 2}),
    (entry(PLAIN_A, customer="cus\\u0007"), False, "printable", {"key": "customer", "line": 3}),
    (entry(PLAIN_A, customer="cus\\u202e24"), False, "printable", {"key": "customer", "line": 3}),
    (f'[keys."{PLAIN_A}"]\ntenant = "t"\ncustomer = 42\n', False, "'customer' must be", {"key": "customer", "line": 3}),
]  # fmt: skip


@pytest.mark.parametrize(("text", "keyed", "words", "fields"), INVALID)
def test_a_bad_map_is_refused_with_the_place_named(
    text: str, keyed: bool, words: str, fields: dict[str, Any]
) -> None:
    with pytest.raises(KeyMapError) as caught:
        parse_keymap(text, keyed=keyed, source="keys.toml")
    assert isinstance(caught.value, MeterError)
    assert words in caught.value.message
    assert caught.value.fields == {"file": "keys.toml", **fields}


def test_a_raw_api_key_pasted_into_the_map_is_never_quoted_back() -> None:
    with pytest.raises(KeyMapError) as caught:
        parse_keymap(entry(KEY_A), keyed=True, source="keys.toml")
    assert "edgemeter fingerprint" in caught.value.message
    assert KEY_A not in str(caught.value) and KEY_A not in repr(caught.value.fields)


def test_too_many_entries_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keymap, "MAX_ENTRIES", 2)
    text = "".join(entry(fingerprint(f"k{i}")) for i in range(3))
    with pytest.raises(KeyMapError, match="more than 2 entries"):
        parse_keymap(text, keyed=False)


# -- the live map ------------------------------------------------------------------------------


def test_the_book_follows_the_file_and_keeps_the_last_good_map(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(entry(KEYED_A, customer="cus_a"))
    book = KeyBook(path, keyed=True, check_interval_s=0)  # every lookup checks the file
    assert book.lookup(KEYED_A) == Account("t_1", "cus_a")
    assert book.lookup(KEYED_B) is None

    path.write_text(entry(KEYED_A, customer="cus_a2") + entry(KEYED_B, customer="cus_b"))
    assert book.lookup(KEYED_A) == Account("t_1", "cus_a2")
    assert book.lookup(KEYED_B) == Account("t_1", "cus_b")

    path.write_text(entry(PLAIN_A))  # made without the secret: refused, the map stays
    with caplog.at_level(logging.ERROR, logger="edgemeter.metering.keymap"):
        assert book.lookup(KEYED_B) == Account("t_1", "cus_b")
    [error] = caplog.records
    assert "key map" in error.getMessage() and "still attributing with" in error.getMessage()
    assert "made without a secret" in error.getMessage()


def test_a_bad_file_at_startup_raises(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    with pytest.raises(KeyMapError, match="cannot read the key map"):
        KeyBook(path, keyed=False)
    path.write_text("keys = ")
    with pytest.raises(KeyMapError, match="not valid TOML") as caught:
        KeyBook(path, keyed=False)
    assert caught.value.fields["file"] == str(path)


def test_unknown_keys_are_logged_once_each_and_boundedly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keymap, "MAX_UNKNOWN_LOGGED", 3)
    path = tmp_path / "keys.toml"
    path.write_text("[keys]\n")
    book = KeyBook(path, keyed=True)
    with caplog.at_level(logging.WARNING, logger="edgemeter.metering.keymap"):
        for fp in [KEYED_A, KEYED_A, "", KEYED_B, "hmac:1", "hmac:2", "hmac:3"]:
            book.report_unknown(fp)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4
    assert KEYED_A in messages[0] and "billed with customer_id ''" in messages[0]
    assert "without an API key" in messages[1]
    assert KEYED_B in messages[2]
    assert "more than 3 unknown API keys" in messages[3]
    assert KEY_A not in caplog.text


def test_a_large_map_parses_in_bounded_time(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints what a reload of a large map costs the event loop (figures, not asserts)."""
    n = 20_000
    text = "".join(
        entry(fingerprint(f"sk-{i}", SECRET), f"t_{i % 50}", f"cus_{i}") for i in range(n)
    )
    started = time.perf_counter()
    parsed = parse_keymap(text.encode(), keyed=True)
    elapsed = time.perf_counter() - started
    assert len(parsed.accounts) == n
    with capsys.disabled():
        print(
            f"\nkey map: {n} keys, {len(text) / 2**20:.1f} MiB, parsed in {elapsed:.2f} s "
            f"({elapsed / n * 1e6:.0f} µs a key)"
        )


def test_the_readme_example_is_a_valid_keyed_map() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Attribution and API keys", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    parsed = parse_keymap(example, keyed=True)
    assert parsed.accounts == {"hmac:3f9a0c1d2e4b5a67": Account("t_7", "cus_42")}
