"""The talkinghead alerting rules as a Prometheus rule group, for the local stack (`make up`).

The rules come from the chart's files/alerts.yaml and their settings (enabled, for, severity,
threshold) from the defaults in its values.yaml (metrics.prometheusRule.alerts): the chart's
PrometheusRule template (templates/server-prometheusrule.yaml) renders the same source the same
way - plain-text replacement of `${selector}` and `${threshold}` in `expr`, `summary` and
`description` - so the two never diverge (tests/test_alerts.py renders both and compares them).

    python deploy/local/alerts.py > rules.yml      # the local stack's group (job="talkinghead")

Needs PyYAML (the project's virtual environment), which `stack.py up` runs with.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

CHART = Path(__file__).resolve().parents[1] / "helm" / "talkinghead"
SOURCE = CHART / "files" / "alerts.yaml"
VALUES = CHART / "values.yaml"
# The local stack's scrape job of the service (prometheus.yml.in).
LOCAL_SELECTOR = 'job="talkinghead"'
# The alert whose threshold, when null, is the live latency budget (in seconds).
LATENCY_ALERT = "TalkingheadLatencyHigh"
README_SECTION = "section 6, Alerts"


def _yaml(path: Path) -> Any:
    import yaml  # (PyYAML: the venv's; stack.py's `down` and `status` stay stdlib-only)

    return yaml.safe_load(path.read_text())


def default_settings() -> tuple[dict[str, dict[str, Any]], int]:
    """(metrics.prometheusRule.alerts, server.latencyBudgetMs) of the chart's values.yaml."""
    values = _yaml(VALUES)
    return values["metrics"]["prometheusRule"]["alerts"], int(values["server"]["latencyBudgetMs"])


def number(value: float) -> str:
    """A threshold as Go's %v prints it (helm's toString): 3, 0.05, 0.2."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


def rule_group(
    selector: str = LOCAL_SELECTOR,
    settings: dict[str, dict[str, Any]] | None = None,
    latency_budget_ms: int | None = None,
    runbook_url: str = "",
    rule_labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The rule group (`{name, rules}`), as the chart renders it with these values."""
    defaults, budget = default_settings()
    settings = defaults if settings is None else settings
    budget = budget if latency_budget_ms is None else latency_budget_ms
    source = _yaml(SOURCE)
    rules = []
    for alert in source["alerts"]:
        name = alert["alert"]
        if name not in settings:
            raise KeyError(f"metrics.prometheusRule.alerts.{name}: no settings for this alert of {SOURCE}")
        setting = settings[name]
        if not setting["enabled"]:
            continue
        threshold = setting.get("threshold")
        if name == LATENCY_ALERT and threshold is None:
            threshold = budget / 1000
        text = "<no value>" if threshold is None else number(threshold)

        def fill(template: str, threshold: str = text) -> str:
            return template.replace("${selector}", selector).replace("${threshold}", threshold)

        annotations = {"summary": fill(alert["summary"]), "description": fill(alert["description"])}
        anchor = name.lower()
        if runbook_url:
            annotations["runbook_url"] = f"{runbook_url}#{anchor}"
        else:
            annotations["runbook"] = f"deploy/README.md#{anchor} ({README_SECTION})"
        rules.append(
            {
                "alert": name,
                "annotations": annotations,
                "expr": fill(alert["expr"]),
                "for": setting["for"],
                "labels": {**(rule_labels or {}), "severity": setting["severity"]},
            }
        )
    return {"name": source["group"], "rules": rules}


def rules_file(path: Path, selector: str = LOCAL_SELECTOR, latency_budget_ms: int | None = None) -> Path:
    """Write a Prometheus rules file (`groups: [the group]`) to `path`."""
    import yaml

    group = rule_group(selector, latency_budget_ms=latency_budget_ms)
    path.write_text(
        "# Rendered by deploy/local/alerts.py from deploy/helm/talkinghead/files/alerts.yaml and the\n"
        "# chart's values.yaml (metrics.prometheusRule.alerts); edit those, not this file.\n"
        + yaml.safe_dump({"groups": [group]}, sort_keys=False, width=120)
    )
    return path


if __name__ == "__main__":
    import yaml

    sys.stdout.write(yaml.safe_dump({"groups": [rule_group()]}, sort_keys=False, width=120))
