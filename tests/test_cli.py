"""The `edgemeter` operator command: status, tail, drain, dead list|export|requeue and serve,
their help, errors and exit codes, against real nats-server processes and real spools."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import io
import json
import os
import pty
import re
import signal
import stat
import struct
import subprocess
import sys
import termios
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import pytest
from nats.js.api import ConsumerConfig
from rich.console import Console

import edgemeter
from edgemeter.cli import main
from edgemeter.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from edgemeter.cli.spooldir import in_use_by
from edgemeter.cli.status import subject_matches
from edgemeter.cli.tail import TSV_HEADER, TailView, parse_envelope, parse_since, tsv_row
from edgemeter.ids import uuid7
from edgemeter.metering.contract import route
from edgemeter.metering.envelope import Facts, build, encode
from edgemeter.metering.prices import flat_price
from edgemeter.metering.usage import Usage
from edgemeter.options import OPTIONS
from spool.deadletter import DeadLetters
from spool.store import Spool
from tools.harness import MeterFactory, NatsServer
from tools.streams import ensure_stream, stream_messages

REFUSAL = ValueError("nats: message size exceeds maximum allowed")
REASON = "message size exceeds maximum allowed"  # nats-py's prefix is dropped


def envelope(key: str) -> bytes:
    return json.dumps({"customer_id": "cus_42", "metadata": {"request_id": key}}).encode()


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    """A spool with two dead letters (oldest first) and one envelope still spooled."""
    directory = tmp_path / "spool"
    with Spool(directory) as spool, DeadLetters.of(directory) as dead:
        for key in (uuid7(), uuid7()):
            spool.submit(key, envelope(key)).result()
            dead.move(spool, key, envelope(key), REFUSAL)
        spool.submit("zz-still-spooled", b"{}").result()
    return directory


@pytest.fixture
def dead_keys(spool_dir: Path) -> Iterator[list[str]]:
    with DeadLetters.of(spool_dir) as dead:
        yield [d.key for d in dead]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def spooled(spool_dir: Path) -> list[str]:
    with Spool(spool_dir) as spool:
        return [k for k, _ in spool.read_page("", 100)]


# -- list -------------------------------------------------------------------------------------


def test_list_shows_key_size_age_and_reason(
    capsys: pytest.CaptureFixture[str],
    spool_dir: Path,
    dead_keys: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich folds long cells at 80 columns off a terminal
    code, out, _ = run(capsys, "dead", "list", "--spool-dir", str(spool_dir))
    assert code == EXIT_OK
    assert "2 dead letters" in out
    for key in dead_keys:
        assert key in out
    assert f"{len(envelope(dead_keys[0]))} B" in out
    assert "0s" in out or "1s" in out
    assert "ValueError: message size exceeds maximum allowed" in out


def test_list_json_is_one_object_per_dead_letter(
    capsys: pytest.CaptureFixture[str], spool_dir: Path, dead_keys: list[str]
) -> None:
    code, out, _ = run(capsys, "dead", "list", "--json", "--spool-dir", str(spool_dir))
    assert code == EXIT_OK
    rows = json.loads(out)
    assert [r["key"] for r in rows] == dead_keys
    assert rows[0]["size"] == len(envelope(dead_keys[0]))
    assert rows[0]["error"] == "ValueError"
    assert rows[0]["reason"] == REASON
    assert 0 <= rows[0]["age_s"] < 3600
    assert rows[0]["dead_lettered_at"].endswith("Z")


@pytest.mark.parametrize("form", [(), ("--json",)])
def test_an_empty_area_lists_nothing_and_succeeds(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, form: tuple[str, ...]
) -> None:
    with Spool(tmp_path / "spool"):
        pass
    code, out, err = run(capsys, "dead", "list", *form, "--spool-dir", str(tmp_path / "spool"))
    assert code == EXIT_OK
    assert (json.loads(out) == []) if form else ("no dead letters" in err and out == "")
    assert not (tmp_path / "spool" / "dead-letter").exists()


@pytest.mark.parametrize("action", [["list"], ["export"], ["requeue", "--all"]])
def test_a_missing_spool_dir_is_a_clear_error_and_is_not_created(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, action: list[str]
) -> None:
    missing = tmp_path / "nowhere"
    code, out, err = run(capsys, "dead", *action, "--spool-dir", str(missing))
    assert code == EXIT_FAILED
    assert err.startswith("edgemeter: error: no spool directory here")
    assert str(missing) in err
    assert out == ""
    assert not missing.exists()


def test_the_spool_dir_defaults_to_the_platform_data_dir(
    capsys: pytest.CaptureFixture[str],
    spool_dir: Path,
    dead_keys: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EDGEMETER_SPOOL_DIR", str(spool_dir))
    code, out, _ = run(capsys, "dead", "list", "--json")
    assert code == EXIT_OK
    assert [r["key"] for r in json.loads(out)] == dead_keys


# -- export -----------------------------------------------------------------------------------


def test_export_writes_json_lines_with_the_envelope_parsed(
    capsys: pytest.CaptureFixture[str], spool_dir: Path, dead_keys: list[str]
) -> None:
    code, out, _ = run(capsys, "dead", "export", "--spool-dir", str(spool_dir))
    assert code == EXIT_OK
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["key"] for line in lines] == dead_keys
    assert lines[0]["envelope"] == json.loads(envelope(dead_keys[0]))
    assert lines[0]["reason"] == REASON
    assert set(lines[0]) >= {"key", "reason", "dead_lettered_at", "envelope"}


def test_export_to_a_file_is_private(
    capsys: pytest.CaptureFixture[str], spool_dir: Path, dead_keys: list[str], tmp_path: Path
) -> None:
    target = tmp_path / "dead.jsonl"
    code, out, err = run(
        capsys, "dead", "export", dead_keys[1], "-o", str(target), "--spool-dir", str(spool_dir)
    )
    assert code == EXIT_OK
    assert out == ""
    assert "exported 1 dead letters" in err
    assert [json.loads(line)["key"] for line in target.read_text().splitlines()] == dead_keys[1:]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_export_of_an_unknown_key_fails(
    capsys: pytest.CaptureFixture[str], spool_dir: Path, dead_keys: list[str]
) -> None:
    code, out, err = run(
        capsys, "dead", "export", dead_keys[0], "no-such-key", "--spool-dir", str(spool_dir)
    )
    assert code == EXIT_FAILED
    assert [json.loads(line)["key"] for line in out.splitlines()] == dead_keys[:1]
    assert "not in the dead-letter area: no-such-key" in err


# -- requeue ----------------------------------------------------------------------------------


def test_requeue_by_key_moves_only_that_one_back(
    capsys: pytest.CaptureFixture[str], spool_dir: Path, dead_keys: list[str]
) -> None:
    code, _, err = run(capsys, "dead", "requeue", dead_keys[0], "--spool-dir", str(spool_dir))
    assert code == EXIT_OK
    assert "requeued 1 dead letters" in err
    assert spooled(spool_dir) == [dead_keys[0], "zz-still-spooled"]
    with DeadLetters.of(spool_dir) as dead:
        assert [d.key for d in dead] == dead_keys[1:]


def test_requeue_all_moves_every_dead_letter_back(
    capsys: pytest.CaptureFixture[str], spool_dir: Path, dead_keys: list[str]
) -> None:
    code, _, _ = run(capsys, "dead", "requeue", "--all", "--spool-dir", str(spool_dir))
    assert code == EXIT_OK
    assert spooled(spool_dir) == [*dead_keys, "zz-still-spooled"]
    with Spool(spool_dir) as spool:
        assert spool.read_page("", 1) == [(dead_keys[0], envelope(dead_keys[0]))]
    code, _, err = run(capsys, "dead", "requeue", "--all", "--spool-dir", str(spool_dir))
    assert code == EXIT_OK
    assert "no dead letters to requeue" in err


def test_requeue_of_an_unknown_key_fails_and_moves_nothing(
    capsys: pytest.CaptureFixture[str], spool_dir: Path, dead_keys: list[str]
) -> None:
    code, _, err = run(capsys, "dead", "requeue", "no-such-key", "--spool-dir", str(spool_dir))
    assert code == EXIT_FAILED
    assert "not in the dead-letter area: no-such-key" in err
    assert spooled(spool_dir) == ["zz-still-spooled"]


@pytest.mark.parametrize(
    "argv",
    [
        ["dead", "requeue"],
        ["dead", "requeue", "--all", "some-key"],
        ["dead"],
        ["dead", "bury"],
        ["dead", "list", "--colour"],
        [],
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, _, err = run(capsys, *argv)
    assert code == EXIT_USAGE
    assert "usage: edgemeter" in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["status"],
        ["tail"],
        ["drain"],
        ["dead"],
        ["dead", "list"],
        ["dead", "export"],
        ["dead", "requeue"],
    ],
)
def test_every_command_has_help(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, _ = run(capsys, *argv, "--help")
    assert code == EXIT_OK
    assert out.startswith("usage: edgemeter")
    if argv[-1:] in (["list"], ["export"], ["requeue"], ["status"], ["drain"]):
        assert "--spool-dir" in out
    if argv[-1:] in (["status"], ["tail"], ["drain"]):
        assert "--nats-url" in out
        assert "EDGEMETER_NATS_URL" in out
        assert "Exit codes: 0" in " ".join(out.split())


def test_the_console_script_runs_as_its_own_process(spool_dir: Path, dead_keys: list[str]) -> None:
    script = Path(sys.executable).parent / "edgemeter"
    done = subprocess.run(
        [str(script), "dead", "list", "--json", "--spool-dir", str(spool_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == EXIT_OK, done.stderr
    assert [r["key"] for r in json.loads(done.stdout)] == dead_keys
    missing = subprocess.run(
        [str(script), "dead", "list", "--spool-dir", str(spool_dir / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == EXIT_FAILED
    assert "no spool directory here" in missing.stderr


# == status, tail and drain against a real broker ==============================================


@dataclass(frozen=True)
class Stream:
    url: str
    name: str
    subject: str

    def flags(self) -> list[str]:
        return ["--nats-url", self.url, "--subject", self.subject]


@pytest.fixture
def stream(module_nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> Stream:
    """A stream of its own on the module's broker, bound to a subject of its own, and to an
    unbillable subject of its own (as the meter's environment names it)."""
    tag = uuid.uuid4().hex[:12]
    made = Stream(module_nats_server.url, f"CLI_{tag}", f"cli.{tag}.usage")
    monkeypatch.setenv("EDGEMETER_UNBILLABLE_SUBJECT", f"cli.{tag}.unbillable")
    asyncio.run(ensure_stream(made.url, made.name, [made.subject, f"cli.{tag}.unbillable"]))
    return made


def usage_envelope(
    key: str,
    tenant: str = "t_7",
    model: str = "gpt-4o-mini",
    tokens: tuple[int, int] = (120, 31),
    customer: str = "cus_42",
) -> bytes:
    """A real envelope, as the meter builds it (flat price: 156 micro-OMR per token)."""
    now = time.time()
    facts = Facts(
        request_id=key,
        api="openai.chat",
        path="/v1/chat/completions",
        stream=True,
        status_code=200,
        model=model,
        tenant_id=tenant,
        customer_id=customer,
        started_at=now - 1,
        completed_at=now,
        first_byte_at=now - 0.5,
        outcome="complete",
        usage_source="reported",
        currency="OMR",
    )
    usage = Usage(input_tokens=tokens[0], output_tokens=tokens[1])
    return encode(build(facts, usage, flat_price(usage, 156)))


def minted_at(ms: int, n: int) -> str:
    """The n-th UUIDv7 of a past millisecond (ids.uuid7 never goes back behind ids it made)."""
    return str(uuid.UUID(int=ms << 80 | 0x7 << 76 | 0b10 << 62 | n))


def filled_spool(directory: Path, count: int, minted_ms: int | None = None) -> list[str]:
    if minted_ms is None:
        keys = [uuid7() for _ in range(count)]
    else:
        keys = [minted_at(minted_ms, n) for n in range(count)]
    with Spool(directory) as spool:
        for future in [spool.submit(key, usage_envelope(key)) for key in keys]:
            future.result()
    return keys


def spool_contents(directory: Path) -> dict[str, bytes]:
    with Spool(directory) as spool:
        return dict(spool.read_page("", 100_000))


def on_stream(stream: Stream) -> list[tuple[str, bytes]]:
    """(Nats-Msg-Id, payload) of every message on the stream; each must carry the id."""
    messages = asyncio.run(stream_messages(stream.url, stream.name))
    return [((headers or {})["Nats-Msg-Id"], data) for headers, data in messages]


def publish_when_tailed(
    stream: Stream, payloads: list[tuple[str, bytes]], subject: str | None = None
) -> concurrent.futures.Future[None]:
    """Publish from another thread once a consumer (the tail's) is on the stream, so a tail of
    new messages only sees every one of them (on the stream's subject unless told)."""

    async def publish() -> None:
        nc = await nats.connect(stream.url, connect_timeout=5)
        try:
            jsm, js = nc.jsm(), nc.jetstream()
            deadline = time.monotonic() + 60
            while (await jsm.stream_info(stream.name)).state.consumer_count == 0:
                assert time.monotonic() < deadline, "the tail never subscribed"
                await asyncio.sleep(0.05)
            for key, data in payloads:
                await js.publish(subject or stream.subject, data, headers={"Nats-Msg-Id": key})
        finally:
            await nc.close()

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(asyncio.run, publish())
    finally:
        pool.shutdown(wait=False)


def in_terminal(argv: list[str], columns: int, rows: int = 60) -> tuple[int, str, str]:
    """Runs the console script in a real terminal of that size (as `kubectl exec -t` gives
    one); returns its exit code, what the terminal showed last (control sequences taken out)
    and its stderr."""
    script = Path(sys.executable).parent / "edgemeter"
    main_fd, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in TERMINAL_OVERRIDES}
    proc = subprocess.Popen(
        [str(script), *argv],
        stdin=terminal,
        stdout=terminal,
        stderr=subprocess.PIPE,
        env=env | {"TERM": "xterm-256color"},
    )
    os.close(terminal)
    shown = b""
    with contextlib.suppress(OSError):  # EIO once the script has closed the terminal
        while data := os.read(main_fd, 65536):
            shown += data
    os.close(main_fd)
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=60)
    text = re.sub(r"\x1b\[[0-9;?]*[ -/]*[@-~]", "", shown.decode()).replace("\r", "")
    return code, text, err


