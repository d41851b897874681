// Scalar series (loss, accuracy, ...) as line charts, one per series.
// Points arrive in batches from the streamer (merged, never dropped); they are
// appended by step so a reconnect's snapshot never duplicates or reorders them.
import { formatValue, type Line, nearest, Plot } from "./plot";

const MAX_POINTS = 4000;
export const COLORS = ["#fb8c00", "#42a5f5", "#66bb6a", "#ab47bc", "#ef5350", "#26c6da"];

export class Series {
  steps: number[] = [];
  // null where a value was NaN or infinite: the chart draws a gap there.
  values: (number | null)[] = [];
  /** Each point's raw min and max (the point itself unless it is a bucket). */
  lo: (number | null)[] = [];
  hi: (number | null)[] = [];
  /** Whether points came down-sampled (buckets of several steps): the chart draws
   *  their band. Client-side decimation keeps the extremes in lo/hi but draws none. */
  banded = false;
  dirty = false;

  /** Append points newer than the last one held; returns how many were taken.
   *  ``lo``/``hi``: the buckets' raw min and max when the points are down-sampled. */
  append(steps: readonly bigint[] | readonly number[], values: readonly number[],
         lo: readonly number[] = [], hi: readonly number[] = []): number {
    const last = this.steps.length ? this.steps[this.steps.length - 1] : -1;
    const bucketed = lo.length === values.length && hi.length === values.length;
    const finite = (v: number) => (Number.isFinite(v) ? v : null);
    let taken = 0;
    for (let i = 0; i < values.length; i++) {
      const s = Number(steps[i]);
      if (s <= last) continue;
      this.steps.push(s);
      const v = finite(values[i]);
      this.values.push(v);
      this.lo.push(bucketed ? finite(lo[i]) : v);
      this.hi.push(bucketed ? finite(hi[i]) : v);
      taken++;
    }
    if (bucketed && taken) this.banded = true;
    if (this.steps.length > MAX_POINTS) this.decimate();
    if (taken) this.dirty = true;
    return taken;
  }

  /** Halve the older half's resolution: the curve keeps its whole extent, the band
   *  the extremes of the points it drops. */
  private decimate(): void {
    const half = this.steps.length >> 1;
    const steps: number[] = [], values: (number | null)[] = [], lo: (number | null)[] = [], hi: (number | null)[] = [];
    const pick = (a: number | null, b: number | null, f: (x: number, y: number) => number) =>
      a === null ? b : b === null ? a : f(a, b);
    for (let i = 0; i < half; i += 2) {
      const j = Math.min(i + 1, half - 1);
      steps.push(this.steps[i]);
      values.push(this.values[i]);
      lo.push(pick(this.lo[i], this.lo[j], Math.min));
      hi.push(pick(this.hi[i], this.hi[j], Math.max));
    }
    this.steps = steps.concat(this.steps.slice(half));
    this.values = values.concat(this.values.slice(half));
    this.lo = lo.concat(this.lo.slice(half));
    this.hi = hi.concat(this.hi.slice(half));
  }
}

/** Chart settings shared by every chart (the Metrics card's controls). */
export interface ChartOptions {
  /** EMA weight in [0, 1): 0 = raw. TensorBoard's default is 0.6. */
  smoothing: number;
  /** Logarithmic y axis (values <= 0 are left out). */
  log: boolean;
}

/**
 * TensorBoard's smoothing: an exponential moving average, debiased (divided by
 * 1 - weight^n) so the first points are not pulled towards zero.
 */
export function smooth(values: readonly (number | null)[], weight: number): (number | null)[] {
  if (weight <= 0) return values.slice();
  const out = new Array<number | null>(values.length);
  let last = 0;
  let n = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (v === null || !Number.isFinite(v)) {
      out[i] = v;  // a gap (non-finite) stays a gap and does not reset the average
      continue;
    }
    last = last * weight + (1 - weight) * v;
    n++;
    out[i] = last / (1 - weight ** n);
  }
  return out;
}

type Chart = { plot: Plot; box: HTMLElement; readout: HTMLElement; color: string; steps: readonly number[];
                raw: readonly (number | null)[]; smoothed: (number | null)[]; banded: boolean };

