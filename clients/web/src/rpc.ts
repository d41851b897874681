// All RPC code of the app: the gRPC-Web transport, the trainer and streamer
// clients, and the live subscription with reconnect and backoff (the inference
// calls are in inference-rpc.ts, loaded with the inference panel, on this transport).
// UI modules call these functions and never touch a transport or a stub.
import type { DescService } from "@bufbuild/protobuf";
import { type Client, Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { type Array as PackedArray, Codec, type ScalarSeries } from "./gen/tensorwire/common/v1/common_pb";
import { type Frame, StreamerService } from "./gen/tensorwire/streamer/v1/streamer_pb";
import { type Run, type TaskInfo, TrainerService } from "./gen/tensorwire/trainer/v1/trainer_pb";

// The access token: `tensorwire up` prints the page URL with `#token=...`. It is
// read once, kept in this tab's sessionStorage and removed from the address bar
// (a fragment never reaches a server, logs or a Referer header).
const TOKEN_KEY = "tensorwire.token";

function takeToken(): string | null {
  const match = /(?:^#|&)token=([^&]+)/.exec(window.location.hash);
  if (match) {
    const token = decodeURIComponent(match[1]);
    try { sessionStorage.setItem(TOKEN_KEY, token); } catch { /* storage off: memory only */ }
    history.replaceState(null, "", window.location.pathname + window.location.search);
    return token;
  }
  try { return sessionStorage.getItem(TOKEN_KEY); } catch { return null; }
}

const token = takeToken();

const bearer: Interceptor = (next) => async (req) => {
  if (token) req.header.set("authorization", `Bearer ${token}`);
  return next(req);
};

const transport = createGrpcWebTransport({
  baseUrl: window.location.origin,
  useBinaryFormat: true,
  interceptors: [bearer],
});
// Sent on Subscribe and Ack: a proxy in front of several streamer replicas
// (deploy/envoy/envoy.yaml hashes on it) sends a page's acks to the replica
// that serves its stream.
const AFFINITY = { "x-tensorwire-affinity": Math.random().toString(36).slice(2) };

const trainer = createClient(TrainerService, transport);
const streamer = createClient(StreamerService, transport);

/** A client of ``service`` on the page's transport (token, binary gRPC-Web). */
export function clientFor<T extends DescService>(service: T): Client<T> {
  return createClient(service, transport);
}

export const CONTROL_TIMEOUT_MS = 5000;

/**
 * ``call`` made one at a time: a call asked for while one is in flight runs once
 * after it (however many were asked for meanwhile; each caller's promise settles when
 * that next call has), never beside it. The page's periodic refreshes on a slow link
 * (each longer than its period) otherwise stacked up to ten calls, the browser's six
 * HTTP/1.1 connections to the gateway filled, and acks waited seconds for one (their
 * views held meanwhile).
 */
export function singleFlight(call: () => Promise<void>): () => Promise<void> {
  let running: Promise<void> | null = null;
  let next: Promise<void> | null = null;
  const start = (): Promise<void> => {
    running = call().finally(() => {
      running = null;
    });
    return running;
  };
  return () => {
    if (!running) return start();
    const after = () => {
      next = null;
      return start();
    };
    next ??= running.then(after, after);
    return next;
  };
}

/** A failed call, in words a person can act on. */
/** Download a run's scalar history (CSV or JSON) with this tab's token: a plain
 *  link could not carry the Authorization header. */
export async function downloadScalars(runId: string, fmt: "csv" | "json"): Promise<void> {
  const url = `/api/runs/${encodeURIComponent(runId)}/scalars.${fmt}`;
  const reply = await fetch(url, { headers: token ? { authorization: `Bearer ${token}` } : {} });
  if (!reply.ok) throw new Error(`export failed: ${reply.status} ${await reply.text()}`);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await reply.blob());
  link.download = `run-${runId}-scalars.${fmt}`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

export function describeError(err: unknown): string {
  const e = ConnectError.from(err);
  return `${Code[e.code] ?? e.code}: ${e.rawMessage}`;
}

// ---------------------------------------------------------------- trainer

export async function listTasks(): Promise<TaskInfo[]> {
  return (await trainer.listTasks({}, { timeoutMs: CONTROL_TIMEOUT_MS })).tasks;
}

/** The newest runs (one page of the stored runs), optionally filtered: a word is
 *  searched in names, tags and notes; `state = RUNNING`, `task = "spiral"`,
 *  `tags:"best"` (AIP-160) are passed as they are. */
export async function listRuns(filter = ""): Promise<Run[]> {
  const reply = await trainer.listRuns(
    { pageSize: 200, orderBy: "created_at desc", filter },
    { timeoutMs: CONTROL_TIMEOUT_MS },
  );
  return reply.runs;
}

/** A run's stored scalar history, each series in at most ``maxPoints`` buckets
 *  (min/mean/max over equal step spans; raw points when there are few). */
export async function runScalars(runId: string, maxPoints: number): Promise<ScalarSeries[]> {
  const reply = await trainer.getRunScalars({ runId, maxPoints }, { timeoutMs: CONTROL_TIMEOUT_MS });
  return reply.scalars?.series ?? [];
}

export async function startRun(task: string, params: Record<string, number>, name = ""): Promise<Run | undefined> {
  return (await trainer.startRun({ task, params, name }, { timeoutMs: CONTROL_TIMEOUT_MS })).run;
}

export async function deleteRun(runId: string): Promise<void> {
  await trainer.deleteRun({ runId }, { timeoutMs: CONTROL_TIMEOUT_MS });
}

export type Control = "pause" | "resume" | "stop";

export async function controlRun(runId: string, action: Control): Promise<Run | undefined> {
  const opts = { timeoutMs: CONTROL_TIMEOUT_MS };
  switch (action) {
    case "pause":
      return (await trainer.pauseRun({ runId }, opts)).run;
    case "resume":
      return (await trainer.resumeRun({ runId }, opts)).run;
    case "stop":
      return (await trainer.stopRun({ runId }, opts)).run;
  }
}

export async function updateParams(runId: string, params: Record<string, number>): Promise<Run | undefined> {
  return (await trainer.updateRun({ runId, params }, { timeoutMs: CONTROL_TIMEOUT_MS })).run;
}

// ---------------------------------------------------------------- streamer

export type ConnectionState = "connecting" | "connected" | "reconnecting" | "offline";

export interface SubscriptionHandlers {
  frame(frame: Frame, receivedAt: number): void;
  state(state: ConnectionState, detail: string): void;
  /** This clock minus the streamer's, seconds, whenever acks have measured it. */
  clockOffset?(offsetS: number): void;
}

/**
 * This clock minus the streamer's, from bounds (as tensorwire/live.py): a frame
 * arrived after the streamer stamped it (`sentAt`), and an ack was answered
 * after it left and before its answer came back. A round trip's midpoint (NTP)
 * would be biased on a link whose directions differ (a slow download: the
 * answer waits behind frames); the tightest bounds are each tight on a fast
 * direction, and the estimate is the middle of the interval they leave.
 */
export class ClockOffset {
  // Bounds on (streamer clock - this clock), newest 64 of each.
  private low: number[] = [];
  private high: number[] = [];

  fromFrame(sentAt: number, receivedAt: number): void {
    if (sentAt) push(this.low, sentAt - receivedAt);
  }

  fromAck(sent: number, serverTime: number, back: number): void {
    push(this.high, serverTime - sent);
    push(this.low, serverTime - back);
  }

  /** This clock minus the streamer's, seconds (null until an ack answered). */
  get offsetS(): number | null {
    if (!this.high.length || !this.low.length) return null;
    return -(Math.max(...this.low) + Math.min(...this.high)) / 2;
  }
}

function push(values: number[], value: number): void {
  values.push(value);
  if (values.length > 64) values.shift();
}

/** Acks answered since the page loaded (all subscriptions; for tests and the curious). */
export const feedback = { acks: 0 };

const ACK_STOP = new Set([Code.NotFound, Code.Unimplemented, Code.PermissionDenied, Code.Unauthenticated]);

/**
 * Delivery feedback for one subscription (the same policy as tensorwire/live.py):
 * a view is acknowledged at once, other frames at most every `intervalMs`; acks
 * do not wait for answers (those come back behind the frames on the slow
 * direction), at most `maxOutstanding` at once. The streamer then keeps at most
 * about one view in flight, so what arrives is fresh whatever the link holds.
 * Each answer carries the streamer's clock: with the frames' `sentAt` it bounds
 * the clock offset (ClockOffset) that makes the lag badge true.
 */
/** The arrays of the last view of each name on one stream: the streamer sends an
 * array that did not change since (a task's dataset) as `unchanged`, without its
 * bytes (SubscribeRequest.reuseArrays), and this puts the held one back. */
export class HeldArrays {
  private readonly views = new Map<string, Map<string, PackedArray>>();

  fill(frame: Frame): void {
    if (frame.body.case !== "view") return;
    const view = frame.body.value;
    const key = view.name || view.kind;
    const held = this.views.get(key);
    const arrays = view.arrays.map((a) => {
      if (!a.unchanged) return a;
      const kept = held?.get(a.name);
      if (!kept) throw new Error(`view ${key}: the streamer named array ${a.name} unchanged, but it was never sent`);
      return kept;
    });
    view.arrays = arrays;
    this.views.set(key, new Map(arrays.map((a) => [a.name, a])));
  }
}

export class Acker {
  acks = 0;
  private subscriptionId = "";
  private seq = 0n;
  private receivedAt = 0;
  private lastSentMs = -Infinity;
  private outstanding = 0;
  private timer = 0;
  private stopped = false;
  readonly clock = new ClockOffset();

  constructor(
    private readonly runId: string,
    private readonly signal: AbortSignal,
    private readonly onOffset?: (offsetS: number) => void,
    private readonly intervalMs = 500,
    // Browsers open at most 6 HTTP/1.1 connections per origin and each unary call
    // holds one until its answer: leave room for the stream and the controls.
    private readonly maxOutstanding = 2,
  ) {}

  received(frame: Frame, receivedAt: number): void {
    if (frame.subscriptionId) this.subscriptionId = frame.subscriptionId;
    this.clock.fromFrame(frame.sentAt, receivedAt);
    if (!frame.seq || !this.subscriptionId || this.stopped) return;
    this.seq = frame.seq;
    this.receivedAt = receivedAt;
    const wait = this.lastSentMs + this.intervalMs - performance.now();
    if (frame.body.case === "view" || wait <= 0) this.send();
    else if (!this.timer) this.timer = window.setTimeout(() => this.send(), wait);
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
  }

  private send(): void {
    clearTimeout(this.timer);
    this.timer = 0;
    if (this.stopped || this.signal.aborted) return;
    if (this.outstanding >= this.maxOutstanding) {
      this.timer = window.setTimeout(() => this.send(), this.intervalMs);
      return;
    }
    this.lastSentMs = performance.now();
    this.outstanding++;
    const sent = Date.now() / 1000;
    streamer
      .ack(
        { subscriptionId: this.subscriptionId, runId: this.runId, seq: this.seq, receivedAt: this.receivedAt },
        { signal: this.signal, timeoutMs: CONTROL_TIMEOUT_MS, headers: AFFINITY },
      )
      .then((reply) => {
        this.acks++;
        feedback.acks++;
        const back = Date.now() / 1000;
        if (reply.serverTime > 0) {
          this.clock.fromAck(sent, reply.serverTime, back);
          const offset = this.clock.offsetS;
          if (offset !== null) this.onOffset?.(offset);
        }
      })
      .catch((err) => {
        if (ACK_STOP.has(ConnectError.from(err).code)) this.stop();
      })
      .finally(() => {
        this.outstanding--;
      });
  }
}

/** Tunables of the live subscription (tests shorten them through the URL). */
export interface SubscribeOptions {
  maxFps: number;
  /** Points per series in scalar frames and twice that in the snapshot's history
   *  (0: the streamer's default, 64). */
  maxPoints: number;
  /** A stream silent this long is presumed dead and re-opened (the streamer sends
   *  status frames every second even when nothing changes). */
  stallMs: number;
  backoffStartMs: number;
  backoffMaxMs: number;
  /** After this many failed attempts in a row the indicator says offline. */
  offlineAfter: number;
}

export const DEFAULT_SUBSCRIBE: SubscribeOptions = {
  maxFps: 20,
  maxPoints: 0,
  stallMs: 5000,
  backoffStartMs: 250,
  backoffMaxMs: 5000,
  offlineAfter: 4,
};

/**
 * Follow one run's live frames until `signal` aborts: reconnects by itself with
 * exponential backoff and jitter, re-opens a stalled stream, reports the
 * connection state. Each (re)connect starts with the streamer's snapshot.
 */
export async function followRun(
  runId: string,
  handlers: SubscriptionHandlers,
  signal: AbortSignal,
  options: SubscribeOptions = DEFAULT_SUBSCRIBE,
): Promise<void> {
  let failures = 0;
  while (!signal.aborted) {
    handlers.state(failures === 0 ? "connecting" : failures >= options.offlineAfter ? "offline" : "reconnecting",
      failures ? `attempt ${failures + 1}` : "");
    const attempt = new AbortController();
    const onAbort = () => attempt.abort();
    signal.addEventListener("abort", onAbort);
    let stall = 0;
    let acker: Acker | null = null;
    const arm = () => {
      clearTimeout(stall);
      stall = window.setTimeout(() => attempt.abort(new Error("stream stalled")), options.stallMs);
    };
    try {
      arm();
      const stream = streamer.subscribe(
        { runId, maxFps: options.maxFps, maxPoints: options.maxPoints, acceptCodecs: [Codec.DEFLATE],
          reuseArrays: true, acks: true },
        { signal: attempt.signal, headers: AFFINITY },
      );
      acker = new Acker(runId, attempt.signal, handlers.clockOffset);
      const held = new HeldArrays();
      for await (const frame of stream) {
        arm();
        acker.received(frame, Date.now() / 1000);
        held.fill(frame);
        if (failures !== 0 || frame.snapshot) {
          failures = 0;
        }
        handlers.state("connected", "");
        handlers.frame(frame, Date.now() / 1000);
      }
      // The server ended the stream (run over, or a streamer shutting down): re-open.
      failures = Math.max(failures, 1);
    } catch (err) {
      if (signal.aborted) break;
      failures += 1;
      const e = ConnectError.from(err);
      if (e.code === Code.NotFound) {
        handlers.state("offline", `run ${runId}: ${e.rawMessage}`);
      } else {
        handlers.state(failures >= options.offlineAfter ? "offline" : "reconnecting", describeError(err));
      }
    } finally {
      clearTimeout(stall);
      acker?.stop();
      signal.removeEventListener("abort", onAbort);
      attempt.abort();
    }
    if (signal.aborted) break;
    const base = Math.min(options.backoffMaxMs, options.backoffStartMs * 2 ** Math.max(0, failures - 1));
    await sleep(base * (0.5 + Math.random() / 2), signal);
  }
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done);
  });
}