# What makes rich treat a pipe as a terminal, or size it, regardless of the real one.
TERMINAL_OVERRIDES = ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")


def tsv(out: str) -> list[list[str]]:
    """The rows of tab-separated output, its header line first."""
    return [line.split("\t") for line in out.splitlines()]


# -- status -----------------------------------------------------------------------------------


def test_status_of_a_healthy_meter_reports_spool_broker_and_stream(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    stream: Stream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    directory = tmp_path / "spool"
    keys = filled_spool(directory, 2, minted_ms=int(time.time() * 1000) - 90_000)
    argv = ["status", "--spool-dir", str(directory), *stream.flags()]
    code, out, _ = run(capsys, *argv, "--json")
    assert code == EXIT_OK
    report = json.loads(out)
    assert report["healthy"] is True
    assert report["problems"] == []
    spool = report["spool"]
    assert spool["envelopes"] == 2
    assert spool["bytes"] == sum(len(v) for v in spool_contents(directory).values())
    assert spool["oldest_key"] == keys[0]
    assert 90 <= spool["oldest_age_s"] < 3600
    assert spool["dead_letters"] == 0
    assert spool["in_use_by"] is None
    broker = report["broker"]
    assert broker["reachable"] is True
    assert broker["version"].count(".") == 2
    assert (broker["stream"], broker["messages"], broker["duplicate_window_s"]) == (
        stream.name,
        0,
        120,
    )

    code, out, _ = run(capsys, *argv)
    assert code == EXIT_OK
    assert "2 envelopes" in out
    assert "oldest 1m 3" in out  # 90 s and the time this test took
    assert f"{stream.name}: 0 messages" in out
    assert "duplicate window 2m 0s" in out
    assert out.rstrip().endswith("healthy")


def test_status_with_the_broker_down_needs_attention(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, stopped_nats_server: NatsServer
) -> None:
    filled_spool(tmp_path / "spool", 1)
    code, out, _ = run(
        capsys,
        "status",
        "--json",
        "--spool-dir",
        str(tmp_path / "spool"),
        "--nats-url",
        stopped_nats_server.url,
        "--connect-timeout",
        "1",
    )
    assert code == EXIT_FAILED
    report = json.loads(out)
    assert report["broker"]["reachable"] is False
    assert report["broker"]["error"].startswith(
        f"cannot connect to NATS at {stopped_nats_server.url}: "
    )
    assert report["problems"] == [f"broker unreachable: {report['broker']['error']}"]
    assert report["spool"]["envelopes"] == 1  # the spool is still reported


def test_status_without_a_stream_for_the_subject_needs_attention(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, module_nats_server: NatsServer
) -> None:
    filled_spool(tmp_path / "spool", 1)
    subject = f"cli.{uuid.uuid4().hex[:12]}.unbound"
    argv = ["status", "--spool-dir", str(tmp_path / "spool"), "--nats-url", module_nats_server.url]
    code, out, _ = run(capsys, *argv, "--subject", subject, "--json")
    assert code == EXIT_FAILED
    report = json.loads(out)
    assert report["broker"]["reachable"] is True
    assert report["broker"]["stream"] is None
    assert report["problems"] == [
        f"no stream is bound to subject {subject!r}: envelopes stay spooled until the billing "
        "consumer creates it"
    ]


def test_status_of_a_missing_spool_needs_attention_and_creates_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, stream: Stream
) -> None:
    missing = tmp_path / "nowhere"
    argv = ["status", "--spool-dir", str(missing), *stream.flags()]
    code, out, _ = run(capsys, *argv, "--json")
    assert code == EXIT_FAILED
    report = json.loads(out)
    assert report["spool"]["exists"] is False
    assert report["problems"] == [
        "spool: no spool here (give --spool-dir or set EDGEMETER_SPOOL_DIR)"
    ]
    assert report["broker"]["stream"] == stream.name  # the broker is still checked
    code, out, _ = run(capsys, *argv)
    assert code == EXIT_FAILED
    assert "needs attention" in out
    assert not missing.exists()


