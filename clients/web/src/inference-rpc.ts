// The inference service's calls (Open Inference Protocol over gRPC-Web), on the
// page's transport. Loaded with the inference panel, after the first chart: the
// service's descriptors are not part of the first download.
import { create } from "@bufbuild/protobuf";
import {
  GRPCInferenceService,
  type ModelMetadataResponse,
  ModelInferRequest_InferInputTensorSchema,
} from "./gen/tensorwire/inference/grpc_service_pb";
import { CONTROL_TIMEOUT_MS, clientFor } from "./rpc";

const inference = clientFor(GRPCInferenceService);

export interface ModelEntry {
  name: string;
  version: string;
  state: string;
}

export async function listModels(): Promise<ModelEntry[]> {
  const reply = await inference.repositoryIndex({ ready: false }, { timeoutMs: CONTROL_TIMEOUT_MS });
  return reply.models.map((m) => ({ name: m.name, version: m.version, state: m.state }));
}

export async function modelMetadata(name: string): Promise<ModelMetadataResponse> {
  return inference.modelMetadata({ name }, { timeoutMs: CONTROL_TIMEOUT_MS });
}

export interface InferResult {
  outputs: { name: string; shape: number[]; values: Float32Array }[];
  modelVersion: string;
  latencyMs: number;
}

/** One ModelInfer call with FP32 inputs as raw little-endian bytes. */
export async function infer(
  model: string,
  inputs: { name: string; shape: number[]; values: Float32Array }[],
): Promise<InferResult> {
  const started = performance.now();
  const reply = await inference.modelInfer(
    {
      modelName: model,
      inputs: inputs.map((t) =>
        create(ModelInferRequest_InferInputTensorSchema, {
          name: t.name,
          datatype: "FP32",
          shape: t.shape.map((d) => BigInt(d)),
        }),
      ),
      rawInputContents: inputs.map((t) => new Uint8Array(t.values.buffer, t.values.byteOffset, t.values.byteLength)),
    },
    { timeoutMs: CONTROL_TIMEOUT_MS },
  );
  const latencyMs = performance.now() - started;
  const outputs = reply.outputs.map((o, i) => {
    const raw = reply.rawOutputContents[i];
    let values: Float32Array;
    if (raw && raw.byteLength) {
      const copy = raw.slice(); // aligned copy
      values = new Float32Array(copy.buffer, 0, copy.byteLength / 4);
    } else {
      values = Float32Array.from(o.contents?.fp32Contents ?? []);
    }
    return { name: o.name, shape: o.shape.map(Number), values };
  });
  return { outputs, modelVersion: reply.modelVersion, latencyMs };
}
