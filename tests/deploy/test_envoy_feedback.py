"""Envoy sends a page's Acks to the streamer replica that serves its Subscribe stream."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.test_envoy import _hcm, bootstrap, raw

pytest.importorskip("envoy_data_plane")
from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap

__all__ = ["bootstrap", "raw"]  # the fixtures, shared with test_envoy.py

ROOT = Path(__file__).resolve().parents[2]
HEADER = "x-tensorwire-affinity"


def test_streamer_route_hashes_on_the_pages_affinity_header(bootstrap: Bootstrap) -> None:
    routes = {r.name: r for r in _hcm(bootstrap).route_config.virtual_hosts[0].routes}
    policies = routes["streamer"].route.hash_policy
    assert [p.header.header_name for p in policies] == [HEADER]
    clusters = {c.name: c for c in bootstrap.static_resources.clusters}
    assert clusters["streamer"].lb_policy.name == "RING_HASH"  # a hash picks the replica


def test_cross_origin_pages_may_send_it(bootstrap: Bootstrap) -> None:
    host = _hcm(bootstrap).route_config.virtual_hosts[0]
    policy = host.typed_per_filter_config["envoy.filters.http.cors"].unpack()
    assert HEADER in {h.strip() for h in policy.allow_headers.split(",")}


def test_the_page_sends_it_on_subscribe_and_ack() -> None:
    source = (ROOT / "clients" / "web" / "src" / "rpc.ts").read_text()
    assert f'"{HEADER}"' in source
    assert source.count("headers: AFFINITY") == 2
