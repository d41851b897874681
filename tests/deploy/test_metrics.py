"""Every metric the Grafana dashboard and the alert rules use is really exported.

The suite runs as processes (streamer, inference, trainer publishing a run and
announcing checkpoints, the web gateway), gets a little of every kind of traffic,
and the names in deploy/monitoring are checked against the union of what their
``/metrics`` endpoints expose — and each label a selector filters on against the
labels those metrics carry.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tensorwire.client import InferenceClient
from tensorwire.serving import modelrepo
from tensorwire.serving.models import build_model
from tensorwire.trainer.v1 import trainer_pb2 as tpb
from tensorwire.trainer.v1 import trainer_pb2_grpc as tpb_grpc
from tests.conftest import free_port

from .processes import running

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"

PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
"""Series Prometheus makes itself for every target, not exported by a service."""
RELABELLED = {"namespace", "pod", "app", "job", "instance"}
"""Labels the scrape configuration adds (deploy/monitoring/prometheus.yaml)."""
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "le", "inf", "nan",
}


# -- reading PromQL ----------------------------------------------------------------

def _strip(expr: str) -> str:
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery durations
    return re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression selects (functions, keywords, labels excluded)."""
    expr = _strip(expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        word = m.group(0)
        after = expr[m.end():].lstrip()
        if after.startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def selectors(expr: str) -> Iterator[tuple[str, set[str]]]:
    """(metric, labels it filters on) for every ``name{...}`` selector."""
    for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", re.sub(r"\[[^\]]*\]", "", expr)):
        labels = {lm.group(1) for lm in re.finditer(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2))}
        yield m.group(1), labels


def dashboard_exprs() -> list[str]:
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", ())]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert m, f"unexpected template query {query}"
            exprs.append(m.group(1))
    return exprs


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def test_promql_reader_finds_names_and_labels() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, pod) (rate(a_seconds_bucket{service="x", '
            'method=~"M|N"}[5m]))) > 0.25 and on(pod) b_total offset 5m unless up{job="t"} == 0')
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "up"}
    assert dict(selectors(expr)) == {"a_seconds_bucket": {"service", "method"}, "up": {"job"}}
    assert metric_names('sum(rate(x_total{namespace=~"$namespace"}[$__rate_interval]))') == {"x_total"}


def test_every_alert_and_panel_has_a_query() -> None:
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    names = [r["alert"] for g in rules["groups"] for r in g["rules"]]
    assert len(names) == len(set(names))
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]
            assert metric_names(rule["expr"]), rule["alert"]
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["targets"] and all(metric_names(t["expr"]) for t in p["targets"]), p["title"]


# -- the running suite -------------------------------------------------------------

