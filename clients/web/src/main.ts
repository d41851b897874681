// The page: task picker, runs, controls, hyper-parameters, live view, charts,
// live badge, connection indicator, inference panel. Frames only update state;
// drawing happens in at most one requestAnimationFrame callback at a time.
import "./style.css";
import type { Frame } from "./gen/tensorwire/streamer/v1/streamer_pb";
import { RunState, type RunStatus } from "./gen/tensorwire/common/v1/common_pb";
import type { Run, TaskInfo } from "./gen/tensorwire/trainer/v1/trainer_pb";
import * as rpc from "./rpc";
import { decodeAll } from "./decode";
import { drawView, type LiveView } from "./views";
import { ChartPanel, Series } from "./charts";
import { CompareView } from "./compare";

const $ = <T extends HTMLElement>(sel: string, root: ParentNode = document): T => root.querySelector(sel) as T;
const h = <K extends keyof HTMLElementTagNameMap>(tag: K, props: Partial<HTMLElementTagNameMap[K]> = {}, ...kids: (Node | string)[]): HTMLElementTagNameMap[K] => {
  const el = Object.assign(document.createElement(tag), props);
  el.append(...kids);
  return el;
};

// ------------------------------------------------------------------ state

interface Live {
  runId: string;
  status: RunStatus | null;
  serverStep: number;
  /** Step and production time of the newest frame applied (not yet drawn). */
  pendingStep: number;
  pendingProducedAt: number;
  displayedStep: number;
  lagS: number;
  /** This clock minus the servers': from ack round trips, else gross skew only. */
  clockOffsetS: number;
  clockFromAcks: boolean;
  /** Production time of the view on screen (0: none yet). */
  viewProducedAt: number;
  /** The newest status frame's age when it arrived, s (produced -> arrived). */
  statusLagS: number;
  /** The newest step of the scalars drawn on the charts (0: none yet), and of those
   *  arrived and not yet drawn. */
  scalarStep: number;
  pendingScalarStep: number;
  arrivals: number[];
  series: Map<string, Series>;
  view: LiveView | null;
  viewLabel: string;
  nextView: Frame | null;
  abort: AbortController | null;
}

const live: Live = {
  runId: "",
  status: null,
  serverStep: 0,
  pendingStep: 0,
  pendingProducedAt: 0,
  displayedStep: 0,
  lagS: 0,
  clockOffsetS: 0,
  clockFromAcks: false,
  viewProducedAt: 0,
  statusLagS: 0,
  scalarStep: 0,
  pendingScalarStep: 0,
  arrivals: [],
  series: new Map(),
  view: null,
  viewLabel: "",
  nextView: null,
  abort: null,
};

let tasks: TaskInfo[] = [];
let runs: Run[] = [];

// Everything the page exposes to tests and the curious: read-only figures.
const stats = {
  frames: 0,
  renders: 0,
  /** Longest render() so far, ms: what one animation frame costs at worst. */
  maxRenderMs: 0,
  get serverStep() { return live.serverStep; },
  get displayedStep() { return live.displayedStep; },
  get lagS() { return live.lagS; },
  get clockOffsetS() { return live.clockOffsetS; },
  get acks() { return rpc.feedback.acks; },
  get viewStep() { return live.view?.step ?? 0; },
  get stepsPerS() { return live.status?.stepsPerSecond ?? 0; },
  get viewProducedAt() { return live.viewProducedAt; },
  get statusLagS() { return live.statusLagS; },
  get scalarStep() { return live.scalarStep; },
  /** Views decoded for the screen (skipped ones not counted). */
  views: 0,
  get runId() { return live.runId; },
  get state() { return RunState[currentState()] === "UNSPECIFIED" ? "" : RunState[currentState()]; },
  get charts() { return charts.describe(); },
  get compare() { return compare?.describe() ?? {}; },
  /** Milliseconds from navigation start to the first chart with points on screen,
   *  and to the start of the subscription that brought them (the run's history). */
  firstChartMs: 0,
  subscribedMs: 0,
  /** The first screen's download rate, bytes/s (Infinity: not measured), and whether
   *  the inference panel waits to be asked for (a slow link). */
  firstScreenBytesPerS: 0,
  /** Under SLOW_LINK_BYTES_PER_S: the stream asks for fewer points, the run list is
   *  refreshed less often, the inference panel waits to be asked for. */
  slowLink: false,
  get inferenceOnRequest() { return stats.slowLink; },
  get runsShown() { return runs.map((r) => r.runId); },
  get updatesPerS() { return updatesPerSecond(); },
  connection: "connecting" as rpc.ConnectionState,
};
(window as unknown as { tensorwire: typeof stats }).tensorwire = stats;

