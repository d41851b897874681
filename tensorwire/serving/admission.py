"""Bounds on what an admin may ask of a model repository, checked before anything is built.

An admin call (RepositoryModelLoad's ``config`` parameter, an UploadModel header)
can ask for a model a thousand times larger than the machine, a kind its weights
do not have, a traffic split of NaN, or version 2^62. Everything here runs before a
single tensor is allocated and raises a domain error naming the bound:

- ``parse_version``: a version string is ASCII digits only (``str.isdigit`` and
  ``int`` accept "²" and "١"), 1 <= v <= ``MAX_VERSION``;
- ``check_new_version``: an uploaded version is at most ``newest + MAX_VERSION_STEP``
  (one stray upload cannot push every later version out of reach);
- ``model_bytes`` / ``check_model_size``: a tensorwire kind is built on torch's
  ``meta`` device (shapes only, no memory) and its parameters and buffers counted;
  over ``max_model_bytes`` is RESOURCE_EXHAUSTED;
- ``check_override``: a config override may only touch ``OVERRIDABLE`` keys, never
  change ``name``, ``kind`` or ``platform``, and its traffic weights must be finite,
  >= 0 and name versions on disk;
- ``VersionPolicy``: a model's version policy, parsed once (config.json, an override,
  config.pbtxt) into one typed value;
- ``json_object``: JSON text that must be an object (a config override, a setting);
- ``echo``: input quoted in an error message is cut to ``MAX_ECHO`` characters.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tensorwire.errors import InvalidArgumentError, ResourceExhaustedError

MAX_VERSION = 2**31 - 1
"""Highest model version (Triton's int64 versions, bounded to what every client's int holds)."""
MAX_VERSION_STEP = 1000
"""An uploaded version may be at most this much above the newest on disk."""
MAX_ECHO = 200
"""Characters of caller input quoted back in an error message."""
DEFAULT_MAX_MODEL_BYTES = 1 << 30
"""Parameters and buffers of one tensorwire-kind model (1 GiB: 268 M fp32 parameters)."""
MAX_MODEL_ARG = 1 << 20
"""Largest value of any integer model_arg (widths); the estimate itself must stay cheap."""
MAX_DEPTH_ARGS = {"layers": 256}
"""Args that add modules one by one: building even on ``meta`` costs ~1 ms per layer."""
MAX_BATCH_SIZE = 1 << 16
MAX_INSTANCE_COUNT = 64
MAX_QUEUE_DELAY_US = 10_000_000
OVERRIDABLE = frozenset({
    "model_args", "max_batch_size", "max_queue_delay_us", "preferred_batch_size", "version_policy",
    "traffic", "response_cache", "instance_count", "name", "kind", "platform",
    # Triton models: what config.pbtxt's dynamic_batching and parameters carry.
    "dynamic_batching", "parameters",
})
"""Keys a config override may carry (``name``/``kind``/``platform`` only unchanged)."""
_FIXED = ("name", "kind", "platform")
_VERSION = re.compile(r"[0-9]{1,10}\Z", re.ASCII)


def echo(value: Any, limit: int = MAX_ECHO) -> str:
    """``repr(value)``, cut to ``limit`` characters (caller input in error messages)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def parse_version(text: Any, what: str = "model version") -> int:
    """A version from a string (request field, folder name, traffic key): ASCII digits,
    1..MAX_VERSION; InvalidArgumentError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif isinstance(text, str) and _VERSION.match(text):
        value = int(text)
    else:
        raise InvalidArgumentError(f"{what} must be a positive integer, got {echo(text)} (ASCII digits only)")
    if not 1 <= value <= MAX_VERSION:
        raise InvalidArgumentError(f"{what} must be in 1..{MAX_VERSION}, got {value}")
    return value


def is_version_name(text: str) -> bool:
    """Whether a folder name is a version (strict: no Unicode digits, in range)."""
    return bool(_VERSION.match(text)) and 1 <= int(text) <= MAX_VERSION


PolicyKind = Literal["latest", "all", "specific"]
_POLICY_KINDS: tuple[PolicyKind, ...] = ("latest", "all", "specific")


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    """Which of a model's versions on disk are served (Triton's ``version_policy``).

    In config.json it reads ``{"latest": {"num_versions": 1}}``, ``{"all": {}}`` or
    ``{"specific": {"versions": [1, 3]}}``; ``parse`` turns that into this value once,
    ``to_json`` turns it back."""

    kind: PolicyKind = "latest"
    num_versions: int = 1
    """``latest``: the newest this many versions."""
    versions: tuple[int, ...] = ()
    """``specific``: exactly these versions (those of them on disk)."""

    @classmethod
    def parse(cls, raw: Any, where: str = "version_policy") -> VersionPolicy:
        """A policy from its JSON shape (or a VersionPolicy, returned as it is);
        InvalidArgumentError naming ``where`` and the bad value otherwise."""
        if isinstance(raw, VersionPolicy):
            return raw
        if (not isinstance(raw, Mapping) or len(raw) != 1 or next(iter(raw)) not in _POLICY_KINDS
                or not isinstance(next(iter(raw.values())) or {}, Mapping)):
            raise InvalidArgumentError(f"{where} must be one of {{latest|all|specific: {{...}}}}, got {echo(raw)}")
        (kind, args), = raw.items()
        args = args or {}
        if kind == "latest":
            _check_int(args, "num_versions", 1, MAX_VERSION, f"{where}.latest.")
            return cls("latest", num_versions=args.get("num_versions", 1))
        if kind == "specific":
            listed = args.get("versions", [])
            if not isinstance(listed, list):
                raise InvalidArgumentError(f"{where}.specific.versions must be a list, got {echo(listed)}")
            return cls("specific", versions=tuple(parse_version(v, f"{where} version") for v in listed))
        return cls("all")

    def to_json(self) -> dict[str, Any]:
        """The config.json shape ``parse`` reads."""
        if self.kind == "latest":
            return {"latest": {"num_versions": self.num_versions}}
        if self.kind == "specific":
            return {"specific": {"versions": list(self.versions)}}
        return {"all": {}}

    def select(self, available: Sequence[int]) -> list[int]:
        """The versions this policy serves out of those on disk, ascending."""
        if self.kind == "all":
            return sorted(available)
        if self.kind == "specific":
            return sorted(v for v in available if v in self.versions)
        return sorted(available)[-self.num_versions:] if self.num_versions > 0 else []


def check_new_version(version: int, newest: int, model: str) -> int:
    """An uploaded version: in range and at most ``newest + MAX_VERSION_STEP``."""
    parse_version(version, f"version of model {model!r}")
    if version > newest + MAX_VERSION_STEP:
        raise InvalidArgumentError(
            f"version {version} of model {model!r} is more than {MAX_VERSION_STEP} above the newest "
            f"({newest}); upload without a version to take the next one"
        )
    return version


def check_model_args(kind: str, model_args: Any) -> dict[str, int]:
    """``model_args`` of a tensorwire kind: a JSON object of known integer args in bounds."""
    from tensorwire.serving.models import MODELS  # late: torch is heavy

    if kind not in MODELS:
        raise InvalidArgumentError(f"unknown model kind {echo(kind)}; known: {', '.join(sorted(MODELS))}")
    if not isinstance(model_args, Mapping):
        raise InvalidArgumentError(f"model_args must be a JSON object, got {echo(model_args)}")
    known = MODELS[kind].default_args
    for key, value in model_args.items():
        if key not in known:
            raise InvalidArgumentError(
                f"unknown model_arg {echo(key)} for kind {kind!r}; known: {', '.join(sorted(known))}"
            )
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidArgumentError(f"model_args.{key} must be an integer, got {echo(value)}")
        bound = MAX_DEPTH_ARGS.get(key, MAX_MODEL_ARG)
        if not 1 <= value <= bound:
            raise ResourceExhaustedError(
                f"model_args.{key} = {value} is outside 1..{bound}, the bound on any {key!r} model_arg"
            )
    return dict(model_args)


def model_bytes(kind: str, model_args: Mapping[str, Any]) -> int:
    """Bytes of parameters and buffers of ``kind`` built with ``model_args``, counted on
    torch's meta device (nothing allocated). Call ``check_model_args`` first."""
    import torch

    from tensorwire.serving.models import build_model

    try:
        with torch.device("meta"):
            module = build_model(kind, **model_args)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"model_args do not fit kind {kind!r}: {echo(str(exc))}") from None
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def check_model_size(kind: str, model_args: Any, max_bytes: int = DEFAULT_MAX_MODEL_BYTES) -> int:
    """Validate ``model_args`` and refuse a model over ``max_bytes``; returns its size."""
    args = check_model_args(kind, model_args)
    size = model_bytes(kind, args)
    if size > max_bytes:
        raise ResourceExhaustedError(
            f"a {kind!r} model with model_args {echo(args)} needs {size / 2**20:,.0f} MiB of parameters; "
            f"the bound is {max_bytes / 2**20:,.0f} MiB (--max-model-mb)"
        )
    return size


