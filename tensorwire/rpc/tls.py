"""TLS for every port: server credentials that follow certificate rotation, and
client credentials that verify the services a program calls.

A server's certificate and key are re-read when either file changes (cert-manager
renews them in place): gRPC asks ``ServerTls`` for a new configuration at each
handshake, and the HTTP endpoints (gateway, metrics) reload their SSL context the
same way. With a client CA the server asks every client for a certificate (mTLS).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)


class TlsError(ValueError):
    """A certificate, key or CA file cannot be used (the message names it)."""


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise TlsError(f"{what} {path} is not PEM (no -----BEGIN line)")
    return data


def _stamp(*paths: Path | None) -> tuple[tuple[int, int], ...]:
    out = []
    for path in paths:
        if path is None:
            continue
        try:
            st = path.stat()
            out.append((st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((-1, -1))
    return tuple(out)


class ServerTls:
    """A server's certificate, key and optional client CA, reloaded on change."""

    def __init__(self, cert: Path | str, key: Path | str, client_ca: Path | str | None = None) -> None:
        self.cert, self.key = Path(cert), Path(key)
        self.client_ca = Path(client_ca) if client_ca else None
        self._lock = threading.Lock()
        self._stamp = _stamp(self.cert, self.key, self.client_ca)
        self._pem = self._load()
        self.reloads = 0
        self._contexts: list[ssl.SSLContext] = []
        self._looked_at = time.monotonic()

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def _load(self) -> tuple[bytes, bytes, bytes | None]:
        cert = _read(self.cert, "TLS certificate")
        key = _read(self.key, "TLS key")
        ca = _read(self.client_ca, "client CA") if self.client_ca else None
        try:  # the pair must match: a mismatch found now, not at the first handshake
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(self.cert, self.key)
        except ssl.SSLError as exc:
            raise TlsError(f"TLS certificate {self.cert} and key {self.key} do not load: {exc}") from None
        return key, cert, ca

    def _changed(self) -> bool:
        """Re-read the files if they changed; True when a new, valid pair was loaded."""
        stamp = _stamp(self.cert, self.key, self.client_ca)
        if stamp == self._stamp:
            return False
        with self._lock:
            if stamp == self._stamp:
                return False
            self._stamp = stamp
            try:
                self._pem = self._load()
            except TlsError as exc:  # half-written during rotation: keep serving the old pair
                log.error("TLS files changed but do not load, keeping the previous ones: %s", exc)
                return False
            self.reloads += 1
            log.info("TLS certificate %s reloaded", self.cert)
            for ctx in self._contexts:
                self._fill(ctx)
            return True

    def _config(self) -> grpc.ServerCertificateConfiguration:
        key, cert, ca = self._pem
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port`` that pick up rotated files at the next handshake."""

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            return self._config() if self._changed() else None

        return grpc.dynamic_ssl_server_credentials(
            self._config(), fetch, require_client_authentication=self.mutual
        )

    def _fill(self, ctx: ssl.SSLContext) -> None:
        ctx.load_cert_chain(self.cert, self.key)
        if self.client_ca is not None:
            ctx.load_verify_locations(cafile=str(self.client_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED

    def ssl_context(self) -> ssl.SSLContext:
        """An SSL context for an HTTP endpoint; ``maybe_reload()`` refreshes it in place."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._fill(ctx)
        self._contexts.append(ctx)
        return ctx

    def maybe_reload(self, min_interval_s: float = 1.0) -> None:
        """Re-read the files if they changed (looked at most every ``min_interval_s``)."""
        now = time.monotonic()
        if now - self._looked_at >= min_interval_s:
            self._looked_at = now
            self._changed()


@dataclass(frozen=True)
class ClientTls:
    """How a program verifies the services it calls (and, for mTLS, who it is)."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "TLS CA"),
            private_key=_read(self.key, "TLS key") if self.key else None,
            certificate_chain=_read(self.cert, "TLS certificate") if self.cert else None,
        )
