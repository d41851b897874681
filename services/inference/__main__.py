"""``tensorwire-inference``: run the inference service (``--workers N`` for N processes)."""

from __future__ import annotations

import sys

from tensorwire.rpc import config
from tensorwire.rpc.server import run_main
from tensorwire.serving.devices import resolve_device

from .app import create_app
from .settings import InferenceSettings
from .workers import run_workers


def main(argv: list[str] | None = None) -> int:
    try:
        settings = config.load(InferenceSettings, argv, prog="tensorwire-inference", description=__doc__)
        if settings.workers > 1:  # each worker would find a missing device on its own
            resolve_device(settings.device, settings.env_prefix)
    except config.SettingsError as exc:
        print(f"tensorwire-inference: {exc}", flush=True)
        return 2
    if settings.workers > 1:
        return run_workers(settings)
    # Listen at once; health says NOT_SERVING until the boot scan of the repository is done.
    return run_main(InferenceSettings, lambda s: create_app(s, wait_for_models=False), argv,
                    description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
