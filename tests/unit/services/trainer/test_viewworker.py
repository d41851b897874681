"""The view worker process renders the same view as the trainer's own thread would."""

from __future__ import annotations

import torch

from services.trainer.tasks import TASKS
from services.trainer.viewworker import ViewWorker
from tensorwire.common.v1 import common_pb2 as cpb


async def test_worker_process_renders_the_snapshot() -> None:
    task = TASKS["spiral"]
    config = task.configure()
    torch.manual_seed(0)
    model = task.build_model(config).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = task.build_view(model, task.make_data(config, 5), config)
    worker = ViewWorker()
    try:
        data, cost_s = await worker.render("run-1", "spiral", config, 5, state, 42, 123.5)
    finally:
        worker.close()
    view = cpb.View.FromString(data)
    assert view.step == 42 and view.produced_at == 123.5 and cost_s >= 0
    assert [a.SerializeToString() for a in view.arrays] == [a.SerializeToString() for a in expected.arrays]
