"""The Prometheus /metrics HTTP server of the service and of the personalisation worker.

prometheus_client's `start_http_server`, bound as gRPC binds its own port: an "every address"
host ("0.0.0.0", or "" / "::") listens on IPv6 as well as IPv4 where the host has IPv6. With
"0.0.0.0" as such the metrics port was IPv4 only while the gRPC port beside it took both, so on an
IPv6-only cluster Prometheus could not scrape a server that served its clients (helper-73).
The worker serves its liveness (worker/liveness.py) beside it, on HEALTH_PATH: one port to probe.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

ANY = ("0.0.0.0", "", "::")
HEALTH_PATH = "/healthz"


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # (a scrape in flight does not hold the process at its end)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a line on stderr per scrape and probe


def app(registry: CollectorRegistry, health: Callable[[], str | None] | None = None) -> Callable[..., Any]:
    """The WSGI app: /metrics (any path, as prometheus_client's) and, with `health`, HEALTH_PATH:
    200 "ok" while health() is None, else 503 with what it says."""
    metrics = make_wsgi_app(registry)

    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if health is None or environ.get("PATH_INFO") != HEALTH_PATH:
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        why = health()
        body = ("ok" if why is None else why).encode() + b"\n"
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
        start_response("200 OK" if why is None else "503 Service Unavailable", headers)
        return [body]

    return serve


def _start(host: str, port: int, wsgi: Callable[..., Any]) -> tuple[Any, threading.Thread]:
    """prometheus_client's start_wsgi_server, with our app: the family the address is of."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsServer", (_Server,), {"address_family": family})
    server: _Server = make_server(host, port, wsgi, server_class, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, thread


def serve(
    host: str, port: int, registry: CollectorRegistry, health: Callable[[], str | None] | None = None
) -> tuple[Any, threading.Thread]:
    """Start the /metrics server (and HEALTH_PATH with `health`) in a daemon thread -> (server,
    its thread). OSError when the address cannot be bound (in use, not this machine's)."""
    wsgi = app(registry, health)
    if host in ANY and socket.has_ipv6:
        with contextlib.suppress(OSError):  # no IPv6 here: IPv4 alone, as asked
            server, thread = _start("::", port, wsgi)
            if not server.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
                return server, thread  # one socket, both families
            server.shutdown()  # (IPv6 only on this host: net.ipv6.bindv6only=1)
            server.server_close()
    return _start("0.0.0.0" if host in ANY else host, port, wsgi)
