"""`edgemeter tail`: envelopes as they reach the stream, one row each, with running totals."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import nats.errors
import nats.js.errors
from nats.js.api import ConsumerConfig, DeliverPolicy
from rich.console import Group
from rich.live import Live
from rich.table import Table

from edgemeter.cli.broker import (
    add_unbillable_subject,
    broker_config,
    connect,
    nats_options,
    unbillable_subject,
)
from edgemeter.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    Io,
    SubParsers,
    amount,
    positive,
    seconds,
)
from edgemeter.errors import BrokerError
from spool.publisher import NatsConfig


@dataclass(frozen=True, slots=True)
class Row:
    """The columns of one envelope in `tail`, read open-world (absent or odd fields: empty)."""

    time: str
    tenant: str
    customer: str
    model: str
    api: str
    input_tokens: int
    output_tokens: int
    amount_micro: int
    currency: str
    outcome: str
    usage_source: str
    # Why the billing consumer could not book it (envelopes on the unbillable subject).
    unbillable_reason: str = ""


def parse_envelope(data: bytes) -> tuple[dict[str, Any], Row] | None:
    """The envelope and its row; None unless it is a JSON object with a metadata object."""
    try:
        envelope = json.loads(data)
    except ValueError:
        return None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("metadata"), dict):
        return None
    meta: dict[str, Any] = envelope["metadata"]

    def text(obj: Mapping[str, Any], key: str) -> str:
        value = obj.get(key)
        return value if isinstance(value, str) else ""

    def number(obj: Mapping[str, Any], key: str) -> int:
        value = obj.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    # A seed-shaped envelope has only the total: it counts as input.
    input_tokens = (
        number(meta, "input_tokens") if "input_tokens" in meta else number(meta, "tokens_used")
    )
    return envelope, Row(
        time=text(meta, "completed_at").replace("T", " ").removesuffix("Z"),
        tenant=text(meta, "tenant_id"),
        customer=text(envelope, "customer_id"),
        model=text(meta, "model"),
        api=text(meta, "api"),
        input_tokens=input_tokens,
        output_tokens=number(meta, "output_tokens"),
        amount_micro=number(envelope, "amount_micro_omr"),
        currency=text(meta, "currency"),
        outcome=text(meta, "outcome"),
        usage_source=text(meta, "usage_source"),
        unbillable_reason=text(meta, "unbillable_reason"),
    )


@dataclass
class Total:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    amount_micro: int = 0
    currency: str = ""


@dataclass
class TailView:
    """The last envelopes and the running totals per (tenant, model); rich renders it live."""

    last: int = 20
    rows: collections.deque[Row] = field(default_factory=collections.deque)
    totals: dict[tuple[str, str], Total] = field(default_factory=dict)
    # Totals per unbillable_reason, for envelopes that carry one (`tail --unbillable`).
    reasons: dict[str, Total] = field(default_factory=dict)
    envelopes: int = 0
    malformed: int = 0

    def add(self, row: Row) -> None:
        self.envelopes += 1
        self.rows.append(row)
        while len(self.rows) > self.last:
            self.rows.popleft()
        totals = [self.totals.setdefault((row.tenant, row.model), Total(currency=row.currency))]
        if row.unbillable_reason:
            totals.append(
                self.reasons.setdefault(row.unbillable_reason, Total(currency=row.currency))
            )
        for total in totals:
            total.requests += 1
            total.input_tokens += row.input_tokens
            total.output_tokens += row.output_tokens
            total.amount_micro += row.amount_micro
            if total.currency != row.currency:
                total.currency = "mixed"

    def by_reason(self) -> str:
        """The unbillable envelopes per reason, in one line ("" when there are none)."""
        return ", ".join(f"{reason} {t.requests}" for reason, t in sorted(self.reasons.items()))

    def __rich__(self) -> Group:
        recent = Table(
            title=f"last {len(self.rows)} of {self.envelopes} envelopes", title_justify="left"
        )
        for name in ("time", "tenant", "customer", "model", "api"):
            recent.add_column(name, no_wrap=True)
        for name in ("in", "out", "amount"):
            recent.add_column(name, justify="right", no_wrap=True)
        recent.add_column("outcome", no_wrap=True)
        recent.add_column("usage", no_wrap=True)
        for r in self.rows:
            recent.add_row(
                r.time,
                r.tenant,
                r.customer,
                r.model,
                r.api,
                str(r.input_tokens),
                str(r.output_tokens),
                amount(r.amount_micro),
                r.outcome,
                r.usage_source,
                style=None if r.outcome in ("complete", "") else "yellow",
            )
        caption = f"{self.malformed} malformed messages skipped" if self.malformed else None
        totals = Table(
            title="totals", title_justify="left", caption=caption, caption_justify="left"
        )
        for name in ("tenant", "model"):
            totals.add_column(name, no_wrap=True)
        for name in ("requests", "in", "out", "amount"):
            totals.add_column(name, justify="right", no_wrap=True)
        totals.add_column("currency", no_wrap=True)
        for (tenant, model), t in sorted(self.totals.items()):
            totals.add_row(
                tenant,
                model,
                str(t.requests),
                str(t.input_tokens),
                str(t.output_tokens),
                amount(t.amount_micro),
                t.currency,
            )
        if not self.reasons:
            return Group(recent, totals)
        reasons = Table(title="unbillable, by reason", title_justify="left")
        reasons.add_column("reason", no_wrap=True)
        for name in ("requests", "in", "out", "amount"):
            reasons.add_column(name, justify="right", no_wrap=True)
        reasons.add_column("currency", no_wrap=True)
        for reason, t in sorted(self.reasons.items()):
            reasons.add_row(
                reason,
                str(t.requests),
                str(t.input_tokens),
                str(t.output_tokens),
                amount(t.amount_micro),
                t.currency,
            )
        return Group(recent, totals, reasons)


def parse_since(text: str, now: datetime) -> datetime:
    """`90s`, `15m`, `2h` or `1d` ago, or an ISO 8601 time (UTC unless it names a zone)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = text[:-1], text[-1:]
    if unit in units and number.isdigit():
        return now - timedelta(seconds=int(number) * units[unit])
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"expected 15m, 2h, 1d or an ISO time, not {text!r}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


