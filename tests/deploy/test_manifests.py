"""The Kubernetes manifests under deploy/: references, schemas, and the rules of issue 7.

Three layers, from what needs nothing to what needs kubectl:
1. every kustomization's references exist and stay inside its root (kustomize's
   default load restrictor refuses files outside it);
2. every plain manifest file passes kubernetes-validate (strict: unknown fields are
   errors) for a current Kubernetes version;
3. every entry point (overlays, jobs) is rendered with ``kubectl kustomize`` (there is
   no Python implementation of kustomize; kubectl embeds it) and the rendered objects
   are validated and checked: probes, security, resources, config, balancing, GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from services.gateway.settings import GatewaySettings
from services.inference.settings import InferenceSettings
from services.probe.settings import ProbeSettings
from services.streamer.settings import StreamerSettings
from services.trainer.distributed import DistributedSettings
from services.trainer.settings import TrainerSettings
from tensorwire.rpc import config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSIONS = ("1.37.0", "1.33.0")
"""The newest release kubernetes-validate knows, and an older one still supported."""
ENTRY_POINTS = ("overlays/dev", "overlays/prod", "overlays/prod-gpu", "overlays/dev-local",
                "overlays/prod-tls", "jobs/distributed-training")
TLS_ENTRY_POINTS = ("overlays/prod-tls",)
"""Entry points with the TLS component (deploy/k8s/components/tls)."""
SETTINGS = {
    cls.env_prefix: cls
    for cls in (TrainerSettings, StreamerSettings, InferenceSettings, GatewaySettings,
                DistributedSettings, ProbeSettings)
}
GRPC_SERVICES = {"trainer": 50051, "streamer": 50052, "inference": 8001}


KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")


def kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise AssertionError(f"{directory} holds no kustomization")


def kustomization_dirs() -> list[Path]:
    return sorted({p.parent for n in KUSTOMIZATION_NAMES for p in DEPLOY.rglob(n)})


def load_yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _refs(kust: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(what, relative path) for every file or directory a kustomization names."""
    for key in ("resources", "components", "bases"):
        for ref in kust.get(key) or ():
            yield key, ref
    for patch in kust.get("patches") or ():
        if "path" in patch:
            yield "patches", patch["path"]
    for ref in kust.get("patchesStrategicMerge") or ():
        yield "patchesStrategicMerge", ref
    for gen in (kust.get("configMapGenerator") or []) + (kust.get("secretGenerator") or []):
        for ref in gen.get("envs") or ():
            yield f"generator {gen['name']} envs", ref
        for ref in gen.get("files") or ():
            yield f"generator {gen['name']} files", ref.split("=", 1)[-1]


def patch_files() -> set[Path]:
    """Files that are patches or generator inputs (not objects of their own)."""
    out: set[Path] = set()
    for d in kustomization_dirs():
        kust = yaml.safe_load(kustomization_file(d).read_text())
        for what, ref in _refs(kust):
            if what.startswith(("patch", "generator")):
                out.add((d / ref).resolve())
    return out


# -- 1. references ------------------------------------------------------------------

