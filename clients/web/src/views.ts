// Canvas renderers of the five live views and of the generic views any model can
// show (histograms, images, scatter, series: SDK scripts). Array names and shapes
// follow the contracts in services/trainer/views.py and tensorwire/views.py.
import type { Decoded } from "./decode";

export interface LiveView {
  kind: string;
  step: number;
  arrays: Map<string, Decoded>;
  meta: Record<string, number>;
  name?: string;
  labels?: string[];
}

const C0 = [66, 133, 244];
const C1 = [251, 140, 0];
const TRUTH = "#43a047";
const PRED = "#fb8c00";
const PAST = "#9aa5b1";
const BG = "#0b0f14";

type Ctx = CanvasRenderingContext2D;

export function drawView(canvas: HTMLCanvasElement, view: LiveView | null): string {
  const ctx = canvas.getContext("2d");
  if (!ctx) return "";
  const { width: w, height: h } = canvas;
  ctx.fillStyle = BG;
  ctx.fillRect(0, 0, w, h);
  if (!view) {
    ctx.fillStyle = "#6b7785";
    ctx.font = "14px system-ui, sans-serif";
    ctx.fillText("waiting for the first view…", 16, 28);
    return "";
  }
  switch (view.kind) {
    case "boundary":
      return boundary(ctx, w, h, view);
    case "paths":
      return paths(ctx, w, h, view);
    case "signal":
      return signal(ctx, w, h, view);
    case "fusion":
      return fusion(ctx, w, h, view);
    case "boxes":
      return boxes(ctx, w, h, view);
    case "histograms":
      return histograms(ctx, w, h, view);
    case "images":
      return images(ctx, w, h, view);
    case "scatter":
      return scatter(ctx, w, h, view);
    case "series":
      return series(ctx, w, h, view);
    default:
      ctx.fillStyle = "#6b7785";
      ctx.fillText(`no renderer for view "${view.kind}"`, 16, 28);
      return "";
  }
}

function fmt(meta: Record<string, number>, keys: string[]): string {
  return keys
    .filter((k) => meta[k] !== undefined)
    .map((k) => `${k} ${Math.abs(meta[k]) >= 100 ? meta[k].toFixed(0) : meta[k].toFixed(3)}`)
    .join(" · ");
}

// Off-screen canvas reused for heatmaps and images (drawn scaled, smoothed).
let scratch: HTMLCanvasElement | null = null;
function image(ctx: Ctx, pixels: Uint8ClampedArray, gw: number, gh: number, x: number, y: number, w: number, h: number, flipY: boolean): void {
  scratch ??= document.createElement("canvas");
  scratch.width = gw;
  scratch.height = gh;
  const sctx = scratch.getContext("2d")!;
  sctx.putImageData(new ImageData(pixels as Uint8ClampedArray<ArrayBuffer>, gw, gh), 0, 0);
  ctx.save();
  ctx.imageSmoothingEnabled = true;
  if (flipY) {
    ctx.translate(0, y * 2 + h);
    ctx.scale(1, -1);
  }
  ctx.drawImage(scratch, x, y, w, h);
  ctx.restore();
}

function boundary(ctx: Ctx, w: number, h: number, v: LiveView): string {
  const grid = v.arrays.get("grid");
  const pts = v.arrays.get("points");
  const labels = v.arrays.get("labels");
  const extent = v.meta.extent || 1;
  const side = Math.min(w, h);
  if (grid) {
    const [gh, gw] = grid.shape;
    const px = new Uint8ClampedArray(gw * gh * 4);
    for (let i = 0; i < gw * gh; i++) {
      const p = Math.min(1, Math.max(0, grid.values[i]));
      for (let c = 0; c < 3; c++) px[i * 4 + c] = 0.55 * (C0[c] * (1 - p) + C1[c] * p) + 20;
      px[i * 4 + 3] = 255;
    }
    image(ctx, px, gw, gh, 0, 0, side, side, true); // row 0 is the bottom row
  }
  if (pts && labels) {
    // One path per class: a thousand points cost two fills and two strokes.
    const n = pts.shape[0];
    ctx.lineWidth = 0.8;
    ctx.strokeStyle = "rgba(255,255,255,.7)";
    for (const [cls, c] of [[0, C0], [1, C1]] as [number, number[]][]) {
      ctx.beginPath();
      for (let i = 0; i < n; i++) {
        if ((labels.values[i] > 0.5 ? 1 : 0) !== cls) continue;
        const x = ((pts.values[i * 2] + extent) / (2 * extent)) * side;
        const y = side - ((pts.values[i * 2 + 1] + extent) / (2 * extent)) * side;
        ctx.moveTo(x + 2.6, y);
        ctx.arc(x, y, 2.6, 0, Math.PI * 2);
      }
      ctx.fillStyle = `rgb(${c[0]},${c[1]},${c[2]})`;
      ctx.fill();
      ctx.stroke();
    }
  }
  return fmt(v.meta, ["accuracy", "loss"]);
}