def test_status_with_dead_letters_needs_attention(
    capsys: pytest.CaptureFixture[str], spool_dir: Path, stream: Stream
) -> None:
    code, out, _ = run(capsys, "status", "--json", "--spool-dir", str(spool_dir), *stream.flags())
    assert code == EXIT_FAILED
    report = json.loads(out)
    assert report["spool"]["dead_letters"] == 2
    assert report["spool"]["oldest_age_s"] is None  # "zz-still-spooled" is no request id
    assert report["problems"] == ["2 dead letters wait for an operator (edgemeter dead list)"]


async def billing_consumer(stream: Stream, name: str, filter_subject: str) -> None:
    """A durable pull consumer on the stream, as the billing service has one: of the 3
    envelopes published, one acked, one delivered and not acked yet, one not delivered."""
    nc = await nats.connect(stream.url, connect_timeout=5)
    try:
        js = nc.jetstream()
        await js.add_consumer(
            stream.name,
            ConsumerConfig(durable_name=name, filter_subject=filter_subject, ack_wait=600),
        )
        for key in [uuid7() for _ in range(3)]:
            await js.publish(stream.subject, usage_envelope(key), headers={"Nats-Msg-Id": key})
        if filter_subject != stream.subject:
            return
        sub = await js.pull_subscribe_bind(durable=name, stream=stream.name)
        [first] = await sub.fetch(1, timeout=10)
        await first.ack_sync()
        await sub.fetch(1, timeout=10)  # delivered, not acknowledged
    finally:
        await nc.close()


