// Scalar series (loss, accuracy, ...) as uPlot line charts, one per series.
// Points arrive in batches from the streamer (merged, never dropped); they are
// appended by step so a reconnect's snapshot never duplicates or reorders them.
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";

const MAX_POINTS = 4000;
export const COLORS = ["#fb8c00", "#42a5f5", "#66bb6a", "#ab47bc", "#ef5350", "#26c6da"];

export class Series {
  steps: number[] = [];
  // null where a value was NaN or infinite: uPlot draws a gap there.
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

type Chart = { plot: uPlot; box: HTMLElement; color: string; banded: boolean; last: number | null; lastSmoothed: number | null };

export interface ChartInfo {
  log: boolean;
  smoothing: number;
  last: number | null;
  lastSmoothed: number | null;
  /** Points drawn, and whether a raw min/max band is drawn (down-sampled points). */
  points: number;
  band: boolean;
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
      out[name] = { log: this.options.log, smoothing: this.options.smoothing, last: c.last, lastSmoothed: c.lastSmoothed,
                    points: c.plot.data[0].length, band: c.banded };
    }
    return out;
  }

  /** Redraw the series that changed (called from the animation frame only). */
  render(series: Map<string, Series>): void {
    const { smoothing, log } = this.options;
    for (const [name, s] of series) {
      if (!s.dirty) continue;
      s.dirty = false;
      let chart = this.charts.get(name);
      if (chart && chart.banded !== s.banded) {  // the band's two series join the chart, in place
        const old = chart;
        chart = this.add(name, s.banded, old.color);
        old.box.replaceWith(chart.box);
        old.plot.destroy();
      }
      if (!chart) chart = this.add(name, s.banded);
      const smoothed = smooth(s.values, smoothing);
      const positive = (v: number | null) => (v === null || (log && !(v > 0)) ? null : v);
      chart.last = s.values.length ? s.values[s.values.length - 1] : null;
      chart.lastSmoothed = smoothed.length ? smoothed[smoothed.length - 1] : null;
      const data: uPlot.AlignedData = [s.steps, s.values.map(positive), smoothed.map(positive)];
      chart.plot.setData(s.banded ? [...data, s.lo.map(positive), s.hi.map(positive)] : data);
    }
  }

  private width(): number {
    return Math.max(240, this.root.clientWidth - 4);
  }

  private add(name: string, banded: boolean, color = COLORS[this.charts.size % COLORS.length]): Chart {
    const box = document.createElement("div");
    box.className = "chart";
    box.dataset.series = name;
    const readout = document.createElement("div");
    readout.className = "readout";
    this.root.append(box);
    const axis = { stroke: "#8b949e", grid: { stroke: "#222a33" }, ticks: { stroke: "#222a33" } };
    const plot = new uPlot(
      {
        width: this.width(),
        height: 170,
        title: name,
        // uPlot's own legend re-renders with every setData (measured: long tasks and
        // dropped frames while streaming); a readout written only on cursor moves
        // shows every series' value at the cursor instead.
        legend: { show: false },
        hooks: { setCursor: [(u) => this.readout(u, readout, name)] },
        // Drag to zoom in on steps; double-click resets.
        cursor: { drag: { x: true, y: false } },
        scales: { x: { time: false }, y: this.options.log ? { distr: 3 } : {} },
        axes: [
          { ...axis, label: "step", labelSize: 16 },
          { ...axis, size: 56, label: name, labelSize: 16 },
        ],
        series: [
          { label: "step" },
          { label: "raw", stroke: `${color}55`, width: 1, points: { show: false } },
          { label: this.options.smoothing > 0 ? `${name} (smoothed)` : name, stroke: color, width: 1.5,
            points: { show: false } },
          // The raw min/max of down-sampled points: a band between these two.
          ...(banded ? [{ label: "min", stroke: "transparent", width: 0, points: { show: false } },
                        { label: "max", stroke: "transparent", width: 0, points: { show: false } }] : []),
        ],
        bands: banded ? [{ series: [4, 3], fill: `${color}30` }] : [],
      },
      banded ? [[], [], [], [], []] : [[], [], []],
      box,
    );
    box.append(readout);
    const chart = { plot, box, color, banded, last: null, lastSmoothed: null };
    this.charts.set(name, chart);
    return chart;
  }

  /** "step N · raw v · smoothed v" at the cursor (written only when it changes). */
  private readout(u: uPlot, el: HTMLElement, name: string): void {
    const i = u.cursor.idx;
    let text = "";
    if (i != null) {
      const fmt = (v: number | null | undefined) => (v == null ? "–" : Math.abs(v) >= 0.01 || v === 0 ? v.toPrecision(4) : v.toExponential(3));
      const [steps, raw, smoothed] = u.data;
      text = `step ${steps[i]} · ${name} ${fmt(raw[i])}`;
      if (this.options.smoothing > 0) text += ` · smoothed ${fmt(smoothed[i])}`;
    }
    if (el.textContent !== text) el.textContent = text;
  }

  private resize(): void {
    const width = this.width();
    for (const { plot } of this.charts.values()) plot.setSize({ width, height: 170 });
  }
}