interface Bounds { x0: number; x1: number; y0: number; y1: number }

function bounds(arrays: (Decoded | undefined)[]): Bounds {
  const b = { x0: Infinity, x1: -Infinity, y0: Infinity, y1: -Infinity };
  for (const a of arrays) {
    if (!a) continue;
    for (let i = 0; i + 1 < a.values.length; i += 2) {
      const x = a.values[i], y = a.values[i + 1];
      if (!Number.isFinite(x) || !Number.isFinite(y)) continue;
      b.x0 = Math.min(b.x0, x); b.x1 = Math.max(b.x1, x);
      b.y0 = Math.min(b.y0, y); b.y1 = Math.max(b.y1, y);
    }
  }
  if (!Number.isFinite(b.x0)) return { x0: -1, x1: 1, y0: -1, y1: 1 };
  return b;
}

function projector(b: Bounds, w: number, h: number, pad = 16): (x: number, y: number) => [number, number] {
  const span = Math.max(b.x1 - b.x0, b.y1 - b.y0, 1e-6);
  const s = (Math.min(w, h) - 2 * pad) / span;
  const ox = pad + (w - 2 * pad - (b.x1 - b.x0) * s) / 2;
  const oy = pad + (h - 2 * pad - (b.y1 - b.y0) * s) / 2;
  return (x, y) => [ox + (x - b.x0) * s, h - (oy + (y - b.y0) * s)];
}

function polyline(ctx: Ctx, a: Decoded, from: number, count: number, P: (x: number, y: number) => [number, number], color: string, width: number, dash: number[] = [], prefix?: [number, number]): void {
  ctx.strokeStyle = color;
  ctx.lineWidth = width;
  ctx.setLineDash(dash);
  ctx.beginPath();
  let first = true;
  if (prefix) {
    ctx.moveTo(...P(prefix[0], prefix[1]));
    first = false;
  }
  for (let i = 0; i < count; i++) {
    const [x, y] = P(a.values[(from + i) * 2], a.values[(from + i) * 2 + 1]);
    if (first) ctx.moveTo(x, y);
    else ctx.lineTo(x, y);
    first = false;
  }
  ctx.stroke();
  ctx.setLineDash([]);
}

function paths(ctx: Ctx, w: number, h: number, v: LiveView): string {
  const past = v.arrays.get("past"), truth = v.arrays.get("truth"), pred = v.arrays.get("predicted");
  if (!past) return "";
  const P = projector(bounds([past, truth, pred]), w, h);
  const [K, Pn] = past.shape;
  for (let k = 0; k < K; k++) {
    polyline(ctx, past, k * Pn, Pn, P, PAST, 1.5);
    const last: [number, number] = [past.values[(k * Pn + Pn - 1) * 2], past.values[(k * Pn + Pn - 1) * 2 + 1]];
    if (truth) polyline(ctx, truth, k * truth.shape[1], truth.shape[1], P, TRUTH, 2, [4, 3], last);
    if (pred) polyline(ctx, pred, k * pred.shape[1], pred.shape[1], P, PRED, 2, [], last);
  }
  legend(ctx, [["past", PAST], ["truth", TRUTH], ["predicted", PRED]]);
  return fmt(v.meta, ["ade"]);
}