def exposition(text: str) -> dict[str, set[str]]:
    """Sample name -> label names, from one /metrics page."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def grpc_web_frame(message: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(message)) + message


@pytest.mark.slow
async def test_dashboard_and_alert_metrics_appear_in_running_services(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    modelrepo.write_version(repo, "spiral", "spiral", build_model("spiral").state_dict(),
                            config_overrides={"response_cache": {"enable": True}})
    static = tmp_path / "web"
    static.mkdir()
    (static / "index.html").write_text("<!doctype html><title>tensorwire</title>")
    ports = {name: (free_port(), free_port()) for name in ("streamer", "inference", "trainer")}
    web_port = free_port()
    probe_port = free_port()

    def service_args(name: str) -> list[str]:
        return ["--metrics-port", str(ports[name][1])]

    async with (
        running("streamer", ports["streamer"][0], service_args("streamer"), tmp_path) as streamer,
        running("inference", ports["inference"][0],
                [*service_args("inference"), "--model-repository", str(repo),
                 "--cache-config", "local,size=1048576"], tmp_path) as inference,
        running("trainer", ports["trainer"][0],
                [*service_args("trainer"), "--streamer-target", streamer.target,
                 "--inference-target", inference.target, "--model-repository", str(repo),
                 "--demo-task", "", "--checkpoint-every-steps", "50"], tmp_path) as trainer,
        running("gateway", web_port,
                ["--trainer-target", trainer.target, "--streamer-target", streamer.target,
                 "--inference-target", inference.target, "--static-dir", str(static)],
                tmp_path, ready_path="/healthz"),
        # a replica the trainer does not publish to, and the lag probe watching both
        running("streamer", free_port(), ["--metrics-port", "-1"], tmp_path, suffix="-lonely") as lonely,
        running("probe", probe_port,
                ["--trainer-target", trainer.target, "--interval-s", "0.5",
                 "--streamer-target", f"{streamer.target},{lonely.target}"],
                tmp_path, ready_path="/metrics") as probe,
    ):
        # trainer: a run (publishes to the streamer, checkpoints, announces to inference)
        async with grpc.aio.insecure_channel(trainer.target) as channel:
            stub = tpb_grpc.TrainerServiceStub(channel)
            run = (await stub.StartRun(tpb.StartRunRequest(task="spiral"), timeout=30)).run
        # inference: requests
        async with InferenceClient(inference.target) as client:
            deadline = time.monotonic() + 60
            while not await client.model_ready("spiral"):
                assert time.monotonic() < deadline, inference.log_tail()
                await asyncio.sleep(0.1)
            x = np.zeros((3, 2), np.float32)
            for _ in range(5):
                await client.infer("spiral", {"points": x})
        # gateway: a gRPC-Web call, relayed over its pooled channels
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{web_port}", timeout=30) as http:
            reply = await http.post(
                "/tensorwire.trainer.v1.TrainerService/GetRun",
                content=grpc_web_frame(tpb.GetRunRequest(run_id=run.run_id).SerializeToString()),
                headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
            )
            assert reply.status_code == 200, reply.text
            pages = {"gateway": (await http.get("/metrics")).text}
            # the probe: the published replica's lag is small, the other one's infinite
            deadline = time.monotonic() + 60
            while True:
                page = (await http.get(f"http://127.0.0.1:{probe_port}/metrics")).text
                lags = {
                    s.labels["streamer"]: s.value
                    for f in text_string_to_metric_families(page) for s in f.samples
                    if s.name == "tensorwire_probe_subscriber_lag_seconds"
                    and s.labels["run_id"] == run.run_id
                }
                if lags.get(streamer.target, math.inf) < 5 and lags.get(lonely.target) == math.inf:
                    break
                assert time.monotonic() < deadline, f"probe lags {lags}\n{probe.log_tail()}"
                await asyncio.sleep(0.2)
            pages["probe"] = page
            async with httpx.AsyncClient(timeout=10) as scraper:
                for name, (_, metrics_port) in ports.items():
                    pages[name] = (await scraper.get(f"http://127.0.0.1:{metrics_port}/metrics")).text

    # the five identical requests: one miss, then answered from the response cache
    cache_counts = {
        s.name: s.value for f in text_string_to_metric_families(pages["inference"]) for s in f.samples
        if s.name.startswith("tensorwire_inference_cache_") and s.labels.get("model") == "spiral"
    }
    assert cache_counts["tensorwire_inference_cache_misses_total"] == 1, cache_counts
    assert cache_counts["tensorwire_inference_cache_hits_total"] == 4, cache_counts

    exported: dict[str, set[str]] = {}
    for text in pages.values():
        for name, labels in exposition(text).items():
            exported.setdefault(name, set()).update(labels)

    missing = []
    bad_labels = []
    for source, exprs in (("dashboard", dashboard_exprs()), ("alerts", alert_exprs())):
        for expr in exprs:
            for name in metric_names(expr) - PROMETHEUS_OWN:
                if name not in exported:
                    missing.append(f"{source}: {name}")
            for name, labels in selectors(expr):
                if name in PROMETHEUS_OWN or name not in exported:
                    continue
                unknown = labels - exported[name] - RELABELLED
                if unknown:
                    bad_labels.append(f"{source}: {name} has no label {sorted(unknown)}")
    assert not missing, (
        f"not exported by any running service: {sorted(set(missing))}\n"
        f"exported: {sorted(n for n in exported if n.startswith('tensorwire_'))}"
    )
    assert not bad_labels, sorted(set(bad_labels))


# -- promtool: syntax, and the alerts firing on synthetic series --------------------

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)"
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL or "promtool", *args], capture_output=True, text=True, timeout=120)


@needs_promtool
def test_promtool_accepts_the_scrape_config_and_the_rules(tmp_path: Path) -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yaml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/tensorwire-alerts.yaml"]
    config["rule_files"] = [str(MONITORING / "alerts.yaml")]  # where the ConfigMap mounts it
    # Debian's promtool is built without Kubernetes service discovery; check the rest
    # (relabelling, intervals, rules) with the discovery swapped for a static target.
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs")[0]["role"] == "pod"
        job["static_configs"] = [{"targets": ["127.0.0.1:9101"]}]
    (tmp_path / "prometheus.yaml").write_text(yaml.safe_dump(config))
    proc = _promtool("check", "config", "--syntax-only", str(tmp_path / "prometheus.yaml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _promtool("check", "rules", str(MONITORING / "alerts.yaml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_alerts_fire_on_the_conditions_they_name(tmp_path: Path) -> None:
    """promtool's rule unit tests: synthetic series in, the expected alerts out."""
    rules = {
        r["alert"]: r
        for g in yaml.safe_load((MONITORING / "alerts.yaml").read_text())["groups"] for r in g["rules"]
    }

    def expect(alert: str, at: str, value_text: str = "", **labels: str) -> dict[str, object]:
        rule = rules[alert]
        annotations = {}
        for key, template in rule["annotations"].items():
            text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], template)
            annotations[key] = re.sub(r"\{\{ \$value[^}]*\}\}", value_text, text)
        return {"eval_time": at, "alertname": alert, "exp_alerts": [
            {"exp_labels": {**rule["labels"], **labels}, "exp_annotations": annotations}]}

    ok_infer = 'tensorwire_rpc_handled_total{service="inference",method="ModelInfer",code="OK",pod="i-1"}'
    full = 'tensorwire_inference_rejected_total{model="spiral",version="3",pod="i-1"}'
    loads = 'tensorwire_inference_model_loads_total{outcome="%s",pod="i-1"}'
    bucket = 'tensorwire_rpc_latency_seconds_bucket{service="inference",method="ModelInfer",pod="i-1",le="%s"}'
    # 10 requests/s: all slower than 0.25 s, none slower than 0.5 s -> p99 ~ 0.5 s
    slow = [(bucket % le, "0+0x30" if float(le) <= 0.25 else "0+600x30") for le in
            ("0.1", "0.25", "0.5", "1", "+Inf")]
    tests = {
        "rule_files": [str(MONITORING / "alerts.yaml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'tensorwire_serving{service="streamer",pod="s-1"}', "values": "1 1 0x10"},
                    {"series": 'up{job="tensorwire",app="trainer",pod="t-1",instance="t-1:9101"}',
                     "values": "1 0x10"},
                    {"series": ok_infer, "values": "0+600x30"},
                    {"series": full, "values": "0+60x30"},
                    {"series": loads % "success", "values": "1+1x30"},
                    {"series": loads % "timeout", "values": "0x12 1x18"},
                    *({"series": s, "values": v} for s, v in slow),
                    {"series": 'tensorwire_rpc_handled_total{service="streamer",method="Subscribe",'
                               'code="RESOURCE_EXHAUSTED",pod="s-1"}', "values": "0+30x30"},
                    {"series": 'tensorwire_rpc_handled_total{service="streamer",method="Publish",'
                               'code="UNAVAILABLE",pod="s-1"}', "values": "0+30x30"},
                    {"series": 'tensorwire_rpc_handled_total{service="streamer",method="Publish",'
                               'code="CANCELLED",pod="s-2"}', "values": "0+300x30"},
                    {"series": 'tensorwire_probe_subscriber_lag_seconds{streamer="10.0.0.7:50052",'
                               'run_id="r1",pod="p-1"}', "values": "1 1 30x20"},
                    {"series": 'tensorwire_probe_subscriber_lag_seconds{streamer="10.0.0.8:50052",'
                               'run_id="r1",pod="p-1"}', "values": "1x20"},
                    {"series": 'tensorwire_inference_cache_up{cache="redis",pod="i-1"}',
                     "values": "1 1 0x20"},
                    {"series": 'tensorwire_inference_cache_up{cache="redis",pod="i-2"}', "values": "1x20"},
                ],
                "alert_rule_test": [
                    expect("TensorwireNotServing", "8m", service="streamer", pod="s-1"),
                    {"eval_time": "1m", "alertname": "TensorwireNotServing", "exp_alerts": []},
                    expect("TensorwireTargetDown", "5m", job="tensorwire", app="trainer", pod="t-1",
                           instance="t-1:9101"),
                    expect("TensorwireInferenceQueueFull", "20m", pod="i-1", model="spiral"),
                    {"eval_time": "10m", "alertname": "TensorwireModelLoadsFailing", "exp_alerts": []},
                    expect("TensorwireModelLoadsFailing", "15m", pod="i-1"),
                    # all requests between 0.25 s and 0.5 s: p99 = 0.25 + 0.99 * 0.25 s
                    expect("TensorwireInferenceLatencyP99High", "20m", value_text="497.5ms"),
                    expect("TensorwireStreamerRefusingViewers", "20m", pod="s-1"),
                    # a clean close (CANCELLED, pod s-2) of publish streams is no failure
                    expect("TensorwirePublishStreamsFailing", "20m", pod="s-1"),
                    {"eval_time": "20m", "alertname": "TensorwireRpcInternalErrors", "exp_alerts": []},
                    {"eval_time": "3m", "alertname": "TensorwireSubscriberLagHigh", "exp_alerts": []},
                    expect("TensorwireSubscriberLagHigh", "10m", value_text="30s",
                           streamer="10.0.0.7:50052", run_id="r1"),
                    {"eval_time": "4m", "alertname": "TensorwireResponseCacheDown", "exp_alerts": []},
                    expect("TensorwireResponseCacheDown", "10m", pod="i-1", cache="redis"),
                ],
            }
        ],
    }
    path = tmp_path / "alerts_test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    proc = _promtool("test", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