@pytest.mark.parametrize("directory", kustomization_dirs(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_kustomization_reference_exists_inside_its_root(directory: Path) -> None:
    kust = yaml.safe_load(kustomization_file(directory).read_text())
    assert kust.get("kind") in ("Kustomization", "Component"), directory
    refs = list(_refs(kust))
    assert refs, f"{directory} names nothing"
    for what, ref in refs:
        target = (directory / ref).resolve()
        assert target.exists(), f"{directory.relative_to(ROOT)}: {what} {ref!r} does not exist"
        if what in ("resources", "components", "bases") and target.is_dir():
            kind = yaml.safe_load(kustomization_file(target).read_text()).get("kind")
            want = "Component" if what == "components" else "Kustomization"
            assert kind == want, f"{directory}: {what} {ref} is a {kind}, expected a {want}"
        else:
            # kustomize's default load restrictor: files only from within the root
            assert target.is_relative_to(directory.resolve()), (
                f"{directory.relative_to(ROOT)}: {what} {ref!r} is outside the kustomization "
                "root; kustomize build would refuse it"
            )


def test_every_manifest_file_is_reachable_from_an_entry_point() -> None:
    reachable: set[Path] = set()

    def walk(d: Path) -> None:
        kust = yaml.safe_load(kustomization_file(d).read_text())
        reachable.add(kustomization_file(d).resolve())
        for _, ref in _refs(kust):
            target = (d / ref).resolve()
            if target.is_dir():
                walk(target)
            else:
                reachable.add(target)

    for entry in ENTRY_POINTS:
        walk(K8S / entry)
    stray = [
        p.relative_to(ROOT) for d in (K8S, DEPLOY / "monitoring") for p in d.rglob("*")
        if p.suffix in (".yaml", ".yml", ".env", ".json") and p.resolve() not in reachable
    ]
    assert (DEPLOY / "envoy" / "envoy.yaml").resolve() in reachable
    assert not stray, f"files no overlay or job uses (dead, or a missing reference): {stray}"


# -- 2. each file ------------------------------------------------------------------

def manifest_files() -> list[Path]:
    patches = patch_files()
    return sorted(
        p for p in K8S.rglob("*.yaml")
        if p.name != "kustomization.yaml" and p.resolve() not in patches
    )


@pytest.fixture(autouse=True, scope="module")
def _schemas_parsed_once() -> Iterator[None]:
    """kubernetes-validate parses its (large) JSON schema files on every call; the
    files never change, so parse each once while this module runs."""
    original = kubernetes_validate.utils.schema_contents
    kubernetes_validate.utils.schema_contents = functools.cache(original)
    try:
        yield
    finally:
        kubernetes_validate.utils.schema_contents = original


CERT_MANAGER_FIELDS = {
    "Issuer": {"selfSigned", "ca", "acme", "vault", "venafi"},
    "Certificate": {
        "secretName", "issuerRef", "commonName", "dnsNames", "ipAddresses", "uris",
        "emailAddresses", "usages", "duration", "renewBefore", "privateKey", "isCA",
        "subject", "secretTemplate", "keystores", "literalSubject", "revisionHistoryLimit",
    },
}
"""cert-manager.io/v1 spec fields (kubernetes-validate knows no custom resources)."""


def _validate_cert_manager(doc: dict[str, Any], where: str) -> None:
    """The part of cert-manager's CRD schema these manifests use, strictly."""
    kind, spec = doc["kind"], doc.get("spec") or {}
    name = f"{where}: {kind}/{doc['metadata']['name']}"
    assert doc["apiVersion"] == "cert-manager.io/v1", name
    assert kind in CERT_MANAGER_FIELDS, f"{name}: not a kind these manifests use"
    assert set(spec) <= CERT_MANAGER_FIELDS[kind], f"{name}: unknown fields {set(spec) - CERT_MANAGER_FIELDS[kind]}"
    if kind == "Issuer":
        assert len(set(spec) & CERT_MANAGER_FIELDS["Issuer"]) == 1, f"{name}: exactly one issuer type"
        return
    assert spec.get("secretName") and spec.get("issuerRef", {}).get("name"), name
    assert set(spec["issuerRef"]) <= {"name", "kind", "group"}, name
    assert set(spec.get("privateKey", {})) <= {"algorithm", "size", "encoding", "rotationPolicy"}, name
    allowed_usages = {"digital signature", "key encipherment", "server auth", "client auth",
                      "cert sign", "crl sign"}
    assert set(spec.get("usages", ())) <= allowed_usages, f"{name}: {spec.get('usages')}"
    assert spec.get("dnsNames") or spec.get("commonName"), f"{name}: names nothing"


def _validate(doc: dict[str, Any], where: str) -> None:
    if doc.get("apiVersion", "").startswith("cert-manager.io/"):
        _validate_cert_manager(doc, where)
        return
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{where}: {doc['kind']}/{doc['metadata']['name']} invalid for "
                        f"Kubernetes {version} at {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{where}: {exc.message}")


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_each_manifest_file_passes_kubernetes_validate(path: Path) -> None:
    docs = load_yaml_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        _validate(doc, str(path.relative_to(ROOT)))


# -- 3. rendered -------------------------------------------------------------------

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl (which embeds kustomize) is not installed; layers 1-2 ran"
)


