"""`edgemeter tail`: envelopes as they reach the stream, one row each, with running totals: a
live table that fits the terminal, tab-separated rows for a pipe, or JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import fnmatch
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import nats.errors
import nats.js.errors
from nats.js.api import ConsumerConfig, DeliverPolicy
from rich import box
from rich.console import Console
from rich.live import Live
from rich.measure import Measurement
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
    request_id: str
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
        request_id=text(meta, "request_id"),
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


@dataclass(frozen=True, slots=True)
class Match:
    """The envelopes to show (--customer, --tenant, --model, --request-id); None matches any.
    A model may be a glob (`gpt-4o*`); a request id may be given whole or by its end."""

    customer: str | None = None
    tenant: str | None = None
    model: str | None = None
    request_id: str | None = None

    @property
    def filtering(self) -> bool:
        return any(v is not None for v in (self.customer, self.tenant, self.model, self.request_id))

    def __call__(self, row: Row) -> bool:
        return (
            (self.customer is None or row.customer == self.customer)
            and (self.tenant is None or row.tenant == self.tenant)
            and (self.model is None or fnmatch.fnmatchcase(row.model, self.model))
            and (self.request_id is None or (row.request_id or "\0").endswith(self.request_id))
        )


@dataclass(frozen=True, slots=True)
class Column:
    """A column of a table: its cell, and a shorter cell for a narrow terminal (None: none)."""

    name: str
    cell: Callable[[Row], str]
    right: bool = False
    short: Callable[[Row], str] | None = None


RECENT: Final = (
    Column("time", lambda r: r.time, short=lambda r: r.time[-8:]),
    Column("request id", lambda r: r.request_id, short=lambda r: "…" + r.request_id[-12:]),
    Column("tenant", lambda r: r.tenant),
    Column("customer", lambda r: r.customer),
    Column("model", lambda r: r.model),
    Column("api", lambda r: r.api),
    Column("in", lambda r: str(r.input_tokens), right=True),
    Column("out", lambda r: str(r.output_tokens), right=True),
    Column("amount", lambda r: amount(r.amount_micro), right=True),
    Column("outcome", lambda r: r.outcome),
    Column("usage", lambda r: r.usage_source),
)
# How the table of recent envelopes gets narrower until it fits the terminal, step by step:
# the columns of least use when settling a bill go first; tokens and amount always stay.
NARROWER: Final = (
    ("api", "drop"),
    ("usage", "drop"),
    ("tenant", "drop"),
    ("time", "short"),
    ("request id", "short"),
    ("time", "drop"),
    ("outcome", "drop"),
    ("model", "drop"),
    ("customer", "drop"),
)
# The plain rows of a pipe: every column, values in full (the time as in the envelope).
TSV_HEADER: Final = (
    "completed_at\trequest_id\ttenant_id\tcustomer_id\tmodel\tapi\tinput_tokens\t"
    "output_tokens\tamount\tcurrency\toutcome\tusage_source"
)


def tsv_row(row: Row, completed_at: str, unbillable: bool = False) -> str:
    """A pipe's row; with `unbillable` (tail --unbillable), the reason is its last column."""
    cells = (
        completed_at,
        row.request_id,
        row.tenant,
        row.customer,
        row.model,
        row.api,
        str(row.input_tokens),
        str(row.output_tokens),
        amount(row.amount_micro),
        row.currency,
        row.outcome,
        row.usage_source,
        *((row.unbillable_reason,) if unbillable else ()),
    )
    # A tab or line break inside a value would shift the columns of a pipe's reader.
    return "\t".join(" ".join(c.split()) if c and not c.isprintable() else c for c in cells)


def _fits(console: Console, table: Table) -> bool:
    # Measured unbounded: a measurement within the console's width is clamped to it.
    wide = console.options.update_width(1 << 20)
    return Measurement.get(console, wide, table).maximum <= console.width


def narrowest_fit(
    console: Console, make: Callable[[Sequence[tuple[str, str]]], Table], steps: Sequence[Any]
) -> Table:
    """The widest variant of a table that fits the console: `make(steps[:n])` for the
    smallest n that fits; with every step taken, what is left (text cut with an ellipsis)."""
    for n in range(len(steps) + 1):
        table = make(steps[:n])
        if _fits(console, table):
            return table
    return table


@dataclass
class Total:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    amount_micro: int = 0
    currency: str = ""


