"""The Helm chart (deploy/helm/edgemeter) and the gateway chart that embeds it as its
meteringSidecar (deploy/helm/newapi-example), rendered and linted offline by Helm's own library
(helm-python-sdk) for several value sets, every manifest validated strictly: Kubernetes kinds by
kubernetes-validate, prometheus-operator kinds by their CRDs' schemas (tests/schemas)."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
from referencing import Registry, Resource
from ruamel.yaml import YAML

from edgemeter import container
from edgemeter.options import OPTIONS
from tests import dockerfile
from tools.harness import ROOT

CHART = ROOT / "deploy" / "helm" / "edgemeter"
EXAMPLE = ROOT / "deploy" / "helm" / "newapi-example"
SCHEMAS = Path(__file__).parent / "schemas"
# The oldest Kubernetes the example chart supports (native preStop sleep) and the newest the
# validator knows.
KUBE_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())

Manifests = list[dict[str, Any]]

STANDALONE = {"upstream": "http://newapi.newapi.svc:3000"}
PRICES = """\
version = "2026-11"
[[model]]
match = "gpt-4o-mini*"
input = 150
output = 600
"""
# Every option a user sets in practice, at once.
FULL = STANDALONE | {
    "replicas": 3,
    "runner": "serve",
    "workers": 2,
    "natsURL": "tls://nats-0.nats:4222,tls://nats-1.nats:4222",
    "natsPublishTimeout": "1500ms",
    "nats": {
        "credentials": {"secretName": "edgemeter-nats", "key": "meter.creds"},
        "tls": {
            "secretName": "nats-client-tls",
            "ca": "ca.crt",
            "cert": "tls.crt",
            "key": "tls.key",
        },
    },
    "prices": {"inline": PRICES},
    "attribution": "keymap",
    "keymap": {"secret": {"name": "edgemeter-keymap", "key": "keys.toml"}},
    "fingerprintSecret": {"secretName": "edgemeter-fingerprint", "key": "hmac"},
    "spool": {"maxMB": 4096, "sync": "full", "onFull": "reject"},
    "persistence": {"type": "pvc", "size": "8Gi", "storageClassName": "fast"},
    "shutdown": {"graceMs": 30000, "drainMs": 15500, "marginSeconds": 5},
    "readiness": {"brokerDownS": 120, "spoolAgeS": 600},
    "metrics": {
        "maxModels": 50,
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True, "selector": 'namespace="llm"'},
    },
    "networkPolicy": {
        "from": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "traefik"}}}
        ],
        "metricsFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ],
        "upstream": {"namespace": "newapi", "port": 3000},
    },
    "extraEnv": [{"name": "MITMPROXY_TERMLOG_VERBOSITY", "value": "warn"}],
    "extraArgs": ["--set", "http2=false"],
    "podAnnotations": {"team": "billing"},
    "tolerations": [{"key": "llm", "operator": "Exists", "effect": "NoSchedule"}],
}
SIDECAR_FULL = {
    "meteringSidecar": {
        "natsURL": "nats://nats.nats-system:4222",
        "nats": {
            "token": {"secretName": "edgemeter-nats", "key": "token"},
        },
        "prices": {"configMap": {"name": "llm-prices", "key": "prices.toml"}},
        "persistence": {"type": "pvc", "existingClaim": "newapi-spool"},
        "metrics": {"podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    },
    "newapi": {"replicas": 1},
}


def documents(rendered: dict[str, str]) -> Manifests:
    yaml = YAML(typ="safe")
    docs = []
    for name, text in sorted(rendered.items()):
        if name.endswith(".txt"):
            continue
        docs += [d for d in yaml.load_all(io.StringIO(text)) if d]
    return docs


@pytest.fixture(scope="module")
def gateway_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example gateway chart with its dependency built as `helm dependency build` does
    (the edgemeter chart packaged into charts/ from file://../edgemeter)."""
    root = tmp_path_factory.mktemp("charts")
    for chart in (CHART, EXAMPLE):
        shutil.copytree(chart, root / chart.name, ignore=shutil.ignore_patterns("charts", "*.lock"))
    helm.dependency_build(root / EXAMPLE.name)
    assert [p.name for p in (root / EXAMPLE.name / "charts").iterdir()] == ["edgemeter-0.1.0.tgz"]
    return root / EXAMPLE.name


