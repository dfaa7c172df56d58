"""CPU and Python calls per non-streamed request of the meter's hooks, in process: a `Meter`
configured as the tests configure it, `requestheaders` to the encoded envelope handed to a spool
replaced by a future already done (so the spool and the publisher are not measured), on flows
built beforehand with a recorded answer per API shape (docs/PERFORMANCE.md).

    python tools/hook_cost.py                       # this tree
    python tools/hook_cost.py --against /tmp/old    # old and this tree alternated, in rounds

Run as a file, not with -m: with --against, each round runs this file with PYTHONPATH set to one
tree, so the tree measured need not have it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
FORM_FIELDS = {"model": "gpt-4o-transcribe"}

# shape: (path, recorded answer, request body, request Content-Type); the bodies are what the
# corpus (tests/test_corpus.py) sends with those recordings.
CASES: dict[str, tuple[str, str, str, str]] = {
    "chat": (
        "/v1/chat/completions",
        "openai-chat-nonstream.json",
        '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}',
        "application/json",
    ),
    "responses": (
        "/v1/responses",
        "openai-responses-nonstream.json",
        '{"model":"gpt-4o-mini","input":"hello"}',
        "application/json",
    ),
    "anthropic": (
        "/v1/messages",
        "anthropic-messages-nonstream.json",
        '{"model":"claude-3-5-haiku","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}',
        "application/json",
    ),
    "embeddings": (
        "/v1/embeddings",
        "openai-embeddings-base64.json",
        '{"model":"text-embedding-3-small","input":"hello"}',
        "application/json",
    ),
    "images": (
        "/v1/images/generations",
        "openai-images-generations-gpt-image-1.json",
        '{"model":"gpt-image-1.5","prompt":"A cute baby sea otter","n":1,"size":"1024x1024"}',
        "application/json",
    ),
    "transcription": (
        "/v1/audio/transcriptions",
        "openai-audio-transcriptions-gpt-4o-transcribe-tokens.json",
        "",  # a multipart upload: made by tests.corpus.form
        "",
    ),
    "rerank": (
        "/v1/rerank",
        "cohere-rerank-v2.json",
        '{"model":"rerank-v3.5","query":"sunny day","documents":["rainy","sunny"]}',
        "application/json",
    ),
}


class DoneSpool:
    """The spool as the hooks see it, every write committed at once."""

    accepting = True
    max_bytes = 0

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.last = b""

    def enqueue(self, key: str, data: bytes) -> asyncio.Future[None]:
        self.last = data
        return self.done


def _flows(case: str, n: int, fixtures: Path) -> list[Any]:
    from mitmproxy import http
    from mitmproxy.test import tflow, tutils

    from tests.corpus import FORM, form, wav

    path, fixture, body, ctype = CASES[case]
    answer = (fixtures / fixture).read_bytes()
    request = body.encode() if body else form(FORM_FIELDS, wav(25))
    ctype = ctype or FORM
    flows = []
    for _ in range(n):
        flow = tflow.tflow()
        flow.request.method = "POST"
        flow.request.path = path
        flow.request.headers["authorization"] = "Bearer sk-live-0123456789abcdef"
        flow.request.headers["x-tenant-id"] = "t_7"
        flow.request.headers["x-customer-id"] = "cus_42"
        flow.request.headers["x-request-id"] = "client-req-1"
        flow.request.headers["content-type"] = ctype
        flow.request.content = request
        flow.response = tutils.tresp(
            status_code=200, headers=http.Headers(content_type="application/json")
        )
        flow.response.content = answer
        flows.append(flow)
    return flows


def _drive(addon: Any) -> Callable[[Any], None]:
    requestheaders, request = addon.requestheaders, addon.request
    responseheaders, response = addon.responseheaders, addon.response

    def one(flow: Any) -> None:
        requestheaders(flow)
        request(flow)
        responseheaders(flow)
        pending = response(flow)
        if pending is not None:
            try:
                pending.send(None)
            except StopIteration:
                pass
            else:
                raise RuntimeError("the spool write did not complete at once")

    return one


def _calls(one: Callable[[Any], None], flows: list[Any]) -> tuple[float, float]:
    """Python calls and C calls per request, counted by a profile function."""
    counts = {"call": 0, "c_call": 0}

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event in counts:
            counts[event] += 1

    sys.setprofile(profile)
    try:
        for flow in flows:
            one(flow)
    finally:
        sys.setprofile(None)
    return counts["call"] / len(flows), counts["c_call"] / len(flows)


def measure(cases: list[str], n: int, repeats: int, fixtures: Path) -> dict[str, Any]:
    """Per case: the median and least over `repeats` batches of the mean µs per request over
    `n` requests (process CPU), and Python / C calls per request."""
    from mitmproxy.test import taddons

    from edgemeter.addon import Meter

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    done: asyncio.Future[None] = loop.create_future()
    done.set_result(None)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        addon = Meter()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, meter_spool_dir=str(Path(tmp) / "spool"))
            real = addon.spool
            spool = DoneSpool(done)
            addon.spool = spool  # type: ignore[assignment]
            one = _drive(addon)
            for case in cases:
                for flow in _flows(case, 200, fixtures):
                    one(flow)  # warm
                assert spool.last, f"{case}: nothing spooled"
                runs = []
                for _ in range(repeats):
                    flows = _flows(case, n, fixtures)
                    start = time.process_time_ns()
                    for flow in flows:
                        one(flow)
                    runs.append((time.process_time_ns() - start) / n / 1000)
                py, c = _calls(one, _flows(case, 200, fixtures))
                out[case] = {
                    "us": round(statistics.median(runs), 2),
                    "us_min": round(min(runs), 2),
                    "py_calls": round(py, 1),
                    "c_calls": round(c, 1),
                }
            assert real is not None
            real.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    shared = Path(os.environ.get("EDGEMETER_SHARED", HERE.parent / "shared"))
    parser.add_argument("--fixtures", type=Path, default=shared / "fixtures/recorded")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--against", type=Path, help="an older tree, alternated with this one")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cases = args.cases.split(",")
    if args.against is None:
        print(json.dumps(measure(cases, args.n, args.repeats, args.fixtures)))
        return
    trees = {"old": args.against.resolve(), "new": HERE}
    results: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    for r in range(args.rounds):
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
            env = {**os.environ, "PYTHONPATH": str(trees[name])}
            argv = [sys.executable, __file__, "--cases", args.cases, "-n", str(args.n)]
            argv += ["--repeats", str(args.repeats), "--fixtures", str(args.fixtures)]
            run = subprocess.run(argv, env=env, cwd=trees[name], capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(run.stderr)
            results[name].append(json.loads(run.stdout))
    print("| shape | µs old | µs new | change | Python calls old → new | C calls old → new |")
    print("|---|---:|---:|---:|---|---|")
    for case in cases:
        old = statistics.median(r[case]["us"] for r in results["old"])
        new = statistics.median(r[case]["us"] for r in results["new"])
        o, n = results["old"][0][case], results["new"][0][case]
        print(
            f"| {case} | {old:.1f} | {new:.1f} | {(new / old - 1) * 100:+.0f} % | "
            f"{o['py_calls']} → {n['py_calls']} | {o['c_calls']} → {n['c_calls']} |"
        )


if __name__ == "__main__":
    main()
