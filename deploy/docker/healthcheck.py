#!/usr/bin/env python3
"""grpc.health.v1 Check against the talkinghead service; exit 0 when SERVING, 1 otherwise.

The image installs it as `talkinghead-healthcheck`, for the Dockerfile HEALTHCHECK, the Helm chart's
probes when TLS is on (Kubernetes' native gRPC probe cannot speak TLS) and the `helm test` pod.
It reads the service's own settings, so inside the container no flag is needed:

    talkinghead-healthcheck                                   # 127.0.0.1:$TALKINGHEAD_GRPC_PORT
    talkinghead-healthcheck --address talkinghead.ns.svc:50051 --timeout 10
    talkinghead-healthcheck --tls --ca /etc/talkinghead/tls/ca.crt --server-name avatars.example.com
    talkinghead-healthcheck --tls --client-cert probe/tls.crt --client-key probe/tls.key   # mTLS

TLS is used with --tls, or when TALKINGHEAD_TLS_CERT is set. The trusted roots are --ca, else the
ca.crt beside the certificate, else the certificate itself (right for a self-signed one). The name
checked against the certificate is --server-name, else the certificate's first DNS name. A server
that requires client certificates (TALKINGHEAD_TLS_CLIENT_CA) refuses the handshake without one:
give it with --client-cert and --client-key (the health service itself needs no credentials).
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="talkinghead-healthcheck",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    port = os.environ.get("TALKINGHEAD_GRPC_PORT", "50051")
    parser.add_argument("--address", default=f"127.0.0.1:{port}", help="host:port (default: %(default)s)")
    parser.add_argument("--service", default="", help="health service name; '' is the whole server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default: %(default)s)")
    parser.add_argument(
        "--tls", action="store_true", help="connect with TLS (implied by TALKINGHEAD_TLS_CERT)"
    )
    parser.add_argument(
        "--cert", default=os.environ.get("TALKINGHEAD_TLS_CERT", ""), help="server certificate"
    )
    parser.add_argument("--ca", default="", help="CA bundle to trust (default: ca.crt beside --cert)")
    parser.add_argument(
        "--server-name", default="", help="name to verify (default: the cert's first DNS name)"
    )
    parser.add_argument("--client-cert", default="", help="PEM client certificate (mTLS; with --client-key)")
    parser.add_argument("--client-key", default="", help="PEM private key of --client-cert")
    args = parser.parse_args(argv)
    if bool(args.client_cert) != bool(args.client_key):
        parser.error("--client-cert and --client-key go together")
    args.tls = args.tls or bool(os.environ.get("TALKINGHEAD_TLS_CERT"))
    return args


def certificate_names(cert: Path) -> list[str]:
    """DNS names (then the common name) of a PEM certificate, without third-party packages."""
    try:
        decoded = ssl._ssl._test_decode_cert(str(cert))  # type: ignore[attr-defined]
    except (AttributeError, ssl.SSLError, OSError):
        return []
    names = [value for kind, value in decoded.get("subjectAltName", ()) if kind == "DNS"]
    for rdn in decoded.get("subject", ()):
        names += [value for key, value in rdn if key == "commonName"]
    return names


def channel(args: argparse.Namespace) -> grpc.Channel:
    if not args.tls:
        return grpc.insecure_channel(args.address)
    cert = Path(args.cert) if args.cert else None
    candidates = [Path(args.ca)] if args.ca else []
    if cert is not None:
        candidates += [cert.parent / "ca.crt", cert]
    roots = next((path for path in candidates if path.is_file()), None)
    if roots is None:
        raise SystemExit("talkinghead-healthcheck: --tls needs --ca or --cert (or TALKINGHEAD_TLS_CERT)")
    client = (
        (Path(args.client_key).read_bytes(), Path(args.client_cert).read_bytes())
        if args.client_cert
        else (None, None)
    )
    credentials = grpc.ssl_channel_credentials(
        root_certificates=roots.read_bytes(), private_key=client[0], certificate_chain=client[1]
    )
    names = [args.server_name] if args.server_name else certificate_names(cert) if cert else []
    options = [("grpc.ssl_target_name_override", names[0])] if names else []
    return grpc.secure_channel(args.address, credentials, options=options)


def check(args: argparse.Namespace) -> int:
    with channel(args) as chan:
        stub = health_pb2_grpc.HealthStub(chan)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as error:
            print(f"{args.address}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def main(argv: list[str] | None = None) -> int:
    return check(parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