def check_traffic(traffic: Any, versions: Collection[int] | None = None) -> dict[str, float]:
    """Traffic weights: version -> finite weight >= 0; versions among ``versions`` when given."""
    if not isinstance(traffic, Mapping):
        raise InvalidArgumentError(f"traffic must map versions to weights, got {echo(traffic)}")
    for key, weight in traffic.items():
        version = parse_version(key, "traffic version")
        if (not isinstance(weight, (int, float)) or isinstance(weight, bool)
                or not math.isfinite(weight) or weight < 0):
            raise InvalidArgumentError(
                f"traffic weight of version {version} must be a finite number >= 0, got {echo(weight)}"
            )
        if versions is not None and version not in versions:
            have = ", ".join(str(v) for v in sorted(versions)) or "none"
            raise InvalidArgumentError(f"traffic names version {version}, which is not on disk (versions: {have})")
    return dict(traffic)


def json_object(what: str, raw: Any) -> dict[str, Any]:
    """``raw`` (JSON text or bytes, or a value decoded already) as a JSON object;
    InvalidArgumentError naming ``what`` when it is not valid JSON or not an object."""
    if isinstance(raw, bytes):
        raw = raw.decode(errors="replace")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidArgumentError(f"{what} must be a JSON object, got {echo(raw)}")
    return raw


