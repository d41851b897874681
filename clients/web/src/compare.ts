// Several runs side by side: one chart per metric with every selected run's curve
// overlaid, each run its own colour and legend entry (the legend shows each run's
// value at the cursor), and each run's raw min/max band where its history is
// down-sampled. The histories come from the run store (GetRunScalars), so ended
// and interrupted runs compare as well as live ones.
import type { ScalarSeries } from "./gen/tensorwire/common/v1/common_pb";
import type { Run } from "./gen/tensorwire/trainer/v1/trainer_pb";
import { RunState } from "./gen/tensorwire/common/v1/common_pb";
import { type ChartOptions, COLORS, smooth } from "./charts";
import { type Line, Plot } from "./plot";
import { runScalars } from "./rpc";

/** Buckets per series and run: about one per pixel of a wide chart. */
const MAX_POINTS = 1024;

export interface CompareInfo {
  runs: string[];
  /** Whether a raw min/max band is drawn (some run's history is down-sampled). */
  band: boolean;
  points: number;
}

export class CompareView {
  private plots = new Map<string, { plot: Plot; box: HTMLElement; info: CompareInfo }>();
  /** Histories of ended runs (they do not change); live runs are fetched again. */
  private cache = new Map<string, ScalarSeries[]>();
  private shown: { run: Run; series: ScalarSeries[] }[] = [];
  /** Numbers show() calls: an answer to an older selection is not drawn. */
  private request = 0;

  constructor(private readonly root: HTMLElement) {
    new ResizeObserver(() => {
      for (const { plot } of this.plots.values()) plot.setWidth(this.width());
    }).observe(root);
  }

  /** Show ``runs`` (in this order: each run keeps its colour while others come and go). */
  async show(runs: Run[], options: ChartOptions): Promise<void> {
    const request = ++this.request;
    const histories = await Promise.all(runs.map(async (run) => {
      const cached = this.cache.get(run.runId);
      if (cached) return cached;
      const series = await runScalars(run.runId, MAX_POINTS);
      const live = run.state === RunState.RUNNING || run.state === RunState.PAUSED || run.state === RunState.PENDING;
      if (!live) this.cache.set(run.runId, series);
      return series;
    }));
    if (request !== this.request) return; // a newer selection was asked for meanwhile
    this.shown = runs.map((run, i) => ({ run, series: histories[i] }));
    this.draw(options);
  }

  /** Draw again with other options (smoothing, log scale) from what was fetched. */
  redraw(options: ChartOptions): void {
    this.draw(options);
  }

  clear(): void {
    this.request++; // answers still on their way are for a view no longer shown
    for (const { plot, box } of this.plots.values()) {
      plot.destroy();
      box.remove();
    }
    this.plots.clear();
    this.shown = [];
  }

  describe(): Record<string, CompareInfo> {
    const out: Record<string, CompareInfo> = {};
    for (const [name, { info }] of this.plots) out[name] = info;
    return out;
  }

  private width(): number {
    return Math.max(240, this.root.clientWidth - 4);
  }

  private draw(options: ChartOptions): void {
    const histories = this.shown;
    for (const { plot, box } of this.plots.values()) {
      plot.destroy();
      box.remove();
    }
    this.plots.clear();
    const names = [...new Set(histories.flatMap((h) => h.series.map((s) => s.name)))]
      .sort((a, b) => (a === "loss" ? -1 : b === "loss" ? 1 : a.localeCompare(b)));
    const positive = (v: number | null) => (v === null || !Number.isFinite(v) || (options.log && !(v > 0)) ? null : v);
    for (const name of names) {
      const lines: Line[] = [];
      const info: CompareInfo = { runs: [], band: false, points: 0 };
      histories.forEach(({ run, series: all }, i) => {
        const s = all.find((x) => x.name === name);
        if (!s || !s.steps.length) return;
        const color = COLORS[i % COLORS.length];
        const steps = s.steps.map(Number);
        const values = s.values.map((v) => (Number.isFinite(v) ? v : null));
        const bucketed = s.min.length === s.values.length && s.max.length === s.values.length;
        lines.push({
          label: run.name || `${run.task} ${run.runId}`, color, width: 1.5, spanGaps: true, x: steps,
          y: smooth(values, options.smoothing).map(positive),
          band: bucketed ? { lo: s.min.map(positive), hi: s.max.map(positive), fill: `${color}30` } : undefined,
        });
        info.runs.push(run.runId);
        info.band ||= bucketed;
        info.points += steps.length;
      });
      if (!lines.length) continue;
      const box = document.createElement("div");
      box.className = "chart compare-chart";
      box.dataset.series = name;
      this.root.append(box);
      // Drag to zoom in on steps, double-click resets; the legend gives each run's value at the cursor.
      const plot = new Plot(box, this.width(), {
        title: `${name}${options.smoothing > 0 ? " (smoothed)" : ""}`, yLabel: name, height: 220, log: options.log,
        legend: true,
      });
      plot.setData(lines);
      this.plots.set(name, { plot, box, info });
    }
  }
}