function legend(ctx: Ctx, items: [string, string][]): void {
  ctx.font = "12px system-ui, sans-serif";
  let x = 10;
  for (const [label, color] of items) {
    ctx.fillStyle = color;
    ctx.fillRect(x, 8, 10, 10);
    ctx.fillStyle = "#d8dee9";
    ctx.fillText(label, x + 14, 17);
    x += ctx.measureText(label).width + 30;
  }
}

function signal(ctx: Ctx, w: number, h: number, v: LiveView): string {
  const sig = v.arrays.get("signal"), rec = v.arrays.get("reconstruction");
  const err = v.arrays.get("error"), flagged = v.arrays.get("flagged"), truth = v.arrays.get("truth");
  if (!sig) return "";
  const [T, C] = sig.shape;
  const top = 26, errH = h * 0.22, laneH = (h - top - errH - 10) / Math.max(C, 1);
  const X = (t: number) => (t / Math.max(T - 1, 1)) * (w - 20) + 10;
  for (let t = 0; t < T; t++) {
    if (truth && truth.values[t] > 0.5) {
      ctx.fillStyle = "rgba(67,160,71,.18)";
      ctx.fillRect(X(t) - 1, top, Math.max(2, (w - 20) / T), h - top);
    }
    if (flagged && flagged.values[t] > 0.5) {
      ctx.fillStyle = "rgba(229,57,53,.55)";
      ctx.fillRect(X(t) - 1, h - errH - 8, Math.max(2, (w - 20) / T), 6);
    }
  }
  let lo = Infinity, hi = -Infinity;
  for (const x of sig.values) { if (x < lo) lo = x; if (x > hi) hi = x; }
  const span = hi - lo || 1;
  for (let c = 0; c < C; c++) {
    const y0 = top + c * laneH;
    const Y = (x: number) => y0 + laneH - ((x - lo) / span) * laneH * 0.9;
    for (const [arr, color, width] of [[sig, "#8fbcdb", 1.2], [rec, PRED, 1]] as [Decoded | undefined, string, number][]) {
      if (!arr) continue;
      ctx.strokeStyle = color;
      ctx.lineWidth = width;
      ctx.beginPath();
      for (let t = 0; t < T; t++) {
        const y = Y(arr.values[t * C + c]);
        if (t === 0) ctx.moveTo(X(t), y);
        else ctx.lineTo(X(t), y);
      }
      ctx.stroke();
    }
  }
  if (err) {
    let emax = v.meta.threshold ?? 0;
    for (const e of err.values) emax = Math.max(emax, e);
    emax = emax || 1;
    const Y = (e: number) => h - 4 - (e / emax) * (errH - 12);
    ctx.strokeStyle = "#e57373";
    ctx.lineWidth = 1.2;
    ctx.beginPath();
    for (let t = 0; t < T; t++) (t ? ctx.lineTo : ctx.moveTo).call(ctx, X(t), Y(err.values[t]));
    ctx.stroke();
    if (v.meta.threshold !== undefined) {
      ctx.setLineDash([5, 4]);
      ctx.strokeStyle = "#ffd54f";
      ctx.beginPath();
      ctx.moveTo(10, Y(v.meta.threshold));
      ctx.lineTo(w - 10, Y(v.meta.threshold));
      ctx.stroke();
      ctx.setLineDash([]);
    }
  }
  legend(ctx, [["signal", "#8fbcdb"], ["reconstruction", PRED], ["error", "#e57373"], ["injected", TRUTH]]);
  return fmt(v.meta, ["precision", "recall", "threshold"]);
}

function fusion(ctx: Ctx, w: number, h: number, v: LiveView): string {
  const gps = v.arrays.get("gps"), fused = v.arrays.get("fused"), truth = v.arrays.get("truth");
  const P = projector(bounds([gps, fused, truth]), w, h);
  if (gps) {
    ctx.fillStyle = "rgba(154,165,177,.75)";
    for (let i = 0; i < gps.shape[0]; i++) {
      const [x, y] = P(gps.values[i * 2], gps.values[i * 2 + 1]);
      ctx.fillRect(x - 1.5, y - 1.5, 3, 3);
    }
  }
  if (truth) polyline(ctx, truth, 0, truth.shape[0], P, TRUTH, 2, [5, 3]);
  if (fused) polyline(ctx, fused, 0, fused.shape[0], P, PRED, 2);
  legend(ctx, [["GPS fixes", PAST], ["truth", TRUTH], ["fused", PRED]]);
  return fmt(v.meta, ["gps_error", "fused_error"]);
}

