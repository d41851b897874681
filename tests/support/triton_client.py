"""Drive a tensorwire inference server with the real tritonclient, in its own process.

tritonclient's generated protobuf modules define the same ``inference.*``
symbols as tensorwire's, so they cannot live in one Python process: tests run
this script with subprocess.

    python -m tests.support.triton_client rpcs URL MODEL SPARE OUT   # every RPC
    python -m tests.support.triton_client descriptors OUT            # tritonclient's proto
    python -m tests.support.triton_client load URL SECONDS OUT       # closed-loop load
    python -m tests.support.triton_client models GRPC HTTP OUT MODEL...  # both clients

``rpcs`` writes OUT.json (what each RPC answered) and OUT.npz (inputs sent and
outputs received by ModelInfer, async infer and ModelStreamInfer); SPARE is a
model it unloads and loads again.
"""

from __future__ import annotations

import json
import queue
import sys
import threading

import numpy as np


def _status(exc: Exception) -> dict[str, str]:
    return {"status": str(exc.status()), "message": exc.message()}  # type: ignore[attr-defined]


def rpcs(url: str, model: str, spare: str, out: str) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url)
    report: dict[str, object] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "server_metadata": client.get_server_metadata(as_json=True),
        "model_metadata": client.get_model_metadata(model, as_json=True),
        "model_config": client.get_model_config(model, as_json=True),
        "model_ready": client.is_model_ready(model),
        "unknown_model_ready": client.is_model_ready("no-such-model"),
        "index": client.get_model_repository_index(as_json=True),
    }
    meta = report["model_metadata"]
    arrays: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(7)

    def inputs_for(batch: int, tag: str) -> list:
        tensors = []
        for spec in meta["inputs"]:  # type: ignore[index]
            shape = [batch, *[int(d) for d in spec["shape"][1:]]]
            data = rng.standard_normal(shape).astype(np.float32)
            arrays[f"{tag}/in/{spec['name']}"] = data
            tensor = grpcclient.InferInput(spec["name"], shape, spec["datatype"])
            tensor.set_data_from_numpy(data)
            tensors.append(tensor)
        return tensors

    out_names = [o["name"] for o in meta["outputs"]]  # type: ignore[index]
    result = client.infer(model, inputs_for(3, "infer"), request_id="req-1")
    for name in out_names:
        arrays[f"infer/out/{name}"] = result.as_numpy(name)
    report["infer_response"] = result.get_response(as_json=True)

    # Requested-output selection: only the last output.
    selected = client.infer(model, inputs_for(2, "select"),
                            outputs=[grpcclient.InferRequestedOutput(out_names[-1])])
    report["selected_outputs"] = [o["name"] for o in selected.get_response(as_json=True)["outputs"]]
    arrays[f"select/out/{out_names[-1]}"] = selected.as_numpy(out_names[-1])

    # async_infer (callback).
    done: queue.Queue = queue.Queue()
    client.async_infer(model, inputs_for(1, "async"), lambda result, error: done.put((result, error)))
    res, err = done.get(timeout=30)
    assert err is None, err
    for name in out_names:
        arrays[f"async/out/{name}"] = res.as_numpy(name)

    # ModelStreamInfer: several requests over one bidi stream.
    streamed: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: streamed.put((result, error)))
    for i in range(4):
        client.async_stream_infer(model, inputs_for(i + 1, f"stream{i}"), request_id=f"s{i}")
    client.async_stream_infer("no-such-model", inputs_for(1, "stream-bad"), request_id="bad")
    stream_errors = []
    for _ in range(5):
        res, err = streamed.get(timeout=30)
        if err is not None:
            stream_errors.append(str(err))
            continue
        rid = res.get_response().id
        for name in out_names:
            arrays[f"stream{rid[1:]}/out/{name}"] = res.as_numpy(name)
    client.stop_stream()
    report["stream_errors"] = stream_errors

    report["statistics"] = client.get_inference_statistics(model, as_json=True)
    report["all_statistics"] = client.get_inference_statistics(as_json=True)

    try:
        client.infer("no-such-model", inputs_for(1, "bad"))
    except InferenceServerException as exc:
        report["unknown_model_error"] = _status(exc)

    client.unload_model(spare)
    report["spare_ready_after_unload"] = client.is_model_ready(spare)
    report["index_after_unload"] = client.get_model_repository_index(as_json=True)
    client.load_model(spare)
    report["spare_ready_after_load"] = client.is_model_ready(spare)
    client.load_model(model, config=json.dumps({"max_queue_delay_us": 100}))
    report["config_after_load"] = client.get_model_config(model, as_json=True)
    client.close()

    with open(out + ".json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    np.savez(out + ".npz", **arrays)


def message_fields(*modules) -> dict[str, dict[str, list]]:  # type: ignore[no-untyped-def]
    """{message: {field: [number, type, repeated, type name, oneof]}} of every message
    (nested ones too) of generated ``_pb2`` modules: ours in the test, tritonclient's
    here (in its own process: both define the ``inference`` package)."""
    result: dict[str, dict[str, list]] = {}

    def walk(desc) -> None:  # type: ignore[no-untyped-def]
        fields = {}
        for f in desc.fields:
            sub = f.message_type.full_name if f.message_type else (f.enum_type.full_name if f.enum_type else "")
            oneof = f.containing_oneof.name if f.containing_oneof else ""
            fields[f.name] = [f.number, f.type, bool(f.is_repeated), sub, oneof]
        result[desc.full_name] = fields
        for nested in desc.nested_types:
            walk(nested)

    for module in modules:
        for desc in module.DESCRIPTOR.message_types_by_name.values():
            walk(desc)
    return result


def descriptors(out: str) -> None:
    """tritonclient's message descriptors (``message_fields``), DataType enum and methods."""
    from tritonclient.grpc import model_config_pb2, service_pb2

    result = message_fields(service_pb2, model_config_pb2)
    enums = {
        e.full_name: {v.name: v.number for v in e.values}
        for e in model_config_pb2.DESCRIPTOR.enum_types_by_name.values()
    }
    methods = {
        m.name: [m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming]
        for m in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
    }
    with open(out, "w") as fh:
        json.dump({"messages": result, "enums": enums, "methods": methods}, fh)


def load(url: str, seconds: float, out: str) -> None:
    """Closed-loop ModelInfer calls from 4 threads until told to stop; counts by model version.

    Runs until ``seconds`` pass or a line arrives on stdin; writes OUT.json with
    the count of successes per version and every error."""
    import tritonclient.grpc as grpcclient

    stop = threading.Event()
    versions: dict[str, int] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        client = grpcclient.InferenceServerClient(url)
        data = np.zeros((1, 2), dtype=np.float32)
        tensor = grpcclient.InferInput("points", [1, 2], "FP32")
        tensor.set_data_from_numpy(data)
        while not stop.is_set():
            try:
                res = client.infer("spiral", [tensor])
                version = res.get_response().model_version
                with lock:
                    versions[version] = versions.get(version, 0) + 1
            except Exception as exc:  # every failure is reported, none hidden
                with lock:
                    errors.append(str(exc))
        client.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    print("STARTED", flush=True)
    reader = threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True)
    reader.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join()
    with open(out + ".json", "w") as f:
        json.dump({"versions": versions, "errors": errors}, f)


