from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow, tutils

from edgemeter.addon import Meter, headers_get, set_body
from spool.journal import records, segments
from tests.corpus import is_stream, wire_body
from tests.flows import KEY, make_flow, run_flow, spooled


@pytest.mark.parametrize(
    ("fixture", "tokens_used", "model", "api_path"),
    [
        ("openai-chat-nonstream.json", 379, "gpt-4.1-nano-2025-04-14", "/v1/chat/completions"),
        ("openai-chat-stream-tool-call-usage.raw.sse", 68, "gpt-4o-mini-2024-07-18", "/v1/chat/completions"),
        ("anthropic-messages-nonstream.json", 41, "claude-sonnet-4-5-20250929", "/v1/messages"),
        ("anthropic-messages-stream-simple.raw.sse", 25, "claude-sonnet-4-5-20250929", "/v1/messages"),
    ],
)  # fmt: skip
async def test_a_recorded_answer_is_spooled_as_one_envelope(
    meter: tuple[Meter, Any],
    recorded: Path,
    fixture: str,
    tokens_used: int,
    model: str,
    api_path: str,
) -> None:
    addon, _ = meter
    path = recorded / fixture
    body = wire_body(path)
    sent = await run_flow(addon, make_flow(api_path), 200, body, is_stream(path))
    assert sent == body
    [env] = spooled(addon)
    meta = env["metadata"]
    assert meta["tokens_used"] == tokens_used
    assert env["amount_micro_omr"] == -tokens_used * 156
    assert env["customer_id"] == "cus_42" and meta["tenant_id"] == "t_7"
    assert meta["model"] == model
    assert env["reason"] == f"usage:newapi:{model.lower()}"
    assert meta["stream"] is is_stream(path)
    assert meta["outcome"] == "complete" and meta["usage_source"] == "reported"
    assert meta["client_request_id"] == "client-req-1"
    assert uuid.UUID(meta["request_id"]).version == 7
    assert meta["request_id"] != "client-req-1"
    assert meta["api_key_fingerprint"] and KEY not in json.dumps(env)


