"""CPU per request of the metering wing for the five original API shapes on recorded answers
(docs/PERFORMANCE.md); compare two trees with PYTHONPATH=<tree> python -m tools.shape_cost.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from edgemeter.metering.flow import FlowMeter, Request
from edgemeter.metering.prices import flat_price
from tests.corpus import chunked, wire_body

CASES = {
    "openai.chat stream": ("openai-chat-stream-include-usage.chunks.txt", "openai.chat"),
    "openai.chat body": ("openai-chat-nonstream.json", "openai.chat"),
    "openai.completions stream": (
        "openai-completions-legacy-stream-usage.chunks.txt",
        "openai.completions",
    ),
    "openai.embeddings body": ("openai-embeddings-base64.json", "openai.embeddings"),
    # Not the flex-tier recording: its envelope gains service_tier, which is new work on purpose.
    "openai.responses stream": ("openai-responses-stream.raw.sse", "openai.responses"),
    "anthropic.messages stream": (
        "anthropic-messages-stream-text.chunks.txt",
        "anthropic.messages",
    ),
}
ASKED = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]}).encode()


def one(api: str, body: bytes, chunks: list[bytes] | None) -> None:
    m = FlowMeter(Request("id", api, "/v1/x", 0.0, "t", "c", "", ""))
    m.request_body = ASKED
    if chunks is None:
        m.body(200, body, "", 0.0)
    else:
        m.start_stream(200, "", False)
        for chunk in chunks:
            m(chunk)
        m(b"")
    m.finish(aborted=False, now=1.0, currency="OMR", price_of=lambda u, _m: flat_price(u, 156))


def measure(fixtures: Path, n: int, repeats: int) -> dict[str, float]:
    """The least, over `repeats`, of the mean µs per request over `n` requests, per case: the
    least is the run the shared machine disturbed least."""
    out = {}
    for name, (fixture, api) in CASES.items():
        body = wire_body(fixtures / fixture)
        chunks = None if fixture.endswith(".json") else chunked(body, 0)
        runs = []
        for _ in range(repeats):
            start = time.process_time()
            for _ in range(n):
                one(api, body, chunks)
            runs.append((time.process_time() - start) / n * 1e6)
        out[name] = round(min(runs), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fixtures", type=Path, default=Path("../shared/fixtures/recorded"))
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(json.dumps(measure(args.fixtures, args.n, args.repeats)))


if __name__ == "__main__":
    main()
