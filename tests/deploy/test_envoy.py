"""deploy/envoy/envoy.yaml against Envoy's own v3 schema (envoy-data-plane, offline).

The config must parse as a Bootstrap with every typed_config resolved to its
message (unknown fields and bad enum values are errors), every route must name
a defined cluster, gRPC upstreams must speak HTTP/2, streaming routes must never
time out, CORS must expose grpc-status/grpc-message, and Envoy must route every
service the built-in gateway routes.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.gateway.app import routes_for
from services.gateway.settings import GatewaySettings

pytest.importorskip("envoy_data_plane")
from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap

# envoy-data-plane's generated models use a pydantic idiom newer pydantic deprecates.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "envoy" / "envoy.yaml"
TLS_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "components" / "tls" / "envoy-tls.yaml"
"""Envoy of the TLS component: CONFIG plus TLS toward every upstream."""


def _type_urls(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "@type":
                yield value
            else:
                yield from _type_urls(value)
    elif isinstance(node, list):
        for value in node:
            yield from _type_urls(value)


def parse(raw: dict[str, Any]) -> Bootstrap:
    """Envoy's schema check: every typed_config's module is loaded so it is checked too."""
    for url in set(_type_urls(raw)):
        package = url.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        importlib.import_module(f"envoy_data_plane.{package}")
    return Bootstrap.from_dict(raw)


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text())


@pytest.fixture(scope="module")
def bootstrap(raw: dict[str, Any]) -> Bootstrap:
    return parse(raw)


def _hcm(bootstrap: Bootstrap) -> Any:
    (listener,) = bootstrap.static_resources.listeners
    (chain,) = listener.filter_chains
    (network_filter,) = chain.filters
    assert network_filter.name == "envoy.filters.network.http_connection_manager"
    return network_filter.typed_config.unpack()


def undefined_clusters(bootstrap: Bootstrap) -> set[str]:
    defined = {c.name for c in bootstrap.static_resources.clusters}
    named = set()
    for host in _hcm(bootstrap).route_config.virtual_hosts:
        for route in host.routes:
            if route.is_set("route"):
                named.add(route.route.cluster)
            else:
                assert route.is_set("direct_response"), f"route {route.name} goes nowhere"
    return named - defined


def test_config_matches_envoys_schema(bootstrap: Bootstrap) -> None:
    assert bootstrap.static_resources.clusters


@pytest.mark.parametrize(
    ("path", "key", "value", "error"),
    [
        (("static_resources", "clusters", 0), "lb_polcy", "ROUND_ROBIN", KeyError),
        (("static_resources", "clusters", 0), "lb_policy", "FASTEST", ValueError),
        (("static_resources", "listeners", 0, "filter_chains", 0, "filters", 0, "typed_config"),
         "stream_idle_timout", "0s", KeyError),
    ],
)
def test_schema_check_rejects_mistakes(raw: dict[str, Any], path: tuple[Any, ...], key: str,
                                       value: str, error: type[Exception]) -> None:
    broken = copy.deepcopy(raw)
    node = broken
    for part in path:
        node = node[part]
    node[key] = value
    with pytest.raises(error):
        parse(broken)


def test_every_route_names_a_defined_cluster(bootstrap: Bootstrap, raw: dict[str, Any]) -> None:
    assert undefined_clusters(bootstrap) == set()
    # ...and the check notices a route to nowhere.
    broken = copy.deepcopy(raw)
    hcm = broken["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["route_config"]["virtual_hosts"][0]["routes"][1]["route"]["cluster"] = "streamr"
    assert undefined_clusters(parse(broken)) == {"streamr"}


def test_filters_grpc_web_then_cors_then_router(bootstrap: Bootstrap) -> None:
    names = [f.name for f in _hcm(bootstrap).http_filters]
    assert names == ["envoy.filters.http.grpc_web", "envoy.filters.http.cors",
                     "envoy.filters.http.router"]


def test_grpc_upstreams_are_http2(bootstrap: Bootstrap) -> None:
    clusters = {c.name: c for c in bootstrap.static_resources.clusters}
    for name in ("trainer", "streamer", "inference"):
        options = clusters[name].typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ].unpack()
        assert options.explicit_http_config.is_set("http2_protocol_options"), name


def test_streams_never_time_out(bootstrap: Bootstrap) -> None:
    hcm = _hcm(bootstrap)
    assert hcm.stream_idle_timeout.total_seconds() == 0
    routes = {r.name: r for r in hcm.route_config.virtual_hosts[0].routes}
    stream = routes["streamer"].route
    assert stream.timeout.total_seconds() == 0
    assert stream.idle_timeout.total_seconds() == 0
    for name in ("trainer", "inference"):
        assert routes[name].route.timeout.total_seconds() == 0  # the grpc-timeout header rules


def test_publish_is_not_exposed(bootstrap: Bootstrap) -> None:
    first = _hcm(bootstrap).route_config.virtual_hosts[0].routes[0]
    assert first.match.path == "/tensorwire.streamer.v1.StreamerService/Publish"
    assert first.direct_response.status == 403


def test_cors_exposes_grpc_status(bootstrap: Bootstrap) -> None:
    host = _hcm(bootstrap).route_config.virtual_hosts[0]
    policy = host.typed_per_filter_config["envoy.filters.http.cors"].unpack()
    exposed = {h.strip() for h in policy.expose_headers.split(",")}
    assert {"grpc-status", "grpc-message"} <= exposed
    allowed = {h.strip() for h in policy.allow_headers.split(",")}
    # authorization: the page's bearer token (issue 12), passed through to the services
    assert {"content-type", "x-grpc-web", "grpc-timeout", "authorization"} <= allowed


def test_envoy_routes_what_the_builtin_gateway_routes(bootstrap: Bootstrap) -> None:
    prefixes = {r.match.prefix for r in _hcm(bootstrap).route_config.virtual_hosts[0].routes}
    for service in routes_for(GatewaySettings()):
        assert f"/{service}/" in prefixes, service


def test_tls_config_is_the_config_plus_verified_tls_to_every_upstream(raw: dict[str, Any]) -> None:
    """envoy-tls.yaml passes the schema check and differs from envoy.yaml only by an
    UpstreamTlsContext per cluster that verifies the CA and the upstream's name."""
    tls_raw = yaml.safe_load(TLS_CONFIG.read_text())
    tls = parse(tls_raw)
    assert undefined_clusters(tls) == set()
    for cluster in tls.static_resources.clusters:
        assert cluster.transport_socket.name == "envoy.transport_sockets.tls", cluster.name
        context = cluster.transport_socket.typed_config.unpack()
        validation = context.common_tls_context.validation_context
        assert validation.trusted_ca.filename.startswith("/etc/envoy-tls/"), cluster.name
        (san,) = validation.match_typed_subject_alt_names
        address = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
        assert context.sni == san.matcher.exact == address.address, cluster.name
        if cluster.name != "web":  # gRPC upstreams negotiate HTTP/2
            assert list(context.common_tls_context.alpn_protocols) == ["h2"], cluster.name
    plain = copy.deepcopy(tls_raw)
    for cluster in plain["static_resources"]["clusters"]:
        del cluster["transport_socket"]
    assert plain == raw, "envoy-tls.yaml must change envoy.yaml the same way (see its header)"