_REDRAW_S: Final = 0.25


async def _tail(
    config: NatsConfig,
    args: argparse.Namespace,
    view: TailView,
    show: Callable[[dict[str, Any] | None], None],
) -> bool:
    """Feed envelopes from the stream into view until --count or --timeout; True when --count
    was reached. `show` gets each envelope, and None at least once a second."""
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    nc = await connect(config, args.connect_timeout)
    try:
        js = nc.jetstream(timeout=args.connect_timeout)
        consumer = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
        if args.all:
            consumer = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        elif args.since is not None:
            consumer = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=args.since
            )
        try:
            # An ordered consumer: ephemeral, in memory, without acks; it changes no stream.
            sub = await js.subscribe(config.subject, ordered_consumer=True, config=consumer)
        except nats.js.errors.NotFoundError:
            raise BrokerError(f"no stream is bound to subject {config.subject!r}") from None
        while args.count is None or view.envelopes < args.count:
            wait = 1.0 if deadline is None else min(deadline - time.monotonic(), 1.0)
            if wait <= 0:
                return False
            try:
                msg = await sub.next_msg(timeout=wait)
            except nats.errors.TimeoutError:
                show(None)
                continue
            parsed = parse_envelope(msg.data)
            if parsed is None:
                view.malformed += 1
                show(None)
                continue
            envelope, row = parsed
            view.add(row)
            show(envelope)
        return True
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def tail(args: argparse.Namespace, io: Io) -> int:
    config = broker_config(args)
    if args.unbillable:
        config = replace(config, subject=unbillable_subject(args))
    view = TailView(last=args.last)

    # Redrawn from the loop that changes the view, not by rich's refresh thread, which would
    # read the view while it changes.
    live = None if args.json else Live(view, console=io.console, auto_refresh=False)
    drawn = 0.0

    def show(envelope: dict[str, Any] | None) -> None:
        nonlocal drawn
        if live is None:
            if envelope is not None:
                io.stdout.write(json.dumps(envelope, ensure_ascii=False, separators=(",", ":")))
                io.stdout.write("\n")
                io.stdout.flush()  # a pipe gets each envelope as it comes
        elif time.monotonic() - drawn >= _REDRAW_S:
            live.refresh()
            drawn = time.monotonic()

    reached = False
    try:
        with live or contextlib.nullcontext():
            reached = asyncio.run(_tail(config, args, view, show))
    except KeyboardInterrupt:
        reached = True  # Ctrl-C is how a live tail ends
    if not args.json and not io.console.is_terminal:
        io.stdout.write("\n")
    skipped = f", {view.malformed} malformed messages skipped" if view.malformed else ""
    reasons = f"; unbillable by reason: {view.by_reason()}" if view.reasons else ""
    io.say(f"{view.envelopes} envelopes{skipped}{reasons}")
    if args.count is not None and not reached:
        io.error(f"saw {view.envelopes} of {args.count} envelopes within {args.timeout:g}s")
        return EXIT_FAILED
    return EXIT_OK


def add_tail(commands: SubParsers) -> None:
    command = commands.add_parser(
        "tail",
        parents=[nats_options()],
        help="a live table of envelopes on the stream, with totals per tenant and model",
        description="""Follow the stream bound to the subject with an ordered consumer (ephemeral,
        in memory, no acks: it takes nothing from the billing consumer) and show the last
        envelopes and running totals per tenant and model. Messages that are not envelopes are
        counted and skipped. Ctrl-C ends it. With --unbillable, the envelopes the billing
        consumer could not book (sent to reconciliation), with totals by reason.""",
        epilog="""Exit codes: 0 stopped by Ctrl-C, --count reached or --timeout (without
        --count); 1 broker unreachable, no stream, or --count not reached within --timeout;
        2 usage error.""",
    )
    start = command.add_mutually_exclusive_group()
    start.add_argument("--all", action="store_true", help="start at the stream's first message")
    start.add_argument(
        "--since",
        type=since,
        metavar="WHEN",
        help="start at a time: 15m, 2h, 1d ago, or an ISO time (default: new envelopes only)",
    )
    command.add_argument(
        "--unbillable",
        action="store_true",
        help="follow the unbillable subject instead (envelopes sent to reconciliation), with "
        "totals by reason",
    )
    add_unbillable_subject(command)
    command.add_argument("--json", action="store_true", help="one envelope per line, for pipes")
    command.add_argument("--count", type=positive, metavar="N", help="stop after N envelopes")
    command.add_argument("--timeout", type=seconds, metavar="S", help="stop after S seconds")
    command.add_argument(
        "--last", type=positive, default=20, metavar="N", help="rows shown (default: 20)"
    )
    command.set_defaults(run=tail, parser=command)


def since(text: str) -> datetime:
    try:
        return parse_since(text, datetime.now(UTC))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