export interface ChartInfo {
  log: boolean;
  smoothing: number;
  last: number | null;
  lastSmoothed: number | null;
  /** Points drawn, and whether a raw min/max band is drawn (down-sampled points). */
  points: number;
  band: boolean;
  /** The steps shown (drag to zoom in, double-click to reset). */
  range: [number, number];
}

export class ChartPanel {
  private charts = new Map<string, Chart>();
  options: ChartOptions = { smoothing: 0.6, log: false };

  constructor(private readonly root: HTMLElement) {
    new ResizeObserver(() => this.resize()).observe(root);
  }

  clear(): void {
    for (const { plot, box } of this.charts.values()) {
      plot.destroy();
      box.remove();
    }
    this.charts.clear();
  }

  /** New settings: every chart is drawn again (rebuilt when the y scale changes). */
  setOptions(options: Partial<ChartOptions>, series: Map<string, Series>): void {
    const rebuild = options.log !== undefined && options.log !== this.options.log;
    this.options = { ...this.options, ...options };
    if (rebuild) this.clear();
    for (const s of series.values()) s.dirty = true;
    this.render(series);
  }

  /** What each chart shows, for tests and the curious. */
  describe(): Record<string, ChartInfo> {
    const out: Record<string, ChartInfo> = {};
    for (const [name, c] of this.charts) {
      out[name] = { log: this.options.log, smoothing: this.options.smoothing,
                    last: c.raw.length ? c.raw[c.raw.length - 1] : null,
                    lastSmoothed: c.smoothed.length ? c.smoothed[c.smoothed.length - 1] : null,
                    points: c.steps.length, band: c.banded, range: c.plot.range };
    }
    return out;
  }

  /** Redraw the series that changed (called from the animation frame only). */
  render(series: Map<string, Series>): void {
    const { smoothing, log } = this.options;
    for (const [name, s] of series) {
      if (!s.dirty) continue;
      s.dirty = false;
      const chart = this.charts.get(name) ?? this.add(name);
      const positive = (v: number | null) => (v === null || (log && !(v > 0)) ? null : v);
      chart.steps = s.steps.slice();  // what is drawn, while the series grows
      chart.raw = s.values.slice();
      chart.smoothed = smooth(s.values, smoothing);
      chart.banded = s.banded;
      const { color } = chart;
      const lines: Line[] = [
        { label: "raw", color: `${color}55`, width: 1, x: chart.steps, y: chart.raw.map(positive),
          band: s.banded ? { lo: s.lo.map(positive), hi: s.hi.map(positive), fill: `${color}30` } : undefined },
        { label: smoothing > 0 ? `${name} (smoothed)` : name, color, width: 1.5, x: chart.steps,
          y: chart.smoothed.map(positive) },
      ];
      chart.plot.setData(lines);
    }
  }

  private width(): number {
    return Math.max(240, this.root.clientWidth - 4);
  }

  private add(name: string): Chart {
    const box = document.createElement("div");
    box.className = "chart";
    box.dataset.series = name;
    const readout = document.createElement("div");
    readout.className = "readout";
    this.root.append(box);
    const chart: Chart = { plot: null as unknown as Plot, box, readout, color: COLORS[this.charts.size % COLORS.length],
                           steps: [], raw: [], smoothed: [], banded: false };
    // A readout written only on cursor moves shows the values at the cursor (a legend
    // rewritten with every new point would cost long tasks while streaming).
    chart.plot = new Plot(box, this.width(), { title: name, yLabel: name, height: 170, log: this.options.log,
                                              onCursor: (x) => this.readout(chart, name, x) });
    box.append(readout);
    this.charts.set(name, chart);
    return chart;
  }

  /** "step N · raw v · smoothed v" at the cursor (written only when it changes). */
  private readout(chart: Chart, name: string, x: number | null): void {
    const i = x === null ? -1 : nearest(chart.steps, x);
    let text = "";
    if (i >= 0) {
      text = `step ${chart.steps[i]} · ${name} ${formatValue(chart.raw[i])}`;
      if (this.options.smoothing > 0) text += ` · smoothed ${formatValue(chart.smoothed[i])}`;
    }
    if (chart.readout.textContent !== text) chart.readout.textContent = text;
  }

  private resize(): void {
    const width = this.width();
    for (const { plot } of this.charts.values()) plot.setWidth(width);
  }
}