def test_status_shows_how_far_behind_the_billing_consumer_is(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    stream: Stream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    asyncio.run(billing_consumer(stream, "sme-billing-metering", stream.subject))
    filled_spool(tmp_path / "spool", 1)
    argv = ["status", "--spool-dir", str(tmp_path / "spool"), *stream.flags()]
    code, out, _ = run(capsys, *argv, "--consumer", "sme-billing-metering", "--json")
    assert code == EXIT_OK
    consumer = json.loads(out)["broker"]["consumer"]
    assert consumer["name"] == "sme-billing-metering"
    assert (consumer["found"], consumer["reads_subject"]) == (True, True)
    assert (consumer["pending"], consumer["ack_pending"], consumer["redelivered"]) == (1, 1, 0)
    assert 0 <= consumer["last_delivery_age_s"] < 60
    assert consumer["filter_subjects"] == [stream.subject]
    code, out, _ = run(capsys, *argv, "--consumer", "sme-billing-metering")
    assert code == EXIT_OK
    assert "sme-billing-metering: 1 pending, 1 awaiting ack, 0 redelivered; last delivery " in out


@pytest.mark.parametrize(
    ("name", "elsewhere", "problem"),
    [
        (
            "missing",
            False,
            "no consumer 'missing' on stream {stream}: nothing books the envelopes there",
        ),
        (
            "elsewhere",
            True,
            "consumer 'elsewhere' does not read subject '{subject}' (its filter: {other})",
        ),
    ],
)
def test_status_needs_attention_when_the_named_consumer_would_not_book_the_envelopes(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    module_nats_server: NatsServer,
    name: str,
    elsewhere: bool,
    problem: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tag = uuid.uuid4().hex[:12]
    stream = Stream(module_nats_server.url, f"CLI_{tag}", f"cli.{tag}.usage")
    other = f"cli.{tag}.other"
    # The unbillable subject is bound too: the consumer is the only problem here.
    monkeypatch.setenv("EDGEMETER_UNBILLABLE_SUBJECT", f"cli.{tag}.unbillable")
    subjects = [stream.subject, other, f"cli.{tag}.unbillable"]
    asyncio.run(ensure_stream(stream.url, stream.name, subjects))
    if elsewhere:
        asyncio.run(billing_consumer(stream, name, other))
    filled_spool(tmp_path / "spool", 1)
    argv = ["status", "--spool-dir", str(tmp_path / "spool"), *stream.flags()]
    code, out, _ = run(capsys, *argv, "--consumer", name, "--json")
    assert code == EXIT_FAILED
    assert json.loads(out)["problems"] == [
        problem.format(stream=stream.name, subject=stream.subject, other=other)
    ]


@pytest.mark.parametrize(
    ("pattern", "subject", "matches"),
    [
        ("catalyst.usage.recorded", "catalyst.usage.recorded", True),
        ("catalyst.>", "catalyst.usage.recorded", True),
        ("catalyst.*.recorded", "catalyst.usage.recorded", True),
        ("catalyst.*", "catalyst.usage.recorded", False),
        ("catalyst.usage.recorded.>", "catalyst.usage.recorded", False),
        ("catalyst.usage.unbillable", "catalyst.usage.recorded", False),
    ],
)
def test_subject_filters_match_as_nats_matches_them(
    pattern: str, subject: str, matches: bool
) -> None:
    assert subject_matches(pattern, subject) is matches


def test_version_names_edgemeter_and_what_it_runs_on(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == EXIT_OK
    assert out.startswith(f"edgemeter {edgemeter.__version__} (mitmproxy 12.2.3, nats-py ")
    assert edgemeter.__version__ == "0.1.0"  # the installed distribution's, not a fallback
    as_module = subprocess.run(
        [sys.executable, "-m", "edgemeter.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (as_module.returncode, as_module.stdout) == (EXIT_OK, out)


def test_the_broker_comes_from_the_meters_environment_variables(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    stream: Stream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    filled_spool(tmp_path / "spool", 1)
    monkeypatch.setenv("EDGEMETER_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setenv("EDGEMETER_NATS_URL", stream.url)
    monkeypatch.setenv("EDGEMETER_SUBJECT", stream.subject)
    code, out, _ = run(capsys, "status", "--json")
    assert code == EXIT_OK
    assert json.loads(out)["broker"]["stream"] == stream.name
    monkeypatch.setenv("EDGEMETER_NATS_URL", "http://127.0.0.1:4222")
    code, _, err = run(capsys, "status")
    assert code == EXIT_USAGE
    assert "EDGEMETER_NATS_URL" in err


def test_the_help_shows_the_meters_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    defaults = {name: default for name, _type, default, _help in OPTIONS}
    _, out, _ = run(capsys, "drain", "--help")
    flat = " ".join(out.split())
    for name in ("meter_nats_url", "meter_subject", "meter_publish_timeout_ms"):
        assert str(defaults[name]) in flat, name


def test_credentials_reach_the_broker_and_are_never_printed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = f"tok-{uuid.uuid4().hex}"
    server = NatsServer(store_dir=tmp_path / "jetstream", extra_args=["--auth", token])
    server.start()
    try:
        with Spool(tmp_path / "spool"):
            pass
        argv = [
            "status",
            "--json",
            "--spool-dir",
            str(tmp_path / "spool"),
            "--connect-timeout",
            "1",
        ]
        token_file = tmp_path / "token"
        token_file.write_text(token + "\n")
        _, out, _ = run(
            capsys, *argv, "--nats-url", server.url, "--nats-token-file", str(token_file)
        )
        assert json.loads(out)["broker"]["reachable"] is True
        monkeypatch.setenv("EDGEMETER_NATS_TOKEN", token)
        _, out, _ = run(capsys, *argv, "--nats-url", server.url)
        assert json.loads(out)["broker"]["reachable"] is True

        wrong = f"wrong-{token}"
        monkeypatch.setenv("EDGEMETER_NATS_TOKEN", wrong)
        _, out, err = run(capsys, *argv, "--nats-url", server.url)
        broker = json.loads(out)["broker"]
        assert broker["reachable"] is False
        # The server says why, unless it closes the socket before the client reads that.
        assert any(
            reason in broker["error"] for reason in ("Authorization Violation", "ConnectionReset")
        ), broker["error"]
        password = f"pw-{uuid.uuid4().hex}"
        with_userinfo = server.url.replace("nats://", f"nats://alice:{password}@")
        _, out2, err2 = run(capsys, *argv, "--nats-url", with_userinfo)
        assert json.loads(out2)["broker"]["servers"] == [
            server.url.replace("nats://", "nats://***@")
        ]
        for text in (out, err, out2, err2):
            assert token not in text
            assert password not in text
    finally:
        server.stop()


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "--nats-url", "http://127.0.0.1:4222"],
        ["status", "--subject", "catalyst.>"],
        ["status", "--nats-token-file", "/nonexistent/token"],
        ["status", "--connect-timeout", "0"],
        ["tail", "--since", "yesterday"],
        ["tail", "--count", "0"],
        ["tail", "--all", "--since", "1h"],
        ["drain", "--timeout", "-1"],
        ["drain", "--publish-timeout-ms", "soon"],
    ],
)
def test_bad_broker_and_timing_flags_are_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == EXIT_USAGE
    assert out == ""
    assert f"usage: edgemeter {argv[0]}" in err


# -- tail -------------------------------------------------------------------------------------


def test_tail_piped_prints_a_tab_separated_row_per_envelope_and_skips_malformed_ones(
    capsys: pytest.CaptureFixture[str], stream: Stream
) -> None:
    keys = [uuid7() for _ in range(3)]
    payloads = [
        (keys[0], usage_envelope(keys[0], "t_1", "gpt-4o-mini", (100, 10))),
        ("junk-1", b"{not json"),
        (keys[1], usage_envelope(keys[1], "t_1", "gpt-4o-mini", (50, 5))),
        ("junk-2", b'{"metadata": 3}'),
        (keys[2], usage_envelope(keys[2], "t_2", "claude-sonnet-4", (7, 3))),
    ]
    published = publish_when_tailed(stream, payloads)
    code, out, err = run(capsys, "tail", "--count", "3", "--timeout", "60", *stream.flags())
    published.result(timeout=60)
    assert code == EXIT_OK
    assert "3 envelopes, 2 malformed messages skipped" in err
    header, *rows = tsv(out)
    assert header == [
        "completed_at",
        "request_id",
        "tenant_id",
        "customer_id",
        "model",
        "api",
        "input_tokens",
        "output_tokens",
        "amount",
        "currency",
        "outcome",
        "usage_source",
    ]
    assert [row[1:] for row in rows] == [
        [
            keys[0],
            "t_1",
            "cus_42",
            "gpt-4o-mini",
            "openai.chat",
            "100",
            "10",
            "-0.017160",
            "OMR",
            "complete",
            "reported",
        ],
        [
            keys[1],
            "t_1",
            "cus_42",
            "gpt-4o-mini",
            "openai.chat",
            "50",
            "5",
            "-0.008580",
            "OMR",
            "complete",
            "reported",
        ],
        [
            keys[2],
            "t_2",
            "cus_42",
            "claude-sonnet-4",
            "openai.chat",
            "7",
            "3",
            "-0.001560",
            "OMR",
            "complete",
            "reported",
        ],
    ]
    for row, key in zip(rows, keys, strict=True):
        published_at = json.loads(usage_envelope(key))["metadata"]["completed_at"]
        assert row[0][:10] == published_at[:10] and row[0].endswith("Z")


def test_a_value_with_a_tab_does_not_shift_the_columns_of_a_pipe() -> None:
    parsed = parse_envelope(b'{"customer_id": "a\\tb", "metadata": {"model": "m\\nx"}}')
    assert parsed is not None
    assert tsv_row(parsed[1], "t").split("\t")[3:5] == ["a b", "m x"]


@pytest.mark.parametrize("columns", [80, 200])
def test_tail_on_a_terminal_fits_its_width_keeping_tokens_and_amount(
    stream: Stream, columns: int
) -> None:
    keys = [uuid7() for _ in range(3)]
    payloads = [
        (keys[0], usage_envelope(keys[0], "t_1", "gpt-4o-mini", (100, 10))),
        (keys[1], usage_envelope(keys[1], "t_1", "gpt-4o-mini", (50, 5))),
        (keys[2], usage_envelope(keys[2], "t_2", "claude-sonnet-4", (70000, 3123))),
    ]
    published = publish_when_tailed(stream, payloads)
    argv = ["tail", "--count", "3", "--timeout", "60", *stream.flags()]
    code, shown, err = in_terminal(argv, columns)
    published.result(timeout=60)
    assert code == EXIT_OK, err
    last = shown[shown.rindex("last 3 of 3 envelopes") :]
    assert max(len(line.rstrip()) for line in last.splitlines()) <= columns
    recent, totals = last.split("totals")
    rows = [line.split() for line in recent.splitlines() if "openai.chat" in line or "…" in line]
    if columns == 80:
        # The least useful columns went first: api, usage source, tenant, time; the request
        # id is shortened to its end (which --request-id takes).
        assert rows == [
            ["…" + keys[0][-12:], "cus_42", "gpt-4o-mini", "100", "10", "-0.017160"],
            ["…" + keys[1][-12:], "cus_42", "gpt-4o-mini", "50", "5", "-0.008580"],
            ["…" + keys[2][-12:], "cus_42", "claude-sonnet-4", "70000", "3123", "-11.407188"],
        ]
    else:
        assert [row[2:] for row in rows] == [
            [
                keys[0],
                "t_1",
                "cus_42",
                "gpt-4o-mini",
                "openai.chat",
                "100",
                "10",
                "-0.017160",
                "complete",
                "reported",
            ],
            [
                keys[1],
                "t_1",
                "cus_42",
                "gpt-4o-mini",
                "openai.chat",
                "50",
                "5",
                "-0.008580",
                "complete",
                "reported",
            ],
            [
                keys[2],
                "t_2",
                "cus_42",
                "claude-sonnet-4",
                "openai.chat",
                "70000",
                "3123",
                "-11.407188",
                "complete",
                "reported",
            ],
        ]
    total_rows = [line.split() for line in totals.splitlines() if line.strip().startswith("t_")]
    assert [row[:6] for row in total_rows] == [
        ["t_1", "gpt-4o-mini", "2", "150", "15", "-0.025740"],
        ["t_2", "claude-sonnet-4", "1", "70000", "3123", "-11.407188"],
    ]


# (customer, tenant, model) of the envelopes of the filter tests, in stream order.
FOUR = [
    ("cus_1", "t_1", "gpt-4o-mini"),
    ("cus_2", "t_1", "gpt-4o-mini-2024-07-18"),
    ("cus_1", "t_2", "claude-sonnet-4"),
    ("cus_3", "t_2", "gpt-4o"),
]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--customer", "cus_1"], [0, 2]),
        (["--tenant", "t_2"], [2, 3]),
        (["--model", "gpt-4o-mini*"], [0, 1]),
        (["--model", "gpt-4o"], [3]),
        (["--customer", "cus_1", "--tenant", "t_2"], [2]),
        (["--request-id", "KEY1"], [1]),
        (["--request-id", "END2"], [2]),
    ],
)
def test_tail_finds_envelopes_in_the_streams_history_by_customer_tenant_model_or_request_id(
    capsys: pytest.CaptureFixture[str],
    stream: Stream,
    tmp_path: Path,
    flags: list[str],
    expected: list[int],
) -> None:
    keys = [uuid7() for _ in FOUR]
    with Spool(tmp_path / "spool") as spool:
        for key, (customer, tenant, model) in zip(keys, FOUR, strict=True):
            spool.submit(key, usage_envelope(key, tenant, model, customer=customer)).result()
    assert run(capsys, "drain", "--spool-dir", str(tmp_path / "spool"), *stream.flags())[0] == 0
    flags = [keys[1] if f == "KEY1" else keys[2][-12:] if f == "END2" else f for f in flags]
    argv = ["tail", "--all", *flags, "--count", str(len(expected)), "--timeout", "60"]
    code, out, err = run(capsys, *argv, "--json", *stream.flags())
    assert code == EXIT_OK, err
    shown = [json.loads(line)["metadata"]["request_id"] for line in out.splitlines()]
    assert shown == [keys[i] for i in expected]


def test_a_search_of_the_history_says_when_it_has_read_it(
    capsys: pytest.CaptureFixture[str], stream: Stream, tmp_path: Path
) -> None:
    filled_spool(tmp_path / "spool", 3)
    assert run(capsys, "drain", "--spool-dir", str(tmp_path / "spool"), *stream.flags())[0] == 0
    code, out, err = run(
        capsys, "tail", "--all", "--customer", "nobody", "--timeout", "2", *stream.flags()
    )
    assert code == EXIT_OK
    assert tsv(out) == [TSV_HEADER.split("\t")]  # the header alone: nothing matched
    assert "history read: 3 envelopes, 0 matched; following new ones" in err
    assert "0 envelopes of 3 matched" in err


def test_tail_json_prints_one_envelope_a_line(
    capsys: pytest.CaptureFixture[str], stream: Stream
) -> None:
    keys = [uuid7() for _ in range(2)]
    payloads = [
        (keys[0], usage_envelope(keys[0])),
        ("junk", b"[]"),
        (keys[1], usage_envelope(keys[1])),
    ]
    published = publish_when_tailed(stream, payloads)
    code, out, err = run(
        capsys, "tail", "--json", "--count", "2", "--timeout", "60", *stream.flags()
    )
    published.result(timeout=60)
    assert code == EXIT_OK
    lines = out.splitlines()
    assert [json.loads(line) for line in lines] == [
        json.loads(payloads[0][1]),
        json.loads(payloads[2][1]),
    ]
    assert "1 malformed messages skipped" in err


@pytest.mark.parametrize("start", [["--all"], ["--since", "1h"]])
def test_tail_can_start_with_envelopes_already_on_the_stream(
    capsys: pytest.CaptureFixture[str], stream: Stream, tmp_path: Path, start: list[str]
) -> None:
    keys = filled_spool(tmp_path / "spool", 3)
    assert (
        run(capsys, "drain", "--spool-dir", str(tmp_path / "spool"), *stream.flags())[0] == EXIT_OK
    )
    code, out, _ = run(
        capsys, "tail", *start, "--json", "--count", "3", "--timeout", "60", *stream.flags()
    )
    assert code == EXIT_OK
    assert [json.loads(line)["metadata"]["request_id"] for line in out.splitlines()] == keys


def test_tail_ends_at_its_timeout_and_fails_only_if_a_count_was_not_reached(
    capsys: pytest.CaptureFixture[str], stream: Stream
) -> None:
    code, out, err = run(capsys, "tail", "--json", "--timeout", "0.5", *stream.flags())
    assert (code, out) == (EXIT_OK, "")
    assert "0 envelopes" in err
    code, _, err = run(capsys, "tail", "--count", "1", "--timeout", "0.5", *stream.flags())
    assert code == EXIT_FAILED
    assert "edgemeter: error: saw 0 of 1 envelopes within 0.5s" in err


def test_tail_without_a_broker_or_a_stream_fails_clearly(
    capsys: pytest.CaptureFixture[str],
    stopped_nats_server: NatsServer,
    module_nats_server: NatsServer,
) -> None:
    code, _, err = run(
        capsys, "tail", "--nats-url", stopped_nats_server.url, "--connect-timeout", "1"
    )
    assert code == EXIT_FAILED
    assert f"edgemeter: error: cannot connect to NATS at {stopped_nats_server.url}" in err
    subject = f"cli.{uuid.uuid4().hex[:12]}.unbound"
    code, _, err = run(capsys, "tail", "--nats-url", module_nats_server.url, "--subject", subject)
    assert code == EXIT_FAILED
    assert f"edgemeter: error: no stream is bound to subject {subject!r}" in err


def test_ctrl_c_ends_a_live_tail_with_exit_0(stream: Stream) -> None:
    script = Path(sys.executable).parent / "edgemeter"
    proc = subprocess.Popen(
        [str(script), "tail", "--json", *stream.flags()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        key = uuid7()
        publish_when_tailed(stream, [(key, usage_envelope(key))]).result(timeout=60)
        assert proc.stdout is not None and proc.stderr is not None
        assert json.loads(proc.stdout.readline())["metadata"]["request_id"] == key
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == EXIT_OK
        assert "1 envelopes" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def publish(url: str, subject: str, payloads: list[tuple[str, bytes]]) -> None:
    nc = await nats.connect(url, connect_timeout=5)
    try:
        for key, data in payloads:
            await nc.jetstream().publish(subject, data, headers={"Nats-Msg-Id": key})
    finally:
        await nc.close()


def unbillable_envelope(key: str, drop: str) -> bytes:
    """An envelope without its customer or tenant, as the meter sends it to reconciliation."""
    built = json.loads(usage_envelope(key))
    if drop == "customer":
        built["customer_id"] = ""
    else:
        built["metadata"]["tenant_id"] = ""
    return encode(route(built).envelope)


def test_tail_unbillable_follows_reconciliation_with_totals_by_reason(
    capsys: pytest.CaptureFixture[str], stream: Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    unbillable = os.environ["EDGEMETER_UNBILLABLE_SUBJECT"]
    keys = [uuid7() for _ in range(3)]
    payloads = [
        (keys[0], unbillable_envelope(keys[0], "customer")),
        (keys[1], unbillable_envelope(keys[1], "tenant")),
        (keys[2], unbillable_envelope(keys[2], "customer")),
    ]
    billed = uuid7()
    published = publish_when_tailed(stream, [(billed, usage_envelope(billed))])
    unpublished = publish_when_tailed(stream, payloads, subject=unbillable)
    code, out, err = run(
        capsys, "tail", "--unbillable", "--count", "3", "--timeout", "60", *stream.flags()
    )
    published.result(timeout=60)
    unpublished.result(timeout=60)
    assert code == EXIT_OK
    assert "3 envelopes; unbillable by reason: no_customer 2, no_tenant 1" in err
    header, *rows = [line.split("\t") for line in out.splitlines()]
    assert header[3] == "customer_id" and header[-1] == "unbillable_reason"
    assert [(r[3], r[-1]) for r in rows] == [
        ("", "no_customer"),
        ("cus_42", "no_tenant"),
        ("", "no_customer"),
    ]
    # On a terminal, the totals by reason under the running totals.
    view = TailView()
    for _, data in payloads:
        parsed = parse_envelope(data)
        assert parsed is not None
        view.add(parsed[1])
    console = Console(file=io.StringIO(), width=200, height=60, record=True)
    console.print(view)
    reasons = console.export_text().split("unbillable, by reason")[1]
    assert [line.split() for line in reasons.splitlines() if line.strip().startswith("no_")] == [
        ["no_customer", "2", "240", "62", "-0.047112", "OMR"],
        ["no_tenant", "1", "120", "31", "-0.023556", "OMR"],
    ]
    # Its own subject, given on the command line, and --json: the envelopes as they came.
    other = f"{stream.subject}.unbillable"
    asyncio.run(ensure_stream(stream.url, f"{stream.name}_U", [other]))
    asyncio.run(publish(stream.url, other, payloads[:1]))
    code, out, err = run(
        capsys,
        "tail",
        *("--unbillable", "--unbillable-subject", other, "--all", "--json"),
        *("--count", "1", "--timeout", "60", *stream.flags()),
    )
    assert code == EXIT_OK
    assert json.loads(out)["metadata"]["unbillable_reason"] == "no_customer"
    assert "unbillable by reason: no_customer 1" in err


def test_status_says_how_many_went_to_reconciliation_and_the_latest_why(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    stream: Stream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    unbillable = os.environ["EDGEMETER_UNBILLABLE_SUBJECT"]
    filled_spool(tmp_path / "spool", 1)
    argv = ["status", "--spool-dir", str(tmp_path / "spool"), *stream.flags()]
    code, out, _ = run(capsys, *argv, "--json")
    assert (code, json.loads(out)["broker"]["unbillable"]) == (EXIT_OK, 0)
    keys = [uuid7(), uuid7()]
    payloads = [
        (keys[0], unbillable_envelope(keys[0], "customer")),
        (keys[1], unbillable_envelope(keys[1], "tenant")),
    ]
    asyncio.run(publish(stream.url, unbillable, payloads))
    code, out, _ = run(capsys, *argv, "--json")
    assert code == EXIT_OK  # reconciliation is for the billing team: not the meter's health
    broker = json.loads(out)["broker"]
    assert (broker["unbillable"], broker["unbillable_stream"]) == (2, stream.name)
    assert broker["last_unbillable_reason"] == "no_tenant"
    assert 0 <= broker["last_unbillable_age_s"] < 60
    code, out, _ = run(capsys, *argv)
    assert f"2 on {unbillable} ({stream.name}), last " in out
    assert "ago (no_tenant)" in out

    # Where no stream keeps them, they wait in the spool: that needs attention.
    code, out, _ = run(capsys, *argv, "--json", "--unbillable-subject", "cli.nowhere.unbillable")
    assert code == EXIT_FAILED
    assert json.loads(out)["problems"] == [
        "no stream is bound to the unbillable subject 'cli.nowhere.unbillable': envelopes "
        "sent to reconciliation stay spooled"
    ]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"customer_id": "c"}', None),
        (b'{"metadata": "m"}', None),
        (
            b'{"customer_id": "c", "amount_micro_omr": -5, "metadata": {"tenant_id": "t", "model": "m", "tokens_used": 9}}',
            ("t", "c", "m", 9, 0, -5),
        ),
        (
            b'{"amount_micro_omr": true, "metadata": {"tenant_id": 7, "input_tokens": 4, "output_tokens": "2", "new_field": {}}}',
            ("", "", "", 4, 0, 0),
        ),
    ],
)
def test_envelopes_are_read_open_world(
    data: bytes, expected: tuple[str, str, str, int, int, int] | None
) -> None:
    parsed = parse_envelope(data)
    if expected is None:
        assert parsed is None
        return
    assert parsed is not None
    row = parsed[1]
    assert (
        row.tenant,
        row.customer,
        row.model,
        row.input_tokens,
        row.output_tokens,
        row.amount_micro,
    ) == expected


NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", NOW - timedelta(seconds=90)),
        ("15m", NOW - timedelta(minutes=15)),
        ("2h", NOW - timedelta(hours=2)),
        ("1d", NOW - timedelta(days=1)),
        ("2026-11-22T09:00:00Z", datetime(2026, 11, 22, 9, tzinfo=UTC)),
        ("2026-11-22T09:00:00", datetime(2026, 11, 22, 9, tzinfo=UTC)),
        ("2026-11-22T12:00:00+03:00", datetime(2026, 11, 22, 9, tzinfo=UTC)),
    ],
)
def test_since_is_a_duration_ago_or_a_time(text: str, expected: datetime) -> None:
    assert parse_since(text, NOW) == expected


@pytest.mark.parametrize("text", ["", "h", "-5m", "1.5h", "yesterday", "10x"])
def test_since_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError):
        parse_since(text, NOW)


