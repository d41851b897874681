// Scalar series (loss, accuracy, ...) as uPlot line charts, one per series.
// Points arrive in batches from the streamer (merged, never dropped); they are
// appended by step so a reconnect's snapshot never duplicates or reorders them.
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";

const MAX_POINTS = 4000;
const COLORS = ["#fb8c00", "#42a5f5", "#66bb6a", "#ab47bc", "#ef5350", "#26c6da"];

export class Series {
  steps: number[] = [];
  // null where a value was NaN or infinite: uPlot draws a gap there.
  values: (number | null)[] = [];
  dirty = false;

  /** Append points newer than the last one held; returns how many were taken. */
  append(steps: readonly bigint[] | readonly number[], values: readonly number[]): number {
    const last = this.steps.length ? this.steps[this.steps.length - 1] : -1;
    let taken = 0;
    for (let i = 0; i < values.length; i++) {
      const s = Number(steps[i]);
      if (s <= last) continue;
      this.steps.push(s);
      this.values.push(Number.isFinite(values[i]) ? values[i] : null);
      taken++;
    }
    if (this.steps.length > MAX_POINTS) this.decimate();
    if (taken) this.dirty = true;
    return taken;
  }

  /** Halve the older half's resolution: the curve keeps its whole extent. */
  private decimate(): void {
    const half = this.steps.length >> 1;
    const steps: number[] = [], values: (number | null)[] = [];
    for (let i = 0; i < half; i += 2) {
      steps.push(this.steps[i]);
      values.push(this.values[i]);
    }
    this.steps = steps.concat(this.steps.slice(half));
    this.values = values.concat(this.values.slice(half));
  }
}

export class ChartPanel {
  private charts = new Map<string, { plot: uPlot; box: HTMLElement }>();

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

  /** Redraw the series that changed (called from the animation frame only). */
  render(series: Map<string, Series>): void {
    for (const [name, s] of series) {
      if (!s.dirty) continue;
      s.dirty = false;
      let chart = this.charts.get(name);
      if (!chart) chart = this.add(name);
      chart.plot.setData([s.steps, s.values]);
    }
  }

  private width(): number {
    return Math.max(240, this.root.clientWidth - 4);
  }

  private add(name: string): { plot: uPlot; box: HTMLElement } {
    const box = document.createElement("div");
    box.className = "chart";
    box.dataset.series = name;
    this.root.append(box);
    const color = COLORS[this.charts.size % COLORS.length];
    const plot = new uPlot(
      {
        width: this.width(),
        height: 150,
        title: name,
        legend: { show: false },
        cursor: { drag: { x: true, y: false } },
        scales: { x: { time: false } },
        axes: [
          { stroke: "#8b949e", grid: { stroke: "#222a33" }, ticks: { stroke: "#222a33" } },
          { stroke: "#8b949e", grid: { stroke: "#222a33" }, ticks: { stroke: "#222a33" }, size: 56 },
        ],
        series: [{ label: "step" }, { label: name, stroke: color, width: 1.5, points: { show: false } }],
      },
      [[], []],
      box,
    );
    const chart = { plot, box };
    this.charts.set(name, chart);
    return chart;
  }

  private resize(): void {
    const width = this.width();
    for (const { plot } of this.charts.values()) plot.setSize({ width, height: 150 });
  }
}
