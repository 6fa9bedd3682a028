"""TLS for the gRPC services: server credentials (optionally requiring client certificates,
i.e. mTLS) and channel credentials for clients. Plaintext is for loopback: a worker
refuses to serve plaintext on any other address unless told it sits on a trusted network.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import grpc


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def server_credentials(cert_file: str, key_file: str, client_ca_file: str = "") -> grpc.ServerCredentials:
    """TLS with this certificate chain and key; with ``client_ca_file``, mTLS."""
    return grpc.ssl_server_credentials(
        [(_read(key_file), _read(cert_file))],
        root_certificates=_read(client_ca_file) if client_ca_file else None,
        require_client_auth=bool(client_ca_file))


def channel_credentials(ca_file: str, cert_file: str = "", key_file: str = "") -> grpc.ChannelCredentials:
    """Verify the server with ``ca_file``; present ``cert_file``/``key_file`` for mTLS."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file),
        private_key=_read(key_file) if key_file else None,
        certificate_chain=_read(cert_file) if cert_file else None)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