// ------------------------------------------------------------------ layout

const app = $("#app");
app.innerHTML = "";
const taskSelect = h("select", { id: "task" });
const runName = h("input", { id: "run-name", placeholder: "name (optional)", maxLength: 200 });
const maxSteps = h("input", { id: "max-steps", type: "number", min: "0", step: "1", title: "max_steps: the run ends after this many steps (0 = never)" });
const startBtn = h("button", { id: "start", textContent: "Start run" });
const runFilter = h("input", { id: "run-filter", type: "search", placeholder: "filter: word, state = RUNNING, tags:\"best\"" });
const runTable = h("table", { id: "runs", className: "runs" });
const compareBtn = h("button", { id: "compare", textContent: "Compare", title: "overlay the selected runs' curves" });
const clearBtn = h("button", { id: "compare-clear", textContent: "Clear", title: "unselect every run" });
const pauseBtn = h("button", { id: "pause", textContent: "Pause" });
const resumeBtn = h("button", { id: "resume", textContent: "Resume" });
const stopBtn = h("button", { id: "stop", textContent: "Stop", className: "danger" });
const deleteBtn = h("button", { id: "delete", textContent: "Delete", className: "danger", title: "delete the run, its history and its models" });
const smoothing = h("input", { id: "smoothing", type: "range", min: "0", max: "0.99", step: "0.01", value: "0.6", title: "smoothing (EMA weight, debiased)" });
const smoothingOut = h("output", { id: "smoothing-value", textContent: "0.60" });
const logScale = h("input", { id: "log-scale", type: "checkbox", title: "logarithmic y axis" });
const exportCsv = h("a", { id: "export-csv", textContent: "CSV" });
const exportJson = h("a", { id: "export-json", textContent: "JSON" });
for (const [link, fmt] of [[exportCsv, "csv"], [exportJson, "json"]] as const) {
  link.addEventListener("click", (event) => {
    event.preventDefault();  // a plain link cannot send the tab's token
    const runId = new URLSearchParams(location.search).get("run");
    if (runId) rpc.downloadScalars(runId, fmt).catch((err) => console.error(err));
  });
}
const params = h("div", { id: "params", className: "params" });
const message = h("p", { id: "message", className: "message" });
const viewCanvas = h("canvas", { id: "view", width: 520, height: 520 });
const viewInfo = h("div", { id: "view-info", className: "view-info" });
const chartsRoot = h("div", { id: "charts", className: "charts" });
const inferRoot = h("section", { id: "inference", className: "card" });
const compareCard = h("div", { id: "compare-card", className: "card", hidden: true });
const compareTitle = h("h2", { textContent: "Compare" });
const compareRoot = h("div", { id: "compare-charts", className: "charts" });
compareCard.append(compareTitle, compareRoot);

app.append(
  h("aside", { className: "side" },
    h("section", { className: "card" }, h("h2", { textContent: "New run" }), taskSelect, runName,
      h("label", { className: "param" }, h("span", { textContent: "max_steps" }), maxSteps), startBtn),
    h("section", { className: "card" }, h("h2", { textContent: "Control" }),
      h("div", { className: "row" }, pauseBtn, resumeBtn, stopBtn, deleteBtn), params, message),
  ),
  h("section", { className: "stage" },
    h("div", { className: "card runs-card" },
      h("div", { className: "chart-tools" }, h("h2", { textContent: "Runs" }), runFilter, compareBtn, clearBtn),
      h("div", { className: "runs-scroll" }, runTable)),
    h("div", { className: "card view-card" }, h("h2", { id: "view-title", textContent: "Live view" }), viewCanvas, viewInfo),
    h("div", { className: "card" },
      h("div", { className: "chart-tools" }, h("h2", { textContent: "Metrics" }),
        h("label", {}, "smoothing ", smoothing, smoothingOut),
        h("label", {}, logScale, " log scale"),
        h("span", { className: "export" }, "export ", exportCsv, " ", exportJson)),
      chartsRoot),
    compareCard,
  ),
  h("aside", { className: "side right" }, inferRoot),
);

const conn = $("#conn");
const badge = $("#badge");
const charts = new ChartPanel(chartsRoot);
let compare: CompareView | null = null;
// Not needed for the first chart: loaded once the run list is in (a smaller first
// download); on a slow link only when asked for (its code and first calls, ~8 KB, are
// two seconds of a 32 kbit/s link that the live view would wait behind).
const loadInference = () => import("./inference").then((m) => new m.InferencePanel(inferRoot));
const SLOW_LINK_BYTES_PER_S = 32_000;  // 256 kbit/s

