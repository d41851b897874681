"""The pooled HTTP client and the HTTP(S) model repository mirror, against a real
static file server (http.server, HTTP/1.1 keep-alive) on port 0."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tensorwire.calls.httppool import HttpModelRepository, HttpPool, HttpPoolConfig
from tensorwire.errors import InvalidArgumentError, NotFoundError, UnavailableError
from tensorwire.serving import modelrepo
from tensorwire.serving.models import build_model
from tests.conftest import free_port
from tests.support.file_server import file_server


def _spiral(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model("spiral").state_dict()


async def test_http_client_allocation_reuses_one_connection(tmp_path: Path) -> None:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "a.json").write_text('{"ok": true}')
    with file_server(tmp_path / "www") as url:
        async with HttpPool() as pool:
            for _ in range(20):
                assert await pool.get_json(f"{url}/a.json") == {"ok": True}
            assert pool.requests == 20
            assert pool.connections_opened == 1
            assert pool.reuse_rate == 0.95
            assert repr(pool).startswith("<HttpPool requests 20, connections 1, reuse 95.0%, failures 0")
            with pytest.raises(NotFoundError, match="HTTP 404"):
                await pool.get_json(f"{url}/missing.json")


async def test_model_repository_mirror_fetches_new_versions_only(tmp_path: Path) -> None:
    source, local = tmp_path / "www", tmp_path / "local"
    modelrepo.write_version(source, "spiral", "spiral", _spiral(1))
    modelrepo.write_version(source, "spiral", "spiral", _spiral(2))
    with file_server(source) as url:
        async with HttpPool() as pool:
            mirror = HttpModelRepository(url + "/", local, pool)
            assert await mirror.sync("spiral") == [1, 2]
            for v in (1, 2):
                assert (modelrepo.weights_path(local, "spiral", v).read_bytes()
                        == modelrepo.weights_path(source, "spiral", v).read_bytes())
            assert modelrepo.read_config(local, "spiral")["kind"] == "spiral"
            fetched = pool.bytes
            modelrepo.write_version(source, "spiral", "spiral", _spiral(3))
            assert await mirror.sync("spiral") == [1, 2, 3]
            assert pool.bytes - fetched == modelrepo.weights_path(source, "spiral", 3).stat().st_size
            # Kept-alive connections are reused; http.server closes one after each error
            # reply, here the 404 that ends each version probe: 1 + 2 connections.
            assert pool.connections_opened == 3 and pool.requests == 10
            assert sorted(p.name for p in (local / "spiral").iterdir()) == ["1", "2", "3", "config.json"]
            with pytest.raises(NotFoundError, match="nosuch/config.json"):
                await mirror.sync("nosuch")
    with pytest.raises(InvalidArgumentError, match="must be http"):
        HttpModelRepository("ftp://x", local, pool)


async def test_unreachable_repository_is_retried_then_unavailable(tmp_path: Path) -> None:
    port = free_port()
    config = HttpPoolConfig(attempts=3, backoff_s=0.01, connect_timeout_s=1)
    async with HttpPool(config) as pool:
        mirror = HttpModelRepository(f"http://127.0.0.1:{port}", tmp_path / "local", pool)
        with pytest.raises(UnavailableError, match="ConnectError"):
            await mirror.sync("spiral")
        assert (pool.failures, pool.retries) == (3, 2)
