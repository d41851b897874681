// The inference panel: pick a served model, draw on the pad, see the model's
// answer and the round-trip latency (ModelInfer over gRPC-Web through the gateway).
// A model whose first input is [P, 2] (trajectory) gets the drawn path resampled
// to P points and its predicted positions are drawn after it; a [2] input
// (spiral) gets the last point; any other model gets zeros of its input shapes.
import * as rpc from "./rpc";
import { infer, listModels, modelMetadata } from "./inference-rpc";

const PAD = 260;
// Pad coordinates -> model coordinates: the trajectory model was trained on
// steps of 0.02-0.1 units, so the pad spans a 1 x 1 square; spiral points span
// about [-1.2, 1.2].
const TRAJECTORY_SPAN = 1;
const POINT_SPAN = 2.4;

interface Tensor { name: string; shape: number[]; values: Float32Array }

export class InferencePanel {
  private readonly select = document.createElement("select");
  private listSeq = 0;
  private readonly pad = document.createElement("canvas");
  private readonly result = document.createElement("pre");
  private readonly latency = document.createElement("div");
  private readonly hint = document.createElement("p");
  private path: [number, number][] = [];
  private drawing = false;
  private predicted: [number, number][] = [];
  private inputs: { name: string; shape: number[] }[] = [];

  constructor(root: HTMLElement) {
    const title = document.createElement("h2");
    title.textContent = "Try a served model";
    const refresh = document.createElement("button");
    refresh.textContent = "↻";
    refresh.title = "reload the model list";
    refresh.onclick = () => void this.loadModels();
    const row = document.createElement("div");
    row.className = "row";
    row.append(this.select, refresh);
    const hint = this.hint;
    hint.className = "hint";
    hint.id = "infer-hint";
    hint.textContent = "Draw a path on the pad: the model predicts where it goes next.";
    this.pad.width = this.pad.height = PAD;
    this.pad.id = "pad";
    this.select.id = "model";
    this.result.id = "infer-result";
    this.latency.id = "infer-latency";
    this.latency.className = "latency";
    root.append(title, row, hint, this.pad, this.latency, this.result);
    this.select.onchange = () => void this.loadMetadata();
    this.pad.onpointerdown = (e) => {
      this.drawing = true;
      this.pad.setPointerCapture(e.pointerId);
      this.path = [this.point(e)];
      this.predicted = [];
      this.draw();
    };
    this.pad.onpointermove = (e) => {
      if (!this.drawing) return;
      this.path.push(this.point(e));
      this.draw();
    };
    this.pad.onpointerup = () => {
      this.drawing = false;
      void this.run();
    };
    this.draw();
    void this.loadModels();
  }

  private point(e: PointerEvent): [number, number] {
    const r = this.pad.getBoundingClientRect();
    return [((e.clientX - r.left) / r.width) * PAD, ((e.clientY - r.top) / r.height) * PAD];
  }

  async loadModels(): Promise<void> {
    // Only the newest list counts: an older answer that arrives late (a slow call
    // from before the run's model existed) must not wipe the model chosen since.
    const seq = ++this.listSeq;
    try {
      const models = await listModels();
      if (seq !== this.listSeq) return;
      const names = [...new Set(models.map((m) => m.name))].sort((a, b) =>
        a === "trajectory" ? -1 : b === "trajectory" ? 1 : a.localeCompare(b));
      const keep = this.select.value;
      this.select.innerHTML = "";
      for (const name of names) this.select.append(new Option(name, name));
      if (!names.length) this.select.append(new Option("no models served yet", ""));
      if (names.includes(keep)) this.select.value = keep;
      await this.loadMetadata();
    } catch (err) {
      if (seq !== this.listSeq) return;
      this.result.textContent = `cannot list models: ${rpc.describeError(err)}`;
    }
  }

  private async loadMetadata(): Promise<void> {
    this.inputs = [];
    if (!this.select.value) return;
    try {
      const meta = await modelMetadata(this.select.value);
      this.inputs = meta.inputs.map((t) => ({ name: t.name, shape: t.shape.map(Number) }));
      const dims = this.inputs[0]?.shape.filter((d, i) => !(i === 0 && d === -1)) ?? [];
      this.hint.textContent = dims.length === 2 && dims[1] === 2
        ? "Draw a path on the pad: the model predicts where it goes next."
        : dims.length === 1 && dims[0] === 2
          ? "Click or draw on the pad: the model classifies the last point."
          : "Draw on the pad to send this model zeros of its input shapes.";
      this.result.textContent = `inputs: ${meta.inputs.map((t) => `${t.name} ${t.datatype} [${t.shape.join(", ")}]`).join("; ")}`;
    } catch (err) {
      this.result.textContent = rpc.describeError(err);
    }
  }

  /** Model coordinates of a pad point. */
  private toModel([x, y]: [number, number], span: number): [number, number] {
    return [(x / PAD - 0.5) * span, (0.5 - y / PAD) * span];
  }

