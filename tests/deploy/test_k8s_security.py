"""Issue 12, item 7: tokens and certificates from Secrets, NetworkPolicies, TLS.

- every service that listens beyond loopback reads a token file mounted read-only
  from a Secret, and the clients (trainer, lag probe) their own token, with the roles
  their calls need (checked with tensorwire.rpc.auth on the dev overlay's tokens);
- the NetworkPolicies, evaluated as the network plugin would (a small evaluator of the
  NetworkPolicy semantics below), allow exactly the connections of the suite's
  picture and nothing else;
- the TLS component wires every listener to a cert-manager style Secret
  (``tls.crt``/``tls.key``/``ca.crt``), every client to the CA, and replaces the
  native gRPC probes (which cannot speak TLS) by an exec probe that really checks
  grpc.health.v1 over TLS (run here against a real TLS server).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tensorwire.calls.channels import ChannelPool
from tensorwire.rpc import auth
from tensorwire.rpc.auth import ClientSecurity
from tensorwire.rpc.config import is_loopback
from tensorwire.rpc.tls import ClientTls
from tests.support.certs import Authority

from .test_manifests import (
    ENTRY_POINTS,
    K8S,
    _config_maps_of,
    _pod_specs,
    by_kind,
    needs_kubectl,
    render,
)

OVERLAYS = [e for e in ENTRY_POINTS if e.startswith("overlays/")]
AUTH_SECRET = "tensorwire-auth"
EXTERNAL_SECRETS = {AUTH_SECRET}
"""Secrets the operator creates (README): the prod overlays reference them unrendered."""
TLS_SECRETS = {f"{name}-tls" for name in ("trainer", "streamer", "inference", "web", "envoy", "lag-probe")}
"""The TLS component's Secrets (cert-manager's layout: tls.crt, tls.key, ca.crt)."""


def _pods(docs: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    """Deployment name -> its pod template."""
    return {name: d["spec"]["template"] for name, d in by_kind(docs, "Deployment").items()}


def _secret_mounts(spec: dict[str, Any]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """mountPath -> (volume, mount) for every Secret volume of the pod's one container."""
    volumes = {v["name"]: v for v in spec.get("volumes", ()) if "secret" in v}
    out = {}
    for container in spec["containers"]:
        for mount in container.get("volumeMounts", ()):
            if mount["name"] in volumes:
                out[mount["mountPath"]] = (volumes[mount["name"]], mount)
    return out


def _secret_file(spec: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) that the file ``path`` of the pod comes from."""
    directory, _, filename = path.rpartition("/")
    mounts = _secret_mounts(spec)
    assert directory in mounts, f"{path}: no Secret is mounted at {directory}"
    volume, _ = mounts[directory]
    items = volume["secret"].get("items")
    key = next((i["key"] for i in items if i["path"] == filename), None) if items else filename
    assert key is not None, f"{path}: the Secret volume does not project {filename}"
    return volume["secret"]["secretName"], key


# -- tokens from Secrets ---------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_secrets_are_mounted_read_only_and_only_readable_by_the_pod(entry: str) -> None:
    docs = render(entry)
    for name, spec in _pod_specs(docs):
        for path, (volume, mount) in _secret_mounts(spec).items():
            assert mount.get("readOnly") is True, f"{name}: Secret mounted at {path} is writable"
            assert "subPath" not in mount, f"{name}: a subPath mount never sees a rotated Secret"
            mode = volume["secret"].get("defaultMode", 0o644)
            assert mode & 0o007 == 0, f"{name}: {path} readable by others (mode {mode:o})"
            assert mode & 0o222 == 0, f"{name}: {path} writable (mode {mode:o})"
            if mode & 0o070:  # group-readable: the group must be the pod's
                assert spec["securityContext"].get("fsGroup"), f"{name}: {path} needs fsGroup"


@needs_kubectl
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_listener_beyond_loopback_authenticates_with_a_mounted_token_file(entry: str) -> None:
    """HOST=0.0.0.0 comes with AUTH_TOKEN_FILE (never INSECURE), and every token file a
    service reads is a file of a mounted Secret."""
    docs = render(entry)
    secrets = by_kind(docs, "Secret")
    for name, spec in _pod_specs(docs):
        env = {k: v for k, v in _config_maps_of(docs, spec).items() if k.startswith("TENSORWIRE_")}
        for key, value in env.items():
            if key.endswith("_INSECURE"):
                assert value.lower() in ("", "0", "false", "no", "off"), f"{name}: {key}={value}"
            if key.endswith("_HOST") and not is_loopback(value):
                prefix = key.removesuffix("HOST")
                if prefix == "TENSORWIRE_PROBE_":
                    continue  # the probe's /metrics; it serves no RPC
                token_file = env.get(prefix + "AUTH_TOKEN_FILE")
                assert token_file, f"{entry} {name}: {key}={value} without {prefix}AUTH_TOKEN_FILE"
            if key.endswith("TOKEN_FILE"):
                secret, secret_key = _secret_file(spec, value)
                if secret in secrets:  # rendered (dev): the key is really there
                    assert secret_key in secrets[secret]["data"], f"{name}: {secret} lacks {secret_key}"


def _token_table(directory: Path) -> dict[str, auth.Identity]:
    """token -> identity, for the dev overlay's token files."""
    text = (directory / "tokens.csv").read_text()
    table = auth.parse_token_file(text)
    out = {}
    for token_file in directory.glob("*.token"):
        token = token_file.read_text().strip()
        identity = table.get(auth._digest(token))
        assert identity is not None, f"{token_file.name} is not in tokens.csv"
        out[token_file.stem] = identity
    return out