def chart_path(which: str, gateway_chart: Path) -> Path:
    return gateway_chart if which == "gateway" else CHART


def render(path: Path, values: dict[str, Any], namespace: str = "llm") -> Manifests:
    with helm.Chart.load(path) as chart:
        return documents(chart.render(values, name="newapi", namespace=namespace))


# (which chart, values): the seed's sidecar block as bp-newapi has it (the example's own
# values), the meter off there, standalone defaults, and every option at once, both ways.
VALUE_SETS: dict[str, tuple[str, dict[str, Any]]] = {
    "seed sidecar": ("gateway", {}),
    "sidecar disabled": ("gateway", {"meteringSidecar": {"enabled": False}}),
    "sidecar full": ("gateway", SIDECAR_FULL),
    "standalone": ("edgemeter", STANDALONE),
    "standalone full": ("edgemeter", FULL),
}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest, gateway_chart: Path) -> tuple[str, Manifests]:
    which, values = VALUE_SETS[request.param]
    return request.param, render(chart_path(which, gateway_chart), values)


# --- lint and strict validation -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_the_chart_lints_clean(name: str, gateway_chart: Path) -> None:
    which, values = VALUE_SETS[name]
    report = helm.lint(chart_path(which, gateway_chart), values, strict=True, with_subcharts=True)
    assert report["errors"] == []
    # Severity 1 is information ("icon is recommended"); 2 warning, 3 error.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def _crd_schema(kind: str) -> dict[str, Any]:
    """A prometheus-operator CRD's schema made strict as kubernetes-validate's are: no property
    an object does not declare (unless it keeps unknown fields), metadata as ObjectMeta."""
    schema: dict[str, Any] = json.loads(
        (SCHEMAS / f"{kind.lower()}-monitoring-v1.json").read_text()
    )

    def strict(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    strict(schema)
    # metadata is ObjectMeta, checked by kubernetes-validate's own (strict) definition.
    schema["properties"]["metadata"] = {"$ref": f"{_DEFINITIONS['$id']}#/$defs/{_OBJECT_META}"}
    return schema


_OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
_DEFINITIONS: dict[str, Any] = json.loads(
    (
        Path(kubernetes_validate.__file__).parent
        / "kubernetes-json-schema"
        / f"v{KUBE_VERSIONS[-1]}-local-strict"
        / "_definitions.json"
    ).read_text()
)
_REGISTRY: Registry[Any] = Resource.from_contents(_DEFINITIONS) @ Registry()


def validate(doc: dict[str, Any], version: str) -> None:
    if doc["apiVersion"].startswith("monitoring.coreos.com/"):
        schema = _crd_schema(doc["kind"])
        jsonschema.Draft202012Validator(schema, registry=_REGISTRY).validate(doc)
        return
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_manifest_validates_strictly(rendered: tuple[str, Manifests], version: str) -> None:
    name, docs = rendered
    assert docs, name
    for doc in docs:
        validate(doc, version)


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({"kind": "Service", "apiVersion": "v1", "metadata": {"name": "x"},
          "spec": {"ports": [{"port": 80, "targetPrt": 1}]}}, "targetPrt"),
        ({"kind": "PodMonitor", "apiVersion": "monitoring.coreos.com/v1", "metadata": {"name": "x"},
          "spec": {"selector": {}, "podMetricsEndpoints": [{"prot": "admin"}]}}, "prot"),
        ({"kind": "PrometheusRule", "apiVersion": "monitoring.coreos.com/v1",
          "metadata": {"name": "x", "lables": {}}, "spec": {"groups": []}}, "lables"),
    ],
)  # fmt: skip
def test_strict_validation_refuses_a_misspelt_field(doc: dict[str, Any], path: str) -> None:
    with pytest.raises(jsonschema.ValidationError, match=path):
        validate(doc, KUBE_VERSIONS[-1])


# --- what the manifests say -----------------------------------------------------------------