/** The link's speed as the first screen's downloads measured it (bytes/s): everything
 *  from the page's request to the last script's end. (One file's own timing is no
 *  measure: the first one crossed a 32 kbit/s link at 550 kbit/s, into buffers.) */
function firstScreenBytesPerS(): number {
  const nav = performance.getEntriesByType("navigation")[0] as PerformanceNavigationTiming | undefined;
  const assets = (performance.getEntriesByType("resource") as PerformanceResourceTiming[])
    .filter((r) => r.name.includes("/assets/"));
  if (!nav || !assets.length) return Infinity;
  const bytes = assets.reduce((sum, r) => sum + r.transferSize, nav.transferSize);
  const seconds = (Math.max(...assets.map((r) => r.responseEnd)) - nav.requestStart) / 1000;
  return bytes > 16_384 && seconds > 0 ? bytes / seconds : Infinity;  // cached: not measured
}

/** Points per series a slow link's stream asks for (the streamer's default is 64):
 *  its snapshot's history (twice this per series, ~3.2 KB at 64) is half as long, less
 *  of a 32 kbit/s link before the first view; later scalar frames are down-sampled
 *  for such a link anyway. */
const SLOW_LINK_MAX_POINTS = 32;

function offerInference(): void {
  const rate = stats.firstScreenBytesPerS;
  if (!stats.slowLink) {
    void loadInference();
    return;
  }
  const load = h("button", { id: "load-inference", textContent: "Load the model panel" });
  load.onclick = () => {
    inferRoot.replaceChildren();
    void loadInference();
  };
  inferRoot.replaceChildren(
    h("h2", { textContent: "Try a served model" }),
    h("p", { className: "hint", textContent: `Slow link (~${Math.round((rate * 8) / 1000)} kbit/s): loaded when asked for, so that the live view comes first.` }),
    load,
  );
}

// ------------------------------------------------------------------ rendering

const dirty = new Set<"badge" | "view" | "charts" | "runs" | "controls">();
let frameRequested = false;
const CHARTS_MIN_INTERVAL_MS = 100;
const CHARTS_MAX_WAIT_MS = 250;
let lastChartsAt = 0;
let chartsTimer = 0;

function invalidate(what: "badge" | "view" | "charts" | "runs" | "controls"): void {
  dirty.add(what);
  if (!frameRequested) {
    frameRequested = true;
    requestAnimationFrame(render);
  }
}

function render(): void {
  const started = performance.now();
  frameRequested = false;
  stats.renders++;
  const now = Date.now() / 1000;
  if (live.pendingStep > live.displayedStep || (live.pendingStep && !live.displayedStep)) {
    live.displayedStep = live.pendingStep;
    dirty.add("badge");
  }
  const drewView = dirty.has("view");
  // The lag is the age of what is on screen: the view once there is one, measured
  // on the servers' clock, and it grows while nothing new arrives.
  const shownAt = live.viewProducedAt || live.pendingProducedAt;
  if (shownAt) live.lagS = Math.max(0, now - live.clockOffsetS - shownAt);
  if (drewView) {
    takeView();
    live.viewLabel = drawView(viewCanvas, live.view);
    setText(viewInfo, live.view ? `step ${live.view.step}${live.viewLabel ? " · " + live.viewLabel : ""}` : "");
  }
  // Charts redraw whole (plot.ts). They redraw in the frames that redraw the view
  // anyway, or after CHARTS_MAX_WAIT_MS: every changed canvas is copied to the
  // compositor at commit, so fewer frames with canvas changes keep commits short.
  if (dirty.has("charts")) {
    const since = performance.now() - lastChartsAt;
    if ((drewView && since >= CHARTS_MIN_INTERVAL_MS) || since >= CHARTS_MAX_WAIT_MS) {
      lastChartsAt = performance.now();
      charts.render(live.series);
      live.scalarStep = live.pendingScalarStep;
      if (!stats.firstChartMs && [...live.series.values()].some((s) => s.steps.length)) {
        stats.firstChartMs = performance.now();
      }
    } else {
      dirty.delete("charts");
      clearTimeout(chartsTimer);
      chartsTimer = window.setTimeout(() => invalidate("charts"), CHARTS_MAX_WAIT_MS - since);
    }
  }
  if (dirty.has("badge")) renderBadge();
  if (dirty.has("runs")) renderRuns();
  if (dirty.has("controls")) renderControls();
  dirty.clear();
  stats.maxRenderMs = Math.max(stats.maxRenderMs, performance.now() - started);
}

function updatesPerSecond(): number {
  const cutoff = performance.now() - 1000;
  while (live.arrivals.length && live.arrivals[0] < cutoff) live.arrivals.shift();
  return live.arrivals.length;
}

