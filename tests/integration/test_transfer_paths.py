"""The pool and chunked transfer on the real paths between the services:

- trainer -> inference with no shared filesystem: the trainer pushes each
  checkpoint (UploadModel, chunked) then asks for RepositoryModelLoad, both over
  its channel pool; inference serves the trained weights;
- inference mirrors a model from an HTTP(S) model repository (pooled httpx);
- a backend caller (tensorwire.client) runs inference and gets domain errors.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from services.inference.app import create_app as create_inference
from services.inference.settings import InferenceSettings
from services.trainer.app import create_app as create_trainer
from services.trainer.settings import TrainerSettings
from tensorwire.client import InferenceClient
from tensorwire.errors import NotFoundError
from tensorwire.serving import modelrepo
from tensorwire.serving.models import build_model
from tests.conftest import serving, settings_for
from tests.support.file_server import file_server
from tests.support.waiting import until


def _spiral_points() -> np.ndarray:
    return np.array([[0.1, 0.2], [-0.5, 0.3], [0.9, -0.9]], dtype=np.float32)


async def test_trainer_pushes_checkpoints_to_inference_without_shared_storage(tmp_path: Path) -> None:
    inference_app = await create_inference(
        settings_for(InferenceSettings, tmp_path / "inference", poll_interval_s=0.0,
                     keep_uploaded_versions=1)
    )
    async with serving(inference_app, "inference") as inference:
        trainer_settings = settings_for(
            TrainerSettings, tmp_path / "trainer", streamer_target="",
            inference_target=f"127.0.0.1:{inference.port}", push_checkpoints=True,
            checkpoint_every_steps=25, checkpoint_every_s=0.0, demo_task="", demo_models=False,
            keep_checkpoints=2,
        )
        trainer_app = await create_trainer(trainer_settings)
        try:
            run = trainer_app.runs.start_run("spiral", {"max_steps": 300}, seed=7)
            model = f"run-{run.run_id}"
            async with InferenceClient(f"127.0.0.1:{inference.port}") as client:

                async def served() -> bool:
                    return trainer_app.announcer.loaded.get(model, 0) >= 1 and await client.model_ready(model)

                await until(served, 60.0, what=f"inference serving {model}")
                await asyncio.to_thread(run.loop.join)
                await asyncio.to_thread(trainer_app.runs.flush_checkpoints, 30.0)

                async def caught_up() -> bool:
                    return (trainer_app.announcer.pushed.get(model)
                            == modelrepo.list_versions(trainer_settings.model_repository, model)[-1])

                await until(caught_up, 60.0, what="the last checkpoint pushed")
                await client.load_model(model)
                local = trainer_settings.model_repository
                remote = inference_app.settings.model_repository
                assert local != remote
                # Same version numbers on both sides; checkpoints written while an
                # upload was running are coalesced (latest wins), so some may be skipped.
                versions = modelrepo.list_versions(remote, model)
                assert versions and set(versions) <= set(modelrepo.list_versions(local, model))
                last = versions[-1]
                assert last == modelrepo.list_versions(local, model)[-1]
                # Both repositories are pruned: the trainer keeps 2 versions, inference 1
                # (version numbers are consecutive, so a newest above 2 means some went).
                assert len(modelrepo.list_versions(local, model)) == 2 and last > 2, last
                assert versions == [last]
                assert (modelrepo.weights_path(remote, model, last).read_bytes()
                        == modelrepo.weights_path(local, model, last).read_bytes())
                outputs = await client.infer(model, {"points": _spiral_points()})
                net = build_model("spiral")
                net.load_state_dict(modelrepo.load_state_dict(modelrepo.weights_path(local, model, last)))
                net.eval()
                with torch.no_grad():
                    want = net(torch.from_numpy(_spiral_points())).numpy()
                np.testing.assert_allclose(outputs["logits"], want, rtol=1e-5, atol=1e-6)
                with pytest.raises(NotFoundError):
                    await client.infer("no-such-model", {"points": _spiral_points()})
            assert trainer_app.announcer.pool.metrics.reuse_rate > 0.5
        finally:
            await trainer_app.aclose()


async def test_a_restarted_trainer_on_an_empty_repository_still_reaches_inference(tmp_path: Path) -> None:
    """Inference already holds spiral versions 1-5 (from the trainer's previous life);
    the restarted trainer numbers from 1 again. Inference refuses an older number
    (FAILED_PRECONDITION: a latest policy would never serve it) and the trainer
    installs its checkpoint as inference's next version, which is then served."""
    inference_app = await create_inference(
        settings_for(InferenceSettings, tmp_path / "inference", poll_interval_s=0.0)
    )
    old = build_model("spiral").state_dict()
    for _ in range(5):
        modelrepo.write_version(inference_app.settings.model_repository, "spiral", "spiral", old)
    async with serving(inference_app, "inference") as inference:
        trainer_app = await create_trainer(settings_for(
            TrainerSettings, tmp_path / "trainer", streamer_target="",
            inference_target=f"127.0.0.1:{inference.port}", push_checkpoints=True,
            checkpoint_every_steps=0, checkpoint_every_s=0.0, demo_task="", demo_models=False,
        ))
        try:
            run = trainer_app.runs.start_run("spiral", {"max_steps": 50}, seed=3, publish_as=("spiral",))
            await asyncio.to_thread(run.loop.join)
            await asyncio.to_thread(trainer_app.runs.flush_checkpoints, 30.0)
            local = trainer_app.settings.model_repository
            assert modelrepo.list_versions(local, "spiral") == [1]
            remote = inference_app.settings.model_repository
            async with InferenceClient(f"127.0.0.1:{inference.port}") as client:

                async def served() -> bool:
                    return (trainer_app.announcer.loaded.get("spiral", 0) >= 1
                            and await client.model_ready("spiral", "6"))

                await until(served, 60.0, what="the trainer's checkpoint served as spiral version 6")
                assert (modelrepo.weights_path(remote, "spiral", 6).read_bytes()
                        == modelrepo.weights_path(local, "spiral", 1).read_bytes())
                outputs = await client.infer("spiral", {"points": _spiral_points()})
            net = build_model("spiral")
            net.load_state_dict(modelrepo.load_state_dict(modelrepo.weights_path(local, "spiral", 1)))
            net.eval()
            with torch.no_grad():
                want = net(torch.from_numpy(_spiral_points())).numpy()
            np.testing.assert_allclose(outputs["logits"], want, rtol=1e-5, atol=1e-6)
        finally:
            await trainer_app.aclose()


async def test_inference_loads_models_from_an_http_repository(tmp_path: Path) -> None:
    remote = tmp_path / "www"
    torch.manual_seed(5)
    net = build_model("spiral")
    modelrepo.write_version(remote, "spiral", "spiral", net.state_dict())
    with file_server(remote) as url:
        settings = settings_for(InferenceSettings, tmp_path / "inference", poll_interval_s=0.0,
                                model_repository_url=url)
        app = await create_inference(settings)
        async with serving(app, "inference") as server:
            async with InferenceClient(f"127.0.0.1:{server.port}") as client:
                assert not await client.model_ready("spiral")
                await client.load_model("spiral")
                assert await client.model_ready("spiral")
                outputs = await client.infer("spiral", {"points": _spiral_points()})
                net.eval()
                with torch.no_grad():
                    want = net(torch.from_numpy(_spiral_points())).numpy()
                np.testing.assert_allclose(outputs["logits"], want, rtol=1e-5, atol=1e-6)
                with pytest.raises(NotFoundError, match="nosuch"):
                    await client.load_model("nosuch")
    assert modelrepo.list_versions(settings.model_repository, "spiral") == [1]