def parse_override(raw: Any) -> dict[str, Any]:
    """RepositoryModelLoad's ``config`` parameter (JSON text or, over HTTP, an object)."""
    return json_object("parameter 'config'", raw)


def _check_int(cfg: Mapping[str, Any], key: str, low: int, high: int, prefix: str = "") -> None:
    if key in cfg:
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise InvalidArgumentError(f"{prefix}{key} must be an integer in {low}..{high}, got {echo(value)}")


def check_override(
    current: Mapping[str, Any],
    override: Any,
    versions: Collection[int],
    *,
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
) -> dict[str, Any]:
    """A RepositoryModelLoad config override against the model's ``current`` config and
    the ``versions`` on disk; returns the override. Nothing is built or written."""
    if not isinstance(override, Mapping):
        raise InvalidArgumentError(f"parameter 'config' must be a JSON object, got {echo(override)}")
    unknown = sorted(str(k) for k in override if k not in OVERRIDABLE)
    if unknown:
        raise InvalidArgumentError(
            f"config override key {echo(unknown[0])} is not allowed; allowed: {', '.join(sorted(OVERRIDABLE))}"
        )
    for key in _FIXED:
        if key in override and override[key] != current.get(key):
            raise InvalidArgumentError(
                f"config override cannot change {key} of model {current.get('name')!r} "
                f"({echo(current.get(key))} -> {echo(override[key])})"
            )
    _check_int(override, "max_batch_size", 0, MAX_BATCH_SIZE)
    _check_int(override, "max_queue_delay_us", 0, MAX_QUEUE_DELAY_US)
    _check_int(override, "instance_count", 1, MAX_INSTANCE_COUNT)
    if "preferred_batch_size" in override:
        sizes = override["preferred_batch_size"]
        if not isinstance(sizes, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_BATCH_SIZE for s in sizes
        ):
            raise InvalidArgumentError(
                f"preferred_batch_size must be a list of integers in 1..{MAX_BATCH_SIZE}, got {echo(sizes)}"
            )
    if "version_policy" in override:
        VersionPolicy.parse(override["version_policy"])
    if "traffic" in override:
        check_traffic(override["traffic"], set(versions))
    if "model_args" in override:
        if current.get("platform") is not None:
            raise InvalidArgumentError(f"model {current.get('name')!r} is a {current['platform']} model: "
                                       "it takes no model_args")
        # Replaces the model's model_args (the kind's defaults fill the rest), as the load will.
        check_model_size(current["kind"], override["model_args"], max_model_bytes)
    return dict(override)
