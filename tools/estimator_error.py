"""Measures the output-token estimator against every recorded stream that reports usage.

Run: .venv/bin/python -m tools.estimator_error [RECORDED_DIR]; one row a file, then the median.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from edgemeter.metering.estimate import tokens
from edgemeter.metering.extraction import Extraction
from edgemeter.metering.sse import SSEDecoder

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.corpus import api_of, wire_body  # noqa: E402


def main() -> int:
    recorded = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared/fixtures/recorded"
    errors: list[float] = []
    print(f"{'file':58} {'reported':>8} {'estimate':>8} {'error':>7}")
    for path in sorted(recorded.iterdir()):
        if not path.name.endswith((".sse", ".chunks.txt")):
            continue
        ex = Extraction(api_of(path.name))
        decoder = SSEDecoder()
        for ev in decoder.feed(wire_body(path)) + decoder.close():
            ex.event(ev)
        if ex.usage is None or ex.usage.output_tokens == 0:
            continue
        reported, guess = ex.usage.output_tokens, tokens(ex.output_chars)
        error = (guess - reported) / reported
        errors.append(error)
        print(f"{path.name:58} {reported:8} {guess:8} {error:+7.0%}")
    print(
        f"median error {statistics.median(errors):+.0%}, median |error| "
        f"{statistics.median(abs(e) for e in errors):.0%} over {len(errors)} streams"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
