"""The `edgemeter` operator command: status, tail, drain, dead list|export|requeue and serve,
their help, errors and exit codes, against real nats-server processes and real spools."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import pytest

from edgemeter.cli import main
from edgemeter.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from edgemeter.cli.spooldir import in_use_by
from edgemeter.cli.tail import parse_envelope, parse_since
from edgemeter.ids import uuid7
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
def stream(module_nats_server: NatsServer) -> Stream:
    """A stream of its own on the module's broker, bound to a subject of its own."""
    tag = uuid.uuid4().hex[:12]
    made = Stream(module_nats_server.url, f"CLI_{tag}", f"cli.{tag}.usage")
    asyncio.run(ensure_stream(made.url, made.name, [made.subject]))
    return made


def usage_envelope(
    key: str, tenant: str = "t_7", model: str = "gpt-4o-mini", tokens: tuple[int, int] = (120, 31)
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
        customer_id="cus_42",
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
    stream: Stream, payloads: list[tuple[str, bytes]]
) -> concurrent.futures.Future[None]:
    """Publish from another thread once a consumer (the tail's) is on the stream, so a tail of
    new messages only sees every one of them."""

    async def publish() -> None:
        nc = await nats.connect(stream.url, connect_timeout=5)
        try:
            jsm, js = nc.jsm(), nc.jetstream()
            deadline = time.monotonic() + 60
            while (await jsm.stream_info(stream.name)).state.consumer_count == 0:
                assert time.monotonic() < deadline, "the tail never subscribed"
                await asyncio.sleep(0.05)
            for key, data in payloads:
                await js.publish(stream.subject, data, headers={"Nats-Msg-Id": key})
        finally:
            await nc.close()

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(asyncio.run, publish())
    finally:
        pool.shutdown(wait=False)


def table_rows(text: str) -> list[list[str]]:
    """The cells of each body row of a rich table."""
    return [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if "│" in line]


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


def test_tail_shows_envelopes_published_meanwhile_with_totals_and_skips_malformed_ones(
    capsys: pytest.CaptureFixture[str], stream: Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
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
    recent, totals = out.split("totals")
    assert [row[1] for row in table_rows(recent)] == ["t_1", "t_1", "t_2"]
    assert table_rows(recent)[0][2:8] == [
        "cus_42",
        "gpt-4o-mini",
        "openai.chat",
        "100",
        "10",
        "-0.017160",
    ]
    assert table_rows(totals) == [
        ["t_1", "gpt-4o-mini", "2", "150", "15", "-0.025740", "OMR"],
        ["t_2", "claude-sonnet-4", "1", "7", "3", "-0.001560", "OMR"],
    ]
    assert "2 malformed messages skipped" in totals


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
