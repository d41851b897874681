"""Who may call what: bearer tokens, roles, and the one table of method -> role.

Tokens come from a file in Kubernetes' static token file format (CSV
``token,user,uid,"group1,group2"``), re-read when it changes. A token's groups
give its roles: ``tensorwire:viewer``, ``tensorwire:operator``,
``tensorwire:admin`` (each includes the ones before it) and
``tensorwire:publisher`` (the identity trainers and SDK scripts publish with).

``METHOD_ROLES`` is the only place where an RPC gets its role. A method missing
from it is refused, and a test checks every method of every service descriptor
against it, so a new RPC cannot ship unprotected. Health checks are open (probes).

A client sends ``authorization: Bearer <token>`` as gRPC metadata (through
gRPC-Web: the same HTTP header). Missing or unknown token -> UNAUTHENTICATED;
known token, wrong role -> PERMISSION_DENIED naming the method and the role.
"""

from __future__ import annotations

import csv
import enum
import functools
import hashlib
import io
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import grpc
from grpc_health.v1 import health_pb2

from tensorwire.errors import PermissionDeniedError, UnauthenticatedError
from tensorwire.inference import grpc_service_pb2
from tensorwire.rpc.rpcnames import method_path
from tensorwire.rpc.tls import ClientTls
from tensorwire.streamer.v1 import streamer_pb2
from tensorwire.trainer.v1 import trainer_pb2
from tensorwire.transfer.v1 import transfer_pb2

log = logging.getLogger(__name__)

GROUP_PREFIX: Final = "tensorwire:"


class Role(enum.Enum):
    VIEWER = "viewer"
    """Reads: runs, live views, models, and inference."""
    OPERATOR = "operator"
    """Viewer + starts, pauses, resumes, stops and changes runs."""
    ADMIN = "admin"
    """Operator + loads, unloads and uploads models, config overrides."""
    PUBLISHER = "publisher"
    """Publishes a run's live updates to the streamer (trainers, SDK scripts)."""

    @property
    def group(self) -> str:
        return GROUP_PREFIX + self.value


_INCLUDES: Final[dict[Role, frozenset[Role]]] = {
    Role.VIEWER: frozenset({Role.VIEWER}),
    Role.OPERATOR: frozenset({Role.VIEWER, Role.OPERATOR}),
    Role.ADMIN: frozenset({Role.VIEWER, Role.OPERATOR, Role.ADMIN}),
    Role.PUBLISHER: frozenset({Role.PUBLISHER}),
}

OPEN: Final = None
"""A method anyone may call (health checks)."""

_V, _O, _A, _P = Role.VIEWER, Role.OPERATOR, Role.ADMIN, Role.PUBLISHER

def _roles(module: ModuleType, service: str, roles: Mapping[str, Role | None]) -> dict[str, Role | None]:
    """``roles`` by full method path, each name checked against the proto's descriptor."""
    return {method_path(module, service, method): role for method, role in roles.items()}


_TABLE: Final[dict[str, Role | None]] = {
    **_roles(trainer_pb2, "TrainerService", {
        "ListTasks": _V, "ListRuns": _V, "GetRun": _V, "GetRunScalars": _V,
        "StartRun": _O, "PauseRun": _O, "ResumeRun": _O, "StopRun": _O, "UpdateRun": _O,
        "DeleteRun": _O,
        # A training script (the SDK) registers its run and takes its control over a
        # stream: it is a publisher, like the identity it publishes to the streamer with.
        "RegisterRun": _P, "AttachRun": _P,
    }),
    **_roles(streamer_pb2, "StreamerService", {"Subscribe": _V, "Ack": _V, "Publish": _P}),
    **_roles(grpc_service_pb2, "GRPCInferenceService", {
        # Triton's "health" group: open like grpc.health.v1 (load balancers probe them).
        "ServerLive": OPEN, "ServerReady": OPEN,
        "ModelReady": _V, "ServerMetadata": _V, "ModelMetadata": _V, "ModelConfig": _V,
        "ModelStatistics": _V, "RepositoryIndex": _V,
        "ModelInfer": _V, "ModelStreamInfer": _V,
        "RepositoryModelLoad": _A, "RepositoryModelUnload": _A,
    }),
    **_roles(transfer_pb2, "ModelTransferService", {"UploadModel": _A}),
    **_roles(health_pb2, "Health", {"Check": OPEN, "Watch": OPEN, "List": OPEN}),
    # Reflection has two package names (v1alpha and v1) and no v1 module in grpcio-reflection.
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _V,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": _V,
}

