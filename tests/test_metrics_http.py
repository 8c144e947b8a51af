"""The /metrics server of the service and the worker listens where gRPC does (facekit/metrics_http.py)."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from facekit import metrics_http
from service.metrics import Metrics
from worker.metrics import WorkerMetrics


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


@pytest.mark.parametrize("metrics", [Metrics, WorkerMetrics])
def test_every_address_means_ipv6_too_as_for_grpc(metrics: type) -> None:
    """The chart binds 0.0.0.0: gRPC took IPv6 and IPv4 there, /metrics IPv4 only, so on an
    IPv6-only cluster Prometheus could not scrape a server its clients reached (helper-73:
    [::1]:8080 refused, [::1]:50051 served)."""
    server, port = metrics().serve("0.0.0.0", 0)
    try:
        assert "process_resident_memory_bytes" in _scrape(f"http://127.0.0.1:{port}/metrics")
        if _ipv6_loopback():
            assert "process_resident_memory_bytes" in _scrape(f"http://[::1]:{port}/metrics")
    finally:
        server.shutdown()
        server.server_close()


def test_a_named_address_is_bound_as_given() -> None:
    """127.0.0.1 (the worker's default, the local stack's) stays loopback IPv4 alone."""
    from prometheus_client import CollectorRegistry

    server, _thread = metrics_http.serve("127.0.0.1", 0, CollectorRegistry())
    try:
        assert server.socket.family == socket.AF_INET and server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
        server.server_close()