def test_dev_tokens_give_each_client_the_roles_its_calls_need() -> None:
    identities = _token_table(K8S / "overlays" / "dev" / "dev-only-auth")
    trainer, probe = identities["trainer"], identities["probe"]
    methods = auth.METHOD_ROLES
    # the trainer publishes, then loads or uploads each checkpoint
    for method in ("/tensorwire.streamer.v1.StreamerService/Publish",
                   "/inference.GRPCInferenceService/RepositoryModelLoad",
                   "/tensorwire.transfer.v1.ModelTransferService/UploadModel"):
        role = methods[method]
        assert role is not None and trainer.may(role), method
    # the probe lists runs and subscribes, and may change nothing
    assert probe.roles == {auth.Role.VIEWER}
    for method in ("/tensorwire.trainer.v1.TrainerService/ListRuns",
                   "/tensorwire.streamer.v1.StreamerService/Subscribe"):
        role = methods[method]
        assert role is not None and probe.may(role), method
    assert identities["prometheus"].roles == {auth.Role.VIEWER}  # the gateway's /metrics


@needs_kubectl
def test_dev_generates_the_auth_secret_and_prod_commits_no_secret() -> None:
    dev = by_kind(render("overlays/dev"), "Secret")
    (generated,) = [s for name, s in dev.items() if name.startswith(AUTH_SECRET + "-")]
    assert {"tokens.csv", "trainer.token", "probe.token"} <= set(generated["data"])
    for entry in ("overlays/prod", "overlays/prod-gpu", "overlays/prod-tls"):
        docs = render(entry)
        assert not by_kind(docs, "Secret"), f"{entry} must not carry secrets; the operator creates them"
        for name, spec in _pod_specs(docs):
            for volume, _ in _secret_mounts(spec).values():
                secret = volume["secret"]["secretName"]
                assert secret in EXTERNAL_SECRETS | TLS_SECRETS, f"{entry} {name}: unknown Secret {secret}"
    # every pod of dev mounts a Secret the overlay generates
    for name, spec in _pod_specs(render("overlays/dev")):
        for volume, _ in _secret_mounts(spec).values():
            assert volume["secret"]["secretName"] in dev, name


# -- NetworkPolicies -------------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    """A network peer: a pod (labels, namespace labels, named ports) or an address
    outside the cluster's pods (``ip``)."""

    name: str
    namespace: str | None
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    ports: dict[str, int] = field(default_factory=dict, hash=False)
    ip: str | None = None

    @property
    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace} if self.namespace else {}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or ():
        key, op, values = expr["key"], expr["operator"], expr.get("values", ())
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _peer_matches(peer: dict[str, Any], policy_namespace: str, pod: Pod) -> bool:
    if "ipBlock" in peer:
        if pod.ip is None:
            return False  # pod traffic: ipBlock is meant for addresses outside the cluster
        block = peer["ipBlock"]
        addr = ipaddress.ip_address(pod.ip)
        return addr in ipaddress.ip_network(block["cidr"]) and not any(
            addr in ipaddress.ip_network(e) for e in block.get("except", ()))
    if pod.namespace is None:
        return False
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], pod.namespace_labels):
            return False
    elif pod.namespace != policy_namespace:
        return False
    return _selects(peer.get("podSelector") or {}, pod.labels)