const badgeParts = {
  state: h("span", { className: "state" }),
  server: h("span", { id: "server-step" }),
  shown: h("span", { id: "displayed-step" }),
  lag: h("span", { id: "lag" }),
  ups: h("span", { id: "ups" }),
  progress: h("span", { id: "progress" }),
};
badge.append(...Object.values(badgeParts));

/** Write only what changed: every DOM write costs style, layout and paint. */
function setText(el: HTMLElement, text: string, className?: string): void {
  if (el.textContent !== text) el.textContent = text;
  if (className !== undefined && el.className !== className) el.className = className;
}

function renderBadge(): void {
  const st = live.status;
  // Never "unspecified": the streamer's state, else the run list's, else nothing yet.
  const known = currentState();
  const state = known !== RunState.UNSPECIFIED ? RunState[known].toLowerCase() : live.runId ? "connecting" : "—";
  setText(badgeParts.state, state, `state state-${state}`);
  setText(badgeParts.server, `server step ${live.serverStep}`);
  setText(badgeParts.shown, `shown ${live.displayedStep}`);
  setText(badgeParts.lag, `lag ${live.lagS.toFixed(2)} s`, live.lagS > 2 ? "warn" : "");
  setText(badgeParts.ups, `${updatesPerSecond()} upd/s`);
  setText(badgeParts.progress, progressText(st));
}

/** steps/s, and for a run with max_steps its progress and ETA. */
function progressText(st: RunStatus | null): string {
  if (!st) return "";
  const sps = st.stepsPerSecond;
  const max = st.params["max_steps"] ?? 0;
  const step = Number(st.step);
  const parts = sps > 0 ? [`${sps.toFixed(0)} steps/s`] : [];
  if (max > 0) {
    parts.unshift(`${Math.min(100, (100 * step) / max).toFixed(0)} % of ${max}`);
    if (sps > 0 && step < max) parts.push(`ETA ${fmtDuration((max - step) / sps)}`);
  }
  return parts.join(" · ");
}

