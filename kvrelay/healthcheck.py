"""Probe a worker's ``grpc.health.v1`` service: exit 0 when SERVING, 1 otherwise.

``python -m kvrelay.healthcheck --addr 127.0.0.1:50051`` (what the containers run).
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvrelay.client import open_channel


def is_serving(addr: str, service: str = "", timeout_s: float = 2.0, tls_ca_file: str = "") -> bool:
    """Whether the worker at ``addr`` reports SERVING for ``service`` ("" = the whole worker)."""
    with open_channel(addr, tls_ca_file) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvrelay.healthcheck", description=__doc__)
    parser.add_argument("--addr", default="127.0.0.1:50051", help="HOST:PORT of the worker")
    parser.add_argument("--service", default="", help="service name (default: the whole worker)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds")
    parser.add_argument("--tls-ca", default="", help="PEM CA bundle: probe over TLS")
    args = parser.parse_args(argv)
    return 0 if is_serving(args.addr, args.service, args.timeout, args.tls_ca) else 1


if __name__ == "__main__":
    sys.exit(main())