# -- drain ------------------------------------------------------------------------------------


def test_drain_publishes_every_envelope_once_and_empties_the_spool(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, stream: Stream
) -> None:
    directory = tmp_path / "spool"
    keys = filled_spool(directory, 40)
    before = spool_contents(directory)
    code, out, err = run(capsys, "drain", "--spool-dir", str(directory), *stream.flags())
    assert code == EXIT_OK, err
    assert out == ""
    assert "published 40 envelopes" in err
    assert f"the spool {directory} is empty" in err
    landed = on_stream(stream)
    assert sorted(key for key, _ in landed) == keys
    assert dict(landed) == before
    assert spool_contents(directory) == {}
    code, _, err = run(capsys, "drain", "--spool-dir", str(directory), *stream.flags())
    assert code == EXIT_OK
    assert "published 0 envelopes" in err


@pytest.mark.parametrize("broker", ["down", "without the stream"])
def test_drain_that_cannot_publish_exits_1_with_the_reason_and_loses_nothing(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    broker: str,
    stopped_nats_server: NatsServer,
    module_nats_server: NatsServer,
) -> None:
    directory = tmp_path / "spool"
    filled_spool(directory, 5)
    before = spool_contents(directory)
    url = stopped_nats_server.url if broker == "down" else module_nats_server.url
    reason = "cannot connect to NATS" if broker == "down" else "no JetStream stream is bound"
    subject = f"cli.{uuid.uuid4().hex[:12]}.unbound"
    code, _, err = run(
        capsys,
        "drain",
        "--spool-dir",
        str(directory),
        "--nats-url",
        url,
        "--subject",
        subject,
        "--timeout",
        "0.5",
    )
    assert code == EXIT_FAILED
    assert f"edgemeter: error: 5 envelopes remain in {directory}: " in err
    assert reason in err.rsplit("edgemeter: error:", 1)[1]
    assert spool_contents(directory) == before