def models(grpc_url: str, http_url: str, out: str, *names: str) -> None:
    """Each model through tritonclient.grpc, tritonclient.http (binary tensors) and
    tritonclient.http (JSON tensors), on the same random batch of 3; OUT.npz holds
    ``model/in`` and ``model/{grpc,http_binary,http_json}``, OUT.json the metadata and
    config both clients read, and the errors of requests meant to fail."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    g = grpcclient.InferenceServerClient(grpc_url)
    h = httpclient.InferenceServerClient(http_url)
    rng = np.random.default_rng(11)
    arrays: dict[str, np.ndarray] = {}
    report: dict[str, object] = {
        "http_live": h.is_server_live(), "http_ready": h.is_server_ready(),
        "http_server_metadata": h.get_server_metadata(),
        "http_index": h.get_model_repository_index(),
    }
    for name in names:
        meta = h.get_model_metadata(name)
        report[f"{name}/http_metadata"] = meta
        report[f"{name}/grpc_metadata"] = g.get_model_metadata(name, as_json=True)
        report[f"{name}/http_config"] = h.get_model_config(name)
        report[f"{name}/grpc_config"] = g.get_model_config(name, as_json=True)
        report[f"{name}/http_ready"] = h.is_model_ready(name)
        spec, out_name = meta["inputs"][0], meta["outputs"][0]["name"]
        shape = [3, *[int(d) for d in spec["shape"][1:]]]
        data = rng.standard_normal(shape).astype(np.float32)
        arrays[f"{name}/in"] = data

        gin = grpcclient.InferInput(spec["name"], shape, spec["datatype"])
        gin.set_data_from_numpy(data)
        arrays[f"{name}/grpc"] = g.infer(name, [gin]).as_numpy(out_name)
        hin = httpclient.InferInput(spec["name"], shape, spec["datatype"])
        hin.set_data_from_numpy(data, binary_data=True)
        arrays[f"{name}/http_binary"] = h.infer(name, [hin]).as_numpy(out_name)
        hin = httpclient.InferInput(spec["name"], shape, spec["datatype"])
        hin.set_data_from_numpy(data, binary_data=False)
        result = h.infer(name, [hin], outputs=[httpclient.InferRequestedOutput(out_name, binary_data=False)],
                         request_id="json-1")
        arrays[f"{name}/http_json"] = result.as_numpy(out_name)
        report[f"{name}/http_json_response"] = result.get_response()
        report[f"{name}/http_stats"] = h.get_inference_statistics(name)
        bad = httpclient.InferInput(spec["name"], [3, shape[1] + 1], spec["datatype"])
        bad.set_data_from_numpy(np.zeros((3, shape[1] + 1), np.float32))
        try:
            h.infer(name, [bad])
            report[f"{name}/bad_shape_error"] = None
        except InferenceServerException as exc:
            report[f"{name}/bad_shape_error"] = {"status": exc.status(), "message": exc.message()}
    try:
        h.get_model_metadata("no-such-model")
    except InferenceServerException as exc:
        report["unknown_model_error"] = {"status": exc.status(), "message": exc.message()}
    h.unload_model(names[0])
    report["ready_after_unload"] = h.is_model_ready(names[0])
    h.load_model(names[0])
    report["ready_after_load"] = h.is_model_ready(names[0])
    g.close()
    h.close()
    np.savez(out + ".npz", **arrays)
    with open(out + ".json", "w") as f:
        json.dump(report, f, default=str)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "rpcs":
        rpcs(*args)
    elif command == "descriptors":
        descriptors(*args)
    elif command == "load":
        load(args[0], float(args[1]), args[2])
    elif command == "models":
        models(*args)
    else:
        raise SystemExit(f"unknown command {command!r}")
    sys.exit(0)