def _port_matches(ports: list[dict[str, Any]] | None, dst: Pod, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        want = p.get("port")
        if want is None:
            return True
        number = dst.ports.get(want) if isinstance(want, str) else want
        if number is None:
            continue  # a named port the destination does not have
        if number <= port <= p.get("endPort", number):
            return True
    return False


def _rules(policies: list[dict[str, Any]], pod: Pod, kind: str) -> list[dict[str, Any]] | None:
    """The ``kind`` (Ingress/Egress) rules of every policy selecting ``pod``; None
    when no policy isolates it for that direction (everything allowed)."""
    selecting = [
        p for p in policies
        if p["metadata"]["namespace"] == pod.namespace
        and _selects(p["spec"]["podSelector"], pod.labels)
        and kind in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return None
    return [
        {**rule, "_namespace": p["metadata"]["namespace"]}
        for p in selecting for rule in p["spec"].get(kind.lower()) or ()
    ]


def allowed(policies: list[dict[str, Any]], src: Pod, dst: Pod, port: int,
            protocol: str = "TCP") -> bool:
    """Whether a connection src -> dst:port is allowed: by dst's ingress policies and
    by src's egress policies (each side allows everything when no policy selects it)."""
    ingress = _rules(policies, dst, "Ingress")
    if ingress is not None and not any(
        (not rule.get("from") or any(_peer_matches(p, rule["_namespace"], src) for p in rule["from"]))
        and _port_matches(rule.get("ports"), dst, port, protocol)
        for rule in ingress
    ):
        return False
    egress = _rules(policies, src, "Egress")
    return egress is None or any(
        (not rule.get("to") or any(_peer_matches(p, rule["_namespace"], dst) for p in rule["to"]))
        and _port_matches(rule.get("ports"), dst, port, protocol)
        for rule in egress
    )


def _our_pods(docs: tuple[dict[str, Any], ...]) -> dict[str, Pod]:
    out = {}
    for kind in ("Deployment", "Job"):
        for name, d in by_kind(docs, kind).items():
            template = d["spec"]["template"]
            ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"]
                     for p in c.get("ports", ()) if "name" in p}
            out[name] = Pod(name, d["metadata"]["namespace"], template["metadata"]["labels"], ports)
    return out


PROMETHEUS = Pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"})
INFERENCE_CLIENT = Pod("inference-client", "shop", {"tensorwire.io/inference-client": "true"})
STRANGER = Pod("stranger", "shop", {"app.kubernetes.io/name": "web"})  # our labels, other namespace
INTERNET = Pod("internet", None, ip="203.0.113.7")
KUBE_DNS = Pod("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, {"dns": 53})

EXPECTED = {
    ("envoy", "trainer", 50051), ("envoy", "streamer", 50052), ("envoy", "inference", 8001),
    ("envoy", "web", 8080),
    ("web", "trainer", 50051), ("web", "streamer", 50052), ("web", "inference", 8001),
    ("trainer", "streamer", 50052), ("trainer", "inference", 8001),
    ("lag-probe", "trainer", 50051), ("lag-probe", "streamer", 50052),
    ("inference-client", "inference", 8001),
    ("prometheus", "trainer", 9101), ("prometheus", "streamer", 9102),
    ("prometheus", "inference", 8002), ("prometheus", "web", 8080),
    ("prometheus", "lag-probe", 9103),
    # Envoy is the entry point: anyone outside may connect; our own pods have no reason to
    *((src, "envoy", 8080) for src in ("internet", "stranger", "inference-client", "prometheus")),
}
"""(source, destination, port) of every connection the suite needs; nothing else."""


@needs_kubectl
@pytest.mark.parametrize("entry", OVERLAYS)
def test_network_policies_allow_exactly_what_each_pod_needs(entry: str) -> None:
    docs = render(entry)
    policies = list(by_kind(docs, "NetworkPolicy").values())
    ours = _our_pods(docs)
    expected = set(EXPECTED)
    if "redis" in ours:  # the optional response cache (components/redis): inference only
        expected.add(("inference", "redis", 6379))
    assert set(ours) - {"redis"} == {"trainer", "streamer", "inference", "web", "envoy", "lag-probe"}
    sources = [*ours.values(), PROMETHEUS, INFERENCE_CLIENT, STRANGER, INTERNET]
    got = set()
    for src in sources:
        for dst in ours.values():
            for port in sorted(set(dst.ports.values())):
                if src.name != dst.name and allowed(policies, src, dst, port):
                    got.add((src.name, dst.name, port))
    assert got - expected == set(), f"{entry}: allowed beyond what the suite needs"
    assert expected - got == set(), f"{entry}: needed but refused"
    # Publish and admin RPCs share their port with reads: the network cannot tell them
    # apart, the token's role does (test_dev_tokens_give_each_client_the_roles_its_calls_need).
    for pod in ours.values():
        assert allowed(policies, pod, KUBE_DNS, 53, "UDP"), f"{pod.name} cannot resolve names"
        assert allowed(policies, pod, KUBE_DNS, 53, "TCP"), pod.name
        assert not allowed(policies, pod, INTERNET, 443), f"{pod.name} may reach the internet"
        assert not allowed(policies, pod, KUBE_DNS, 10250), pod.name


@needs_kubectl
@pytest.mark.parametrize("entry", OVERLAYS)
def test_every_pod_is_isolated_both_ways_and_has_its_own_policy(entry: str) -> None:
    docs = render(entry)
    policies = list(by_kind(docs, "NetworkPolicy").values())
    for pod in _our_pods(docs).values():
        for kind in ("Ingress", "Egress"):
            assert _rules(policies, pod, kind) is not None, f"{entry}: {pod.name} not isolated ({kind})"
        own = [p for p in policies if (p["spec"]["podSelector"].get("matchLabels") or {}).get(
            "app.kubernetes.io/name") == pod.name]
        assert own, f"{entry}: no NetworkPolicy names {pod.name}"


@needs_kubectl
def test_distributed_ranks_reach_each_other_and_nothing_else() -> None:
    """The job runs in the suite's namespace, under the base's default deny."""
    suite, job = render("overlays/prod"), render("jobs/distributed-training")
    policies = list(by_kind(suite, "NetworkPolicy").values()) + list(by_kind(job, "NetworkPolicy").values())
    (rank,) = _our_pods(job).values()
    other_rank = Pod("rank-1", rank.namespace, rank.labels, rank.ports)
    for port in (29500, 41234):  # the rendezvous, and a port gloo/NCCL pick
        assert allowed(policies, rank, other_rank, port)
    assert allowed(policies, rank, KUBE_DNS, 53, "UDP")
    for pod in _our_pods(suite).values():
        assert not allowed(policies, pod, rank, 29500), pod.name
        for port in set(pod.ports.values()):
            assert not allowed(policies, rank, pod, port), (pod.name, port)


def test_the_evaluator_follows_network_policy_semantics() -> None:
    """The evaluator above is what the matrix relies on: check it on known cases."""
    ns = "t"
    a = Pod("a", ns, {"app": "a"}, {"grpc": 1000})
    b = Pod("b", ns, {"app": "b"}, {"grpc": 2000})
    elsewhere = Pod("b2", "other", {"app": "b"})

    def policy(name: str, selector: dict[str, Any], **spec: Any) -> dict[str, Any]:
        return {"metadata": {"name": name, "namespace": ns}, "spec": {"podSelector": selector, **spec}}

    assert allowed([], a, b, 2000)  # nothing isolates: open
    deny = policy("deny", {}, policyTypes=["Ingress", "Egress"])
    assert not allowed([deny], a, b, 2000)
    allow_b = policy("b", {"matchLabels": {"app": "b"}}, policyTypes=["Ingress"],
                     ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}],
                               "ports": [{"port": "grpc"}]}])
    allow_a = policy("a", {"matchLabels": {"app": "a"}}, policyTypes=["Egress"],
                     egress=[{"to": [{"podSelector": {"matchLabels": {"app": "b"}}}]}])
    assert not allowed([deny, allow_b], a, b, 2000)  # a's egress still denied
    assert allowed([deny, allow_b, allow_a], a, b, 2000)  # named port resolved on b
    assert not allowed([deny, allow_b, allow_a], a, b, 2001)
    assert not allowed([deny, allow_b, allow_a], b, a, 1000)
    assert not allowed([allow_b], elsewhere, b, 2000)  # podSelector alone: same namespace
    any_ns = policy("b", {"matchLabels": {"app": "b"}}, ingress=[
        {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "b"}}}]}])
    assert allowed([any_ns], elsewhere, b, 2000) and not allowed([any_ns], a, b, 2000)
    assert not allowed([any_ns], INTERNET, b, 2000)
    open_port = policy("b", {"matchLabels": {"app": "b"}}, ingress=[{"ports": [{"port": 2000}]}])
    assert allowed([open_port], INTERNET, b, 2000) and not allowed([open_port], INTERNET, b, 2000, "UDP")