function fmtDuration(s: number): string {
  if (s < 60) return `${Math.ceil(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

// The badge's updates/s decays, and its lag grows, while nothing arrives.
setInterval(() => invalidate("badge"), 250);

// ------------------------------------------------------------------ live frames

function onFrame(frame: Frame, receivedAt: number): void {
  stats.frames++;
  live.arrivals.push(performance.now());
  // Clock skew between this browser and the servers: only corrected when it is
  // obviously skew (seconds), never the network delay we want to show as lag.
  const skew = receivedAt - frame.sentAt;
  if (!live.clockFromAcks && frame.sentAt && Math.abs(skew) > 5) live.clockOffsetS = skew;
  const step = Number(frame.step);
  if (step > live.serverStep) live.serverStep = step;
  if (step >= live.pendingStep && frame.producedAt) {
    live.pendingStep = step;
    live.pendingProducedAt = frame.producedAt;
  }
  const body = frame.body;
  switch (body.case) {
    case "status": {
      // A streamer that has not heard of the run yet says "unspecified": keep what we know.
      if (body.value.state === RunState.UNSPECIFIED) break;
      const previous = live.status?.state;
      live.status = body.value;
      if (frame.producedAt) live.statusLagS = Math.max(0, receivedAt - live.clockOffsetS - frame.producedAt);
      if (previous !== body.value.state) {
        invalidate("controls");
        void refreshRuns();
      }
      syncParamValues(body.value.params);
      break;
    }
    case "scalars":
      for (const s of body.value.series) {
        let series = live.series.get(s.name);
        if (!series) live.series.set(s.name, (series = new Series()));
        series.append(s.steps, s.values, s.min, s.max);
        if (s.steps.length) live.pendingScalarStep = Math.max(live.pendingScalarStep, Number(s.steps[s.steps.length - 1]));
      }
      invalidate("charts");
      break;
    case "view":
      // Latest wins: only the newest view is decoded, once, in the next frame.
      live.nextView = frame;
      invalidate("view");
      break;
  }
  invalidate("badge");
}

/** Decode the newest view that arrived since the last frame (skipped ones cost nothing). */
function takeView(): void {
  const frame = live.nextView;
  live.nextView = null;
  if (!frame || frame.body.case !== "view") return;
  const v = frame.body.value;
  try {
    live.view = { kind: v.kind, step: Number(v.step || frame.step), arrays: decodeAll(v.arrays), meta: { ...v.meta },
                  name: v.name, labels: [...v.labels] };
    live.viewProducedAt = v.producedAt || frame.producedAt;
    stats.views++;
  } catch (err) {
    message.textContent = `cannot decode the ${v.kind} view: ${String(err)}`;
  }
}

function onClockOffset(offsetS: number): void {
  live.clockOffsetS = offsetS;
  live.clockFromAcks = true;
}

function onConnection(state: rpc.ConnectionState, detail: string): void {
  if (stats.connection === state && !detail) return;
  stats.connection = state;
  conn.className = `conn conn-${state}`;
  conn.textContent = state === "connected" ? "live" : state;
  conn.title = detail;
}

const tuning: rpc.SubscribeOptions = { ...rpc.DEFAULT_SUBSCRIBE };
{
  // Tests shorten the reconnect timings through the URL (?stall_ms=&backoff_max_ms=).
  const q = new URLSearchParams(location.search);
  const num = (k: string) => (q.has(k) ? Number(q.get(k)) : NaN);
  if (num("stall_ms") > 0) tuning.stallMs = num("stall_ms");
  if (num("backoff_max_ms") > 0) tuning.backoffMaxMs = num("backoff_max_ms");
  if (num("max_fps") > 0) tuning.maxFps = num("max_fps");
  if (num("max_points") > 0) tuning.maxPoints = num("max_points");
}

function watch(runId: string): void {
  if (live.runId === runId) return;
  live.abort?.abort();
  Object.assign(live, {
    runId, status: null, serverStep: 0, pendingStep: 0, pendingProducedAt: 0, displayedStep: 0,
    lagS: 0, viewProducedAt: 0, statusLagS: 0, scalarStep: 0, pendingScalarStep: 0, arrivals: [], series: new Map(), view: null, nextView: null,
  });
  charts.clear();
  const abort = new AbortController();
  live.abort = abort;
  const run = runs.find((r) => r.runId === runId);
  $("#view-title").textContent = run ? `Live view — ${run.task} (${runId})` : `Live view — ${runId}`;
  renderParams();
  exportCsv.href = `/api/runs/${encodeURIComponent(runId)}/scalars.csv`;
  exportJson.href = `/api/runs/${encodeURIComponent(runId)}/scalars.json`;
  ["view", "badge", "runs", "controls"].forEach((w) => invalidate(w as "view"));
  const q = new URLSearchParams(location.search);
  q.set("run", runId);
  history.replaceState(null, "", `?${q}`);
  if (!stats.firstChartMs) stats.subscribedMs = performance.now();
  void rpc.followRun(runId, { frame: onFrame, state: onConnection, clockOffset: onClockOffset }, abort.signal, tuning);
}

// ------------------------------------------------------------------ runs & controls

const refreshRuns = rpc.singleFlight(async () => {
  try {
    runs = await rpc.listRuns(runFilter.value.trim());
    runs.sort((a, b) => b.createdAt - a.createdAt);
    if (runFilter.value.trim()) message.textContent = "";
    invalidate("runs");
    invalidate("controls");
    if (!live.runId) {
      const wanted = new URLSearchParams(location.search).get("run");
      // The page opens on the run named in the URL, else the longest-running live
      // run (the demo run `tensorwire up` starts first), else the newest run.
      const pick = runs.find((r) => r.runId === wanted)
        ?? runs.findLast((r) => r.state === RunState.RUNNING)
        ?? runs[0];
      if (pick) watch(pick.runId);
    }
  } catch (err) {
    if (runFilter.value.trim() && rpc.describeError(err).startsWith("InvalidArgument")) {
      message.textContent = `filter: ${rpc.describeError(err)}`;
      return;
    }
    onConnection(stats.connection === "connected" ? "connected" : "reconnecting", rpc.describeError(err));
  }
});
let filterTimer = 0;
runFilter.oninput = () => {
  clearTimeout(filterTimer);
  filterTimer = window.setTimeout(() => void refreshRuns(), 250);
};

let runsShown = "";
/** Runs ticked for comparison, in the order they were ticked (their colours). */
const selected: string[] = [];
let sortKey = "started";
let sortDesc = true;

type Column = { key: string; title: string; value: (r: Run) => number | string; text?: (r: Run) => string };

function columns(): Column[] {
  const now = Date.now() / 1000;
  const paramNames = [...new Set(runs.flatMap((r) => Object.keys(r.params)))].sort();
  const metricNames = [...new Set(runs.flatMap((r) => Object.keys(r.metrics)))]
    .sort((a, b) => (a === "loss" ? -1 : b === "loss" ? 1 : a.localeCompare(b)));
  const num = (v: number | undefined) => (v === undefined ? "" : fmtParam(v, Number.isInteger(v)));
  const duration = (r: Run) => (r.endedAt || (r.state === RunState.RUNNING ? now : r.updatedAt)) - r.createdAt;
  return [
    { key: "name", title: "name", value: (r) => r.name || r.task },
    { key: "task", title: "task", value: (r) => r.task },
    { key: "state", title: "state", value: (r) => RunState[r.state].toLowerCase() },
    { key: "step", title: "step", value: (r) => Number(r.step) },
    { key: "steps/s", title: "steps/s", value: (r) => r.stepsPerSecond,
      text: (r) => (r.stepsPerSecond > 0 ? r.stepsPerSecond.toFixed(0) : "") },
    { key: "started", title: "started", value: (r) => r.createdAt, text: (r) => fmtTime(r.createdAt) },
    { key: "duration", title: "duration", value: duration, text: (r) => fmtDuration(Math.max(0, duration(r))) },
    // The best value so far of each run's main metric (its task's: highest accuracy,
    // lowest loss...), from the trainer's stored history.
    { key: "best", title: "best metric", value: (r) => r.best?.value ?? NaN,
      text: (r) => (r.best ? `${r.best.name} ${fmtParam(r.best.value, false)}` : "") },
    ...metricNames.map((m): Column => ({ key: `m:${m}`, title: m, value: (r) => r.metrics[m] ?? NaN,
                                         text: (r) => num(r.metrics[m]) })),
    ...paramNames.map((p): Column => ({ key: `p:${p}`, title: p, value: (r) => r.params[p] ?? NaN,
                                        text: (r) => num(r.params[p]) })),
  ];
}

function fmtTime(unixS: number): string {
  const d = new Date(unixS * 1000);
  const sameDay = d.toDateString() === new Date().toDateString();
  return sameDay ? d.toLocaleTimeString([], { hour12: false }) : d.toLocaleDateString();
}

function sortedRuns(cols: Column[]): Run[] {
  const col = cols.find((c) => c.key === sortKey) ?? cols[5];
  const sign = sortDesc ? -1 : 1;
  return [...runs].sort((a, b) => {
    const x = col.value(a), y = col.value(b);
    if (typeof x === "number" && typeof y === "number") {
      if (Number.isNaN(x) || Number.isNaN(y)) return Number.isNaN(x) ? 1 : Number.isNaN(y) ? -1 : 0;
      return sign * (x - y);
    }
    return sign * String(x).localeCompare(String(y));
  });
}

function renderRuns(): void {
  const cols = columns();
  const key = [live.runId, sortKey, sortDesc, selected.join(","), cols.map((c) => c.key).join(","),
               runs.map((r) => `${r.runId}:${r.state}:${r.step}:${r.name}:${r.stepsPerSecond.toFixed(0)}:${r.best?.value}`).join(",")].join("|");
  if (key === runsShown) return;
  runsShown = key;
  compareBtn.disabled = selected.length < 1;
  clearBtn.disabled = selected.length < 1;
  const head = h("tr", {}, h("th", { className: "select" }));
  for (const c of cols) {
    const th = h("th", { textContent: c.title + (c.key === sortKey ? (sortDesc ? " ▾" : " ▴") : ""), title: `sort by ${c.title}` });
    th.dataset.key = c.key;
    if (c.key.startsWith("p:")) th.className = "param-col";
    th.onclick = () => {
      sortDesc = c.key === sortKey ? !sortDesc : c.key !== "name" && c.key !== "task";
      sortKey = c.key;
      invalidate("runs");
    };
    head.append(th);
  }
  const body = h("tbody");
  if (!runs.length) body.append(h("tr", { className: "empty" }, h("td", { colSpan: cols.length + 1, textContent: "no runs yet" })));
  for (const r of sortedRuns(cols)) {
    const box = h("input", { type: "checkbox", checked: selected.includes(r.runId), title: "select to compare" });
    box.onclick = (event) => event.stopPropagation();
    box.onchange = () => {
      const at = selected.indexOf(r.runId);
      if (box.checked && at < 0) selected.push(r.runId);
      if (!box.checked && at >= 0) selected.splice(at, 1);
      invalidate("runs");
      if (!compareCard.hidden) void showCompare();
    };
    const tr = h("tr", { className: r.runId === live.runId ? "active" : "", title: [r.runId, r.notes, r.tags.join(", ")].filter(Boolean).join(" · ") },
      h("td", { className: "select" }, box));
    for (const c of cols) {
      const td = h("td", { textContent: c.text ? c.text(r) : String(c.value(r)) });
      if (c.key === "name") td.className = "run-name";
      if (c.key === "best") td.className = "best";
      if (c.key === "state") {
        td.textContent = "";
        td.append(h("span", { className: `state state-${c.value(r)}`, textContent: String(c.value(r)) }));
      }
      tr.append(td);
    }
    tr.dataset.run = r.runId;
    tr.onclick = () => watch(r.runId);
    body.append(tr);
  }
  runTable.replaceChildren(h("thead", {}, head), body);
}

/** Overlay the selected runs' stored curves. */
async function showCompare(): Promise<void> {
  const chosen = selected.map((id) => runs.find((r) => r.runId === id)).filter((r): r is Run => !!r);
  if (!chosen.length) {
    compareCard.hidden = true;
    compare?.clear();
    return;
  }
  compareCard.hidden = false;
  compareTitle.textContent = `Compare ${chosen.length} run${chosen.length > 1 ? "s" : ""}`;
  try {
    compare ??= new CompareView(compareRoot);
    await compare.show(chosen, charts.options);
  } catch (err) {
    message.textContent = `compare: ${rpc.describeError(err)}`;
  }
}
compareBtn.onclick = () => void showCompare();
clearBtn.onclick = () => {
  selected.length = 0;
  invalidate("runs");
  void showCompare();
};

function currentState(): RunState {
  return live.status?.state || (runs.find((r) => r.runId === live.runId)?.state ?? RunState.UNSPECIFIED);
}

function renderControls(): void {
  const s = currentState();
  pauseBtn.disabled = s !== RunState.RUNNING;
  resumeBtn.disabled = !(s === RunState.PAUSED || s === RunState.INTERRUPTED);
  resumeBtn.title = s === RunState.INTERRUPTED ? "resume from the last checkpoint" : "";
  stopBtn.disabled = !(s === RunState.RUNNING || s === RunState.PAUSED || s === RunState.PENDING);
  deleteBtn.disabled = !live.runId || !stopBtn.disabled || s === RunState.UNSPECIFIED;
}

async function act(action: rpc.Control): Promise<void> {
  if (!live.runId) return;
  message.textContent = "";
  try {
    const wasInterrupted = currentState() === RunState.INTERRUPTED;
    const run = await rpc.controlRun(live.runId, action);
    if (run && live.status) live.status.state = run.state;
    if (run && action === "resume" && wasInterrupted) {
      // Resumed from its checkpoint: follow it afresh (history cut back to the checkpoint).
      const id = live.runId;
      live.runId = "";
      watch(id);
    }
    await refreshRuns();
  } catch (err) {
    message.textContent = rpc.describeError(err);
  }
}
pauseBtn.onclick = () => void act("pause");
resumeBtn.onclick = () => void act("resume");
stopBtn.onclick = () => void act("stop");
deleteBtn.onclick = async () => {
  const id = live.runId;
  if (!id || !window.confirm(`Delete run ${id}, its history and its models?`)) return;
  try {
    await rpc.deleteRun(id);
    live.abort?.abort();
    live.runId = "";
    charts.clear();
    message.textContent = `run ${id} deleted`;
    await refreshRuns();
  } catch (err) {
    message.textContent = rpc.describeError(err);
  }
};
smoothing.oninput = () => {
  const weight = Number(smoothing.value);
  smoothingOut.textContent = weight.toFixed(2);
  charts.setOptions({ smoothing: weight }, live.series);
  if (!compareCard.hidden) compare?.redraw(charts.options);
};
logScale.onchange = () => {
  charts.setOptions({ log: logScale.checked }, live.series);
  if (!compareCard.hidden) compare?.redraw(charts.options);
};

startBtn.onclick = async () => {
  const task = tasks.find((t) => t.name === taskSelect.value);
  if (!task) return;
  message.textContent = "";
  try {
    const steps = Number(maxSteps.value);
    const run = await rpc.startRun(task.name, Number.isFinite(steps) && maxSteps.value !== "" ? { max_steps: steps } : {},
      runName.value.trim());
    await refreshRuns();
    if (run) watch(run.runId);
  } catch (err) {
    message.textContent = rpc.describeError(err);
  }
};

// Live hyper-parameter controls: a slider per live parameter of the run's task.
const paramInputs = new Map<string, { range: HTMLInputElement; out: HTMLOutputElement; editing: number }>();
let pendingParams: Record<string, number> = {};
let paramTimer = 0;

function renderParams(): void {
  params.innerHTML = "";
  paramInputs.clear();
  const run = runs.find((r) => r.runId === live.runId);
  const task = tasks.find((t) => t.name === run?.task);
  if (!task) return;
  for (const p of task.params.filter((p) => p.live)) {
    const log = !p.integer && p.min > 0 && p.max / p.min >= 100;
    const toSlider = (v: number) => (log ? Math.log10(v) : v);
    const fromSlider = (v: number) => (log ? 10 ** v : v);
    const range = h("input", {
      type: "range",
      min: String(toSlider(p.min)),
      max: String(toSlider(p.max)),
      step: p.integer ? "1" : String((toSlider(p.max) - toSlider(p.min)) / 200),
      value: String(toSlider(run?.params[p.name] ?? p.defaultValue)),
      title: p.description,
    });
    range.dataset.param = p.name;
    const out = h("output", { textContent: fmtParam(fromSlider(Number(range.value)), p.integer) });
    const entry = { range, out, editing: 0 };
    range.oninput = () => {
      const value = p.integer ? Math.round(fromSlider(Number(range.value))) : fromSlider(Number(range.value));
      out.textContent = fmtParam(value, p.integer);
      entry.editing = performance.now();
      pendingParams[p.name] = value;
      clearTimeout(paramTimer);
      paramTimer = window.setTimeout(sendParams, 150);
    };
    paramInputs.set(p.name, entry);
    (range as HTMLInputElement & { fromValue?: (v: number) => number }).fromValue = toSlider;
    params.append(h("label", { className: "param" }, h("span", { textContent: p.name }), range, out));
  }
}

function fmtParam(v: number, integer: boolean): string {
  return integer ? String(Math.round(v)) : v >= 0.01 ? v.toPrecision(3) : v.toExponential(2);
}

async function sendParams(): Promise<void> {
  const changes = pendingParams;
  pendingParams = {};
  if (!live.runId || !Object.keys(changes).length) return;
  try {
    await rpc.updateParams(live.runId, changes);
    message.textContent = `updated ${Object.keys(changes).join(", ")}`;
  } catch (err) {
    message.textContent = rpc.describeError(err);
  }
}

/** Show the server's parameter values, except on a slider the user moved just now. */
function syncParamValues(values: Record<string, number>): void {
  for (const [name, entry] of paramInputs) {
    const v = values[name];
    if (v === undefined || performance.now() - entry.editing < 2000) continue;
    const toSlider = (entry.range as HTMLInputElement & { fromValue?: (v: number) => number }).fromValue;
    const value = String(toSlider ? toSlider(v) : v);
    if (entry.range.value !== value) entry.range.value = value;
    setText(entry.out, fmtParam(v, entry.range.step === "1"));
  }
}

// ------------------------------------------------------------------ boot

/** A run started from the page ends by itself unless asked not to (0 = never). */
const PAGE_MAX_STEPS = 20_000;

/** The new-run form's max_steps: the task's default when finite, else PAGE_MAX_STEPS. */
function syncMaxSteps(): void {
  const spec = tasks.find((t) => t.name === taskSelect.value)?.params.find((p) => p.name === "max_steps");
  maxSteps.value = String(spec?.defaultValue || PAGE_MAX_STEPS);
}
taskSelect.onchange = syncMaxSteps;

const loadTasks = rpc.singleFlight(async () => {
  try {
    tasks = await rpc.listTasks();
    taskSelect.innerHTML = "";
    for (const t of tasks) taskSelect.append(h("option", { value: t.name, textContent: t.title || t.name, title: t.description }));
    syncMaxSteps();
    message.textContent = "";
  } catch (err) {
    message.textContent = `cannot list tasks: ${rpc.describeError(err)}`;
  }
});

async function boot(): Promise<void> {
  // The link's speed as the first screen measured it decides what a slow link waits for.
  stats.firstScreenBytesPerS = firstScreenBytesPerS();
  stats.slowLink = stats.firstScreenBytesPerS < SLOW_LINK_BYTES_PER_S;
  if (stats.slowLink && !tuning.maxPoints) tuning.maxPoints = SLOW_LINK_MAX_POINTS;
  // The run list first: it picks the run to watch, and the stream starts; the tasks
  // (the new-run form, 2.6 KB) after it, not beside it on a slow link. (Loaded a few
  // seconds after the first view instead, on a 32 kbit/s link: the steady view lag
  // p95 went from 0.69-0.74 s to 1.41-1.65 s, cause not found; reverted.)
  await refreshRuns();
  await loadTasks();
  offerInference();
  renderParams();
  invalidate("view");
  invalidate("controls");
  // The run list is small; refresh it now and then for runs started elsewhere
  // (every 5 s; every 30 s on a slow link, where each answer shares the link with
  // the live stream's frames and the streamer cannot see it), every second
  // while no run is shown yet (the demo run may still be starting).
  let tick = 0;
  setInterval(() => {
    tick++;
    if (!tasks.length) void loadTasks();
    if (!live.runId || tick % (stats.slowLink ? 30 : 5) === 0) void refreshRuns();
  }, 1000);
}

void boot();
