"""The one table of the meter's mitmproxy options (name, type, default, help) and of their
EDGEMETER_* variables: the addon, settings, the container, the CLI and the docs all read it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from edgemeter.settings import default_spool_dir

METER_PREFIX = "meter_"
VARIABLE_PREFIX = "EDGEMETER_"


class Option(NamedTuple):
    """One mitmproxy option of the meter (unpacks as mitmproxy's add_option arguments)."""

    name: str
    type: type
    default: Any
    help: str

    @property
    def variable(self) -> str:
        """The container's environment variable: meter_nats_url is EDGEMETER_NATS_URL."""
        return variable_of(self.name)

    @property
    def one_paragraph(self) -> str:
        """The help text as mitmproxy shows it: one paragraph, single spaces."""
        return " ".join(self.help.split())


def variable_of(option: str) -> str:
    return VARIABLE_PREFIX + option.removeprefix(METER_PREFIX).upper()


OPTIONS: tuple[Option, ...] = (
    Option(
        "meter_nats_url",
        str,
        "nats://127.0.0.1:4222",
        """Comma-separated NATS server URLs of the JetStream cluster the envelopes are published
        to. The meter connects in the background and never waits for the broker at startup.""",
    ),
    Option(
        "meter_nats_creds",
        str,
        "",
        """Path to a NATS credentials file (JWT and nkey seed) used to authenticate to the
        broker. Empty: no credentials file.""",
    ),
    Option(
        "meter_nats_token",
        str,
        "",
        """Token used to authenticate to the broker. Never logged. Empty: no token.""",
    ),
    Option(
        "meter_nats_user",
        str,
        "",
        """User name used to authenticate to the broker, together with meter_nats_password.""",
    ),
    Option(
        "meter_nats_password",
        str,
        "",
        """Password used to authenticate to the broker, together with meter_nats_user.
        Never logged.""",
    ),
    Option(
        "meter_nats_tls_ca",
        str,
        "",
        """PEM file of the CA that signed the broker's certificate. Server certificates are
        always verified, with the host name checked, when the URL is tls:// or a CA is set.""",
    ),
    Option(
        "meter_nats_tls_cert",
        str,
        "",
        """PEM client certificate for brokers that require mutual TLS (with meter_nats_tls_key).""",
    ),
    Option(
        "meter_nats_tls_key",
        str,
        "",
        """PEM private key of meter_nats_tls_cert.""",
    ),
    Option(
        "meter_subject",
        str,
        "catalyst.usage.recorded",
        """Subject every usage envelope is published on. A JetStream stream owned by the billing
        consumer must bind it; the meter never creates or changes streams.""",
    ),
    Option(
        "meter_unbillable_subject",
        str,
        "catalyst.usage.unbillable",
        """Subject of the envelopes the billing consumer could not book (no customer, a
        customer without a tenant, an unknown key, a zero amount...): published there, with
        the reason in metadata.unbillable_reason and the Edgemeter-Unbillable-Reason header,
        for reconciliation. The default is under catalyst.usage., so the billing service's
        catalyst.> stream keeps them while its consumer of meter_subject never sees them.
        Must differ from meter_subject.""",
    ),
    Option(
        "meter_house_customer",
        str,
        "",
        """Customer the requests nobody can be billed for are booked to instead (no customer,
        no tenant, an unknown key), marked in metadata.house_account with the reason and the
        attribution it replaced. Set together with meter_house_tenant. Empty: they go to
        meter_unbillable_subject.""",
    ),
    Option(
        "meter_house_tenant",
        str,
        "",
        """Tenant of meter_house_customer (billing creates an unknown customer only with a
        tenant).""",
    ),
    Option(
        "meter_cloudevents",
        bool,
        False,
        """Also publish each envelope's CloudEvents attributes as binary-mode headers (ce-id:
        the request id, ce-source, ce-type, ce-time, ce-subject: the customer), for
        CloudEvents readers such as OpenMeter's collector. The body stays the same.""",
    ),
    Option(
        "meter_spool_dir",
        str,
        "",
        f"""Directory of the write-ahead spool (diskcache) where every envelope is committed
        before it is published and stays until the broker acknowledged it. Created 0700. Empty:
        the platform data directory ({default_spool_dir()}).""",
    ),
    Option(
        "meter_spool_sync",
        str,
        "normal",
        """How the spool syncs to disk: normal survives a crash of the meter process (SQLite WAL
        with synchronous=NORMAL); full also survives power loss, at several times the cost per
        commit.""",
    ),
    Option(
        "meter_spool_max_mb",
        int,
        1024,
        """Most envelope data the spool holds, in MiB (0: no limit). A spool reaches it only when
        the broker has been away for long; what happens then is meter_on_spool_full.""",
    ),
    Option(
        "meter_on_spool_full",
        str,
        "serve",
        """What to do while the spool is full or its disk does not take writes. serve: keep
        proxying; every envelope that cannot be spooled is counted (spool failures) and an ERROR
        is logged once a minute. reject: answer new metered requests 503 before they reach the
        upstream, so no request goes unbilled.""",
    ),
    Option(
        "meter_paths",
        str,
        "/v1/,/v1beta/",
        """Comma-separated request path prefixes that are metered. Responses to other paths
        (e.g. a gateway's /api/ admin surface) pass through without metering. /v1beta/ is where
        NewAPI relays Gemini's own API (models/{model}:generateContent).""",
    ),
    Option(
        "meter_price_micro_per_token",
        int,
        156,
        """Flat price per token in micro-units of meter_currency, used when no price table entry
        matches the model. Amounts are exact integers: tokens times this price.""",
    ),
    Option(
        "meter_prices",
        str,
        "",
        """Path to a price table (per model, per token kind), reloaded when the file changes.
        Empty: flat pricing only.""",
    ),
    Option(
        "meter_currency",
        str,
        "OMR",
        """ISO 4217 code of the currency the amounts are in. The envelope's amount fields keep
        the seed's names (amount_omr, amount_micro_omr) whatever the currency.""",
    ),
    Option(
        "meter_tenant_header",
        str,
        "x-tenant-id",
        """Request header carrying the tenant id the usage is attributed to.""",
    ),
    Option(
        "meter_customer_header",
        str,
        "x-customer-id",
        """Request header carrying the customer id whose ledger the usage is debited from.""",
    ),
    Option(
        "meter_attribution",
        str,
        "headers",
        """Where a request's tenant and customer come from. headers: meter_tenant_header and
        meter_customer_header, which any client can set, so only safe behind an ingress that
        overwrites them. keymap: the key map (meter_keymap) entry of the request's API key
        fingerprint; the client's tenant and customer headers are ignored, and a request whose
        key is not in the map is billed with an empty customer_id, marked attribution
        unknown_key and counted. Changing it needs a restart.""",
    ),
    Option(
        "meter_keymap",
        str,
        "",
        """Path of the key map used when meter_attribution=keymap: a TOML file mapping API key
        fingerprints to tenant and customer, reloaded when it changes (a bad change keeps the
        last good map and logs an ERROR). Required in keymap mode, refused otherwise.""",
    ),
    Option(
        "meter_fingerprint_secret",
        str,
        "",
        """Secret of the HMAC-SHA256 that makes api_key_fingerprint ("hmac:" and 16 hex digits).
        Empty: a plain SHA-256 prefix (16 hex digits), which anyone holding a candidate key can
        recompute. Never logged; prefer meter_fingerprint_secret_file, since a command line is
        visible to every user of the host.""",
    ),
    Option(
        "meter_fingerprint_secret_file",
        str,
        "",
        """File holding meter_fingerprint_secret, read when options are set; one trailing
        newline is dropped.""",
    ),
    Option(
        "meter_stream_usage",
        str,
        "inject-strip",
        """inject-strip: ask the upstream for stream usage (stream_options.include_usage) when
        the client did not, and remove the added usage event from what the client sees; inject:
        ask but do not strip; off: never change a request or a response byte.""",
    ),
    Option(
        "meter_publish_timeout_ms",
        int,
        5000,
        """How long to wait for the broker's ack of one publish, in milliseconds. A timed-out
        publish is retried with the same Nats-Msg-Id, so the broker drops the duplicate.""",
    ),
    Option(
        "meter_publish_linger_ms",
        int,
        250,
        """How long the publisher lets envelopes gather before it publishes them, in
        milliseconds (at most; 256 waiting go at once). Envelopes are on disk before this
        starts: a longer linger only delays them on the stream, and lets one batch of
        publishes, acks and deletes serve many of them (a trickle costs far less CPU). 0
        publishes each commit at once.""",
    ),
    Option(
        "meter_shutdown_drain_ms",
        int,
        5000,
        """On shutdown, how long to keep publishing what is spooled, in milliseconds. What is
        not acknowledged by then stays spooled for the next start.""",
    ),
    Option(
        "meter_shutdown_grace_ms",
        int,
        10000,
        """On shutdown, how long requests in flight (streams above all) get to finish before
        the final drain, in milliseconds; new metered requests are answered 503 meanwhile. A
        request still open at the end is billed as client_aborted.""",
    ),
    Option(
        "meter_anthropic_counts",
        str,
        "",
        """Routes whose OpenAI-shaped usage follows Anthropic's token convention (prompt_tokens
        without cache reads and writes, as NewAPI reports Claude models): comma-separated
        PATH_PREFIX@MODEL_GLOB, or MODEL_GLOB for every metered path, e.g. claude-*. Their cached
        and cache-write tokens are added to input_tokens.""",
    ),
    Option(
        "meter_max_body_mb",
        int,
        16,
        """Largest non-streamed body, in MiB (decoded, and as it came), that is parsed for usage;
        also the largest request body read for include_usage and estimates. A larger response
        passes through untouched, only its end is scanned for the usage object, and it is
        counted as oversize (billed on the estimate if no usage is found there).""",
    ),
    Option(
        "meter_max_event_kb",
        int,
        1024,
        """Largest single SSE event, in KiB, the meter parses or holds. A larger one stops
        parsing of that stream only (counted as oversize_event, billed on what was seen); its
        bytes still flow on unchanged, and inject-strip stops stripping that stream.""",
    ),
    Option(
        "meter_websocket_keep",
        int,
        100,
        """WebSocket messages a live flow keeps in memory, the newest (mitmweb shows these, and a
        saved flow holds these). mitmproxy keeps every message of a connection until it
        closes, so an hour of Realtime audio holds hundreds of MiB; past twice this many, the
        older ones are let go (the meter has read them). A flow read from a file keeps all.
        0 keeps them all, as mitmproxy does.""",
    ),
    Option(
        "meter_admin_listen",
        str,
        "127.0.0.1:9464",
        """host:port of the admin endpoint: /healthz (the proxy's event loop answers), /readyz
        (the meter can record requests) and /metrics (Prometheus text). Empty disables it.""",
    ),
    Option(
        "meter_metrics_max_models",
        int,
        100,
        """Most model names the GenAI metrics (gen_ai_*) label: the first this many models seen
        get a label of their own, requests for any other are counted under model "other", so an
        upstream that names many models cannot make /metrics grow without bound. 0: every
        model is "other".""",
    ),
    Option(
        "meter_ready_broker_down_s",
        int,
        0,
        """/readyz answers 503 once the broker has been unreachable this many seconds (the
        proxy keeps serving and spooling meanwhile). 0: the broker never makes it unready, the
        right choice for a sidecar, whose readiness is its gateway's.""",
    ),
    Option(
        "meter_ready_spool_age_s",
        int,
        0,
        """/readyz answers 503 while the oldest spooled envelope is this many seconds old
        (envelopes are not reaching the stream). 0: spool age never makes it unready.""",
    ),
    Option(
        "meter_tune_mitmproxy",
        bool,
        True,
        """Under mitmdump and mitmweb, give mitmproxy the lean runner's two tunings while the
        meter runs: each event goes only to the addons that implement it, instead of a walk
        over all ~40 addons for every event of every flow (same hooks, same order; about half
        of mitmdump's CPU per request), and the objects alive at startup are frozen out of
        garbage collection (gc.freeze), so a full collection no longer pauses the proxy for
        tens of milliseconds walking them. false leaves mitmproxy as it is.""",
    ),
)

NAMES: frozenset[str] = frozenset(o.name for o in OPTIONS)
DEFAULTS: dict[str, Any] = {o.name: o.default for o in OPTIONS}
