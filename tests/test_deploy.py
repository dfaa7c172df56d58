"""The Kubernetes example in deploy/: the sidecar next to the gateway in one Pod, checked against
the image (its Dockerfile) and the entrypoint's own mapping of variables to options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from ruamel.yaml import YAML

from edgemeter import container
from edgemeter.options import OPTIONS, variable_of
from tests import dockerfile
from tools.harness import ROOT

EXAMPLE = ROOT / "deploy" / "kubernetes" / "edgemeter-sidecar.yaml"
DEFAULTS = {name: default for name, _type, default, _help in OPTIONS}


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    docs = [d for d in YAML(typ="safe").load_all(EXAMPLE.read_text(encoding="utf-8")) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one object of each kind"
    return by_kind


@pytest.fixture(scope="module")
def pod(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = manifests["Deployment"]["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def meter(pod: dict[str, Any]) -> dict[str, Any]:
    return _container(pod, "edgemeter")


@pytest.fixture(scope="module")
def env(meter: dict[str, Any]) -> dict[str, str]:
    """The meter's environment as the container sees it: the image's ENV, then the example's."""
    image = dockerfile.read()[-1].env()
    return image | {e["name"]: str(e["value"]) for e in meter["env"] if "value" in e}


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in pod["containers"] if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def _port(container_spec: dict[str, Any], name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container_spec.get("ports", [])}
    return int(ports[name])


def _mounts(container_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container_spec.get("volumeMounts", [])}


def _option(env: dict[str, str], option: str) -> str:
    return env.get(variable_of(option), str(DEFAULTS[option]))


def test_example_has_the_pod_its_service_and_a_network_policy(
    manifests: dict[str, dict[str, Any]],
) -> None:
    assert set(manifests) == {"Deployment", "Service", "NetworkPolicy"}


def test_meter_proxies_to_the_gateway_in_the_same_pod(
    pod: dict[str, Any], env: dict[str, str]
) -> None:
    gateway = _container(pod, "gateway")
    assert env["EDGEMETER_UPSTREAM"] == f"http://127.0.0.1:{_port(gateway, 'gateway')}"


def test_every_variable_is_a_setting_and_the_entrypoint_accepts_them(
    meter: dict[str, Any], env: dict[str, str], tmp_path: Path
) -> None:
    table = container.settings_table(OPTIONS, container.proxy_options("mitmdump"))
    names = [e["name"] for e in meter["env"]]
    assert len(names) == len(set(names))
    for name in names:
        assert name in table, f"{name} sets no option"
    # Files come from the Secret's mount at run time: stand-ins here, so the check sees a file.
    secret_mounts = [m for m in _mounts(meter).values() if m.get("readOnly")]
    checked = dict(env)
    for name, value in env.items():
        if any(value.startswith(m["mountPath"] + "/") for m in secret_mounts):
            stand_in = tmp_path / Path(value).name
            stand_in.write_text("stand-in\n")
            checked[name] = str(stand_in)
    assert container.plan(checked, table).ignored == []


def test_probes_ask_the_admin_endpoint(meter: dict[str, Any], env: dict[str, str]) -> None:
    host, _, port = env["EDGEMETER_ADMIN_LISTEN"].rpartition(":")
    assert host == "0.0.0.0", "kubelet probes come from outside the container"
    assert _port(meter, "admin") == int(port)
    probes = {
        kind: (meter[kind]["httpGet"]["path"], meter[kind]["httpGet"]["port"])
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes == {
        "startupProbe": ("/healthz", "admin"),
        "livenessProbe": ("/healthz", "admin"),
        "readinessProbe": ("/readyz", "admin"),
    }


def test_service_reaches_the_meter_never_the_gateway(
    manifests: dict[str, dict[str, Any]],
    pod: dict[str, Any],
    meter: dict[str, Any],
    env: dict[str, str],
) -> None:
    (port,) = manifests["Service"]["spec"]["ports"]
    assert port["targetPort"] == "metered"
    assert _port(meter, "metered") == int(env["EDGEMETER_LISTEN_PORT"])
    allowed = {
        int(p["port"])
        for rule in manifests["NetworkPolicy"]["spec"]["ingress"]
        for p in rule["ports"]
    }
    assert allowed == {_port(meter, "metered"), _port(meter, "admin")}
    assert _port(_container(pod, "gateway"), "gateway") not in allowed


def test_spool_and_confdir_lie_in_the_image_volume(
    pod: dict[str, Any], meter: dict[str, Any], env: dict[str, str]
) -> None:
    volumes = [v for i in dockerfile.read()[-1].all("VOLUME") for v in i.exec_form or []]
    mounts = _mounts(meter)
    for volume in volumes:
        assert volume in mounts and not mounts[volume].get("readOnly"), volume
    for name in ("EDGEMETER_SPOOL_DIR", "MITMPROXY_CONFDIR"):
        assert str(Path(env[name]).parent) in volumes, name
    declared = {v["name"]: v for v in pod["volumes"]}
    assert {m["name"] for m in mounts.values()} <= declared.keys()


def test_nats_credentials_are_a_secret_mounted_as_a_file(
    pod: dict[str, Any], meter: dict[str, Any], env: dict[str, str]
) -> None:
    creds = Path(env["EDGEMETER_NATS_CREDS"])
    mount = _mounts(meter)[str(creds.parent)]
    assert mount["readOnly"] is True
    volume = {v["name"]: v for v in pod["volumes"]}[mount["name"]]
    assert "secretName" in volume["secret"]


def test_meter_runs_as_the_image_user_on_a_read_only_root(
    pod: dict[str, Any], meter: dict[str, Any]
) -> None:
    uid, _, gid = dockerfile.read()[-1].last("USER").args.partition(":")
    security = meter["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid))
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # The volume's root stays root's: the group makes it writable for the meter.
    assert pod["securityContext"]["fsGroup"] == int(gid)


def test_pod_waits_for_the_meter_to_finish_and_drain(
    pod: dict[str, Any], env: dict[str, str]
) -> None:
    shutdown_ms = int(_option(env, "meter_shutdown_grace_ms")) + int(
        _option(env, "meter_shutdown_drain_ms")
    )
    assert pod["terminationGracePeriodSeconds"] * 1000 > shutdown_ms


def test_pod_gets_no_service_link_variables(pod: dict[str, Any]) -> None:
    assert pod["enableServiceLinks"] is False


def test_meter_has_requests_and_a_memory_limit(meter: dict[str, Any]) -> None:
    resources = meter["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]


def test_prometheus_scrapes_the_admin_port(
    manifests: dict[str, dict[str, Any]], meter: dict[str, Any]
) -> None:
    annotations = manifests["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == _port(meter, "admin")


@pytest.mark.parametrize("version", ["1.27.0", kubernetes_validate.utils.latest_version()])
def test_every_manifest_validates_strictly(
    manifests: dict[str, dict[str, Any]], version: str
) -> None:
    for manifest in manifests.values():
        kubernetes_validate.validate(manifest, version, strict=True)