const SHAPES = ["square", "circle", "triangle"];

function boxes(ctx: Ctx, w: number, h: number, v: LiveView): string {
  const images = v.arrays.get("images");
  if (!images) return "";
  const [I, S] = images.shape;
  const cols = Math.ceil(Math.sqrt(I)), rows = Math.ceil(I / cols);
  const cell = Math.min(w / cols, h / rows);
  const tile = cell - 6;
  const origin = (i: number): [number, number] => [(i % cols) * cell + 3, Math.floor(i / cols) * cell + 3];
  for (let i = 0; i < I; i++) {
    const px = new Uint8ClampedArray(S * S * 4);
    for (let j = 0; j < S * S; j++) {
      const g = Math.max(0, Math.min(255, images.values[i * S * S + j] * 255));
      px[j * 4] = px[j * 4 + 1] = px[j * 4 + 2] = g;
      px[j * 4 + 3] = 255;
    }
    const [x, y] = origin(i);
    image(ctx, px, S, S, x, y, tile, tile, false);
  }
  const drawBoxes = (arr: Decoded | undefined, stride: number, color: string, dash: number[]) => {
    if (!arr) return;
    ctx.font = "11px system-ui, sans-serif";
    for (let n = 0; n < arr.shape[0]; n++) {
      const r = arr.values.subarray(n * stride, n * stride + stride);
      const [ox, oy] = origin(Math.round(r[0]));
      const bx = ox + (r[2] - r[4] / 2) * tile, by = oy + (r[3] - r[5] / 2) * tile;
      ctx.save();
      ctx.beginPath();
      ctx.rect(ox, oy, tile, tile); // a box never spills onto the next image
      ctx.clip();
      ctx.strokeStyle = color;
      ctx.lineWidth = 2;
      ctx.setLineDash(dash);
      ctx.strokeRect(bx, by, r[4] * tile, r[5] * tile);
      ctx.setLineDash([]);
      if (stride === 7) {
        ctx.fillStyle = color;
        ctx.fillText(`${SHAPES[Math.round(r[1])] ?? r[1]} ${r[6].toFixed(2)}`, Math.max(ox + 2, bx), Math.max(oy + 10, by - 3));
      }
      ctx.restore();
    }
  };
  drawBoxes(v.arrays.get("true_boxes"), 6, TRUTH, [4, 3]);
  drawBoxes(v.arrays.get("pred_boxes"), 7, PRED, []);
  return fmt(v.meta, ["threshold"]);
}

// -- generic views (tensorwire/views.py) ------------------------------------------

function label(ctx: Ctx, text: string, x: number, y: number): void {
  ctx.fillStyle = "#c9d1d9";
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillText(text, x, y);
}

/** One row per layer: weight histogram left, gradient histogram right (bar heights). */
function histograms(ctx: Ctx, w: number, h: number, v: LiveView): string {
  const names = v.labels ?? [];
  const rows = Math.max(1, names.length);
  const rowH = h / rows;
  const half = w / 2;
  const pairs: [string, string, string][] = [["weights", "weight_ranges", "#42a5f5"], ["grads", "grad_ranges", "#fb8c00"]];
  pairs.forEach(([key, rangeKey, color], side) => {
    const hist = v.arrays.get(key);
    const ranges = v.arrays.get(rangeKey);
    if (!hist) return;
    const bins = hist.shape[1] || 1;
    const barW = (half - 12) / bins;
    for (let r = 0; r < rows; r++) {
      let peak = 0;
      for (let b = 0; b < bins; b++) peak = Math.max(peak, hist.values[r * bins + b]);
      ctx.fillStyle = color;
      for (let b = 0; b < bins; b++) {
        const frac = peak > 0 ? hist.values[r * bins + b] / peak : 0;
        const bh = frac * (rowH - 16);
        ctx.fillRect(side * half + 6 + b * barW, (r + 1) * rowH - 4 - bh, Math.max(1, barW - 1), bh);
      }
      const lo = ranges ? ranges.values[r * 2] : 0;
      const hi = ranges ? ranges.values[r * 2 + 1] : 0;
      label(ctx, `${side ? "grad" : names[r] ?? ""} [${lo.toPrecision(2)}, ${hi.toPrecision(2)}]`, side * half + 6, r * rowH + 11);
    }
  });
  return `${rows} layers · weights (blue) · gradients (orange)`;
}