def test_drain_leaves_a_running_meters_spool_alone_unless_forced_and_takes_a_dead_ones(
    capsys: pytest.CaptureFixture[str],
    meter_factory: MeterFactory,
    stopped_nats_server: NatsServer,
    stream: Stream,
) -> None:
    # A live meter whose broker is down keeps what it spools; so does its spool here.
    meter = meter_factory.start("http://127.0.0.1:9", stopped_nats_server.url)
    assert meter.proc is not None
    spool = ["--spool-dir", str(meter.spool_dir), *stream.flags()]
    deadline = time.monotonic() + 60
    while in_use_by(meter.spool_dir) is None:  # it listens before it has opened its spool
        assert time.monotonic() < deadline, "the meter never opened its spool"
        time.sleep(0.05)
    first = filled_spool(meter.spool_dir, 3)  # diskcache is process-safe: the meter has it open

    code, out, _ = run(capsys, "status", "--json", *spool)
    assert json.loads(out)["spool"]["in_use_by"] == meter.proc.pid
    code, _, err = run(capsys, "drain", *spool)
    assert code == EXIT_FAILED
    assert f"process {meter.proc.pid} has this spool open" in err
    assert sorted(spool_contents(meter.spool_dir)) == first

    code, _, err = run(capsys, "drain", "--force", *spool)
    assert code == EXIT_OK, err
    second = filled_spool(meter.spool_dir, 2)

    # The Pod dies: its files stay behind, and nobody holds them any more.
    meter.proc.kill()
    meter.proc.wait()
    code, out, _ = run(capsys, "status", "--json", *spool)
    assert json.loads(out)["spool"]["in_use_by"] is None
    code, _, err = run(capsys, "drain", *spool)
    assert code == EXIT_OK, err
    assert sorted(key for key, _ in on_stream(stream)) == first + second
    assert spool_contents(meter.spool_dir) == {}


