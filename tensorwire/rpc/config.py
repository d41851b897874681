"""Typed settings read from flags and environment variables, validated once.

A service declares a frozen dataclass whose fields carry ``setting(...)``
metadata; :func:`load` builds the argument parser from it, reads each field from
its flag, else its environment variable, else the default, converts and checks
it, and names the bad value in the error. Only a service's ``__main__`` calls
:func:`load`; everything else receives the settings object.

A setting may be *repeatable* (``--cache-config a --cache-config b``; in the
environment the values are separated by ``;``) and may have its own ``parse``
function, which turns the raw string (or the tuple of strings of a repeatable
setting) into a typed value and raises ``ValueError`` with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_type_hints

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting has a value that cannot be used."""


def setting(
    default: Any,
    *,
    env: str,
    help: str,
    min: float | None = None,
    max: float | None = None,
    choices: Sequence[str] | None = None,
    repeatable: bool = False,
    parse: Callable[[Any], Any] | None = None,
) -> Any:
    """A settings field: its default, environment variable, help and bounds.

    ``repeatable``: the flag may be given many times (its values in order, a tuple
    of strings; the environment variable separates them with ``;``).
    ``parse``: builds the field's value from the raw string (repeatable: the tuple
    of strings) instead of the type's own conversion; a ``ValueError`` it raises
    becomes a SettingsError naming the flag or variable.
    """
    meta = {"env": env, "help": help, "min": min, "max": max, "choices": choices,
            "repeatable": repeatable, "parse": parse}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed in settings")
    return dataclasses.field(default=default, metadata=meta)


def _show(default: Any) -> str:
    """A default as a person reads it in --help."""
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, tuple):
        return ",".join(map(str, default)) or "none"
    if default == "":
        return "none"
    return str(default)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _convert(name: str, source: str, raw: str, typ: Any) -> Any:
    try:
        if typ is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if typ is Path:
            if "\0" in raw:
                raise ValueError(raw)
            return Path(raw)
        if typ is float:
            value = float(raw)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(raw)  # NaN passes every bound check
            return value
        if typ == tuple[str, ...]:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return typ(raw)
    except ValueError:
        kind = _KINDS.get(typ, f"a {getattr(typ, '__name__', typ)}")
        raise SettingsError(f"{name} ({source}) must be {kind}, got {raw!r}") from None


_KINDS: dict[Any, str] = {
    bool: "true or false (also 1/0, yes/no, on/off)",
    int: "a whole number",
    float: "a number",
}


def _parse(name: str, source: str, raw: Any, meta: Mapping[str, Any], typ: Any) -> Any:
    if meta.get("parse") is not None:
        try:
            return meta["parse"](raw)
        except ValueError as exc:
            raise SettingsError(f"{name} ({source}): {exc}") from None
    if meta.get("repeatable"):
        return tuple(raw)
    return _convert(name, source, raw, typ)


def _check(name: str, source: str, value: Any, meta: Mapping[str, Any]) -> None:
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if lo is not None and value < lo:
        raise SettingsError(f"{name} ({source}) must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise SettingsError(f"{name} ({source}) must be <= {hi}, got {value!r}")
    if choices is not None and value not in choices:
        raise SettingsError(f"{name} ({source}) must be one of {', '.join(choices)}, got {value!r}")


def load(
    cls: type[T],
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    prog: str | None = None,
    description: str | None = None,
) -> T:
    """Build ``cls`` from flags (highest priority), environment, then defaults.

    Environment names are ``cls.env_prefix`` + the field's ``env``
    (``TENSORWIRE_TRAINER_`` + ``PORT``).
    """
    env = os.environ if env is None else env
    prefix = getattr(cls, "env_prefix", "")
    hints = get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if "env" in f.metadata]  # type: ignore[arg-type]
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for f in fields:
        env_name = prefix + f.metadata["env"]
        if hints[f.name] is bool:
            # A switch: --name, --no-name, or --name true|false (env: true/false/1/0).
            parser.add_argument(
                _flag(f.name), dest=f.name, default=None, nargs="?", const="true",
                metavar="true|false",
                help=f"{f.metadata['help']} (--no-{f.name.replace('_', '-')} turns it off; "
                     f"env {env_name}; default {_show(f.default)})",
            )
            parser.add_argument(
                "--no-" + f.name.replace("_", "-"), dest=f.name, action="store_const",
                const="false", help=argparse.SUPPRESS,
            )
            continue
        entries = f.metadata.get("repeatable", False)  # whole entries, env separated by ;
        repeatable = entries or hints[f.name] == tuple[str, ...]  # comma lists, flag repeatable
        parser.add_argument(
            _flag(f.name),
            dest=f.name,
            default=None,
            action="append" if repeatable else "store",
            metavar=f.name.upper(),
            help=f"{f.metadata['help']} ({'repeatable; ' if repeatable else ''}"
                 f"env {env_name}{', values separated by ;' if entries else ''}; "
                 f"default {_show(f.default)})",
        )
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for f in fields:
        raw, source = getattr(args, f.name), _flag(f.name)
        if isinstance(raw, list) and not f.metadata.get("repeatable"):
            raw = ",".join(raw)  # a list flag given several times: each use a comma list too
        name = prefix + f.metadata["env"]
        if raw is None and name in env:
            raw, source = env[name], name
            if f.metadata.get("repeatable"):
                raw = [part.strip() for part in raw.split(";") if part.strip()]
        if raw is not None and f.metadata.get("repeatable"):
            raw = tuple(raw)
        value = f.default if raw is None else _parse(f.name, source, raw, f.metadata, hints[f.name])
        _check(f.name, source if raw is not None else "default", value, f.metadata)
        values[f.name] = value
    return cls(**values)