/** A grid of grey or RGB images (uint8 [N, H, W, C]); labels under each when given. */
function images(ctx: Ctx, w: number, h: number, v: LiveView): string {
  const arr = v.arrays.get("images");
  if (!arr) return "";
  const [n, ih, iw, c] = arr.shape;
  const cols = v.meta.columns || Math.ceil(Math.sqrt(n));
  const rows = Math.ceil(n / cols);
  const cell = Math.min(w / cols, h / rows);
  for (let k = 0; k < n; k++) {
    const px = new Uint8ClampedArray(iw * ih * 4);
    for (let i = 0; i < iw * ih; i++) {
      for (let ch = 0; ch < 3; ch++) px[i * 4 + ch] = arr.values[(k * iw * ih + i) * c + (c === 3 ? ch : 0)];
      px[i * 4 + 3] = 255;
    }
    const x = (k % cols) * cell;
    const y = Math.floor(k / cols) * cell;
    image(ctx, px, iw, ih, x + 1, y + 1, cell - 2, cell - 2, false);
    const text = v.labels?.[k];
    if (text) label(ctx, text, x + 3, y + cell - 4);
  }
  return `${n} images`;
}

/** Points [N, 2] in their own bounding box, coloured by label when given. */
function scatter(ctx: Ctx, w: number, h: number, v: LiveView): string {
  const pts = v.arrays.get("points");
  if (!pts) return "";
  const labels = v.arrays.get("labels");
  const n = pts.shape[0];
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
  for (let i = 0; i < n; i++) {
    x0 = Math.min(x0, pts.values[2 * i]); x1 = Math.max(x1, pts.values[2 * i]);
    y0 = Math.min(y0, pts.values[2 * i + 1]); y1 = Math.max(y1, pts.values[2 * i + 1]);
  }
  const sx = (w - 20) / (x1 - x0 || 1), sy = (h - 20) / (y1 - y0 || 1);
  for (let i = 0; i < n; i++) {
    const k = labels ? labels.values[i] : 0;
    ctx.fillStyle = `hsl(${(k * 47) % 360}, 70%, 60%)`;
    ctx.fillRect(10 + (pts.values[2 * i] - x0) * sx - 1.5, h - 10 - (pts.values[2 * i + 1] - y0) * sy - 1.5, 3, 3);
  }
  return `${n} points`;
}

/** S lines of T points (x = index), each scaled to the common min..max. */
function series(ctx: Ctx, w: number, h: number, v: LiveView): string {
  const arr = v.arrays.get("values");
  if (!arr) return "";
  const [s, t] = arr.shape.length === 2 ? arr.shape : [1, arr.shape[0]];
  let lo = Infinity, hi = -Infinity;
  for (const x of arr.values) if (Number.isFinite(x)) { lo = Math.min(lo, x); hi = Math.max(hi, x); }
  const sy = (h - 30) / (hi - lo || 1);
  for (let r = 0; r < s; r++) {
    ctx.strokeStyle = COLORS_SERIES[r % COLORS_SERIES.length];
    ctx.beginPath();
    let pen = false;
    for (let i = 0; i < t; i++) {
      const y = arr.values[r * t + i];
      if (!Number.isFinite(y)) { pen = false; continue; }  // a gap
      const px = 10 + (i * (w - 20)) / Math.max(1, t - 1), py = h - 10 - (y - lo) * sy;
      if (pen) ctx.lineTo(px, py); else ctx.moveTo(px, py);
      pen = true;
    }
    ctx.stroke();
    if (v.labels?.[r]) label(ctx, v.labels[r], 10, 14 + r * 13);
  }
  return `${s} × ${t} · [${lo.toPrecision(3)}, ${hi.toPrecision(3)}]`;
}

const COLORS_SERIES = ["#42a5f5", "#fb8c00", "#66bb6a", "#ab47bc", "#ef5350", "#26c6da"];