def test_drain_leaves_a_spool_another_process_publishes_alone(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, stream: Stream
) -> None:
    directory = tmp_path / "spool"
    keys = filled_spool(directory, 4)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(directory)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        code, _, err = run(capsys, "drain", "--spool-dir", str(directory), *stream.flags())
        assert code == EXIT_FAILED
        assert f"process {holder.pid} publishes this spool now" in err
        assert sorted(spool_contents(directory)) == keys
    finally:
        holder.kill()
        holder.wait()
    code, _, err = run(capsys, "drain", "--spool-dir", str(directory), *stream.flags())
    assert code == EXIT_OK, err
    assert spool_contents(directory) == {}


# A publisher of a spool in another process: it holds the spool's lock, not its database.
HOLD_LOCK = """
import sys, time
from pathlib import Path
from spool.lock import SpoolLock
lock = SpoolLock(Path(sys.argv[1]))
print("held" if lock.acquire_nowait() else "refused", flush=True)
time.sleep(60)
"""


# -- serve ------------------------------------------------------------------------------------


def test_serve_hands_the_rest_of_the_command_line_to_the_lean_runner() -> None:
    script = str(Path(sys.executable).parent / "edgemeter")
    done = subprocess.run(
        [script, "serve", "--no-meter", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"COLUMNS": "100"},
    )
    # The runner's own help (mitmdump's flags), not a parser of ours; its exit code is the
    # runner's too: mitmproxy's runners exit 1 after --help, as mitmdump does.
    assert done.stdout.startswith("usage: edgemeter serve [options]")
    assert "--mode" in done.stdout
    assert "--no-meter" in done.stdout
    assert done.returncode == 1


def test_on_a_short_terminal_the_table_keeps_the_totals_in_view() -> None:
    view = TailView(last=50)
    for n in range(30):
        parsed = parse_envelope(usage_envelope(uuid7(), f"t_{n % 2}"))
        assert parsed is not None
        view.add(parsed[1])
    view.malformed = 1  # a caption line too
    console = Console(width=80, height=24, file=io.StringIO(), force_terminal=False)
    with console.capture() as captured:
        console.print(view)
    lines = captured.get().rstrip("\n").splitlines()
    assert len(lines) <= 24
    assert any(line.strip().startswith("t_1 ") for line in lines[-4:])  # the totals' last row
    assert lines[0].startswith("last ") and "of 30 envelopes" in lines[0]