def describe(settings: Any, redact: Callable[[str], bool] = lambda _: False) -> str:
    """One line naming every setting, for the start-up log."""
    parts = []
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        parts.append(f"{f.name}={'***' if redact(f.name) else value}")
    return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class ClientSettings:
    """How a program authenticates to, and verifies, the services it calls."""

    env_prefix: ClassVar[str] = "TENSORWIRE_"
    service: ClassVar[str] = "service"

    tls_ca: str = setting(
        "", env="TLS_CA",
        help="PEM CA to verify the services this one calls (their calls then use TLS)",
    )
    token_file: str = setting(
        "", env="TOKEN_FILE",
        help="file holding the bearer token this service sends to the services it calls",
    )

    def client_security(self) -> Any:
        """The token and TLS this service presents to the services it calls."""
        from tensorwire.rpc import auth
        from tensorwire.rpc.tls import ClientTls

        tls = None
        if self.tls_ca:
            # A service's own certificate is its client identity too (mTLS).
            cert, key = getattr(self, "tls_cert", ""), getattr(self, "tls_key", "")
            tls = ClientTls(Path(self.tls_ca), Path(cert) if cert else None,
                            Path(key) if key else None)
        try:
            token = auth.TokenSource(path=self.token_file) if self.token_file else None
        except auth.TokenFileError as exc:
            raise SettingsError(f"--token-file: {exc}") from None
        return auth.ClientSecurity(token, tls)


@dataclasses.dataclass(frozen=True)
class ServerSettings(ClientSettings):
    """Settings every service has. A service subclasses it, overrides
    ``env_prefix`` and the port defaults, and adds its own fields."""

    host: str = setting(
        "127.0.0.1", env="HOST",
        help="address to listen on; a non-loopback address needs --auth-token-file (or --insecure)",
    )
    port: int = setting(0, env="PORT", help="gRPC port", min=0, max=65535)
    metrics_port: int = setting(
        0, env="METRICS_PORT", help="Prometheus /metrics port (-1 disables)", min=-1, max=65535
    )
    grace_s: float = setting(
        10.0, env="GRACE_S", help="seconds in-flight calls may run after SIGTERM", min=0
    )
    max_message_mb: int = setting(
        64, env="MAX_MESSAGE_MB", help="largest gRPC message accepted or sent, MiB", min=1, max=2047
    )
    log_level: str = setting(
        "INFO", env="LOG_LEVEL", help="log level", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    auth_token_file: str = setting(
        "", env="AUTH_TOKEN_FILE",
        help="bearer tokens, Kubernetes static token file format (token,user,uid,\"groups\"), "
             "re-read when it changes; groups tensorwire:viewer|operator|admin|publisher give "
             "the roles ('' = no authentication: loopback only, unless --insecure)",
    )
    insecure: bool = setting(
        False, env="INSECURE",
        help="allow a non-loopback --host without --auth-token-file (anyone who reaches "
             "the port controls the service)",
    )
    tls_cert: str = setting(
        "", env="TLS_CERT", help="PEM certificate to serve TLS with (reloaded when it changes)"
    )
    tls_key: str = setting("", env="TLS_KEY", help="PEM private key of --tls-cert")
    tls_client_ca: str = setting(
        "", env="TLS_CLIENT_CA", help="PEM CA that client certificates must chain to (mTLS)"
    )

    def __post_init__(self) -> None:
        prefix = self.env_prefix
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SettingsError(
                f"--tls-cert and --tls-key ({prefix}TLS_CERT, {prefix}TLS_KEY) go together; "
                f"got only {'--tls-cert' if self.tls_cert else '--tls-key'}"
            )
        if self.tls_client_ca and not self.tls_cert:
            raise SettingsError("--tls-client-ca needs --tls-cert and --tls-key")
        if not self.auth_token_file and not self.insecure and not is_loopback(self.host):
            raise SettingsError(
                f"refusing to listen on {self.host} (--host) without authentication: add "
                f"--auth-token-file FILE ({prefix}AUTH_TOKEN_FILE), or --insecure to let anyone "
                "who reaches the port call every method"
            )

    def authorizer(self) -> Any:
        """Who may call what on this service (None: no token file, everyone)."""
        from tensorwire.rpc import auth  # late: config must not need grpc

        if not self.auth_token_file:
            return None
        try:
            return auth.Authorizer(auth.TokenFile(self.auth_token_file))
        except auth.TokenFileError as exc:
            raise SettingsError(f"--auth-token-file: {exc}") from None

    def server_tls(self) -> Any:
        from tensorwire.rpc.tls import ServerTls, TlsError

        if not self.tls_cert:
            return None
        try:
            return ServerTls(self.tls_cert, self.tls_key, self.tls_client_ca or None)
        except TlsError as exc:
            raise SettingsError(f"--tls-cert/--tls-key: {exc}") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
