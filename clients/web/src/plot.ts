// Line charts on a canvas: what the live charts and the run comparison draw. The
// page's own (about 4 KiB minified) instead of a charting library (uPlot: 52 KiB
// minified, a third of the first screen on a slow link): lines with gaps, raw
// min/max bands, linear or logarithmic y, a cursor (the caller's readout, or a
// legend with every line's value), drag to zoom on steps, double-click to reset.

/** One curve; ``x`` ascending (steps), ``y`` null where there is no value. */
export interface Line {
  label: string;
  color: string;
  width: number;
  x: readonly number[];
  y: readonly (number | null)[];
  /** Drawn across nulls instead of breaking there. */
  spanGaps?: boolean;
  /** A band from ``lo`` to ``hi`` (same ``x``), drawn under every line. */
  band?: { lo: readonly (number | null)[]; hi: readonly (number | null)[]; fill: string };
}

export interface PlotOptions {
  title: string;
  /** The y axis' title (the x axis is "step"). */
  yLabel: string;
  height: number;
  /** Logarithmic y (values <= 0 must come as null). */
  log: boolean;
  /** A table under the chart with each line's value at the cursor. */
  legend?: boolean;
  /** The step under the cursor (null: the cursor left), on every move. */
  onCursor?: (x: number | null) => void;
}

const PAD = { left: 58, right: 12, top: 6, bottom: 34 };
const AXIS = "#8b949e";
const GRID = "#222a33";
const FONT = "11px system-ui, sans-serif";