# -- TLS -------------------------------------------------------------------------------

TLS_SERVERS = ("trainer", "streamer", "inference", "web")
TLS_CLIENTS = ("trainer", "web", "lag-probe")
HEALTH_CHECK = K8S / "components" / "tls" / "grpc_health_check.py"
TLS_PREFIX = {"trainer": "TENSORWIRE_TRAINER_", "streamer": "TENSORWIRE_STREAMER_",
              "inference": "TENSORWIRE_INFERENCE_", "web": "TENSORWIRE_GATEWAY_",
              "lag-probe": "TENSORWIRE_PROBE_"}


def _target_host(target: str) -> str:
    """``dns:///streamer-headless:50052`` -> ``streamer-headless``."""
    return target.removeprefix("dns:///").rsplit(":", 1)[0]


def _deployment_behind(docs: tuple[dict[str, Any], ...], service: str) -> str:
    svc = by_kind(docs, "Service")[service]
    (name,) = [n for n, pod in _pods(docs).items()
               if all(pod["metadata"]["labels"].get(k) == v for k, v in svc["spec"]["selector"].items())]
    return name


@needs_kubectl
@pytest.mark.parametrize("entry", [e for e in OVERLAYS if e != "overlays/prod-tls"])
def test_tls_is_opt_in(entry: str) -> None:
    docs = render(entry)
    for name, spec in _pod_specs(docs):
        env = _config_maps_of(docs, spec)
        assert not [k for k in env if "_TLS_" in k], f"{entry} {name}: TLS without the component"


