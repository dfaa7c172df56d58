from __future__ import annotations

import logging
import os
import re
from decimal import ROUND_HALF_UP, Decimal, localcontext
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgemeter.errors import MeterError, PriceTableError
from edgemeter.metering import prices
from edgemeter.metering import tomlfile as watched
from edgemeter.metering.prices import MAX_RATE, Price, PriceBook, Rates, charge_micro, parse_table
from edgemeter.metering.usage import MAX_TOKENS, Usage

DOC = Path(__file__).resolve().parent.parent / "docs" / "PRICES.md"

TABLE = """
version = "2026-11-01"

[models."gpt-4o-mini"]
input = 150000
cached_input = 75000
output = 600000

[models."gpt-4o*"]
input = 2500000
output = 10000000

[models."gpt-4o-mini*"]
input = 160000
output = 640000

[models."claude-*"]
input = 1
output = 1

[models."claude-?onnet*"]
input = 3000000
cache_write = 3750000
cached_input = 300000
output = 15000000
reasoning = 20000000

[models."*-sonnet-4*"]
input = 2
output = 2

[models."openai/*"]
input = 3
output = 3
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def table_text(version: str, input_rate: int = 150000) -> str:
    return f'version = "{version}"\n[models."gpt-4o-mini"]\ninput = {input_rate}\noutput = 600000\n'


ONE_IN = Usage(input_tokens=1_000_000)


# -- matching ---------------------------------------------------------------------------------

# model, entry that prices it
MATCHES = [
    ("gpt-4o-mini", "gpt-4o-mini"),  # exact beats the patterns that also match
    ("GPT-4o-Mini", "gpt-4o-mini"),  # case-insensitive
    ("gpt-4o-mini-2024-07-18", "gpt-4o-mini*"),  # the more specific pattern
    ("gpt-4o-2024-08-06", "gpt-4o*"),
    ("gpt-4o", "gpt-4o*"),  # * also matches nothing
    ("claude-sonnet-4-5-20250929", "claude-?onnet*"),  # 12 literal chars beat 9 and 7
    ("Claude-Sonnet-5", "claude-?onnet*"),
    ("claude-opus-4", "claude-*"),
    ("x-sonnet-4", "*-sonnet-4*"),
    ("openai/gpt-4o:free", "openai/*"),  # * crosses / and :
    ("gpt-4", None),
    ("o4-mini", None),
    ("my-gpt-4o-mini", None),  # a pattern matches the whole name
]


@pytest.mark.parametrize(("model", "key"), MATCHES)
def test_the_most_specific_entry_prices_a_model(model: str, key: str | None) -> None:
    entry = parse_table(TABLE).lookup(model)
    assert (entry.key if entry else None) == key


def test_equally_specific_patterns_go_by_file_order() -> None:
    text = 'version = "v"\n[models."a*"]\ninput = 1\noutput = 1\n[models."*b"]\ninput = 2\noutput = 2\n'
    entry = parse_table(text).lookup("ab")
    assert entry is not None and entry.key == "a*"


def test_unknown_model_falls_back_to_the_flat_price(tmp_path: Path) -> None:
    book = PriceBook(write(tmp_path / "p.toml", TABLE))
    price = book.price(Usage(100, 0, 0, 51), "llama-3-70b", 156)
    assert (price.amount_micro, price.version) == (-151 * 156, "flat:156")


@pytest.mark.parametrize("path", [None, ""])
def test_no_table_means_flat_prices(path: str | None) -> None:
    price = PriceBook(path).price(Usage(100, 0, 0, 51), "gpt-4o-mini", 156)
    assert (price.amount_micro, price.version) == (-23556, "flat:156")


def test_price_version_names_the_table_and_the_entry_as_written(tmp_path: Path) -> None:
    book = PriceBook(write(tmp_path / "p.toml", TABLE))
    assert book.price(ONE_IN, "CLAUDE-SONNET-4", 156).version == "2026-11-01:claude-?onnet*"


# -- arithmetic -------------------------------------------------------------------------------

RATES = Rates(input=3, cached_input=5, cache_write=7, output=11, reasoning=13)

# usage, amount in micro-units * 1,000,000 before rounding
KINDS = [
    (Usage(input_tokens=10), 10 * 3),
    (Usage(input_tokens=10, cached_input_tokens=4), 6 * 3 + 4 * 5),
    (Usage(input_tokens=10, cached_input_tokens=4, cache_write_tokens=5), 1 * 3 + 4 * 5 + 5 * 7),
    (Usage(output_tokens=10), 10 * 11),
    (Usage(output_tokens=10, reasoning_tokens=4), 6 * 11 + 4 * 13),
    (Usage(9, 2, 3, 8, 5), 4 * 3 + 2 * 5 + 3 * 7 + 3 * 11 + 5 * 13),
    # Parts larger than their whole are clamped: each token is priced exactly once.
    (Usage(input_tokens=10, cached_input_tokens=15), 10 * 5),
    (Usage(input_tokens=10, cached_input_tokens=6, cache_write_tokens=6), 6 * 5 + 4 * 7),
    (Usage(output_tokens=10, reasoning_tokens=12), 10 * 13),
]


@pytest.mark.parametrize(("usage", "total"), KINDS)
def test_each_kind_of_token_is_priced_at_its_rate(usage: Usage, total: int) -> None:
    input, cached, write, output, reasoning = (r * 1_000_000 for r in (3, 5, 7, 11, 13))
    million = Rates(input, cached, write, output, reasoning)
    assert charge_micro(usage, million) == total


# rate (micro per 1M tokens), input tokens, charged micro-units
ROUNDING = [
    (500_000, 1, 1),  # 0.5 rounds up
    (499_999, 1, 0),
    (1_500_000, 1, 2),
    (2_500_000, 1, 3),  # half up, not half to even
    (1_499_999, 1, 1),
    (150_000, 3, 0),  # 0.45
    (150_000, 4, 1),  # 0.6
    (1, 999_999, 1),
    (1, 499_999, 0),
    (0, 10**12, 0),  # a free model costs nothing
    (150_000, 10**12, 150_000_000_000),  # exact for large counts
    (150_000, 10**12 + 1, 150_000_000_000),
    (150_000, 10**12 + 4, 150_000_000_001),
    (MAX_RATE, MAX_TOKENS, MAX_TOKENS * 1_000_000),
]


@pytest.mark.parametrize(("rate", "tokens", "charged"), ROUNDING)
def test_one_rounding_half_up_of_the_whole_request(rate: int, tokens: int, charged: int) -> None:
    amount = charge_micro(Usage(input_tokens=tokens), Rates(rate, rate, rate, rate, rate))
    assert type(amount) is int
    assert amount == charged


def test_rounding_happens_once_not_per_kind() -> None:
    # 0.4 + 0.4 per kind would round to 0 + 0; the request's 0.8 rounds to 1.
    rates = Rates(400_000, 400_000, 400_000, 400_000, 400_000)
    assert charge_micro(Usage(input_tokens=1, output_tokens=1), rates) == 1


def test_amounts_fit_the_consumers_int64() -> None:
    worst = Usage(MAX_TOKENS, 0, 0, MAX_TOKENS, 0)
    assert charge_micro(worst, Rates(MAX_RATE, MAX_RATE, MAX_RATE, MAX_RATE, MAX_RATE)) < 2**63


def test_optional_rates_default_to_input_and_output() -> None:
    text = 'version = "v"\n[models.m]\ninput = 10\noutput = 20\n'
    entry = parse_table(text).lookup("m")
    assert entry is not None
    assert entry.rates == Rates(input=10, cached_input=10, cache_write=10, output=20, reasoning=20)


def hand_formula(u: Usage, r: Rates) -> int:
    """The docs' formula, rounded with decimal's ROUND_HALF_UP as a second opinion."""
    total = (
        (u.input_tokens - u.cached_input_tokens - u.cache_write_tokens) * r.input
        + u.cached_input_tokens * r.cached_input
        + u.cache_write_tokens * r.cache_write
        + (u.output_tokens - u.reasoning_tokens) * r.output
        + u.reasoning_tokens * r.reasoning
    )
    with localcontext() as ctx:
        ctx.prec = 80
        return -int((Decimal(total) / 1_000_000).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@st.composite
def usages(draw: st.DrawFn) -> Usage:
    tokens = st.integers(0, MAX_TOKENS)
    input_tokens, output_tokens = draw(tokens), draw(tokens)
    cached = draw(st.integers(0, input_tokens))
    written = draw(st.integers(0, input_tokens - cached))
    reasoning = draw(st.integers(0, output_tokens))
    return Usage(input_tokens, cached, written, output_tokens, reasoning)


@given(usages(), st.builds(Rates, *[st.integers(0, MAX_RATE)] * 5))
def test_the_amount_is_a_debit_equal_to_the_hand_formula(usage: Usage, rates: Rates) -> None:
    entry = prices.Entry("m", rates, None, 1, 0)
    price = prices.table_price(usage, entry, "v")
    assert price.amount_micro <= 0
    assert price.amount_micro == hand_formula(usage, rates)
    assert price.version == "v:m"


# -- validation -------------------------------------------------------------------------------

HEAD = 'version = "v"\n'
OK = "input = 1\noutput = 1\n"

# file text, words the message must contain, fields the error must carry
INVALID: list[tuple[str, str, dict[str, Any]]] = [
    ("version = \n", "not valid TOML", {"line": 1, "column": 11}),
    ('[models."m"]\n' + OK, "missing 'version'", {}),
    ('version = "a:b"\n[models."m"]\n' + OK, "'version' must be", {"key": "version", "line": 1}),
    ('version = "flat"\n[models."m"]\n' + OK, "reserved for the flat price", {"key": "version", "line": 1}),
    ("version = 3\n[models.m]\n" + OK, "'version' must be", {"key": "version", "line": 1}),
    (HEAD + 'currency = "omr"\n[models.m]\n' + OK, "ISO 4217", {"key": "currency", "line": 2}),
    (HEAD + '[model."m"]\n' + OK, "unknown top-level key 'model' (did you mean 'models'?)", {"key": "model", "line": 2}),
    (HEAD, "missing the [models", {"key": "models"}),
    (HEAD + "models = 3\n", "missing the [models", {"key": "models", "line": 2}),
    (HEAD + "[models]\n", "no model is priced", {}),
    (HEAD + "[models]\nm = 3\n", "must be a table of rates", {"entry": "m"}),
    (HEAD + '[models."m"]\ninput = 1\nouput = 1\n', "unknown key 'ouput' (did you mean 'output'?)", {"entry": "m", "key": "ouput", "line": 4}),
    (HEAD + "[models.gpt-4.1]\n" + OK, 'quoted: [models."gpt-4.1"]', {"entry": "gpt-4", "key": "1", "line": 2}),
    (HEAD + "[models.m]\ninput = 1\n", "missing the required rate 'output'", {"entry": "m", "key": "output", "line": 2}),
    (HEAD + "[models.m]\noutput = 1\n", "missing the required rate 'input'", {"entry": "m", "key": "input", "line": 2}),
    (HEAD + "[models.m]\ninput = 1.5\noutput = 1\n", "not float 1.5", {"entry": "m", "key": "input", "line": 3}),
    (HEAD + '[models.m]\ninput = "150"\noutput = 1\n', "not str '150'", {"entry": "m", "key": "input", "line": 3}),
    (HEAD + "[models.m]\ninput = true\noutput = 1\n", "not bool True", {"entry": "m", "key": "input", "line": 3}),
    (HEAD + "[models.m]\ninput = 1\noutput = 1\nreasoning = -1\n", "between 0 and", {"entry": "m", "key": "reasoning", "line": 5}),
    (HEAD + f"[models.m]\ninput = {MAX_RATE + 1}\noutput = 1\n", "between 0 and", {"entry": "m", "key": "input", "line": 3}),
    (HEAD + '[models."GPT-4o"]\n' + OK + '[models."gpt-4o"]\n' + OK, "differ only in case", {"entry": "gpt-4o", "line": 5}),
    (HEAD + '[models."gpt-[45]o"]\n' + OK, "'[' and ']' are not allowed", {"entry": "gpt-[45]o", "line": 2}),
    (HEAD + '[models." m"]\n' + OK, "without surrounding spaces", {"entry": " m", "line": 2}),
    (HEAD + '[models.""]\n' + OK, "1-256 characters", {"entry": "", "line": 2}),
]  # fmt: skip


@pytest.mark.parametrize(("text", "words", "fields"), INVALID)
def test_a_bad_table_is_refused_with_the_place_named(
    text: str, words: str, fields: dict[str, Any]
) -> None:
    with pytest.raises(PriceTableError) as caught:
        parse_table(text, source="prices.toml")
    assert isinstance(caught.value, MeterError)
    assert words in caught.value.message
    assert caught.value.fields == {"file": "prices.toml", **fields}


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"#" * (prices.MAX_FILE_BYTES + 1), "larger than"),
    ],
)
def test_a_file_that_is_not_a_small_text_is_refused(data: bytes, words: str) -> None:
    with pytest.raises(PriceTableError, match=words):
        parse_table(data)


def test_too_many_entries_are_refused() -> None:
    entries = "".join(f"[models.m{i}]\n{OK}" for i in range(prices.MAX_ENTRIES + 1))
    with pytest.raises(PriceTableError, match="more than"):
        parse_table(HEAD + entries)


def test_an_unquoted_date_is_a_version() -> None:
    assert parse_table("version = 2026-11-01\n[models.m]\n" + OK).version == "2026-11-01"


def test_a_byte_order_mark_is_accepted() -> None:
    assert parse_table(("\ufeff" + HEAD + "[models.m]\n" + OK).encode()).version == "v"


def test_a_table_in_another_currency_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "p.toml", 'currency = "USD"\n' + HEAD + "[models.m]\n" + OK)
    with pytest.raises(PriceTableError, match="in USD, the meter bills in OMR"):
        PriceBook(path, currency="OMR")
    assert PriceBook(path, currency="USD").table is not None


@pytest.mark.parametrize("text", [None, "version = \n", HEAD])
def test_a_missing_or_bad_file_stops_startup(tmp_path: Path, text: str | None) -> None:
    path = tmp_path / "p.toml"
    if text is not None:
        write(path, text)
    with pytest.raises(PriceTableError) as caught:
        PriceBook(path)
    assert caught.value.fields["file"] == str(path)


# -- reloading --------------------------------------------------------------------------------


def test_a_changed_file_is_reloaded_after_the_check_interval(tmp_path: Path) -> None:
    path, clock = write(tmp_path / "p.toml", table_text("v1")), Clock()
    book = PriceBook(path, clock=clock)
    assert book.price(ONE_IN, "gpt-4o-mini", 156).version == "v1:gpt-4o-mini"
    write(path, table_text("v2", input_rate=170000))
    clock.now += 0.5
    assert book.price(ONE_IN, "gpt-4o-mini", 156).version == "v1:gpt-4o-mini"
    clock.now += 0.5
    price = book.price(ONE_IN, "gpt-4o-mini", 156)
    assert (price.amount_micro, price.version) == (-170000, "v2:gpt-4o-mini")


def test_a_malformed_rewrite_keeps_the_table_and_logs_one_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, clock = write(tmp_path / "p.toml", table_text("v1")), Clock()
    book = PriceBook(path, clock=clock)
    write(path, table_text("v2").replace("output", "ouput"))
    with caplog.at_level(logging.ERROR, logger="edgemeter.metering.prices"):
        for _ in range(50):
            clock.now += 1
            assert book.price(ONE_IN, "gpt-4o-mini", 156).version == "v1:gpt-4o-mini"
        os.utime(path)  # a touch is not a new version of the file
        clock.now += 1
        book.price(ONE_IN, "gpt-4o-mini", 156)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert "still pricing with version v1" in message
    assert "unknown key 'ouput'" in message and str(path) in message


def test_a_fixed_file_loads_and_a_new_breakage_is_logged_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, clock = write(tmp_path / "p.toml", table_text("v1")), Clock()
    book = PriceBook(path, clock=clock)
    with caplog.at_level(logging.INFO, logger="edgemeter.metering.prices"):
        for text, version in [
            ("version = ", "v1"),
            (table_text("v2"), "v2"),
            ("version = ", "v2"),
            ("version = \n# another bad version\n", "v2"),
        ]:
            write(path, text)
            clock.now += 1
            for _ in range(3):
                assert book.price(ONE_IN, "gpt-4o-mini", 156).version == f"{version}:gpt-4o-mini"
    assert [r.levelname for r in caplog.records] == ["ERROR", "INFO", "ERROR", "ERROR"]


def test_a_deleted_file_keeps_the_last_table_until_it_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, clock = write(tmp_path / "p.toml", table_text("v1")), Clock()
    book = PriceBook(path, clock=clock)
    path.unlink()
    with caplog.at_level(logging.ERROR, logger="edgemeter.metering.prices"):
        for _ in range(10):
            clock.now += 1
            assert book.price(ONE_IN, "gpt-4o-mini", 156).version == "v1:gpt-4o-mini"
    assert len(caplog.records) == 1
    assert "cannot read the file" in caplog.records[0].getMessage()
    write(path, table_text("v2"))
    clock.now += 1
    assert book.price(ONE_IN, "gpt-4o-mini", 156).version == "v2:gpt-4o-mini"


def test_an_atomic_replace_is_seen(tmp_path: Path) -> None:
    path, clock = write(tmp_path / "p.toml", table_text("v1")), Clock()
    book = PriceBook(path, clock=clock)
    os.replace(write(tmp_path / "p.toml.tmp", table_text("v2")), path)
    clock.now += 1
    assert book.price(ONE_IN, "gpt-4o-mini", 156).version == "v2:gpt-4o-mini"


def test_a_same_size_rewrite_within_one_timestamp_tick_is_seen(tmp_path: Path) -> None:
    path, clock = write(tmp_path / "p.toml", table_text("v1")), Clock()
    book = PriceBook(path, clock=clock)
    before = path.stat()
    with path.open("r+b") as f:  # in place: same inode, same size
        f.write(table_text("v2").encode())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert watched.Signature.of(path.stat()) == watched.Signature.of(before)
    clock.now += 1
    assert book.price(ONE_IN, "gpt-4o-mini", 156).version == "v2:gpt-4o-mini"


def test_an_old_unchanged_file_is_only_statted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, clock = write(tmp_path / "p.toml", table_text("v1")), Clock()
    os.utime(path, ns=(0, 10**18))  # 2001: long past any timestamp tick
    book = PriceBook(path, clock=clock)
    reads: list[Path] = []
    real_read = watched.read

    def counted(p: Path, max_bytes: int) -> tuple[bytes, watched.Signature]:
        reads.append(p)
        return real_read(p, max_bytes)

    monkeypatch.setattr(watched, "read", counted)
    for _ in range(5):
        clock.now += 1
        book.price(ONE_IN, "gpt-4o-mini", 156)
    assert reads == []


def test_a_reload_that_changes_prices_but_not_the_version_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, clock = write(tmp_path / "p.toml", table_text("v1")), Clock()
    book = PriceBook(path, clock=clock)
    write(path, table_text("v1", input_rate=170000))
    clock.now += 1
    with caplog.at_level(logging.WARNING, logger="edgemeter.metering.prices"):
        assert book.price(ONE_IN, "gpt-4o-mini", 156).amount_micro == -170000
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "kept version 'v1'" in caplog.records[0].getMessage()


def test_pricing_survives_an_unexpected_error_and_logs_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path, clock = write(tmp_path / "p.toml", table_text("v1")), Clock()
    book = PriceBook(path, clock=clock)

    def broken(_: os.stat_result) -> watched.Signature:
        raise RuntimeError("boom")

    monkeypatch.setattr(watched.Signature, "of", broken)
    with caplog.at_level(logging.ERROR, logger="edgemeter.metering.prices"):
        for _ in range(5):
            clock.now += 1
            assert book.price(ONE_IN, "gpt-4o-mini", 156).version == "v1:gpt-4o-mini"
    assert len(caplog.records) == 1


# -- the documentation ------------------------------------------------------------------------


def test_the_documented_example_table_prices_the_worked_examples() -> None:
    example = re.search(r"```toml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    assert example is not None
    table = parse_table(example.group(1))
    anthropic = Usage(1532, 1111, 418, 33, 0)
    for model, usage, amount, key in [
        ("claude-sonnet-4-5-20250929", anthropic, -802, "claude-sonnet-4-5-20250929"),
        ("claude-sonnet-4-20250514", anthropic, -925, "claude-sonnet-4*"),
        ("gpt-4o-mini-2024-07-18", Usage(120, 100, 0, 31, 12), -11, "gpt-4o-mini*"),
    ]:
        entry = table.lookup(model)
        assert entry is not None
        assert prices.table_price(usage, entry, table.version) == Price(amount, f"2026-11-01:{key}")


# -- modalities, units and service tiers ------------------------------------------------------


def _surface_table() -> prices.PriceTable:
    """The second example table of docs/PRICES.md (the one with service tiers)."""
    blocks = re.findall(r"```toml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    [surface] = [b for b in blocks if "[service_tiers]" in b]
    return parse_table(surface)


def _priced(model: str, usage: Usage) -> Price:
    table = _surface_table()
    entry = table.lookup(model)
    assert entry is not None
    return prices.table_price(usage, entry, table.version, table.service_tiers)


# Every amount worked out by hand in docs/PRICES.md ("Worked examples: modalities, units, tiers").
SURFACE = [
    # 22 x 150,000 + 12 x 20,000,000 + 6 x 600,000 = 246,900,000 -> 246.9 -> 247.
    ("gpt-4o-mini-audio-preview-2024-12-17", Usage(22, 0, 0, 18, 0, detail={"input_text": 22, "output_text": 6, "output_audio": 12}), -247, "gpt-4o-mini-audio*"),
    # 1500 x 6,000,000 + 500 x 3,750,000 + 10 x 3,000,000 + 100 x 15,000,000 = 12,405,000,000.
    ("claude-sonnet-4-20250514", Usage(2010, 0, 2000, 100, 0, detail={"cache_write_1h": 1500}), -12405, "claude-sonnet-4*"),
    # 8984 x 3,000,000 + 520 x 15,000,000 + 1 x 10,000,000 x 1,000 = 44,752,000,000.
    ("claude-sonnet-4-20250514", Usage(8984, 0, 0, 520, 0, units={"web_search_calls": 1}), -44752, "claude-sonnet-4*"),
    # (53 x 1,250,000 + 448 x 10,000,000 + 21 x 10,000,000) x 500 / 1,000 = 2,378,125,000 -> 2378.
    ("gpt-5-2025-08-07", Usage(53, 0, 0, 469, 448, service_tier="flex"), -2378, "gpt-5*"),
    ("gpt-5-2025-08-07", Usage(53, 0, 0, 469, 448), -4756, "gpt-5*"),
    # The entry's own priority multiplier (1500) wins over the table's (2000):
    # 100 x 15,000,000 x 1.5 = 2,250,000,000.
    ("claude-sonnet-4-20250514", Usage(0, 0, 0, 100, 0, service_tier="priority"), -2250, "claude-sonnet-4*"),
    # 10 x 5,000,000 + 40 x 10,000,000 + 50 x 40,000,000 = 2,450,000,000.
    ("gpt-image-1.5", Usage(50, 0, 0, 50, 0, detail={"input_text": 10, "input_image": 40, "output_image": 50}), -2450, "gpt-image-1*"),
    # 2 images at 1792x1024/hd, 120,000 each.
    ("dall-e-3", Usage(3, units={"images": 2, "image_size": "1792x1024", "image_quality": "hd"}), -240000, "dall-e-3"),
    # A size the table does not list: "*".
    ("dall-e-3", Usage(3, units={"images": 1, "image_size": "512x512", "image_quality": "standard"}), -80000, "dall-e-3"),
    # 7000 ms x 100 per second: 700; 8471 ms: 847.1 -> 847.
    ("whisper-1", Usage(units={"audio_ms": 7000}), -700, "whisper-1"),
    ("whisper-1", Usage(0, 0, 0, 29, 0, units={"audio_ms": 8471}), -847, "whisper-1"),
    # 45 characters x 15,000,000 per million = 675.
    ("tts-1", Usage(12, units={"characters": 45}), -675, "tts-1"),
    # One search unit at 2,000; Voyage's 12 tokens at 50,000 per million: 0.6 -> 1.
    ("rerank-v3.5", Usage(units={"search_units": 1}), -2000, "rerank-*"),
    ("rerank-2.5", Usage(12), -1, "rerank-*"),
]  # fmt: skip


@pytest.mark.parametrize(("model", "usage", "amount", "key"), SURFACE)
def test_modalities_units_and_tiers_are_priced_as_documented(
    model: str, usage: Usage, amount: int, key: str
) -> None:
    assert _priced(model, usage) == Price(amount, f"2026-12-01:{key}")


def test_a_table_without_the_new_keys_prices_modalities_at_the_base_rates() -> None:
    # The first documented table knows nothing of audio: audio tokens cost what input costs.
    base = Usage(100, 0, 0, 10, 0)
    audio = Usage(100, 0, 0, 10, 0, detail={"input_audio": 60, "output_audio": 10})
    rates = Rates(3_000_000, 300_000, 3_750_000, 15_000_000, 15_000_000)
    assert charge_micro(audio, rates) == charge_micro(base, rates)


def test_units_the_entry_has_no_price_for_are_named() -> None:
    price = _priced("gpt-5", Usage(10, units={"images": 1, "web_search_calls": 2}))
    assert price.unpriced == ("images",)
    # 10 x 1,250,000 + 2 x 10,000,000 x 1,000 = 20,012,500,000 -> 20012.5 -> 20013: the tokens
    # and the two searches, the image at nothing.
    assert price.amount_micro == -20013


def test_flat_pricing_prices_no_unit() -> None:
    price = prices.flat_price(Usage(10, units={"audio_ms": 7000, "image_size": "1024x1024"}), 156)
    assert price == Price(-1560, "flat:156", ("audio_ms",))


def test_modality_parts_larger_than_their_whole_are_clamped() -> None:
    rates = Rates(1_000_000, 1_000_000, 1_000_000, 1_000_000, 1_000_000, input_audio=9_000_000)
    usage = Usage(10, 4, 0, 0, 0, detail={"input_audio": 50})
    # 4 cached at 1; the 6 left are all audio, at 9.
    assert charge_micro(usage, rates) == 4 + 6 * 9


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            'version="v"\n[models.m]\ninput=1\noutput=1\nper_image={"1024x1024"=1.5}\n',
            "whole number",
        ),
        ('version="v"\n[models.m]\ninput=1\noutput=1\nper_audio_second="100"\n', "whole number"),
        ('version="v"\nservice_tiers={flex=0.5}\n[models.m]\ninput=1\noutput=1\n', "per-mille"),
        (
            'version="v"\nservice_tiers={flex=100001}\n[models.m]\ninput=1\noutput=1\n',
            "between 0 and",
        ),
        ('version="v"\nservice_tiers=2\n[models.m]\ninput=1\noutput=1\n', "table of tier"),
        ('version="v"\n[models.m]\ninput=1\noutput=1\nservice_tiers={flex=true}\n', "per-mille"),
        ('version="v"\n[models.m]\ninput=1\noutput=1\nper_imag=5\n', "did you mean 'per_image'"),
    ],
)
def test_bad_unit_prices_and_tiers_are_refused(text: str, words: str) -> None:
    with pytest.raises(PriceTableError, match=words):
        parse_table(text)