async def test_two_requests_with_one_client_id_get_two_request_ids(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    addon, _ = meter
    body = wire_body(recorded / "openai-chat-nonstream.json")
    for _ in range(2):
        await run_flow(addon, make_flow(), 200, body, stream=False)
    ids = {env["metadata"]["request_id"] for env in spooled(addon)}
    assert len(ids) == 2


@pytest.mark.parametrize("status", [400, 401, 429, 500, 503])
async def test_non_2xx_bills_nothing(meter: tuple[Meter, Any], status: int) -> None:
    addon, _ = meter
    body = b'{"error":{"message":"no"},"usage":{"prompt_tokens":5,"completion_tokens":5}}'
    await run_flow(addon, make_flow(), status, body, stream=False)
    assert spooled(addon) == []
    assert addon.stats.unmetered["non_2xx"] == 1


@pytest.mark.parametrize(
    ("path", "method"),
    [("/v1/models", "GET"), ("/api/user/self", "POST"), ("/v1/chat/completions", "GET")],
)
async def test_unmetered_paths_and_methods_produce_nothing(
    meter: tuple[Meter, Any], recorded: Path, path: str, method: str
) -> None:
    addon, _ = meter
    body = wire_body(recorded / "openai-chat-nonstream.json")
    await run_flow(addon, make_flow(path, method), 200, body, stream=False)
    assert spooled(addon) == []
    assert addon.flows == {}


async def test_replayed_flows_are_not_billed_twice(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    addon, _ = meter
    flow = make_flow()
    flow.is_replay = "request"
    await run_flow(addon, flow, 200, wire_body(recorded / "openai-chat-nonstream.json"), False)
    assert spooled(addon) == []


async def test_the_requested_model_is_used_when_the_answer_names_none(
    meter: tuple[Meter, Any],
) -> None:
    addon, _ = meter
    body = b'{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}'
    await run_flow(addon, make_flow(), 200, body, stream=False)
    [env] = spooled(addon)
    assert env["metadata"]["model"] == "requested-model"


def streaming(addon: Meter, flow: http.HTTPFlow) -> Callable[[bytes], Iterable[bytes] | bytes]:
    """The meter's stream callable for `flow`, its request seen and an SSE answer begun."""
    addon.requestheaders(flow)
    addon.request(flow)
    flow.response = tutils.tresp(headers=http.Headers(content_type="text/event-stream"))
    addon.responseheaders(flow)
    stream = flow.response.stream
    assert callable(stream)
    return stream


async def test_a_client_abort_bills_the_usage_reported_so_far(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    addon, _ = meter
    flow = make_flow("/v1/messages")
    body = wire_body(recorded / "anthropic-messages-stream-simple.raw.sse")
    streaming(addon, flow)(body[: body.index(b"event: ping")])  # message_start only
    flow.error = tflow.terr()
    pending = addon.error(flow)
    if pending is not None:  # else committed before the hook returned (nothing in flight)
        await pending
    [env] = spooled(addon)
    assert env["metadata"]["outcome"] == "client_aborted"
    assert env["metadata"]["input_tokens"] == 20
    assert env["metadata"]["output_tokens"] == 1


async def test_an_upstream_error_event_in_a_2xx_stream_bills_reported_usage(
    meter: tuple[Meter, Any],
) -> None:
    addon, _ = meter
    body = (
        b'data: {"id":"c1","model":"m","choices":[],"usage":{"prompt_tokens":9,'
        b'"completion_tokens":2,"total_tokens":11}}\n\n'
        b'data: {"error":{"message":"overloaded"}}\n\n'
    )
    await run_flow(addon, make_flow(), 200, body, stream=True)
    [env] = spooled(addon)
    assert env["metadata"]["outcome"] == "upstream_error"
    assert env["metadata"]["tokens_used"] == 11


async def test_garbage_streams_pass_through_untouched_and_are_estimated(
    meter: tuple[Meter, Any],
) -> None:
    addon, _ = meter
    body = bytes(range(256)) * 40 + b"\r\n\r\ndata: {not json}\n\n"
    sent = await run_flow(addon, make_flow(), 200, body, stream=True, size=13)
    assert sent == body
    [env] = spooled(addon)
    assert env["metadata"]["usage_source"] == "estimated"
    assert env["metadata"]["tokens_used"] > 0


async def test_a_spool_failure_never_breaks_the_response(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    addon, _ = meter
    assert addon.spool is not None
    addon.spool.close()
    body = wire_body(recorded / "openai-chat-nonstream.json")
    await run_flow(addon, make_flow(), 200, body, stream=False)
    assert addon.stats.spool_failures == {"write_failed": 1}


def fill_spool(addon: Meter, size: int) -> None:
    assert addon.spool is not None
    addon.spool.submit("0000-filler", b"x" * size).result(timeout=10)


async def test_a_full_spool_keeps_serving_and_counts_what_it_could_not_spool(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    addon, tctx = meter
    tctx.configure(addon, meter_spool_max_mb=1)
    fill_spool(addon, 1024 * 1024)
    body = wire_body(recorded / "openai-chat-nonstream.json")
    flow = make_flow()
    sent = await run_flow(addon, flow, 200, body, stream=False)
    assert sent == body and flow.response is not None and flow.response.status_code == 200
    assert addon.stats.spool_failures == {"full": 1}
    assert addon.spool is not None and len(addon.spool) == 1  # the filler only
    assert "spool failures: full 1" in addon.status()


async def test_a_full_spool_rejects_metered_requests_before_the_upstream(
    meter: tuple[Meter, Any],
) -> None:
    addon, tctx = meter
    tctx.configure(addon, meter_spool_max_mb=1, meter_on_spool_full="reject")
    fill_spool(addon, 1024 * 1024)
    flow = make_flow()
    addon.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 503
    assert json.loads(flow.response.content or b"")["error"]["code"] == "meter_spool_full"
    assert flow.id not in addon.flows
    assert addon.stats.rejected == 1

    unmetered = make_flow("/v1/models", method="GET")
    addon.requestheaders(unmetered)
    assert unmetered.response is None  # only metered requests are refused


async def test_reject_mode_serves_again_once_the_spool_has_room(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    addon, tctx = meter
    tctx.configure(addon, meter_spool_max_mb=1, meter_on_spool_full="reject")
    fill_spool(addon, 1024 * 1024)
    assert addon.spool is not None
    addon.spool.delete(["0000-filler"])
    body = wire_body(recorded / "openai-chat-nonstream.json")
    flow = make_flow()
    await run_flow(addon, flow, 200, body, stream=False)
    assert flow.response is not None and flow.response.status_code == 200
    assert addon.stats.rejected == 0
    assert len(spooled(addon)) == 1


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("meter_nats_url", "http://nats:4222"),
        ("meter_stream_usage", "sometimes"),
        ("meter_currency", "rial"),
        ("meter_metrics_max_models", -1),
    ],
)
def test_a_bad_option_is_an_options_error_naming_it(
    meter: tuple[Meter, Any], option: str, value: str
) -> None:
    addon, tctx = meter
    with pytest.raises(exceptions.OptionsError, match=option):
        tctx.configure(addon, **{option: value})


async def test_the_model_label_cap_is_an_option(meter: tuple[Meter, Any], recorded: Path) -> None:
    addon, tctx = meter
    tctx.configure(addon, meter_metrics_max_models=1)
    for fixture in ("openai-chat-nonstream.json", "anthropic-messages-nonstream.json"):
        api_path = "/v1/messages" if fixture.startswith("anthropic") else "/v1/chat/completions"
        await run_flow(addon, make_flow(api_path), 200, wire_body(recorded / fixture), False)
    models = {labels[2] for labels in addon.snapshot().genai.duration.series}
    assert models == {"gpt-4.1-nano-2025-04-14", "other"}


def test_an_unwritable_spool_dir_stops_startup(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    addon = Meter()
    with taddons.context(addon) as tctx, pytest.raises(exceptions.OptionsError, match="spool"):
        tctx.configure(addon, meter_spool_dir=str(blocker / "spool"))


async def test_status_reports_what_was_metered(meter: tuple[Meter, Any], recorded: Path) -> None:
    addon, _ = meter
    await run_flow(
        addon, make_flow(), 200, wire_body(recorded / "openai-chat-nonstream.json"), False
    )
    await run_flow(addon, make_flow(), 500, b"{}", False)
    status = addon.status()
    assert "spooled: 1" in status
    assert "metered openai.chat complete reported: 1" in status
    assert "not metered (non_2xx): 1" in status


def streamed_chat_flow(body: dict[str, Any]) -> http.HTTPFlow:
    flow = make_flow()
    flow.request.content = json.dumps(body).encode()
    return flow


STREAM_REQUEST = {
    "model": "gpt-4o-mini",
    "stream": True,
    "messages": [{"role": "user", "content": "hi"}],
}


@pytest.mark.parametrize(
    ("mode", "asked", "injected", "stripped"),
    [
        ("inject-strip", False, True, True),
        ("inject-strip", True, False, False),
        ("inject", False, True, False),
        ("off", False, False, False),
    ],
)
async def test_stream_usage_modes(
    meter: tuple[Meter, Any], recorded: Path, mode: str, asked: bool, injected: bool, stripped: bool
) -> None:
    addon, tctx = meter
    tctx.configure(addon, meter_stream_usage=mode)
    request = (
        dict(STREAM_REQUEST, stream_options={"include_usage": True}) if asked else STREAM_REQUEST
    )
    flow = streamed_chat_flow(request)
    body = wire_body(recorded / "openai-chat-stream-tool-call-usage.raw.sse")
    sent = await run_flow(addon, flow, 200, body, stream=True)
    sent_request = json.loads(flow.request.content or b"")
    assert sent_request.get("stream_options", {}).get("include_usage", False) is (asked or injected)
    assert {k: v for k, v in sent_request.items() if k != "stream_options"} == {
        k: v for k, v in request.items() if k != "stream_options"
    }
    if stripped:
        usage_event = next(e for e in body.split(b"\n\n") if b'"usage":{' in e) + b"\n\n"
        assert sent == body.replace(usage_event, b"")
    else:
        assert sent == body
    [env] = spooled(addon)
    assert env["metadata"]["tokens_used"] == 68


async def test_a_malformed_request_body_is_never_rewritten(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    addon, _ = meter
    flow = make_flow()
    flow.request.content = b'{"stream": true, "messages": ['
    await run_flow(
        addon, flow, 200, wire_body(recorded / "openai-chat-stream-tool-call-usage.raw.sse"), True
    )
    assert flow.request.content == b'{"stream": true, "messages": ['


async def test_a_client_abort_without_usage_is_estimated(meter: tuple[Meter, Any]) -> None:
    addon, _ = meter
    flow = streamed_chat_flow(
        {**STREAM_REQUEST, "messages": [{"role": "user", "content": "x" * 400}]}
    )
    stream = streaming(addon, flow)
    for _ in range(10):
        stream(b'data: {"model":"m","choices":[{"delta":{"content":"' + b"y" * 40 + b'"}}]}\n\n')
    flow.error = tflow.terr()
    pending = addon.error(flow)
    if pending is not None:  # else committed before the hook returned (nothing in flight)
        await pending
    [env] = spooled(addon)
    meta = env["metadata"]
    assert (meta["outcome"], meta["usage_source"]) == ("client_aborted", "estimated")
    assert meta["output_tokens"] == 100  # 400 characters streamed, 4 a token
    assert meta["input_tokens"] == 100 + 4  # 400 characters asked, plus one message


async def test_a_price_table_prices_matching_models(
    meter: tuple[Meter, Any], recorded: Path, tmp_path: Path
) -> None:
    addon, tctx = meter
    table = tmp_path / "prices.toml"
    table.write_text(
        'version = "t1"\n[models."gpt-4.1-nano*"]\ninput = 1000000\noutput = 2000000\n'
    )
    tctx.configure(addon, meter_prices=str(table))
    await run_flow(
        addon, make_flow(), 200, wire_body(recorded / "openai-chat-nonstream.json"), False
    )
    await run_flow(
        addon,
        make_flow("/v1/messages"),
        200,
        wire_body(recorded / "anthropic-messages-nonstream.json"),
        False,
    )
    priced, flat = spooled(addon)
    assert priced["metadata"]["price_version"] == "t1:gpt-4.1-nano*"
    assert priced["amount_micro_omr"] == -(16 * 1 + 363 * 2)
    assert flat["metadata"]["price_version"] == "flat:156"


def test_a_malformed_price_table_stops_startup(meter: tuple[Meter, Any], tmp_path: Path) -> None:
    addon, tctx = meter
    table = tmp_path / "prices.toml"
    table.write_text('version = "t1"\n[models."m"]\ninput = "cheap"\n')
    with pytest.raises(exceptions.OptionsError, match="meter_prices"):
        tctx.configure(addon, meter_prices=str(table))


async def test_anthropic_counts_in_openai_shape_add_cache_reads(meter: tuple[Meter, Any]) -> None:
    addon, tctx = meter
    tctx.configure(addon, meter_anthropic_counts="/v1/chat/completions@claude-*")
    body = (
        b'{"model":"claude-sonnet-4-5","usage":{"prompt_tokens":10,"completion_tokens":5,'
        b'"total_tokens":15,"prompt_tokens_details":{"cached_tokens":1000}}}'
    )
    await run_flow(addon, make_flow(), 200, body, False)
    [env] = spooled(addon)
    meta = env["metadata"]
    assert (meta["input_tokens"], meta["cached_input_tokens"], meta["tokens_used"]) == (
        1010,
        1000,
        1015,
    )


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
async def test_an_encoded_answer_is_metered_and_reaches_the_client_still_encoded(
    meter: tuple[Meter, Any], recorded: Path, encoding: str
) -> None:
    addon, _ = meter
    flow = make_flow()
    addon.requestheaders(flow)
    addon.request(flow)
    body = wire_body(recorded / "openai-chat-nonstream.json")
    flow.response = tutils.tresp(headers=http.Headers(content_type="application/json"))
    flow.response.headers["content-encoding"] = encoding
    flow.response.content = body  # mitmproxy encodes it, as the upstream sent it
    raw = flow.response.raw_content
    assert raw != body
    addon.responseheaders(flow)
    pending = addon.response(flow)
    if pending is not None:  # else committed before the hook returned (nothing in flight)
        await pending
    assert flow.response.raw_content == raw
    assert flow.response.headers["content-encoding"] == encoding
    [env] = spooled(addon)
    assert env["metadata"]["tokens_used"] == 379


def test_a_file_that_is_not_nats_credentials_stops_startup(tmp_path: Path) -> None:
    seed_only = tmp_path / "user.nk"
    seed_only.write_text(
        "-----BEGIN USER NKEY SEED-----\nSUAxxxx\n------END USER NKEY SEED------\n"
    )
    addon = Meter()
    with (
        taddons.context(addon) as tctx,
        pytest.raises(exceptions.OptionsError, match="meter_nats_creds: not a NATS credentials"),
    ):
        tctx.configure(
            addon, meter_spool_dir=str(tmp_path / "spool"), meter_nats_creds=str(seed_only)
        )


@pytest.mark.parametrize(
    ("fixture", "path"),
    [
        ("openai-chat-stream-tool-call-usage.raw.sse", "/v1/chat/completions"),
        ("anthropic-messages-stream-simple.raw.sse", "/v1/messages"),
        ("openai-responses-stream.raw.sse", "/v1/responses"),
    ],
)
async def test_a_stream_is_spooled_when_its_last_event_is_parsed_before_the_client_gets_it(
    meter: tuple[Meter, Any], recorded: Path, fixture: str, path: str
) -> None:
    """A client stops reading at [DONE] / message_stop / response.completed: the envelope's
    commit must already be under way when that event leaves, not at the end of the body."""
    addon, _ = meter
    body = wire_body(recorded / fixture)
    flow = make_flow(path)
    stream = streaming(addon, flow)
    assert flow.response is not None
    flow.response.content = b""
    last = body.rindex(b"data:")  # the start of the last event
    stream(body[:last])
    assert addon.flows[flow.id].early is None
    stream(body[last:])  # the last event: spooled before it is returned to mitmproxy
    routed, future, _, _ = addon.flows[flow.id].early
    envelope = routed.envelope
    assert future.done()  # the only request in flight: committed before the event goes on
    assert [e["metadata"]["request_id"] for e in spooled(addon)] == [
        envelope["metadata"]["request_id"]
    ]
    stream(b"")
    assert addon.response(flow) is None  # nothing left to await
    [env] = spooled(addon)  # still one: the end of the flow does not spool it again
    assert env == envelope
    assert addon.stats.metered[(env["metadata"]["api"], "complete", "reported")] == 1


@pytest.mark.parametrize(
    ("path", "method", "reason"),
    [
        ("/v1/models", "GET", "unknown_endpoint"),
        ("/v1/chat/completions", "GET", "unknown_endpoint"),
        ("/v1/chat/completions/chatcmpl-1", "POST", "unknown_endpoint"),
        ("/v1/moderations", "POST", "free"),
    ],
)
async def test_a_request_on_a_metered_path_without_an_envelope_is_counted(
    meter: tuple[Meter, Any], recorded: Path, path: str, method: str, reason: str
) -> None:
    addon, _ = meter
    body = wire_body(recorded / "openai-moderations.json")
    await run_flow(addon, make_flow(path, method), 200, body, stream=False)
    assert spooled(addon) == []
    assert addon.stats.unmetered == {reason: 1}


async def test_any_other_post_that_reports_usage_is_billed_as_generic(
    meter: tuple[Meter, Any],
) -> None:
    addon, _ = meter
    body = b'{"id":"run_1","model":"gpt-4o","usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}'
    await run_flow(addon, make_flow("/v1/threads/thread_1/runs"), 200, body, stream=False)
    [env] = spooled(addon)
    assert (env["metadata"]["api"], env["metadata"]["tokens_used"]) == ("generic", 10)


async def test_units_without_a_price_are_counted_and_told_once_per_model(
    meter: tuple[Meter, Any], recorded: Path, caplog: pytest.LogCaptureFixture
) -> None:
    addon, _ = meter
    body = wire_body(recorded / "openai-audio-transcriptions-whisper-duration.json")
    for _ in range(3):
        await run_flow(addon, make_flow("/v1/audio/transcriptions"), 200, body, stream=False)
    assert [env["metadata"]["units"] for env in spooled(addon)] == [{"audio_ms": 7000}] * 3
    assert addon.stats.anomalies == {"unpriced": 3}
    told = [r for r in caplog.records if "has no price for" in r.getMessage()]
    assert len(told) == 1 and "audio_ms" in told[0].getMessage()


def test_headers_are_read_as_mitmproxy_reads_them() -> None:
    headers = http.Headers(
        [
            (b"Content-Type", b"application/json"),
            (b"CONTENT-ENCODING", b"gzip"),
            (b"x-other", b"1"),
            (b"content-encoding", b"br"),
            (b"content-type", b"caf\xc3\xa9 \xff"),
        ]
    )
    for first, second in (("content-encoding", "content-type"), ("x-other", "absent")):
        got = headers_get(headers.fields, first.encode(), second.encode())
        assert got == (headers.get(first, ""), headers.get(second, ""))
    assert headers_get(http.Headers().fields, b"content-type") == ("", "")


async def test_remembered_routes_are_routed_as_each_request_would_be(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    from edgemeter import addon as module

    addon, _ = meter
    body = wire_body(recorded / "openai-chat-nonstream.json")
    # The same path by another method, again and again: each routed as it asks.
    for method in ("GET", "POST", "GET", "POST"):
        await run_flow(addon, make_flow("/v1/chat/completions", method), 200, body, False)
    envelopes = spooled(addon)
    assert [env["metadata"]["path"] for env in envelopes] == ["/v1/chat/completions"] * 2
    assert addon.stats.unmetered == {"unknown_endpoint": 2}
    # A query is routed by its path and left out of metadata.path, remembered or not.
    for _ in range(2):
        await run_flow(addon, make_flow("/v1/chat/completions?x=1"), 200, body, False)
    assert [env["metadata"]["path"] for env in spooled(addon)[2:]] == ["/v1/chat/completions"] * 2
    # Bounded: many paths, long ones never kept.
    for i in range(module._MAX_ROUTED_PATHS + 10):
        addon.requestheaders(make_flow(f"/v1/x{i}/chat/completions", "GET"))
    addon.requestheaders(make_flow("/v1/" + "y" * module._MAX_ROUTED_PATH_CHARS, "GET"))
    assert 0 < len(addon._routes) <= module._MAX_ROUTED_PATHS
    assert all(len(path) <= module._MAX_ROUTED_PATH_CHARS for path, _ in addon._routes)


def answered_chat(addon: Meter, recorded: Path) -> http.HTTPFlow:
    """A chat request the meter saw, answered by the recorded JSON, before its response hook."""
    flow = make_flow()
    addon.requestheaders(flow)
    addon.request(flow)
    flow.response = tutils.tresp(headers=http.Headers(content_type="application/json"))
    flow.response.content = wire_body(recorded / "openai-chat-nonstream.json")
    addon.responseheaders(flow)
    return flow


def journaled(addon: Meter) -> list[str]:
    """Request ids appended to the spool's journal and not moved into its database yet."""
    assert addon.spool is not None
    return [
        key for path in segments(addon.spool.directory) for key, _ in records(path.read_bytes())[0]
    ]


async def test_the_envelope_is_on_disk_in_the_journal_when_the_response_hook_returns(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    addon, _ = meter
    flows = [answered_chat(addon, recorded) for _ in range(2)]
    # Another request in flight or not, nothing is left to await: no batch to wait for.
    assert addon.response(flows[0]) is None and addon.response(flows[1]) is None
    ids = [flow.metadata["edgemeter"]["metadata"]["request_id"] for flow in flows]
    assert journaled(addon) == ids
    assert [env["metadata"]["request_id"] for env in spooled(addon)] == ids
    assert journaled(addon) == []  # in the database now, the journal's segment gone


async def test_without_the_journal_the_response_hook_awaits_the_commit(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    addon, tctx = meter
    tctx.configure(addon, meter_spool_sync="full")  # a synced commit per batch, no journal
    flow = answered_chat(addon, recorded)
    pending = addon.response(flow)
    assert pending is not None and spooled(addon) == [] and journaled(addon) == []
    await pending
    [env] = spooled(addon)
    assert env["metadata"]["tokens_used"] == 379


async def test_a_streams_envelope_is_journaled_at_its_last_event(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    addon, _ = meter
    other = make_flow()
    addon.requestheaders(other)  # still in flight when the stream ends
    flow = make_flow("/v1/messages")
    streaming(addon, flow)(wire_body(recorded / "anthropic-messages-stream-simple.raw.sse"))
    _, future, _, _ = addon.flows[flow.id].early
    assert future.done() and future.exception() is None
    assert journaled(addon) == [addon.flows[flow.id].request.request_id]
    assert len(spooled(addon)) == 1


@pytest.mark.parametrize(
    "fields",
    [
        [],
        [(b"Content-Length", b"12")],
        [(b"content-type", b"application/json"), (b"CONTENT-LENGTH", b"12"), (b"x-a", b"1")],
        [(b"content-length", b"12"), (b"x-a", b"1"), (b"Content-Length", b"13")],
        [(b"Transfer-Encoding", b"chunked"), (b"x-a", b"1")],
        [(b"content-length", b"12"), (b"transfer-encoding", b"chunked")],
    ],
)
def test_set_body_leaves_what_mitmproxy_content_setter_leaves(
    fields: list[tuple[bytes, bytes]],
) -> None:
    # The request hook rewrites an unencoded body with set_body instead of `.content =`.
    ours, theirs = tutils.treq(), tutils.treq()
    for request in (ours, theirs):
        request.headers.fields = tuple(fields)
        request.raw_content = b'{"stream":true}'
    set_body(ours, b'{"a":1,"stream":true}')
    theirs.content = b'{"a":1,"stream":true}'
    assert ours.headers.fields == theirs.headers.fields
    assert ours.raw_content == theirs.raw_content
