// Scalar series (loss, accuracy, ...) as the page holds them, and the chart settings:
// plain data with no chart code, so the first screen loads without uPlot (charts.ts,
// imported once the first view is drawn). Points arrive in batches from the streamer
// (merged, never dropped); they are appended by step so a reconnect's snapshot never
// duplicates or reorders them.

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