@needs_kubectl
def test_tls_component_wires_every_listener_and_client_to_its_certificate() -> None:
    docs = render("overlays/prod-tls")
    pods = _pods(docs)
    certificates = {c["spec"]["secretName"]: c for c in by_kind(docs, "Certificate").values()}
    issuers = by_kind(docs, "Issuer")
    env = {name: _config_maps_of(docs, pod["spec"]) for name, pod in pods.items()}

    def names_of(deployment: str) -> set[str]:
        spec = pods[deployment]["spec"]
        secret, key = _secret_file(spec, "/etc/tensorwire/tls/tls.crt")
        assert secret == f"{deployment}-tls" and key == "tls.crt"
        cert = certificates[secret]
        assert cert["spec"]["issuerRef"]["name"] in issuers, secret
        return set(cert["spec"]["dnsNames"])

    for name in TLS_SERVERS:
        prefix = TLS_PREFIX[name]
        for setting, key in (("TLS_CERT", "tls.crt"), ("TLS_KEY", "tls.key")):
            assert _secret_file(pods[name]["spec"], env[name][prefix + setting]) == (f"{name}-tls", key)
        annotations = pods[name]["metadata"]["annotations"]
        assert annotations["prometheus.io/scheme"] == "https", f"{name}: /metrics serves TLS now"
        # Prometheus dials pod IPs: it verifies the one name every server certificate has
        assert "tensorwire-metrics" in names_of(name), name
    for name in TLS_CLIENTS:
        prefix = TLS_PREFIX[name]
        assert _secret_file(pods[name]["spec"], env[name][prefix + "TLS_CA"]) == (f"{name}-tls", "ca.crt")
        # every name a client dials is a name of the certificate it will be shown
        for key, target in env[name].items():
            if key.endswith("_TARGET") and target:
                host = _target_host(target)
                server = _deployment_behind(docs, host)
                assert host in names_of(server), f"{name} dials {host}; {server}'s certificate lacks it"
    # the exec probes ask for a name the pod's certificate carries
    for name in ("trainer", "streamer", "inference"):
        (container,) = pods[name]["spec"]["containers"]
        command = container["readinessProbe"]["exec"]["command"]
        assert command[command.index("--server-name") + 1] in names_of(name)
        mount = _secret_mounts(pods[name]["spec"])  # the script's ConfigMap is mounted too
        assert "/etc/tensorwire/tls" in mount
        volumes = {v["name"]: v for v in pods[name]["spec"]["volumes"]}
        script = by_kind(docs, "ConfigMap")[volumes["grpc-health-check"]["configMap"]["name"]]
        assert script["data"]["grpc_health_check.py"] == HEALTH_CHECK.read_text()
    # Envoy verifies each upstream's Service name with the CA of its mounted Secret
    maps = by_kind(docs, "ConfigMap")
    envoy_spec = pods["envoy"]["spec"]
    volume = next(v for v in envoy_spec["volumes"] if "configMap" in v)
    envoy = yaml.safe_load(maps[volume["configMap"]["name"]]["data"]["envoy.yaml"])
    for cluster in envoy["static_resources"]["clusters"]:
        tls = cluster["transport_socket"]["typed_config"]
        context = tls["common_tls_context"]["validation_context"]
        assert _secret_file(envoy_spec, context["trusted_ca"]["filename"]) == ("envoy-tls", "ca.crt")
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        host = endpoint["endpoint"]["address"]["socket_address"]["address"]
        (san,) = context["match_typed_subject_alt_names"]
        assert tls["sni"] == san["matcher"]["exact"] == host, cluster["name"]
        assert host in names_of(_deployment_behind(docs, host)), cluster["name"]
    # the CA's own key is in no pod
    for name, spec in _pod_specs(docs):
        for volume, _ in _secret_mounts(spec).values():
            assert volume["secret"]["secretName"] != "tensorwire-ca", name


