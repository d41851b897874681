// Scalar series (series.ts) as uPlot line charts, one per series. Loaded after the
// first view is drawn (uPlot is a third of the first screen's bytes otherwise); its
// CSS is imported by main.ts, so it is inlined in the page.
import uPlot from "uplot";
import { type ChartOptions, COLORS, type Series, smooth } from "./series";

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
  constructor(private readonly root: HTMLElement, public options: ChartOptions) {
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
