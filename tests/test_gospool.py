"""`edgemeter go-spool`: the Go sidecar's spool directory, as its publisher.go writes it,
published to a real nats-server as the Go sidecar would have (the bytes, Nats-Msg-Id)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from edgemeter.cli.main import main
from tools.harness import NatsServer
from tools.streams import ensure_stream, stream_messages

STREAM = "CATALYST_SME"


def go_envelope(request_id: str, customer: str = "cus_42") -> bytes:
    """What the Go sidecar's json.Marshal makes of its UsageRecordedPayload: compact, in its
    struct's field order."""
    metadata = (
        f'"metadata":{{"tokens_used":151,"model":"gpt-4o-mini","request_id":"{request_id}",'
        '"tenant_id":"t_7","latency_ms":812,"completed_at":"2026-11-22T10:00:00Z"}'
    )
    return (
        f'{{"customer_id":"{customer}","amount_omr":-0.023556,"amount_micro_omr":-23556,'
        f'"reason":"usage:newapi:gpt-4o-mini",{metadata}}}'
    ).encode()


def safe_filename(request_id: str) -> str:
    """publisher.go's safeFilename: [A-Za-z0-9_-] kept, anything else '_'."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in request_id)


@pytest.fixture
def go_spool(tmp_path: Path) -> Path:
    directory = tmp_path / "metering-sidecar-spool"
    directory.mkdir()
    for request_id in ("req-1", "0193f0c2-7a/b"):
        (directory / f"{safe_filename(request_id)}.json").write_bytes(go_envelope(request_id))
    return directory


def published(url: str) -> dict[str, bytes]:
    return {
        (headers or {})["Nats-Msg-Id"]: data
        for headers, data in asyncio.run(stream_messages(url, STREAM))
    }


def run(directory: Path, url: str, *extra: str) -> int:
    return main(["go-spool", str(directory), "--nats-url", url, *extra])


def test_every_envelope_is_published_as_the_go_sidecar_would_and_then_removed(
    go_spool: Path, nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(ensure_stream(nats_server.url))
    assert run(go_spool, nats_server.url) == 0
    assert published(nats_server.url) == {
        "req-1": go_envelope("req-1"),
        "0193f0c2-7a/b": go_envelope("0193f0c2-7a/b"),
    }
    assert list(go_spool.iterdir()) == []
    assert "published 2 envelopes" in capsys.readouterr().err


def test_a_rerun_is_dropped_by_the_broker_as_a_duplicate(
    go_spool: Path, nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(ensure_stream(nats_server.url))
    assert run(go_spool, nats_server.url, "--keep") == 0
    assert run(go_spool, nats_server.url) == 0
    assert len(published(nats_server.url)) == 2
    assert "(2 the stream had already)" in capsys.readouterr().err


def test_what_is_not_an_envelope_with_a_request_id_stays_and_is_named(
    go_spool: Path, nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(ensure_stream(nats_server.url))
    (go_spool / "anon-1764000000000000000.json").write_bytes(go_envelope(""))
    (go_spool / "broken.json").write_bytes(b'{"customer_id":')
    (go_spool / "req-9.tmp").write_bytes(b"{")  # a write the Go sidecar never renamed
    assert run(go_spool, nats_server.url) == 1
    assert set(published(nats_server.url)) == {"req-1", "0193f0c2-7a/b"}
    assert sorted(p.name for p in go_spool.iterdir()) == [
        "anon-1764000000000000000.json", "broken.json", "req-9.tmp",
    ]  # fmt: skip
    err = capsys.readouterr().err
    assert "anon-1764000000000000000.json stays: no metadata.request_id" in err
    assert "broken.json stays: not JSON" in err
    assert "skipped req-9.tmp" in err


def test_without_a_stream_nothing_is_removed(
    go_spool: Path, nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(p.name for p in go_spool.iterdir())
    assert run(go_spool, nats_server.url) == 1
    assert sorted(p.name for p in go_spool.iterdir()) == before
    assert "no stream is bound to catalyst.usage.recorded" in capsys.readouterr().err


def test_an_unreachable_broker_leaves_the_files(
    go_spool: Path, stopped_nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(p.name for p in go_spool.iterdir())
    assert run(go_spool, stopped_nats_server.url, "--timeout", "1") == 1
    assert sorted(p.name for p in go_spool.iterdir()) == before
    assert "cannot connect to NATS" in capsys.readouterr().err


def test_the_go_envelope_of_these_tests_is_json() -> None:
    assert json.loads(go_envelope("x"))["metadata"]["request_id"] == "x"
