"""The model repository format shared by the trainer (writer) and inference (reader).

Layout::

    <repo>/<model>/config.json          what the model is and how to serve it
    <repo>/<model>/<version:int>/model.pt  a torch state_dict (torch.save)

``config.json`` holds ``name``, ``kind`` (a key of ``tensorwire.serving.models.MODELS``),
``model_args`` (keyword arguments of the kind's builder), ``max_batch_size``,
``inputs``/``outputs`` (``name``, ``datatype`` (Triton's name, e.g. "FP32"),
``dims`` without the batch dimension), the batching knobs
``max_queue_delay_us`` and ``preferred_batch_size`` (a list), ``version_policy``
(``{"latest": {"num_versions": 1}}``, ``{"all": {}}`` or
``{"specific": {"versions": [1, 3]}}``; a validated config holds it parsed, as a
``VersionPolicy``), ``traffic`` (version -> weight, for
A/B tests and gradual roll-outs; empty means "all traffic on the newest") and,
optionally, ``response_cache`` (``{"enable": true}``: identical requests are answered
from the server's response cache, Triton's ``response_cache { enable: true }``).

Weights are loaded with ``torch.load(weights_only=True)``: a file from the
repository can never run code. Every version is written atomically: into a
temporary folder under the model folder, fsynced, then renamed to its number, so a
reader polling the repository never sees half a version.

A model folder may instead be in Triton's format (``config.pbtxt`` and
``<version>/model.{pt,pt2,onnx}``, or no config at all for an ONNX or
torch.export model): ``read_config`` then reads it with
``tensorwire.serving.tritonconfig`` into the same dict, with ``platform`` set. Every
config has ``response_cache_enabled`` (False unless the model asks for it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import IO, Any

from tensorwire.errors import InvalidArgumentError, NotFoundError
from tensorwire.serving import admission
from tensorwire.serving.admission import VersionPolicy

__all__ = ["VersionPolicy"]  # re-exported: the version_policy of a validated config

CONFIG_FILE = "config.json"
TRITON_CONFIG_FILE = "config.pbtxt"
WEIGHTS_FILE = "model.pt"
MODEL_FILES = ("model.pt", "model.pt2", "model.onnx")
"""Files that make a version folder complete (the tensorwire kinds' weights, and
Triton's TorchScript, ExportedProgram and ONNX files)."""
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_QUEUE_DELAY_US = 0
"""No waiting: while one batch runs the next one fills by itself."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}\Z")
"""A model name (``\\Z``, not ``$``: "m\\n" is not a name)."""


def check_name(name: str) -> str:
    """A model name is one safe path component (no '/', no '..')."""
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise InvalidArgumentError(
            f"model name {admission.echo(name)} is not valid: use 1-128 letters, digits, '_', '-', '.'"
        )
    return name


def default_config(name: str, kind: str, model_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config of a new model of ``kind``, from tensorwire.serving.models.MODELS."""
    from tensorwire.serving.models import MODELS, tensor_specs  # late: torch is heavy

    if kind not in MODELS:
        raise InvalidArgumentError(f"unknown model kind {kind!r}; known: {', '.join(sorted(MODELS))}")
    args = dict(MODELS[kind].default_args)
    args.update(model_args or {})
    try:
        inputs, outputs = tensor_specs(kind, **args)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"model_args {args!r} do not fit kind {kind!r}: {exc}") from None

    def tensors(specs: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "dims": list(t.dims)} for t in specs]

    return {
        "name": name,
        "kind": kind,
        "model_args": args,
        "max_batch_size": DEFAULT_MAX_BATCH_SIZE,
        "inputs": tensors(inputs),
        "outputs": tensors(outputs),
        "max_queue_delay_us": DEFAULT_MAX_QUEUE_DELAY_US,
        "preferred_batch_size": [],
        "version_policy": VersionPolicy(),
        "traffic": {},
    }