_HTTP_ROUTES: Final[dict[str, Role | None]] = {
    "GET /metrics": _V,
}
"""HTTP routes that are not gRPC methods (the gateway's), by ``METHOD /path``."""

METHOD_ROLES: Final[Mapping[str, Role | None]] = {**_TABLE, **_HTTP_ROUTES}
"""Full method path (``/package.Service/Method``) or HTTP route -> the role it
needs (None: open)."""

INFERENCE_READ_METHODS: Final = frozenset(
    method_path(grpc_service_pb2, "GRPCInferenceService", m)
    for m in ("ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
              "ModelStatistics", "RepositoryIndex", "ModelInfer", "ModelStreamInfer")
)
"""What ``--open-inference`` opens to callers without a token (Triton's inference,
metadata and statistics groups); loads, unloads and uploads keep their role."""


@dataclass(frozen=True)
class Identity:
    """Who a token belongs to."""

    user: str
    uid: str
    groups: frozenset[str]

    @functools.cached_property
    def roles(self) -> frozenset[Role]:
        out: set[Role] = set()
        for role in Role:
            if role.group in self.groups:
                out |= _INCLUDES[role]
        return frozenset(out)

    def may(self, role: Role) -> bool:
        return role in self.roles


class TokenFileError(ValueError):
    """The token file cannot be used (the message names the file and line)."""


def _digest(token: str) -> bytes:
    # Tokens are looked up by digest: the dict probe then reveals nothing about
    # how much of a wrong token matched (no prefix timing).
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def parse_token_file(text: str, source: str = "token file") -> dict[bytes, Identity]:
    """Tokens of a Kubernetes static token file: ``token,user,uid[,"g1,g2"]`` per line."""
    table: dict[bytes, Identity] = {}
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) < 3:
            raise TokenFileError(
                f"{source}, line {number}: expected token,user,uid[,\"groups\"], "
                f"got {len(row)} column(s)"
            )
        token, user, uid = (part.strip() for part in row[:3])
        if not token or not user:
            raise TokenFileError(f"{source}, line {number}: empty token or user")
        groups = frozenset(g.strip() for g in ",".join(row[3:]).split(",") if g.strip())
        table[_digest(token)] = Identity(user, uid, groups)
    return table