@dataclass
class TailView:
    """The last envelopes and the running totals per (tenant, model); rich renders it live, as
    wide as the terminal allows (`NARROWER`)."""

    last: int = 20
    rows: collections.deque[Row] = field(default_factory=collections.deque)
    totals: dict[tuple[str, str], Total] = field(default_factory=dict)
    # Totals per unbillable_reason, for envelopes that carry one (`tail --unbillable`).
    reasons: dict[str, Total] = field(default_factory=dict)
    # Envelopes shown (those --customer and the other filters let through) and seen.
    envelopes: int = 0
    scanned: int = 0
    malformed: int = 0
    # Said under the table: where a search of the stream's history stands.
    note: str = ""

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

    def recent(self, steps: Sequence[tuple[str, str]], room: int | None = None) -> Table:
        """The last envelopes, at most `room` of them (None: every one kept)."""
        rows = list(self.rows)[-room:] if room is not None else list(self.rows)
        dropped = {name for name, how in steps if how == "drop"}
        shortened = {name for name, how in steps if how == "short"}
        columns = [c for c in RECENT if c.name not in dropped]
        notes = [n for n in (self.note, self._skipped()) if n]
        table = Table(
            title=f"last {len(rows)} of {self.envelopes} envelopes",
            title_justify="left",
            caption="; ".join(notes) or None,
            caption_justify="left",
            box=box.SIMPLE_HEAD,
        )
        for c in columns:
            # Numbers are never cut; text is (rich narrows only wrapping columns before it
            # narrows all), once no step of NARROWER is left.
            table.add_column(
                c.name, justify="right" if c.right else "left", no_wrap=c.right, overflow="ellipsis"
            )
        for r in rows:
            table.add_row(
                *(c.short(r) if c.short and c.name in shortened else c.cell(r) for c in columns),
                style=None if r.outcome in ("complete", "") else "yellow",
            )
        return table

    def _skipped(self) -> str:
        return f"{self.malformed} malformed messages skipped" if self.malformed else ""

    def totals_table(self, steps: Sequence[tuple[str, str]]) -> Table:
        currencies = {t.currency for t in self.totals.values()}
        # One currency (the usual case) is said in the title instead of a column on each row.
        one = next(iter(currencies)) if len(currencies) == 1 and steps else None
        totals = Table(
            title=f"totals ({one})" if one else "totals", title_justify="left", box=box.SIMPLE_HEAD
        )
        for name in ("tenant", "model"):
            totals.add_column(name, overflow="ellipsis")
        for name in ("requests", "in", "out", "amount"):
            totals.add_column(name, justify="right", no_wrap=True)
        if one is None:
            totals.add_column("currency", no_wrap=True)
        for (tenant, model), t in sorted(self.totals.items()):
            cells = [
                tenant,
                model,
                str(t.requests),
                str(t.input_tokens),
                str(t.output_tokens),
                amount(t.amount_micro),
            ]
            totals.add_row(*cells, *(() if one else (t.currency,)))
        return totals

    def reasons_table(self) -> Table:
        """Totals per unbillable reason (`tail --unbillable`)."""
        reasons = Table(title="unbillable, by reason", title_justify="left", box=box.SIMPLE_HEAD)
        reasons.add_column("reason", overflow="ellipsis")
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
        return reasons

    def __rich_console__(self, console: Console, options: Any) -> Any:
        totals = narrowest_fit(console, self.totals_table, (("currency", "title"),))
        # The totals stay in view: the recent rows get the lines the terminal has left (a
        # title, a header, a rule and blank lines around each table; a caption).
        below = len(self.totals) + 5 + (len(self.reasons) + 5 if self.reasons else 0)
        room = max(console.height - below - 7, 1)
        yield narrowest_fit(console, lambda steps: self.recent(steps, room), NARROWER)
        yield totals
        if self.reasons:
            yield self.reasons_table()


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
    match: Match,
    view: TailView,
    show: Callable[[tuple[dict[str, Any], Row] | None], None],
    caught_up: Callable[[], None],
) -> bool:
    """Feed the envelopes that match into view until --count or --timeout; True when --count
    was reached. `show` gets each envelope shown, and None at least once a second;
    `caught_up` is called once a search of the stream's history (--all, --since) has read
    what was there when it started."""
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    history = args.all or args.since is not None
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
                if history:  # nothing (more) to read from the past
                    history = False
                    caught_up()
                show(None)
                continue
            parsed = parse_envelope(msg.data)
            if parsed is None:
                view.malformed += 1
            else:
                view.scanned += 1
                if match(parsed[1]):
                    view.add(parsed[1])
                    show(parsed)
            if history and msg.metadata.num_pending == 0:
                history = False
                caught_up()
            if parsed is None or not match(parsed[1]):
                show(None)
        return True
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def tail(args: argparse.Namespace, io: Io) -> int:
    config = broker_config(args)
    if args.unbillable:
        config = replace(config, subject=unbillable_subject(args))
    view = TailView(last=args.last)
    match = Match(args.customer, args.tenant, args.model, args.request_id)
    # A terminal gets the live table; a pipe, JSON lines (--json) or tab-separated rows.
    table = not args.json and io.stdout.isatty()

    # Redrawn from the loop that changes the view, not by rich's refresh thread, which would
    # read the view while it changes.
    live = Live(view, console=io.console, auto_refresh=False) if table else None
    drawn = 0.0
    if not table and not args.json:
        io.stdout.write(TSV_HEADER + ("\tunbillable_reason" if args.unbillable else "") + "\n")
        io.stdout.flush()

    def show(parsed: tuple[dict[str, Any], Row] | None) -> None:
        nonlocal drawn
        if live is None:
            if parsed is not None:
                envelope, row = parsed
                if args.json:
                    line = json.dumps(envelope, ensure_ascii=False, separators=(",", ":"))
                else:
                    completed_at = envelope["metadata"].get("completed_at")
                    when = completed_at if isinstance(completed_at, str) else ""
                    line = tsv_row(row, when, args.unbillable)
                io.stdout.write(line + "\n")
                io.stdout.flush()  # a pipe gets each envelope as it comes
        elif time.monotonic() - drawn >= _REDRAW_S:
            live.refresh()
            drawn = time.monotonic()

    def caught_up() -> None:
        found = f", {view.envelopes} matched" if match.filtering else ""
        view.note = f"history read: {view.scanned} envelopes{found}; following new ones"
        if live is None:
            io.say(view.note)

    reached = False
    try:
        with live or contextlib.nullcontext():
            reached = asyncio.run(_tail(config, args, match, view, show, caught_up))
    except KeyboardInterrupt:
        reached = True  # Ctrl-C is how a live tail ends
    skipped = f", {view.malformed} malformed messages skipped" if view.malformed else ""
    of = f" of {view.scanned} matched" if match.filtering else ""
    reasons = f"; unbillable by reason: {view.by_reason()}" if view.reasons else ""
    io.say(f"{view.envelopes} envelopes{of}{skipped}{reasons}")
    if args.count is not None and not reached:
        io.error(f"saw {view.envelopes} of {args.count} envelopes within {args.timeout:g}s")
        return EXIT_FAILED
    return EXIT_OK