def _run_health_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HEALTH_CHECK), *args], check=False,
                          capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def _health_server(credentials: grpc.ServerCredentials | None) -> Iterator[tuple[int, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(0)


def test_exec_health_probe_checks_serving_over_verified_tls(tmp_path: Path) -> None:
    """The probe the TLS component gives the gRPC services, against a real TLS server:
    SERVING passes; NOT_SERVING, a name the certificate lacks, another CA and a
    plaintext port fail, each with the reason on stderr (the kubelet shows it)."""
    ca = Authority("suite", tmp_path / "suite")
    cert, key = ca.issue("localhost")
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    with _health_server(credentials) as (port, servicer):
        ok = _run_health_check("--port", str(port), "--server-name", "localhost", "--ca", str(ca.ca_path))
        assert ok.returncode == 0, ok.stderr
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        down = _run_health_check("--port", str(port), "--server-name", "localhost", "--ca", str(ca.ca_path))
        assert down.returncode == 1 and "NOT_SERVING" in down.stderr
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        wrong_name = _run_health_check("--port", str(port), "--server-name", "trainer", "--ca", str(ca.ca_path))
        assert wrong_name.returncode == 1 and "UNAVAILABLE" in wrong_name.stderr
        other = Authority("other", tmp_path / "other")
        untrusted = _run_health_check("--port", str(port), "--server-name", "localhost", "--ca", str(other.ca_path))
        assert untrusted.returncode == 1 and "UNAVAILABLE" in untrusted.stderr
        missing = _run_health_check("--port", str(port), "--server-name", "localhost",
                                    "--ca", str(tmp_path / "absent.crt"))
        assert missing.returncode == 1 and "cannot read TLS files" in missing.stderr
    with _health_server(None) as (port, _):
        plain = _run_health_check("--port", str(port), "--server-name", "localhost", "--ca", str(ca.ca_path))
        assert plain.returncode == 1


def _issue_for_names(ca: Authority, names: list[str], directory: Path) -> tuple[bytes, bytes]:
    """A server certificate carrying DNS names only (as cert-manager issues for a
    Service): (key PEM, certificate PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            cert.public_bytes(serialization.Encoding.PEM))


async def test_pool_over_a_headless_service_verifies_the_service_name(tmp_path: Path) -> None:
    """What the TLS component needs from the library: a pool dialling every pod of
    ``dns:///name:port`` with TLS checks the certificate against ``name``."""
    ca = Authority("suite", tmp_path)
    key, cert = _issue_for_names(ca, ["localhost"], tmp_path)  # the name, not 127.0.0.1
    with _health_server(grpc.ssl_server_credentials([(key, cert)])) as (port, _):
        security = ClientSecurity(tls=ClientTls(ca.ca_path))
        pool = ChannelPool(f"dns:///localhost:{port}", security=security, name="tls-headless")
        try:
            async with pool.acquire() as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await pool.aclose()


def test_prometheus_follows_the_scheme_and_sends_a_viewer_token() -> None:
    """The gateway's /metrics needs a viewer token; the TLS component's pods ask for
    https through the scheme annotation."""
    (job,) = yaml.safe_load((K8S.parent / "monitoring" / "prometheus.yaml").read_text())["scrape_configs"]
    assert job["authorization"]["type"] == "Bearer" and job["authorization"]["credentials_file"]
    scheme = [r for r in job["relabel_configs"]
              if r.get("source_labels") == ["__meta_kubernetes_pod_annotation_prometheus_io_scheme"]]
    assert scheme and scheme[0]["target_label"] == "__scheme__"