class TokenFile:
    """A static token file, re-read when it changes (checked at most every
    ``check_interval_s``). A file that becomes unreadable or invalid keeps the
    last good table (logged once per change)."""

    def __init__(self, path: Path | str, *, check_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self._interval = check_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = clock()
        self._table = self._read()  # a bad file at start-up raises TokenFileError
        self.reloads = 0

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = self.path.stat()
        except OSError:
            return (-1, -1, -1)  # gone: one stamp for it, so it is logged once
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _read(self) -> dict[bytes, Identity]:
        try:
            stamp = self._stat()
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TokenFileError(f"cannot read token file {self.path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise TokenFileError(f"token file {self.path} is not UTF-8 text") from None
        table = parse_token_file(text, str(self.path))
        self._stamp = stamp
        return table

    def _refresh(self) -> None:
        now = self._clock()
        if now - self._checked_at < self._interval:
            return
        with self._lock:
            if now - self._checked_at < self._interval:
                return
            self._checked_at = now
            try:
                if self._stat() == self._stamp:
                    return
                self._table = self._read()
                self.reloads += 1
                log.info("token file %s reloaded (%d tokens)", self.path, len(self._table))
            except (OSError, TokenFileError) as exc:
                self._stamp = self._stat()  # do not log again until it changes
                log.error("token file not reloaded, keeping the previous tokens: %s", exc)

    def lookup(self, token: str) -> Identity | None:
        self._refresh()
        return self._table.get(_digest(token))

    def __len__(self) -> int:
        return len(self._table)


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry, if any."""
    for key, value in metadata or ():
        if key == "authorization":
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


class Authorizer:
    """Decides one call: ``check(method, metadata)`` returns the caller's identity
    (None for an open method or when auth is off) or raises the domain error."""

    def __init__(self, tokens: TokenFile | None, *, open_inference: bool = False,
                 table: Mapping[str, Role | None] = METHOD_ROLES) -> None:
        self.tokens = tokens
        self._table = dict(table)
        self._checkers: dict[str, Callable[[Iterable[tuple[str, Any]] | None], Identity] | None] = {}
        if open_inference:
            for method in INFERENCE_READ_METHODS:
                self._table[method] = OPEN

    @property
    def enabled(self) -> bool:
        return self.tokens is not None

    def role_of(self, method: str) -> Role | None:
        """The role ``method`` needs; a method missing from the table needs a role
        nobody has (it is refused, never silently open)."""
        try:
            return self._table[method]
        except KeyError:
            raise PermissionDeniedError(
                f"{method} is not in the role table (tensorwire.rpc.auth.METHOD_ROLES); refused"
            ) from None

    def check(self, method: str, metadata: Iterable[tuple[str, Any]] | None) -> Identity | None:
        """Decide one call of ``method`` with this metadata (HTTP routes: the check is
        built once per method and kept, as gRPC handlers keep theirs)."""
        try:
            checker = self._checkers[method]
        except KeyError:
            checker = self._checkers[method] = self.checker(method)
        return checker(metadata) if checker is not None else None

    def checker(self, method: str) -> Callable[[Iterable[tuple[str, Any]] | None], Identity] | None:
        """The per-call check of ``method``, built once when its handler is
        registered; None when the method needs no check (auth off, or open)."""
        if self.tokens is None:
            return None
        try:
            role = self.role_of(method)
        except PermissionDeniedError as exc:
            reason = str(exc)

            def refuse(metadata: Iterable[tuple[str, Any]] | None) -> Identity:
                raise PermissionDeniedError(reason)

            return refuse
        if role is None:
            return None
        tokens = self.tokens
        missing = f"{method} needs a bearer token (metadata 'authorization: Bearer <token>')"

        def check(metadata: Iterable[tuple[str, Any]] | None) -> Identity:
            token = bearer_token(metadata)
            if token is None:
                raise UnauthenticatedError(missing)
            identity = tokens.lookup(token)
            if identity is None:
                raise UnauthenticatedError(f"{method}: unknown bearer token")
            if role not in identity.roles:
                held = ", ".join(sorted(r.value for r in identity.roles)) or "no role"
                raise PermissionDeniedError(
                    f"{method} needs role {role.value} (group {role.group}); "
                    f"user {identity.user!r} has {held}"
                )
            return identity

        return check


# ------------------------------------------------------------------ client side


class TokenSource:
    """The bearer token a client sends: a literal, or a file re-read when it changes."""

    def __init__(self, token: str | None = None, *, path: Path | str | None = None) -> None:
        if token is None and path is None:
            raise ValueError("a TokenSource needs a token or a path")
        self._token = token
        self.path = Path(path) if path is not None else None
        self._stamp: tuple[int, int] | None = None
        if self.path is not None:
            self.token()  # an unreadable file fails now, not at the first call

    def token(self) -> str:
        if self.path is None:
            assert self._token is not None
            return self._token
        try:
            st = self.path.stat()
            stamp = (st.st_size, st.st_mtime_ns)
            if stamp != self._stamp:
                self._token = self.path.read_text(encoding="utf-8").strip()
                self._stamp = stamp
        except OSError as exc:
            if self._token is None:
                raise TokenFileError(f"cannot read token file {self.path}: {exc.strerror or exc}") from None
        assert self._token is not None
        return self._token

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token()}"),)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TokenSource | None:
        """``TENSORWIRE_TOKEN`` (the token) or ``TENSORWIRE_TOKEN_FILE`` (a file holding it)."""
        env = os.environ if environ is None else environ
        if env.get("TENSORWIRE_TOKEN"):
            return cls(env["TENSORWIRE_TOKEN"])
        if env.get("TENSORWIRE_TOKEN_FILE"):
            return cls(path=env["TENSORWIRE_TOKEN_FILE"])
        return None


class _Bearer:
    """Adds ``authorization: Bearer <token>`` to a call's metadata (unless the call
    brings its own, as the gateway does with the browser's)."""

    def __init__(self, source: TokenSource) -> None:
        self.source = source

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*tuple(details.metadata or ()))
        if "authorization" not in metadata:
            metadata.add("authorization", f"Bearer {self.source.token()}")
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                          details.credentials, details.wait_for_ready)