def add_tail(commands: SubParsers) -> None:
    command = commands.add_parser(
        "tail",
        parents=[nats_options()],
        help="envelopes on the stream as they come, with totals per tenant and model",
        description="""Follow the stream bound to the subject with an ordered consumer (ephemeral,
        in memory, no acks: it takes nothing from the billing consumer). On a terminal: a live
        table of the last envelopes and running totals per tenant and model, as wide as the
        terminal (at 80 columns: request id, customer, model, tokens in and out, amount and
        outcome); piped: one tab-separated row per envelope after a header line, or JSON lines
        with --json. The filters find any request: with --all or --since, in the stream's
        history too. Messages that are not envelopes are counted and skipped. Ctrl-C ends it.
        With --unbillable, the envelopes the billing consumer could not book (sent to
        reconciliation), with totals by reason.""",
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
    only = command.add_argument_group("filters (all that are given must match)")
    only.add_argument("--customer", metavar="ID", help="only this customer_id")
    only.add_argument("--tenant", metavar="ID", help="only this tenant_id")
    only.add_argument("--model", metavar="NAME", help="only this model (a glob: 'gpt-4o*')")
    only.add_argument(
        "--request-id",
        metavar="ID",
        help="only this request id (a ledger row's external_ref), whole or its end",
    )
    command.add_argument("--json", action="store_true", help="one envelope per line, for pipes")
    command.add_argument("--count", type=positive, metavar="N", help="stop after N envelopes shown")
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