@functools.cache
def render(entry: str) -> tuple[dict[str, Any], ...]:
    proc = subprocess.run(
        [KUBECTL or "kubectl", "kustomize", str(K8S / entry)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"kubectl kustomize {entry} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _pod_specs(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@needs_kubectl
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_rendered_objects_pass_kubernetes_validate(entry: str) -> None:
    docs = render(entry)
    assert docs
    for doc in docs:
        _validate(doc, f"kubectl kustomize {entry}")
        assert doc["metadata"].get("namespace") or doc["kind"] == "Namespace", (
            f"{entry}: {doc['kind']}/{doc['metadata']['name']} has no namespace"
        )


@needs_kubectl
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_pod_is_locked_down_and_sized(entry: str) -> None:
    docs = render(entry)
    accounts = by_kind(docs, "ServiceAccount")
    claims = by_kind(docs, "PersistentVolumeClaim")
    if entry.startswith("jobs/"):  # a job runs beside the suite and uses its claim
        claims |= by_kind(render("overlays/prod"), "PersistentVolumeClaim")
    for name, spec in _pod_specs(docs):
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        assert spec["serviceAccountName"] in accounts, f"{name}: no ServiceAccount"
        assert spec["automountServiceAccountToken"] is False, name
        for vol in spec.get("volumes", ()):
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in claims, f"{name}: {vol}"
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, f"{name}/{c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, f"{name}/{c['name']}"
            assert sc["capabilities"]["drop"] == ["ALL"], f"{name}/{c['name']}"
            assert "add" not in sc["capabilities"], f"{name}/{c['name']}"
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(
                res["limits"]), f"{name}/{c['name']}: requests and limits for cpu and memory"
            mounts = {m["mountPath"] for m in c.get("volumeMounts", ())}
            assert "/tmp" in mounts, f"{name}/{c['name']}: read-only root needs a writable /tmp"


@needs_kubectl
@pytest.mark.parametrize("entry", [e for e in ENTRY_POINTS if e.startswith("overlays/")])
def test_each_service_has_deployment_service_account_and_grpc_probes(entry: str) -> None:
    docs = render(entry)
    deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    accounts = by_kind(docs, "ServiceAccount")
    for name, port in GRPC_SERVICES.items():
        dep = deployments[name]
        pod = dep["spec"]["template"]
        assert name in accounts and pod["spec"]["serviceAccountName"] == name
        (container,) = pod["spec"]["containers"]
        assert container["command"] == [f"tensorwire-{name}"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"] == port
        for probe in ("readinessProbe", "livenessProbe"):
            if entry in TLS_ENTRY_POINTS:  # native probes cannot speak TLS: the exec check
                command = container[probe]["exec"]["command"]
                assert command[:2] == ["python", "/etc/tensorwire/probe/grpc_health_check.py"]
                assert command[command.index("--port") + 1] == str(port), f"{name} {probe}"
                assert "grpc" not in container[probe], f"{name} {probe}: one handler per probe"
            else:
                assert container[probe]["grpc"]["port"] == port, f"{name} {probe}: native gRPC probe"
        svc = services[name]
        assert _selects(svc["spec"]["selector"], pod["metadata"]["labels"])
        grpc_ports = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
        assert grpc_ports and grpc_ports[0]["port"] == port, f"Service {name}: port named grpc"
        metrics_port = pod["metadata"]["annotations"]["prometheus.io/port"]
        assert int(metrics_port) == ports["metrics"], f"{name}: scrape annotation != metrics port"


def _config_maps_of(docs: tuple[dict[str, Any], ...], spec: dict[str, Any]) -> dict[str, str]:
    maps = by_kind(docs, "ConfigMap")
    env: dict[str, str] = {}
    for c in spec["containers"]:
        for source in c.get("envFrom", ()):
            name = source["configMapRef"]["name"]
            assert name in maps, f"envFrom names a missing ConfigMap {name}"
            env.update(maps[name]["data"])
        for var in c.get("env", ()):
            if "value" in var:
                env[var["name"]] = var["value"]
    return env


@needs_kubectl
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_config_is_real_settings_with_valid_values(entry: str) -> None:
    """Every TENSORWIRE_* variable is a setting of the service it configures, and
    the service's own settings loader accepts the values (as it will in the pod)."""
    docs = render(entry)
    for name, spec in _pod_specs(docs):
        if not spec["containers"][0]["image"].rsplit(":", 1)[0].endswith("/tensorwire"):
            continue  # Envoy: configured by its ConfigMap, see test_envoy_*
        env = _config_maps_of(docs, spec)
        ours = {k: v for k, v in env.items() if k.startswith("TENSORWIRE_")}
        assert ours, f"{name}: configured by no TENSORWIRE_ variable"
        for prefix, cls in SETTINGS.items():
            keys = {k for k in ours if k.startswith(prefix)}
            if not keys:
                continue
            known = {prefix + f.metadata["env"] for f in dataclasses.fields(cls) if "env" in f.metadata}
            assert keys <= known, f"{name}: not settings of {cls.__name__}: {sorted(keys - known)}"
            try:
                config.load(cls, [], env=ours)
            except config.SettingsError as exc:
                pytest.fail(f"{entry} {name}: {cls.__name__} refuses its config: {exc}")
            ours = {k: v for k, v in ours.items() if k not in keys}
        assert not ours, f"{name}: variables of no known service: {sorted(ours)}"


@needs_kubectl
@pytest.mark.parametrize("entry", [e for e in ENTRY_POINTS if e.startswith("overlays/")])
def test_trainer_publishes_to_every_streamer_replica_through_the_headless_service(entry: str) -> None:
    docs = render(entry)
    services, deployments = by_kind(docs, "Service"), by_kind(docs, "Deployment")
    env = _config_maps_of(docs, deployments["trainer"]["spec"]["template"]["spec"])
    target = env["TENSORWIRE_TRAINER_STREAMER_TARGET"]
    assert target.startswith("dns:///"), "a DNS target resolves to every replica's address"
    host, port = target.removeprefix("dns:///").rsplit(":", 1)
    svc = services[host.split(".")[0]]
    assert svc["spec"]["clusterIP"] == "None", f"{host} must be headless (one A record per pod)"
    assert _selects(svc["spec"]["selector"],
                    deployments["streamer"]["spec"]["template"]["metadata"]["labels"])
    assert int(port) in [p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"]
    # the lag probe watches the very replicas the trainer publishes to
    probe = _config_maps_of(docs, deployments["lag-probe"]["spec"]["template"]["spec"])
    assert probe["TENSORWIRE_PROBE_STREAMER_TARGET"] == target
    # inference is reached the same way: client-side round-robin over every pod
    host, port = env["TENSORWIRE_TRAINER_INFERENCE_TARGET"].removeprefix("dns:///").rsplit(":", 1)
    assert services[host]["spec"]["clusterIP"] == "None"


@needs_kubectl
@pytest.mark.parametrize("entry", [e for e in ENTRY_POINTS if e.startswith("overlays/")])
def test_inference_autoscales_and_survives_disruptions(entry: str) -> None:
    docs = render(entry)
    dep = by_kind(docs, "Deployment")["inference"]
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["inference"]
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "inference")
    trainer_env = _config_maps_of(docs, by_kind(docs, "Deployment")["trainer"]["spec"]["template"]["spec"])
    if trainer_env.get("TENSORWIRE_TRAINER_PUSH_CHECKPOINTS") == "true":
        # checkpoints pushed to one replica: inference must stay at one
        assert hpa["spec"]["minReplicas"] == hpa["spec"]["maxReplicas"] == 1
    else:
        assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    pdb = by_kind(docs, "PodDisruptionBudget")["inference"]
    assert _selects(pdb["spec"]["selector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"])
    if "minAvailable" in pdb["spec"]:
        # a PDB that allows no eviction at the minimum scale would block node drains
        assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


@needs_kubectl
def test_gpu_component_puts_trainer_and_inference_on_gpu_nodes() -> None:
    docs = render("overlays/prod-gpu")
    deployments = by_kind(docs, "Deployment")
    for name in ("trainer", "inference"):
        spec = deployments[name]["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, name
        assert c["image"].endswith("-cu130"), f"{name} must run the CUDA image, got {c['image']}"
        env = _config_maps_of(docs, spec)
        assert env[f"TENSORWIRE_{name.upper()}_DEVICE"] == "cuda", name  # computes on it, or exits
    streamer = deployments["streamer"]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in streamer["containers"][0]["resources"]["limits"]
    assert "nodeSelector" not in streamer
    cpu = by_kind(render("overlays/prod"), "Deployment")["trainer"]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"]


@needs_kubectl
def test_no_shared_volume_component_drops_the_claim_and_pushes_checkpoints() -> None:
    docs = render("overlays/dev-local")
    assert not by_kind(docs, "PersistentVolumeClaim")
    env = _config_maps_of(docs, by_kind(docs, "Deployment")["trainer"]["spec"]["template"]["spec"])
    assert env["TENSORWIRE_TRAINER_PUSH_CHECKPOINTS"] == "true"
    assert config.load(TrainerSettings, [], env=env).push_checkpoints is True
    pdb = by_kind(docs, "PodDisruptionBudget")["inference"]["spec"]
    assert "minAvailable" not in pdb and pdb["maxUnavailable"] == 1
    shared = render("overlays/dev")
    shared_env = _config_maps_of(shared, by_kind(shared, "Deployment")["trainer"]["spec"]["template"]["spec"])
    assert shared_env.get("TENSORWIRE_TRAINER_PUSH_CHECKPOINTS") in (None, "false")
    for name in ("trainer", "inference"):
        spec = by_kind(docs, "Deployment")[name]["spec"]["template"]["spec"]
        models = next(v for v in spec["volumes"] if v["name"] == "models")
        assert set(models) == {"name", "emptyDir"}, models
        mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "models")
        assert not mount.get("readOnly"), f"{name} installs uploaded checkpoints itself"


@needs_kubectl
def test_distributed_job_gives_each_rank_a_stable_rendezvous_address() -> None:
    docs = render("jobs/distributed-training")
    job = by_kind(docs, "Job")["trainer-ddp"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] >= 2
    pod = spec["template"]["spec"]
    env = _config_maps_of(docs, pod)
    assert int(env["WORLD_SIZE"]) == spec["completions"]
    svc = by_kind(docs, "Service")[pod["subdomain"]]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    # indexed Job pods are named <job>-<index>; rank 0 is the master
    assert env["MASTER_ADDR"] == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert int(env["MASTER_PORT"]) in [p["port"] for p in svc["spec"]["ports"]]
    assert pod["containers"][0]["command"] == ["python", "-m", "services.trainer.distributed"]


@needs_kubectl
def test_overlays_differ_where_they_should() -> None:
    dev, prod = render("overlays/dev"), render("overlays/prod")
    assert {d["metadata"].get("namespace") for d in dev} - {None} == {"tensorwire-dev"}
    assert {d["metadata"].get("namespace") for d in prod} - {None} == {"tensorwire"}
    assert by_kind(prod, "Deployment")["streamer"]["spec"]["replicas"] > 1
    dev_env = _config_maps_of(dev, by_kind(dev, "Deployment")["trainer"]["spec"]["template"]["spec"])
    prod_env = _config_maps_of(prod, by_kind(prod, "Deployment")["trainer"]["spec"]["template"]["spec"])
    assert dev_env["TENSORWIRE_TRAINER_DEMO_TASK"] == "spiral"
    assert prod_env["TENSORWIRE_TRAINER_DEMO_TASK"] == ""
    monitoring = by_kind(prod, "ConfigMap")
    assert yaml.safe_load(monitoring["prometheus-tensorwire"]["data"]["tensorwire-alerts.yaml"])["groups"]
    assert monitoring["grafana-dashboard-tensorwire"]["metadata"]["labels"]["grafana_dashboard"] == "1"


@needs_kubectl
@pytest.mark.parametrize("entry", [e for e in ENTRY_POINTS if e.startswith("overlays/")])
def test_envoy_runs_the_config_of_deploy_envoy_against_services_that_exist(entry: str) -> None:
    """Envoy mounts deploy/envoy/envoy.yaml unchanged, and every upstream it names is
    a Service of the render, on a port it exposes; the streamer and inference
    upstreams are headless, so Envoy balances calls over the pods."""
    docs = render(entry)
    services, maps = by_kind(docs, "Service"), by_kind(docs, "ConfigMap")
    dep = by_kind(docs, "Deployment")["envoy"]
    volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if "configMap" in v)
    text = maps[volume["configMap"]["name"]]["data"]["envoy.yaml"]
    config = (K8S / "components" / "tls" / "envoy-tls.yaml" if entry in TLS_ENTRY_POINTS
              else DEPLOY / "envoy" / "envoy.yaml")
    assert text == config.read_text()
    envoy = yaml.safe_load(text)
    container = dep["spec"]["template"]["spec"]["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    assert f"{mount['mountPath']}/envoy.yaml" in container["args"]
    listen_ports = {
        lst["address"]["socket_address"]["port_value"] for lst in envoy["static_resources"]["listeners"]
    }
    assert {p["containerPort"] for p in container["ports"]} <= listen_ports
    upstreams = {}
    for cluster in envoy["static_resources"]["clusters"]:
        for group in cluster["load_assignment"]["endpoints"]:
            for ep in group["lb_endpoints"]:
                addr = ep["endpoint"]["address"]["socket_address"]
                upstreams[cluster["name"]] = (addr["address"], addr["port_value"])
    for cluster, (host, port) in upstreams.items():
        assert host in services, f"envoy cluster {cluster}: no Service named {host!r}"
        assert port in [p["port"] for p in services[host]["spec"]["ports"]], (cluster, host, port)
    for cluster in ("streamer", "inference"):
        host, _ = upstreams[cluster]
        assert services[host]["spec"].get("clusterIP") == "None", f"{cluster}: {host} not headless"


@needs_kubectl
def test_redis_component_gives_every_inference_replica_one_shared_cache() -> None:
    from tensorwire.serving.cache import RedisCacheConfig

    for entry in ("overlays/prod", "overlays/prod-gpu"):
        docs = render(entry)
        deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
        env = _config_maps_of(docs, deployments["inference"]["spec"]["template"]["spec"])
        cache = config.load(InferenceSettings, [], env=env).cache_config
        assert isinstance(cache, RedisCacheConfig), f"{entry}: inference has no Redis cache"
        redis = deployments[cache.host]
        labels = redis["spec"]["template"]["metadata"]["labels"]
        assert _selects(services[cache.host]["spec"]["selector"], labels)
        assert cache.port in [p["port"] for p in services[cache.host]["spec"]["ports"]]
        (container,) = redis["spec"]["template"]["spec"]["containers"]
        args = container["args"]
        assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"  # a cache, bounded
        assert args[args.index("--save") + 1] == ""  # no persistence
        # only inference pods may connect
        policy = by_kind(docs, "NetworkPolicy")["redis"]
        assert _selects(policy["spec"]["podSelector"]["matchLabels"], labels)
        (rule,) = policy["spec"]["ingress"]
        inference_labels = deployments["inference"]["spec"]["template"]["metadata"]["labels"]
        assert all(_selects(src["podSelector"]["matchLabels"], inference_labels) for src in rule["from"])
    # optional: the dev overlays have no cache
    dev = render("overlays/dev")
    assert "redis" not in by_kind(dev, "Deployment")
    env = _config_maps_of(dev, by_kind(dev, "Deployment")["inference"]["spec"]["template"]["spec"])
    assert config.load(InferenceSettings, [], env=env).cache_config is None