# grpc.aio files an interceptor under the first of the four kinds it is an instance
# of, so each kind is its own class.
class _BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _BearerStreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _BearerStreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def bearer_interceptors(source: TokenSource) -> tuple[grpc.aio.ClientInterceptor, ...]:
    """Client interceptors that send ``source``'s token on every kind of call."""
    return (_BearerUnaryUnary(source), _BearerUnaryStream(source),
            _BearerStreamUnary(source), _BearerStreamStream(source))


@dataclass(frozen=True)
class ClientSecurity:
    """What a program presents to the services it calls: a bearer token and TLS."""

    token: TokenSource | None = None
    tls: ClientTls | None = None

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        return self.tls.grpc_credentials() if self.tls is not None else None

    def interceptors(self) -> tuple[grpc.aio.ClientInterceptor, ...]:
        return bearer_interceptors(self.token) if self.token is not None else ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientSecurity:
        """``TENSORWIRE_TOKEN`` / ``TENSORWIRE_TOKEN_FILE`` and ``TENSORWIRE_TLS_CA``
        (with ``TENSORWIRE_TLS_CERT``/``TENSORWIRE_TLS_KEY`` for mTLS)."""
        env = os.environ if environ is None else environ
        tls = None
        if env.get("TENSORWIRE_TLS_CA"):
            tls = ClientTls(Path(env["TENSORWIRE_TLS_CA"]),
                            Path(env["TENSORWIRE_TLS_CERT"]) if env.get("TENSORWIRE_TLS_CERT") else None,
                            Path(env["TENSORWIRE_TLS_KEY"]) if env.get("TENSORWIRE_TLS_KEY") else None)
        return cls(TokenSource.from_env(env), tls)


# ------------------------------------------------------------- local admin token


def ensure_admin_token(data_dir: Path) -> tuple[str, Path]:
    """The local suite's admin token: ``<data dir>/admin.token`` (0600, made on first
    use) and a token file ``<data dir>/tokens.csv`` naming it (admin + publisher).
    Returns the token and the token file's path."""
    data_dir.mkdir(parents=True, exist_ok=True)
    token_path = data_dir / "admin.token"
    if not token_path.exists():
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32) + "\n")
    os.chmod(token_path, 0o600)
    token = token_path.read_text(encoding="utf-8").strip()
    table_path = data_dir / "tokens.csv"
    line = f'{token},admin,admin,"{Role.ADMIN.group},{Role.PUBLISHER.group}"\n'
    existing = table_path.read_text(encoding="utf-8") if table_path.exists() else ""
    if line not in existing:
        # The admin line first; other lines an operator added stay.
        others = [row for row in existing.splitlines(keepends=True)
                  if row.strip() and not row.startswith(token + ",")
                  and ",admin,admin," not in row]
        tmp = table_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(line + "".join(others))
        os.replace(tmp, table_path)
    os.chmod(table_path, 0o600)
    return token, table_path