def of_kind(docs: Manifests, kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: Manifests, kind: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = of_kind(docs, kind)
    assert len(found) == 1, (kind, len(found))
    return found[0]


def container_of(pod: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in pod["containers"] if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "<from a Secret>") for e in c.get("env", [])}


def port_of(c: dict[str, Any], name: str) -> int:
    return int({p["name"]: p["containerPort"] for p in c["ports"]}[name])


def pod_of(docs: Manifests) -> dict[str, Any]:
    [workload] = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def seed(gateway_chart: Path) -> Manifests:
    return render(gateway_chart, {}, namespace="newapi")


def test_seed_values_keep_the_go_sidecars_names_mapped_to_the_meters_variables(
    seed: Manifests,
) -> None:
    meter = container_of(pod_of(seed), "edgemeter")
    env = env_of(meter)
    assert env["EDGEMETER_LISTEN_PORT"] == "8086" == str(port_of(meter, "metered"))
    assert env["EDGEMETER_PRICE_MICRO_PER_TOKEN"] == "156"
    assert env["EDGEMETER_NATS_URL"] == "nats://nats-jetstream.nats-system.svc.cluster.local:4222"
    assert env["EDGEMETER_PUBLISH_TIMEOUT_MS"] == "5000"
    assert env["EDGEMETER_CUSTOMER_HEADER"] == "X-Customer-Id"
    assert env["EDGEMETER_TENANT_HEADER"] == "X-Tenant-Id"
    assert env["EDGEMETER_SPOOL_DIR"] == "/var/lib/metering-sidecar/spool/spool"
    assert env["EDGEMETER_UPSTREAM"] == "http://127.0.0.1:3000"
    mounts = {m["mountPath"]: m["name"] for m in meter["volumeMounts"]}
    assert mounts["/var/lib/metering-sidecar/spool"] == "edgemeter-data"
    assert meter["securityContext"]["runAsUser"] == 65534
    assert meter["securityContext"]["readOnlyRootFilesystem"] is True
    assert meter["resources"]["limits"] == {"cpu": "500m", "memory": "256Mi"}


def test_the_gateway_service_sends_3000_to_the_meter_and_3001_to_newapi(seed: Manifests) -> None:
    pod = pod_of(seed)
    meter, newapi = container_of(pod, "edgemeter"), container_of(pod, "newapi")
    ports = {p["port"]: p for p in one(seed, "Service")["spec"]["ports"]}
    assert set(ports) == {3000, 3001}
    assert ports[3000]["targetPort"] == "metered" and port_of(meter, "metered") == 8086
    assert ports[3001]["name"] == "http-newapi-direct"
    assert ports[3001]["targetPort"] == port_of(newapi, "http") == 3000
    assert env_of(meter)["EDGEMETER_UPSTREAM"] == f"http://127.0.0.1:{port_of(newapi, 'http')}"


def test_the_gateway_network_policy_admits_the_meter_and_lets_it_reach_nats(
    seed: Manifests,
) -> None:
    policy = one(seed, "NetworkPolicy")["spec"]
    admitted = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert {8086, 9464, 3000} <= admitted
    nats = [
        rule
        for rule in policy["egress"]
        for peer in rule.get("to", [])
        if peer.get("namespaceSelector", {})
        .get("matchLabels", {})
        .get("kubernetes.io/metadata.name")
        == "nats-system"
    ]
    assert [p["port"] for rule in nats for p in rule["ports"]] == [4222]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}


