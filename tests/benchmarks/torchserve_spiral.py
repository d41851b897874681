"""TorchServe's handler for bench_inference.py's side-by-side run (``--servers torchserve``).

The same spiral MLP as tensorwire serves (``tensorwire.serving.models.build_model("spiral")``,
the same ``model.pt`` weights), behind TorchServe's gRPC ``Predictions`` API: each
request's ``input["data"]`` is raw float32 rows of 2, its ``prediction`` the raw float32
logits. A function handler (``handle(data, context)``, called with ``data=None`` once to
load): TorchServe's batcher hands it a whole batch, it runs one forward.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

_model: torch.nn.Module | None = None


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[bytes] | None:
    global _model
    if data is None:  # TorchServe's load call
        from tensorwire.serving.models import build_model

        torch.set_num_threads(1)
        model = build_model("spiral")
        path = os.path.join(context.system_properties["model_dir"], "model.pt")
        model.load_state_dict(torch.load(path, weights_only=True))
        _model = model.eval()
        return None
    assert _model is not None
    rows = [np.frombuffer(bytes(item.get("data") or item.get("body") or b""), np.float32).reshape(-1, 2)
            for item in data]
    with torch.inference_mode():
        out = _model(torch.from_numpy(np.concatenate(rows))).numpy()
    answers, offset = [], 0
    for r in rows:
        answers.append(out[offset:offset + len(r)].tobytes())
        offset += len(r)
    return answers
