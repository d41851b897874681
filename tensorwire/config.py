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
            return Path(raw)
        if typ == tuple[str, ...]:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return typ(raw)
    except ValueError:
        kind = getattr(typ, "__name__", str(typ))
        raise SettingsError(f"{name} ({source}) must be a {kind}, got {raw!r}") from None


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
        repeatable = f.metadata.get("repeatable", False)
        parser.add_argument(
            _flag(f.name),
            dest=f.name,
            default=None,
            action="append" if repeatable else "store",
            metavar=f.name.upper(),
            help=f"{f.metadata['help']} ({'repeatable; ' if repeatable else ''}"
                 f"env {prefix}{f.metadata['env']}{', values separated by ;' if repeatable else ''}, "
                 f"default {f.default!r})",
        )
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for f in fields:
        raw, source = getattr(args, f.name), _flag(f.name)
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
class ServerSettings:
    """Settings every service has. A service subclasses it, overrides
    ``env_prefix`` and the port defaults, and adds its own fields."""

    env_prefix: ClassVar[str] = "TENSORWIRE_"
    service: ClassVar[str] = "service"

    host: str = setting("0.0.0.0", env="HOST", help="address to listen on")
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

    def server_options(self, **extra: Any) -> Any:
        from tensorwire.server import ServerOptions  # late: config must not need grpc

        return ServerOptions(
            name=self.service,
            host=self.host,
            port=self.port,
            metrics_port=None if self.metrics_port < 0 else self.metrics_port,
            grace_s=self.grace_s,
            max_message_bytes=self.max_message_mb * 1024 * 1024,
            **extra,
        )