def test_the_probes_ask_the_admin_endpoint(seed: Manifests) -> None:
    meter = container_of(pod_of(seed), "edgemeter")
    admin = port_of(meter, "edgemeter-admin")
    assert env_of(meter)["EDGEMETER_ADMIN_LISTEN"] == f"0.0.0.0:{admin}"
    probes = {k: meter[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {k: (p["path"], p["port"]) for k, p in probes.items()} == {
        "startupProbe": ("/healthz", "edgemeter-admin"),
        "livenessProbe": ("/healthz", "edgemeter-admin"),
        "readinessProbe": ("/readyz", "edgemeter-admin"),
    }


def test_as_a_dependency_the_chart_renders_no_workload_of_its_own(seed: Manifests) -> None:
    assert [d["kind"] for d in seed] == ["Deployment", "NetworkPolicy", "Service"]
    assert [c["name"] for c in pod_of(seed)["containers"]] == ["newapi", "edgemeter"]


def test_the_sidecar_disabled_leaves_newapi_alone(gateway_chart: Path) -> None:
    docs = render(gateway_chart, VALUE_SETS["sidecar disabled"][1])
    assert [c["name"] for c in pod_of(docs)["containers"]] == ["newapi"]
    [port] = one(docs, "Service")["spec"]["ports"]
    assert port["port"] == 3000 and port["targetPort"] == 3000


def test_newapi_outlives_the_meters_grace_and_the_pod_its_drain(seed: Manifests) -> None:
    pod = pod_of(seed)
    env = env_of(container_of(pod, "edgemeter"))
    grace_s = int(env["EDGEMETER_SHUTDOWN_GRACE_MS"]) / 1000
    drain_s = int(env["EDGEMETER_SHUTDOWN_DRAIN_MS"]) / 1000
    assert pod["terminationGracePeriodSeconds"] > grace_s + drain_s
    sleep = container_of(pod, "newapi")["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert grace_s <= sleep < pod["terminationGracePeriodSeconds"]


@pytest.mark.parametrize(
    ("shutdown", "seconds"),
    [
        ({"graceMs": 10000, "drainMs": 5000, "marginSeconds": 10}, 25),
        ({"graceMs": 30000, "drainMs": 15500, "marginSeconds": 5}, 51),
        ({"graceMs": 1, "drainMs": 0, "marginSeconds": 0}, 1),
    ],
)
def test_termination_grace_is_derived_from_the_shutdown_grace_and_drain(
    shutdown: dict[str, int], seconds: int
) -> None:
    pod = pod_of(render(CHART, STANDALONE | {"shutdown": shutdown}))
    expected = math.ceil((shutdown["graceMs"] + shutdown["drainMs"]) / 1000)
    assert pod["terminationGracePeriodSeconds"] == seconds == expected + shutdown["marginSeconds"]


@pytest.mark.parametrize(
    ("timeout", "ms"),
    [("5s", "5000"), ("1500ms", "1500"), ("1m", "60000"), ("2500", "2500"), (7, "7")],
)
def test_the_publish_timeout_takes_a_go_duration(timeout: str | int, ms: str) -> None:
    meter = container_of(
        pod_of(render(CHART, STANDALONE | {"natsPublishTimeout": timeout})), "edgemeter"
    )
    assert env_of(meter)["EDGEMETER_PUBLISH_TIMEOUT_MS"] == ms


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "upstream: the URL of the gateway"),
        (STANDALONE | {"natsPublishTimeout": "1.5s"}, "natsPublishTimeout"),
        (STANDALONE | {"attribution": "keymap"}, "needs a key map"),
        (STANDALONE | {"prices": {"inline": PRICES, "configMap": {"name": "p"}}}, "give one of"),
        (STANDALONE | {"persistence": {"type": "pvc", "existingClaim": "spool"}}, "replicas must be 1"),
        (STANDALONE | {"persistence": {"type": "hostPath"}}, "emptyDir or pvc"),
        (STANDALONE | {"workers": 2}, "workers: 2 needs runner: serve"),
    ],
)  # fmt: skip
def test_values_that_cannot_work_stop_the_render_with_a_reason(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render(CHART, values)


@pytest.mark.parametrize("name", sorted(set(VALUE_SETS) - {"sidecar disabled"}))
def test_the_entrypoint_accepts_every_variable_the_chart_sets(
    name: str, gateway_chart: Path, tmp_path: Path
) -> None:
    which, values = VALUE_SETS[name]
    meter = container_of(pod_of(render(chart_path(which, gateway_chart), values)), "edgemeter")
    runner = env_of(meter).get("EDGEMETER_RUNNER", "mitmdump")
    proxy_options = container.proxy_options(runner)
    table = container.settings_table(OPTIONS, proxy_options)
    env = env_of(meter)
    assert len(env) == len(meter["env"]), "a variable is set twice"
    # Files come from Secrets and ConfigMaps at run time: stand-ins here, so the checks see one.
    mounts = [m["mountPath"] for m in meter["volumeMounts"] if m.get("readOnly")]
    for variable, value in env.items():
        if any(value.startswith(m + "/") for m in mounts):
            env[variable] = str(tmp_path / Path(value).name)
            Path(env[variable]).write_text("stand-in\n")
    args = meter.get("args", [])
    result = container.plan(env, table, args)
    assert result.ignored == [] and result.go.used == []
    assert set(result.given) == set(env) - {container.RUNNER_VARIABLE, container.WORKERS_VARIABLE}
    assert container.parse_workers(env, runner) == (
        ["--workers", env[container.WORKERS_VARIABLE]] if container.WORKERS_VARIABLE in env else []
    )
    assert container.parse_runner(env) == runner
    # What extraArgs sets is an option of the chosen runner.
    for option in container._set_names(args):
        assert option in proxy_options or option.startswith("meter_"), option


def test_the_full_set_runs_a_statefulset_with_one_claim_per_replica() -> None:
    docs = render(CHART, FULL)
    workload = one(docs, "StatefulSet")
    [claim] = workload["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "edgemeter-data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    pod = workload["spec"]["template"]["spec"]
    assert "edgemeter-data" not in {v["name"] for v in pod["volumes"]}
    assert not of_kind(docs, "Deployment")


def test_the_full_set_takes_nats_credentials_and_tls_from_secrets() -> None:
    docs = render(CHART, FULL)
    pod = pod_of(docs)
    meter = container_of(pod, "edgemeter")
    env = env_of(meter)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in meter["volumeMounts"]}
    assert volumes["edgemeter-nats-creds"]["secret"]["secretName"] == "edgemeter-nats"
    assert (
        env["EDGEMETER_NATS_CREDS"] == mounts["edgemeter-nats-creds"]["mountPath"] + "/meter.creds"
    )
    assert volumes["edgemeter-nats-tls"]["secret"]["secretName"] == "nats-client-tls"
    tls = mounts["edgemeter-nats-tls"]["mountPath"]
    assert (env["EDGEMETER_NATS_TLS_CA"], env["EDGEMETER_NATS_TLS_CERT"], env["EDGEMETER_NATS_TLS_KEY"]) == (
        f"{tls}/ca.crt", f"{tls}/tls.crt", f"{tls}/tls.key"
    )  # fmt: skip
    assert all(m["readOnly"] for n, m in mounts.items() if n != "edgemeter-data")


def test_the_sidecar_full_set_takes_the_token_from_a_secret_key(gateway_chart: Path) -> None:
    meter = container_of(pod_of(render(gateway_chart, SIDECAR_FULL)), "edgemeter")
    [token] = [e for e in meter["env"] if e["name"] == "EDGEMETER_NATS_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "edgemeter-nats", "key": "token"}


def test_prices_and_the_key_map_come_from_a_configmap_or_a_secret(gateway_chart: Path) -> None:
    full = render(CHART, FULL)
    pod = pod_of(full)
    env = env_of(container_of(pod, "edgemeter"))
    volumes = {v["name"]: v for v in pod["volumes"]}
    configmap = one(full, "ConfigMap")
    assert configmap["data"]["prices.toml"] == PRICES
    assert volumes["edgemeter-prices"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert env["EDGEMETER_PRICES"] == "/etc/edgemeter/prices/prices.toml"
    assert volumes["edgemeter-keymap"]["secret"]["secretName"] == "edgemeter-keymap"
    assert env["EDGEMETER_KEYMAP"] == "/etc/edgemeter/keymap/keys.toml"
    assert env["EDGEMETER_ATTRIBUTION"] == "keymap"
    # A change of the inline table rolls the Pods.
    annotations = one(full, "StatefulSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["checksum/edgemeter-tables"]
    sidecar = pod_of(render(gateway_chart, SIDECAR_FULL))
    by_name = {v["name"]: v for v in sidecar["volumes"]}
    assert by_name["edgemeter-prices"]["configMap"]["name"] == "llm-prices"
    assert by_name["edgemeter-data"]["persistentVolumeClaim"]["claimName"] == "newapi-spool"


def test_spool_persistence_is_an_emptydir_with_a_size_limit_by_default() -> None:
    pod = pod_of(render(CHART, STANDALONE))
    [data] = [v for v in pod["volumes"] if v["name"] == "edgemeter-data"]
    assert data["emptyDir"]["sizeLimit"] == "2Gi"


def test_the_runner_extra_env_and_args_reach_the_container() -> None:
    meter = container_of(pod_of(render(CHART, FULL)), "edgemeter")
    env = env_of(meter)
    assert env["EDGEMETER_RUNNER"] == "serve"
    assert env["EDGEMETER_WORKERS"] == "2"
    assert env["MITMPROXY_TERMLOG_VERBOSITY"] == "warn"
    assert meter["args"] == ["--set", "http2=false"]


def test_the_service_monitor_scrapes_the_services_metrics_port() -> None:
    docs = render(CHART, FULL)
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    [endpoint] = monitor["spec"]["endpoints"]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports[endpoint["port"]]["targetPort"] == "edgemeter-admin"
    assert endpoint["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_the_pod_monitor_of_a_sidecar_selects_the_gateways_pods(gateway_chart: Path) -> None:
    docs = render(gateway_chart, SIDECAR_FULL)
    monitor = one(docs, "PodMonitor")
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "edgemeter-admin"


def prometheus_rules(docs: Manifests) -> list[dict[str, Any]]:
    [group] = one(docs, "PrometheusRule")["spec"]["groups"]
    rules: list[dict[str, Any]] = group["rules"]
    return rules


def test_the_prometheus_rule_carries_the_readmes_alerts() -> None:
    rules = {r["alert"]: r for r in prometheus_rules(render(CHART, FULL))}
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    recommended = (
        "edgemeter_spool_failures_total",
        "edgemeter_dead_letters",
        "edgemeter_spool_oldest_age_seconds",
    )
    for metric in recommended:
        assert f"`{metric}" in readme
        assert any(metric in r["expr"] for r in rules.values()), metric
    assert (
        'edgemeter_spool_oldest_age_seconds{namespace="llm"}) > 600'
        in rules["EdgemeterSpoolBacklog"]["expr"]
    )
    assert {r["labels"]["severity"] for r in rules.values()} == {"critical", "warning"}


def test_the_chart_runs_the_meter_as_the_image_user_on_a_read_only_root() -> None:
    pod = pod_of(render(CHART, STANDALONE))
    meter = container_of(pod, "edgemeter")
    uid, _, gid = dockerfile.read()[-1].last("USER").args.partition(":")
    security = meter["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid))
    assert security["readOnlyRootFilesystem"] is True and security["runAsNonRoot"] is True
    assert pod["securityContext"]["fsGroup"] == int(gid)
    assert pod["enableServiceLinks"] is False
    env = env_of(meter)
    image = dockerfile.read()[-1].env()
    for variable in (
        "EDGEMETER_SPOOL_DIR",
        "MITMPROXY_CONFDIR",
        "EDGEMETER_LISTEN_PORT",
        "EDGEMETER_ADMIN_LISTEN",
    ):
        assert env[variable] == image[variable], variable


def test_the_chart_and_the_image_agree_on_the_version() -> None:
    yaml = YAML(typ="safe")
    chart = yaml.load(CHART / "Chart.yaml")
    values = yaml.load(CHART / "values.yaml")
    assert chart["appVersion"] == values["image"]["tag"]
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert f'version = "{chart["appVersion"]}"' in pyproject


def test_every_value_of_the_seeds_block_is_one_the_chart_reads() -> None:
    """bp-newapi's meteringSidecar keys (values.yaml of its 1.1.0 chart) are all edgemeter's."""
    yaml = YAML(typ="safe")
    example = yaml.load(EXAMPLE / "values.yaml")["meteringSidecar"]
    seed_keys = {
        "enabled", "image", "port", "priceMicroOMRPerToken", "natsURL", "natsPublishTimeout",
        "spoolDir", "customerIDHeader", "tenantIDHeader", "resources", "securityContext",
    }  # fmt: skip
    assert seed_keys <= example.keys()
    assert seed_keys <= yaml.load(CHART / "values.yaml").keys()