/** The index of the point of ``xs`` (ascending) nearest to ``x``; -1 when empty. */
export function nearest(xs: readonly number[], x: number): number {
  let lo = 0, hi = xs.length - 1;
  if (hi < 0) return -1;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (xs[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo > 0 && x - xs[lo - 1] <= xs[lo] - x ? lo - 1 : lo;
}

/** A value as the readouts write it: 4 significant digits, tiny ones in exponent form. */
export function formatValue(v: number | null | undefined): string {
  return v == null ? "–" : Math.abs(v) >= 0.01 || v === 0 ? v.toPrecision(4) : v.toExponential(3);
}

function niceStep(range: number, count: number): number {
  const raw = range / Math.max(1, count);
  const p = 10 ** Math.floor(Math.log10(raw));
  const m = raw / p;
  return (m < 1.5 ? 1 : m < 3.5 ? 2 : m < 7.5 ? 5 : 10) * p;
}

function tickLabel(v: number, step: number): string {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e6 || a < 1e-4) return v.toExponential(1).replace("e+", "e");
  return v.toFixed(Math.max(0, Math.min(6, -Math.floor(Math.log10(step) + 1e-9))));
}

export class Plot {
  private readonly canvas = document.createElement("canvas");
  private readonly over = document.createElement("div");
  private readonly cursor = document.createElement("div");
  private readonly selection = document.createElement("div");
  private readonly legend: HTMLTableElement | null = null;
  private lines: Line[] = [];
  private width: number;
  /** The x range shown: the data's unless zoomed in (drag). */
  private zoom: [number, number] | null = null;
  private domain: [number, number] = [0, 1];
  private dragFrom: number | null = null;
  /** The step under the cursor, or null. */
  cursorX: number | null = null;
  private readonly stopDrag = (e: MouseEvent) => this.endDrag(e);

  constructor(private readonly box: HTMLElement, width: number, private readonly options: PlotOptions) {
    this.width = width;
    const title = document.createElement("div");
    title.className = "plot-title";
    title.textContent = options.title;
    const stage = document.createElement("div");
    stage.className = "plot-stage";
    this.over.className = "plot-over";
    this.cursor.className = "plot-cursor";
    this.selection.className = "plot-selection";
    this.cursor.hidden = this.selection.hidden = true;
    this.over.append(this.cursor, this.selection);
    stage.append(this.canvas, this.over);
    box.append(title, stage);
    if (options.legend) {
      this.legend = document.createElement("table");
      this.legend.className = "plot-legend";
      box.append(this.legend);
    }
    this.over.addEventListener("mousemove", (e) => this.moved(e));
    this.over.addEventListener("mouseleave", () => this.moved(null));
    this.over.addEventListener("mousedown", (e) => {
      if (e.button !== 0) return;
      this.dragFrom = e.offsetX;
      window.addEventListener("mouseup", this.stopDrag, { once: true });
    });
    this.over.addEventListener("dblclick", () => {
      this.zoom = null;
      this.draw();
    });
    this.layout();
  }

  /** The steps shown (first, last): every line's, or the zoomed-in range. */
  get range(): [number, number] {
    return [...this.domain];
  }

  /** Replace every line and draw. */
  setData(lines: Line[]): void {
    this.lines = lines;
    this.draw();
  }

  setWidth(width: number): void {
    if (width === this.width) return;
    this.width = width;
    this.layout();
    this.draw();
  }

  destroy(): void {
    window.removeEventListener("mouseup", this.stopDrag);
    this.box.replaceChildren();
  }

  private layout(): void {
    const dpr = window.devicePixelRatio || 1;
    const { width } = this, { height } = this.options;
    this.canvas.width = Math.round(width * dpr);
    this.canvas.height = Math.round(height * dpr);
    this.canvas.style.width = `${width}px`;
    this.canvas.style.height = `${height}px`;
    Object.assign(this.over.style, {
      left: `${PAD.left}px`, top: `${PAD.top}px`,
      width: `${width - PAD.left - PAD.right}px`, height: `${height - PAD.top - PAD.bottom}px`,
    });
  }

  private plotWidth(): number {
    return this.width - PAD.left - PAD.right;
  }

  /** The step at ``px`` pixels from the plot area's left edge. */
  private xAt(px: number): number {
    const [x0, x1] = this.domain;
    return x0 + (px / this.plotWidth()) * (x1 - x0);
  }

  private moved(e: MouseEvent | null): void {
    if (!e) {
      this.cursorX = null;
      this.cursor.hidden = true;
    } else {
      this.cursorX = this.xAt(e.offsetX);
      this.cursor.hidden = false;
      this.cursor.style.left = `${e.offsetX}px`;
      if (this.dragFrom !== null) {
        this.selection.hidden = false;
        this.selection.style.left = `${Math.min(this.dragFrom, e.offsetX)}px`;
        this.selection.style.width = `${Math.abs(e.offsetX - this.dragFrom)}px`;
      }
    }
    this.writeLegend();
    this.options.onCursor?.(this.cursorX);
  }

  private endDrag(e: MouseEvent): void {
    const from = this.dragFrom;
    this.dragFrom = null;
    this.selection.hidden = true;
    if (from === null) return;
    const to = e.clientX - this.over.getBoundingClientRect().left;
    if (Math.abs(to - from) < 5) return;  // a click, not a drag
    const a = this.xAt(Math.max(0, Math.min(from, to))), b = this.xAt(Math.min(this.plotWidth(), Math.max(from, to)));
    this.zoom = [a, b];
    this.draw();
  }

  private writeLegend(): void {
    if (!this.legend) return;
    const x = this.cursorX;
    const rows: [string, string, string][] = [["", "step", x === null ? "–" : Math.round(x).toLocaleString("en")]];
    for (const line of this.lines) {
      const i = x === null ? -1 : nearest(line.x, x);
      rows.push([line.color, line.label, i < 0 ? "–" : formatValue(line.y[i])]);
    }
    const table = this.legend;
    while (table.rows.length > rows.length) table.deleteRow(-1);
    rows.forEach(([color, label, value], r) => {
      const tr = table.rows[r] ?? table.insertRow();
      if (!tr.cells.length) {
        tr.className = "plot-legend-row";
        for (const cls of ["swatch", "label", "value"]) tr.insertCell().className = cls;
      }
      tr.cells[0].style.background = color;
      if (tr.cells[1].textContent !== label) tr.cells[1].textContent = label;
      if (tr.cells[2].textContent !== value) tr.cells[2].textContent = value;
    });
  }

  /** Draw everything again (cheap: a few thousand points per chart). */
  draw(): void {
    const ctx = this.canvas.getContext("2d");
    if (!ctx) return;
    const dpr = this.canvas.width / this.width;
    const { height, log } = this.options;
    const W = this.plotWidth(), H = height - PAD.top - PAD.bottom;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, this.width, height);
    // The x range: zoomed, or every line's extent.
    let x0 = Infinity, x1 = -Infinity;
    for (const l of this.lines) {
      if (l.x.length) {
        x0 = Math.min(x0, l.x[0]);
        x1 = Math.max(x1, l.x[l.x.length - 1]);
      }
    }
    if (this.zoom) [x0, x1] = this.zoom;
    if (!(x1 > x0)) [x0, x1] = Number.isFinite(x0) ? [x0 - 1, x0 + 1] : [0, 1];
    this.domain = [x0, x1];
    // The y range: the values (and bands) within that x range.
    const f = log ? Math.log10 : (v: number) => v;
    let y0 = Infinity, y1 = -Infinity;
    const take = (v: number | null) => {
      if (v !== null && Number.isFinite(v)) {
        const t = f(v);
        if (t < y0) y0 = t;
        if (t > y1) y1 = t;
      }
    };
    for (const l of this.lines) {
      for (let i = 0; i < l.x.length; i++) {
        if (l.x[i] < x0 || l.x[i] > x1) continue;
        take(l.y[i]);
        if (l.band) {
          take(l.band.lo[i]);
          take(l.band.hi[i]);
        }
      }
    }
    if (!Number.isFinite(y0)) [y0, y1] = [0, 1];
    else if (y1 === y0) [y0, y1] = log ? [y0 - 0.5, y1 + 0.5] : [y0 - (Math.abs(y0) * 0.1 || 1), y1 + (Math.abs(y1) * 0.1 || 1)];
    else {
      const pad = (y1 - y0) * 0.05;
      [y0, y1] = [y0 - pad, y1 + pad];
    }
    const sx = (x: number) => PAD.left + ((x - x0) / (x1 - x0)) * W;
    const sy = (t: number) => PAD.top + H - ((t - y0) / (y1 - y0)) * H;

    // Grid, ticks and their labels.
    ctx.font = FONT;
    ctx.fillStyle = AXIS;
    ctx.strokeStyle = GRID;
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const xStep = Math.max(1, niceStep(x1 - x0, W / 90));
    // (at most 50 ticks: a step too small for the values' precision would never end)
    for (let x = Math.ceil(x0 / xStep) * xStep, n = 0; x <= x1 && n < 50; x += xStep, n++) {
      const px = Math.round(sx(x)) + 0.5;
      ctx.moveTo(px, PAD.top);
      ctx.lineTo(px, PAD.top + H);
      ctx.fillText(tickLabel(x, xStep), px, PAD.top + H + 4);
    }
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    const yTicks: [number, string][] = [];
    if (log) {
      const decades = Math.ceil(y1) - Math.floor(y0);
      const every = Math.max(1, Math.ceil(decades / Math.max(1, H / 30)));
      for (let k = Math.floor(y0); k <= Math.ceil(y1); k += every) {
        for (const m of decades <= 2 ? [1, 2, 5] : [1]) {
          const t = k + Math.log10(m);
          const v = m * 10 ** k;
          if (t >= y0 && t <= y1) yTicks.push([t, k >= -4 && k < 6 ? String(+v.toPrecision(3)) : `${m}e${k}`]);
        }
      }
    } else {
      const step = niceStep(y1 - y0, H / 32);
      for (let v = Math.ceil(y0 / step) * step, n = 0; v <= y1 && n < 50; v += step, n++) yTicks.push([v, tickLabel(Math.abs(v) < step / 1e6 ? 0 : v, step)]);
    }
    for (const [t, label] of yTicks) {
      const py = Math.round(sy(t)) + 0.5;
      ctx.moveTo(PAD.left, py);
      ctx.lineTo(PAD.left + W, py);
      ctx.fillText(label, PAD.left - 5, py);
    }
    ctx.stroke();
    ctx.textAlign = "center";
    ctx.textBaseline = "bottom";
    ctx.fillText("step", PAD.left + W / 2, height);
    ctx.save();
    ctx.translate(11, PAD.top + H / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.textBaseline = "middle";
    ctx.fillText(this.options.yLabel, 0, 0);
    ctx.restore();

    ctx.save();
    ctx.beginPath();
    ctx.rect(PAD.left, PAD.top, W, H);
    ctx.clip();
    // Bands first (under every line): one polygon per run of points with both ends.
    for (const l of this.lines) {
      if (!l.band) continue;
      const { lo, hi, fill } = l.band;
      ctx.fillStyle = fill;
      let start = -1;
      for (let i = 0; i <= l.x.length; i++) {
        const ok = i < l.x.length && lo[i] !== null && hi[i] !== null;
        if (ok && start < 0) start = i;
        if (!ok && start >= 0) {
          ctx.beginPath();
          for (let j = start; j < i; j++) ctx.lineTo(sx(l.x[j]), sy(f(hi[j] as number)));
          for (let j = i - 1; j >= start; j--) ctx.lineTo(sx(l.x[j]), sy(f(lo[j] as number)));
          ctx.closePath();
          ctx.fill();
          start = -1;
        }
      }
    }
    ctx.lineJoin = "round";
    for (const l of this.lines) {
      ctx.strokeStyle = l.color;
      ctx.lineWidth = l.width;
      ctx.beginPath();
      let pen = false;
      for (let i = 0; i < l.x.length; i++) {
        const v = l.y[i];
        if (v === null || !Number.isFinite(v)) {
          if (!l.spanGaps) pen = false;
          continue;
        }
        const px = sx(l.x[i]), py = sy(f(v));
        if (pen) ctx.lineTo(px, py);
        else ctx.moveTo(px, py);
        pen = true;
      }
      ctx.stroke();
    }
    ctx.restore();
    this.writeLegend();
  }
}