  private toPad([x, y]: [number, number], span: number): [number, number] {
    return [(x / span + 0.5) * PAD, (0.5 - y / span) * PAD];
  }

  private tensors(): { tensors: Tensor[]; span: number; trajectory: boolean } {
    const dims = (shape: number[]) => shape.filter((_, i) => !(i === 0 && shape[0] === -1));
    let span = TRAJECTORY_SPAN, trajectory = false;
    const tensors = this.inputs.map((input) => {
      const d = dims(input.shape).map((v) => (v < 0 ? 1 : v));
      const size = d.reduce((a, b) => a * b, 1);
      const values = new Float32Array(size);
      if (d.length === 2 && d[1] === 2 && this.path.length) {
        trajectory = true;
        resample(this.path, d[0]).forEach((p, i) => values.set(this.toModel(p, TRAJECTORY_SPAN), i * 2));
      } else if (d.length === 1 && d[0] === 2 && this.path.length) {
        span = POINT_SPAN;
        values.set(this.toModel(this.path[this.path.length - 1], POINT_SPAN));
      }
      return { name: input.name, shape: [1, ...d], values };
    });
    return { tensors, span, trajectory };
  }

  private async run(): Promise<void> {
    const model = this.select.value;
    if (!model || !this.inputs.length || !this.path.length) return;
    const { tensors, trajectory } = this.tensors();
    try {
      const reply = await infer(model, tensors);
      this.latency.textContent = `${reply.latencyMs.toFixed(1)} ms round trip · ${model} v${reply.modelVersion || "?"}`;
      const lines = reply.outputs.map((o) => `${o.name} [${o.shape.join(", ")}]: ${preview(o.values)}`);
      if (trajectory && reply.outputs[0]) {
        const v = reply.outputs[0].values;
        this.predicted = [];
        for (let i = 0; i + 1 < v.length; i += 2) this.predicted.push(this.toPad([v[i], v[i + 1]], TRAJECTORY_SPAN));
      }
      if (!trajectory && reply.outputs[0]?.values.length === 2) {
        const [a, b] = reply.outputs[0].values;
        const p1 = 1 / (1 + Math.exp(a - b));
        lines.push(`P(class 1) = ${p1.toFixed(3)}`);
      }
      this.result.textContent = lines.join("\n");
    } catch (err) {
      this.latency.textContent = "";
      this.result.textContent = rpc.describeError(err);
    }
    this.draw();
  }

  private draw(): void {
    const ctx = this.pad.getContext("2d");
    if (!ctx) return;
    ctx.fillStyle = "#0b0f14";
    ctx.fillRect(0, 0, PAD, PAD);
    ctx.strokeStyle = "#222a33";
    for (let i = 1; i < 4; i++) {
      ctx.beginPath();
      ctx.moveTo((i * PAD) / 4, 0); ctx.lineTo((i * PAD) / 4, PAD);
      ctx.moveTo(0, (i * PAD) / 4); ctx.lineTo(PAD, (i * PAD) / 4);
      ctx.stroke();
    }
    const line = (pts: [number, number][], color: string, dots: boolean) => {
      if (!pts.length) return;
      ctx.strokeStyle = ctx.fillStyle = color;
      ctx.lineWidth = 2;
      ctx.beginPath();
      pts.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      ctx.stroke();
      if (dots) for (const [x, y] of pts) ctx.fillRect(x - 3, y - 3, 6, 6);
    };
    line(this.path, "#9aa5b1", false);
    if (this.predicted.length && this.path.length) line([this.path[this.path.length - 1], ...this.predicted], "#fb8c00", true);
  }
}

/** `n` points evenly spaced along a polyline (by arc length). */
function resample(path: [number, number][], n: number): [number, number][] {
  if (path.length === 1) return Array.from({ length: n }, () => path[0]);
  const cum = [0];
  for (let i = 1; i < path.length; i++) cum.push(cum[i - 1] + Math.hypot(path[i][0] - path[i - 1][0], path[i][1] - path[i - 1][1]));
  const total = cum[cum.length - 1] || 1;
  const out: [number, number][] = [];
  let j = 0;
  for (let k = 0; k < n; k++) {
    const d = (k / Math.max(n - 1, 1)) * total;
    while (j < cum.length - 2 && cum[j + 1] < d) j++;
    const t = (d - cum[j]) / (cum[j + 1] - cum[j] || 1);
    out.push([path[j][0] + t * (path[j + 1][0] - path[j][0]), path[j][1] + t * (path[j + 1][1] - path[j][1])]);
  }
  return out;
}

function preview(v: Float32Array): string {
  const head = Array.from(v.subarray(0, 8), (x) => x.toFixed(3)).join(", ");
  return v.length > 8 ? `${head}, … (${v.length} values)` : head;
}
