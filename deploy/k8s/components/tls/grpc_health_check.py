"""Kubernetes exec probe: grpc.health.v1 Check over TLS, exit 0 only for SERVING.

Kubernetes' native ``grpc`` probe speaks plaintext only (it has no CA to verify a
certificate with, and a TLS port refuses it), and one port cannot serve both. With the
TLS component the pods therefore check themselves: this script calls Check on the
pod's own port through 127.0.0.1, verifies the certificate with the pod's CA and the
Service name the certificate carries (``--server-name``), and prints why it failed.

    python /etc/tensorwire/probe/grpc_health_check.py --port 50051 --server-name trainer

It costs a Python start-up per probe (about 0.2 s of CPU); the probe periods allow it.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server-name", required=True,
                        help="a DNS name of the pod's certificate (its Service name)")
    parser.add_argument("--ca", default="/etc/tensorwire/tls/ca.crt", help="PEM CA to verify with")
    parser.add_argument("--cert", help="client certificate, when the port asks for one (mTLS)")
    parser.add_argument("--key", help="key of --cert")
    parser.add_argument("--service", default="", help="health service name ('' = the server)")
    parser.add_argument("--timeout-s", type=float, default=2.0)
    args = parser.parse_args(argv)

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    try:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read(args.ca), private_key=read(args.key),
            certificate_chain=read(args.cert))
    except OSError as exc:
        print(f"cannot read TLS files: {exc}", file=sys.stderr)
        return 1
    target = f"127.0.0.1:{args.port}"
    options = [("grpc.ssl_target_name_override", args.server_name)]
    with grpc.secure_channel(target, credentials, options=options) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout_s)
        except grpc.RpcError as exc:
            print(f"{target} (TLS, as {args.server_name}): {exc.code().name}: {exc.details()}",
                  file=sys.stderr)
            return 1
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        print(f"{target}: {name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