def validate_config(config: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
    """Check a config's shape; returns a normalised copy. Raises InvalidArgumentError."""
    cfg = dict(config)
    where = f"config of model {name or cfg.get('name')!r}"
    for key in ("name", "kind", "inputs", "outputs"):
        if key not in cfg:
            raise InvalidArgumentError(f"{where} lacks {key!r}")
    if name is not None and cfg["name"] != name:
        raise InvalidArgumentError(f"{where}: name {cfg['name']!r} differs from its folder {name!r}")
    mbs = cfg.setdefault("max_batch_size", DEFAULT_MAX_BATCH_SIZE)
    if not isinstance(mbs, int) or mbs < 0:
        raise InvalidArgumentError(f"{where}: max_batch_size must be an int >= 0, got {mbs!r}")
    delay = cfg.setdefault("max_queue_delay_us", DEFAULT_MAX_QUEUE_DELAY_US)
    if not isinstance(delay, int) or delay < 0:
        raise InvalidArgumentError(f"{where}: max_queue_delay_us must be an int >= 0, got {delay!r}")
    cfg.setdefault("model_args", {})
    cfg.setdefault("preferred_batch_size", [])
    cfg["version_policy"] = VersionPolicy.parse(cfg.get("version_policy", VersionPolicy()),
                                                f"{where}: version_policy")
    try:
        admission.check_traffic(cfg.setdefault("traffic", {}))
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{where}: {exc}") from None
    cache = cfg.get("response_cache", {})
    if (not isinstance(cache, dict) or set(cache) - {"enable"}
            or not isinstance(cache.get("enable", False), bool)):
        raise InvalidArgumentError(
            f'{where}: response_cache must be {{"enable": true|false}}, got {cache!r}'
        )
    # One flag for both formats (config.pbtxt's response_cache { enable: true } sets it too).
    cfg["response_cache_enabled"] = bool(cfg.get("response_cache_enabled")) or cache.get("enable", False)
    for group in ("inputs", "outputs"):
        if not cfg[group]:
            raise InvalidArgumentError(f"{where}: {group} is empty")
        for t in cfg[group]:
            if not {"name", "datatype", "dims"} <= set(t):
                raise InvalidArgumentError(f"{where}: {group} entry {t!r} needs name, datatype, dims")
    return cfg


def response_cache_enabled(config: Mapping[str, Any]) -> bool:
    """Whether a (validated) config opts in to the response cache."""
    return bool(config.get("response_cache_enabled")
                or config.get("response_cache", {}).get("enable", False))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """``write(file)`` into a temporary file beside ``path``, synced, then renamed over
    it: a reader sees the old file or the whole new one, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write_json_atomic(path: Path, config: Mapping[str, Any]) -> None:
    """A validated config as config.json (its VersionPolicy in the JSON shape)."""
    data = {**config, "version_policy": config["version_policy"].to_json()}
    write_atomic(path, lambda f: f.write(json.dumps(data, indent=2, sort_keys=True).encode()))


def is_triton_model(repo: Path, name: str) -> bool:
    """Whether ``name``'s folder is in Triton's format (no config.json)."""
    return not (Path(repo) / check_name(name) / CONFIG_FILE).is_file()


def config_path(repo: Path, name: str) -> Path:
    """The config file of ``name`` (config.json, else config.pbtxt; it may not exist)."""
    folder = Path(repo) / check_name(name)
    json_path = folder / CONFIG_FILE
    return json_path if json_path.is_file() else folder / TRITON_CONFIG_FILE


def read_config(repo: Path, name: str) -> dict[str, Any]:
    """The validated config of model ``name`` (config.json, else Triton's format)."""
    if is_triton_model(repo, name):
        from tensorwire.serving import tritonconfig

        folder = Path(repo) / name
        versions = list_versions(repo, name)
        newest = folder / str(versions[-1]) if versions else None
        if not folder.is_dir():
            raise NotFoundError(f"model {name!r} is not in repository {str(repo)!r}")
        return validate_config(tritonconfig.read(folder, name, newest), name)
    path = Path(repo) / check_name(name) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFoundError(f"model {name!r} has no {CONFIG_FILE} in repository {str(repo)!r}") from None
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidArgumentError(f"{path} must hold a JSON object")
    return validate_config(raw, name)


def write_config(repo: Path, name: str, config: Mapping[str, Any]) -> None:
    """Replace a model's config.json atomically (e.g. to change traffic weights)."""
    folder = Path(repo) / check_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(folder / CONFIG_FILE, validate_config(config, name))


def _is_model_folder(path: Path) -> bool:
    if (path / CONFIG_FILE).is_file() or (path / TRITON_CONFIG_FILE).is_file():
        return True
    return any(admission.is_version_name(p.name) and p.is_dir() for p in path.iterdir())  # Triton: config optional


def list_models(repo: Path, skip: Callable[[str], bool] | None = None) -> list[str]:
    """Names of the models in the repository (folders holding a config.json or a
    config.pbtxt, or Triton model folders with only version folders). ``skip``: names
    left out by name alone, before their folders are looked at (a poll that ignores
    thousands of models costs one directory listing, not a stat of each)."""
    root = Path(repo)
    if not root.is_dir():
        return []
    return sorted(
        name for name in os.listdir(root)
        if not (skip is not None and skip(name)) and _NAME.match(name) and (root / name).is_dir()
        and _is_model_folder(root / name)
    )


def has_model(repo: Path, name: str) -> bool:
    """Whether ``name`` is a model of the repository (as ``list_models`` would say),
    looking at that one folder; False for a name that is not a valid model name."""
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        return False
    folder = Path(repo) / name
    try:
        return folder.is_dir() and _is_model_folder(folder)
    except OSError:
        return False


def list_versions(repo: Path, name: str) -> list[int]:
    """Complete versions of a model, ascending (temp folders are not versions)."""
    folder = Path(repo) / check_name(name)
    if not folder.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in folder.iterdir()
        if p.is_dir() and admission.is_version_name(p.name) and _complete(p)
    )


def _complete(version: Path) -> bool:
    """A version folder holds a model file (any file for a custom default_model_filename)."""
    return any((version / f).is_file() for f in MODEL_FILES) or any(
        p.is_file() and not p.name.startswith(".") for p in version.iterdir()
    )


def prune_versions(repo: Path, name: str, keep: int, protect: Collection[int] = ()) -> list[int]:
    """Delete all but the newest ``keep`` versions of ``name``; returns those deleted.

    Never deletes what the model's config still serves (what its version policy
    selects: under ``all`` nothing is pruned), the versions its traffic split
    names, nor those in ``protect`` (e.g. the one just installed). A
    version goes first by a rename out of the version namespace (a reader polling the
    repository never sees half of one), then its files; leftovers of a pruning that
    died half-way are removed first. ``keep`` <= 0 keeps everything.
    """
    if keep <= 0:
        return []
    root = Path(repo)
    folder = root / check_name(name)
    for stale in folder.glob(".v*.deleting"):
        shutil.rmtree(stale, ignore_errors=True)
    config = read_config(root, name)
    versions = list_versions(root, name)
    kept = (
        set(versions[-keep:])
        | set(config["version_policy"].select(versions))
        | {int(v) for v in config.get("traffic", {})}  # where an A/B test or a roll-out points
        | set(protect)
    )
    deleted = []
    for version in versions:
        if version in kept:
            continue
        doomed = folder / f".v{version}-{uuid.uuid4().hex[:12]}.deleting"
        try:
            os.rename(folder / str(version), doomed)
        except FileNotFoundError:  # another writer pruned it first
            continue
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(version)
    if deleted:
        _fsync_dir(folder)
    return deleted


def weights_path(repo: Path, name: str, version: int) -> Path:
    return Path(repo) / check_name(name) / str(int(version)) / WEIGHTS_FILE


def load_state_dict(path: Path) -> dict[str, Any]:
    """Load weights safely: tensors only, no code runs."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise NotFoundError(f"weights file {str(path)!r} does not exist") from None
    except Exception as exc:  # pickle errors, unsupported globals, truncated files
        raise InvalidArgumentError(f"cannot load weights {str(path)!r}: {exc}") from None
    if not isinstance(state, dict):
        raise InvalidArgumentError(f"weights {str(path)!r} hold a {type(state).__name__}, not a state_dict")
    return state


def write_version(
    repo: Path,
    name: str,
    kind: str,
    state_dict: Mapping[str, Any],
    *,
    model_args: dict | None = None,
    version: int | None = None,
    config_overrides: dict | None = None,
) -> int:
    """Write a new version of model ``name`` atomically; returns its number.

    Creates config.json from ``MODELS[kind]`` (plus ``model_args`` and
    ``config_overrides``) when the model has none; an existing config is kept, only
    updated with ``config_overrides`` when given. ``version=None`` takes the next
    integer after the highest present.
    """
    import torch

    weights = {k: v.detach().cpu() if hasattr(v, "detach") else v for k, v in state_dict.items()}

    def save(path: Path) -> None:
        with open(path, "wb") as f:
            torch.save(weights, f)
            f.flush()
            os.fsync(f.fileno())

    return _add_version(repo, name, kind, save, model_args=model_args, version=version,
                        config_overrides=config_overrides)


def install_weights_file(
    repo: Path,
    name: str,
    kind: str,
    weights_file: Path,
    *,
    model_args: dict | None = None,
    version: int | None = None,
    config_overrides: dict | None = None,
    triton_config: str = "",
) -> int:
    """Like ``write_version``, but moves an already written (and fsynced) weights
    file in, without loading it: checkpoints received over the network
    (tensorwire.checkpoints.receiver). ``weights_file`` must be on the repository's filesystem.
    A ``kind`` of ``tensorwire.serving.tritonconfig.PLATFORMS`` installs a Triton model file
    (model.pt / model.pt2 / model.onnx) beside the folder's config.pbtxt;
    ``triton_config`` (checked by ``tritonconfig.check_sent_config``), when given,
    is written as that config.pbtxt just before the version appears."""
    return _add_version(repo, name, kind, lambda path: os.replace(weights_file, path),
                        model_args=model_args, version=version, config_overrides=config_overrides,
                        triton_config=triton_config)


def _add_version(
    repo: Path,
    name: str,
    kind: str,
    write_weights: Callable[[Path], None],
    *,
    model_args: dict | None,
    version: int | None,
    config_overrides: dict | None,
    triton_config: str = "",
) -> int:
    root = Path(repo)
    folder = root / check_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / CONFIG_FILE
    file_name = WEIGHTS_FILE
    from tensorwire.serving.tritonconfig import PLATFORMS  # light: no torch, no onnxruntime

    if kind in PLATFORMS:
        # A Triton model file: the folder's config.pbtxt (or auto-complete) describes
        # it; the loader checks the file itself, so a bad one never serves.
        if config_path.is_file():
            raise InvalidArgumentError(
                f"model {name!r} is a tensorwire {read_config(root, name)['kind']!r} model; "
                f"cannot add a {kind!r} version"
            )
        if config_overrides or model_args:
            raise InvalidArgumentError(f"a {kind!r} model takes no model_args or config overrides; "
                                       f"edit its {TRITON_CONFIG_FILE}")
        pbtxt = folder / TRITON_CONFIG_FILE
        if pbtxt.is_file():
            from tensorwire.serving import tritonconfig

            parsed = tritonconfig.parse(pbtxt.read_text(), str(pbtxt))
            if tritonconfig.platform_of(parsed, name) not in ("", kind):
                raise InvalidArgumentError(
                    f"model {name!r} is a {tritonconfig.platform_of(parsed, name)!r} model; "
                    f"cannot add a {kind!r} version"
                )
            file_name = tritonconfig.model_filename(parsed, kind, name)
        else:
            file_name = PLATFORMS[kind]
        if triton_config:
            from tensorwire.serving import tritonconfig

            sent = tritonconfig.check_sent_config(triton_config, name, kind)
            file_name = tritonconfig.model_filename(sent, kind, name)
    elif triton_config:
        raise InvalidArgumentError(f"a config.pbtxt comes only with a Triton model file, not a {kind!r} model")
    elif config_path.is_file():
        config = read_config(root, name)
        if config["kind"] != kind:
            raise InvalidArgumentError(
                f"model {name!r} is a {config['kind']!r} model; cannot add a {kind!r} version"
            )
        if config_overrides:
            config.update(config_overrides)
            _write_json_atomic(config_path, validate_config(config, name))
    else:
        if kind not in PLATFORMS:
            admission.check_model_size(kind, model_args or {})  # before a config names it
        config = default_config(name, kind, model_args)
        config.update(config_overrides or {})
        _write_json_atomic(config_path, validate_config(config, name))
    existing = [int(p.name) for p in folder.iterdir() if admission.is_version_name(p.name)]
    newest = max(existing, default=0)
    if version is None:
        version = newest + 1
    if not isinstance(version, int) or isinstance(version, bool):
        raise InvalidArgumentError(f"version must be an int >= 1, got {admission.echo(version)}")
    admission.check_new_version(version, newest, name)
    final = folder / str(version)
    if final.exists():
        raise InvalidArgumentError(f"model {name!r} already has version {version}")
    tmp = Path(tempfile.mkdtemp(prefix=f".v{version}-", suffix=".tmp", dir=folder))
    try:
        write_weights(tmp / file_name)
        _fsync_dir(tmp)
        if triton_config:  # before the version: a reader never sees it under the old config
            write_atomic(folder / TRITON_CONFIG_FILE, lambda f: f.write(triton_config.encode()))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(folder)
    return version


def delete_model(repo: Path, name: str) -> bool:
    """Remove model ``name`` (every version and its config); whether it existed.

    The folder first leaves the model namespace by a rename (a reader polling the
    repository never sees half a model), then its files go.
    """
    folder = Path(repo) / check_name(name)
    doomed = Path(repo) / f".{name}-{uuid.uuid4().hex[:12]}.deleting"
    try:
        os.rename(folder, doomed)
    except FileNotFoundError:
        return False
    shutil.rmtree(doomed, ignore_errors=True)
    return True
