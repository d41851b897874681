"""Scalar export through the gateway: GET /api/runs/{id}/scalars.csv|json, real
trainer (with its run store) and gateway on real sockets."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from pathlib import Path

import aiohttp

from services.gateway.app import Gateway
from services.gateway.settings import GatewaySettings
from services.trainer.app import create_app as create_trainer
from services.trainer.settings import TrainerSettings
from tensorwire.common.v1 import common_pb2 as cpb
from tests.conftest import serving, settings_for


async def test_export_csv_and_json_with_precise_http_statuses(tmp_path: Path) -> None:
    trainer = await create_trainer(settings_for(TrainerSettings, tmp_path, streamer_target="",
                                                inference_target=""))
    async with serving(trainer, "trainer") as tr:
        gateway = Gateway(GatewaySettings(host="127.0.0.1", port=0, trainer_target=f"127.0.0.1:{tr.port}",
                                          streamer_target="", inference_target="",
                                          static_dir=tmp_path / "none", grace_s=0.5))
        port = await gateway.start()
        try:
            run = trainer.runs.start_run("spiral", {"max_steps": 30})
            deadline = time.monotonic() + 30
            while run.state != cpb.RUN_STATE_COMPLETED:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            base = f"http://127.0.0.1:{port}/api/runs"
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{base}/{run.run_id}/scalars.csv") as r:
                    assert r.status == 200 and r.headers["Content-Type"].startswith("text/csv")
                    assert f"run-{run.run_id}-scalars.csv" in r.headers["Content-Disposition"]
                    rows = list(csv.DictReader(io.StringIO(await r.text())))
                loss = [row for row in rows if row["series"] == "loss"]
                assert [int(row["step"]) for row in loss] == list(range(1, 31))
                assert {row["series"] for row in rows} == {"loss", "accuracy"}
                async with http.get(f"{base}/{run.run_id}/scalars.json?max_points=10") as r:
                    assert r.status == 200
                    doc = await r.json()
                assert doc["run_id"] == run.run_id and len(doc["series"]["loss"]["step"]) <= 10
                assert doc["series"]["loss"]["step"][-1] == 30 and doc["series"]["loss"]["first_step"][0] == 1
                for url, status, words in [
                    (f"{base}/nope/scalars.csv", 404, "NOT_FOUND"),
                    (f"{base}/{run.run_id}/scalars.json?max_points=1", 400, "max_points"),
                    (f"{base}/{run.run_id}/scalars.json?max_points=x", 400, "max_points"),
                    (f"{base}/{run.run_id}/scalars.xml", 404, ""),
                    (f"{base}/..%2F..%2Fetc/scalars.csv", 404, ""),
                ]:
                    async with http.get(url) as r:
                        assert r.status == status, url
                        assert words in await r.text()
        finally:
            await gateway.aclose()
