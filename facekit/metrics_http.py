"""The Prometheus /metrics HTTP server of the service and of the personalisation worker.

prometheus_client's `start_http_server`, bound as gRPC binds its own port: an "every address"
host ("0.0.0.0", or "" / "::") listens on IPv6 as well as IPv4 where the host has IPv6. With
"0.0.0.0" as such the metrics port was IPv4 only while the gRPC port beside it took both, so on an
IPv6-only cluster Prometheus could not scrape a server that served its clients (helper-73).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

ANY = ("0.0.0.0", "", "::")


def serve(host: str, port: int, registry: CollectorRegistry) -> tuple[Any, threading.Thread]:
    """Start the /metrics server in a daemon thread -> (server, its thread). OSError when the
    address cannot be bound (in use, not this machine's)."""
    if host in ANY and socket.has_ipv6:
        with contextlib.suppress(OSError):  # no IPv6 here: IPv4 alone, as asked
            server, thread = start_http_server(port, addr="::", registry=registry)
            if not server.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
                return server, thread  # one socket, both families
            server.shutdown()  # (IPv6 only on this host: net.ipv6.bindv6only=1)
            server.server_close()
    return start_http_server(port, addr="0.0.0.0" if host in ANY else host, registry=registry)
