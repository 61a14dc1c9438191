// The benchmark's Node client, run as its own process (its CPU is not the
// proxies'), one process per measurement so that nothing (TLS sessions, pooled
// sockets) carries over. It does the same work for every contender; only the
// way into the tunnel differs:
//   direct  TCP to the target
//   http    TCP to the proxy, "CONNECT host:port" (HTTPS) or an absolute-form
//           request line (plain HTTP)
//   socks5  TCP to ss-local, SOCKS5 greeting (no auth) + CONNECT with an IPv4
//           address, then the same bytes as direct
// HTTP/1.1 is written and parsed by hand (no http module, no pooling), TLS is
// node:tls with full handshakes (no session reuse), verified against the test CA.
//
//   node scripts/bench/client.ts '<json ClientJob>'   → one JSON line on stdout
//
// Mode "hold" (scripts/bench/scale.ts) talks with its parent while it runs:
// it prints a JSON line after each phase and waits for the next command line
// on stdin ("measure", then "close"), so that the parent can read the
// proxy's memory while every tunnel is open.
import { readFileSync } from "node:fs";
import net from "node:net";
import { createInterface } from "node:readline";
import tls from "node:tls";
import type { Duplex } from "node:stream";
import { PATTERN } from "./pattern.ts";

export type ViaKind = "direct" | "http" | "socks5";
export interface Via {
  kind: ViaKind;
  /** The proxy's address and port (not for direct); host defaults to 127.0.0.1. */
  host?: string;
  port?: number;
}
export interface ClientJob {
  mode: "rtt" | "ttfb" | "concurrent" | "rps" | "hold";
  via: Via;
  host: string;
  httpPort: number;
  httpsPort: number;
  caFile: string;
  /** rtt, ttfb: sequential requests; concurrent: tunnels at once; rps: connections. */
  count: number;
  /** concurrent: body size of each download. */
  bytes?: number;
  /** rps: how long to run. */
  seconds?: number;
  /** hold: at most this many tunnels being opened at once (default 10). */
  window?: number;
  /** hold: how many of the open tunnels get a sequential round trip (default all). */
  sample?: number;
  /** Per operation (one request / one tunnel). */
  timeoutMs: number;
  /** The whole job; the client prints what it has and exits after this. */
  deadlineMs: number;
}

const now = (): number => performance.now();

class OpError extends Error {
  readonly stage: string;
  constructor(stage: string, message: string) {
    super(`${stage}: ${message}`);
    this.stage = stage;
  }
}

/** Resolves when `parse` finds a complete message in what `socket` sent; leftovers are unshifted. */
function readMessage<T>(socket: net.Socket, stage: string, parse: (buf: Buffer) => { value: T; used: number } | undefined): Promise<T> {
  return new Promise((resolve, reject) => {
    let buf: Buffer = Buffer.alloc(0);
    const cleanup = (): void => {
      socket.off("readable", onReadable);
      socket.off("error", onError);
      socket.off("end", onEnd);
    };
    const onError = (err: Error): void => {
      cleanup();
      reject(new OpError(stage, (err as NodeJS.ErrnoException).code ?? err.message));
    };
    const onEnd = (): void => {
      cleanup();
      reject(new OpError(stage, `connection closed after ${buf.length} bytes`));
    };
    const onReadable = (): void => {
      let chunk: Buffer | null;
      while ((chunk = socket.read() as Buffer | null) !== null) {
        buf = buf.length ? Buffer.concat([buf, chunk]) : chunk;
        const r = parse(buf);
        if (r) {
          cleanup();
          if (r.used < buf.length) socket.unshift(buf.subarray(r.used));
          resolve(r.value);
          return;
        }
        if (buf.length > 65536) {
          cleanup();
          reject(new OpError(stage, "reply too long"));
          return;
        }
      }
    };
    socket.on("readable", onReadable);
    socket.on("error", onError);
    socket.on("end", onEnd);
    onReadable();
  });
}

function tcpConnect(port: number, host: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host, port, noDelay: true });
    const onError = (err: NodeJS.ErrnoException): void => reject(new OpError("tcp", err.code ?? err.message));
    s.once("error", onError);
    s.once("connect", () => {
      s.off("error", onError);
      resolve(s);
    });
  });
}

export interface Timings {
  /** TCP connected (to the proxy, or to the target for direct). */
  tcp: number;
  /** Tunnel ready: CONNECT answered / SOCKS5 reply; equals tcp for direct. */
  tunnel: number;
}

/** A byte stream to host:port through `via`, ready for TLS or HTTP. */
async function openStream(via: Via, host: string, port: number, t0: number, timings?: Timings): Promise<net.Socket> {
  if (via.kind === "direct") {
    const s = await tcpConnect(port, host);
    if (timings) timings.tcp = timings.tunnel = now() - t0;
    return s;
  }
  const s = await tcpConnect(via.port!, via.host ?? "127.0.0.1");
  if (timings) timings.tcp = now() - t0;
  try {
    if (via.kind === "http") {
      s.write(`CONNECT ${host}:${port} HTTP/1.1\r\nHost: ${host}:${port}\r\n\r\n`);
      const status = await readMessage(s, "connect", (buf) => {
        const end = buf.indexOf("\r\n\r\n");
        if (end < 0) return undefined;
        return { value: Number(/^HTTP\/1\.[01] (\d{3})/.exec(buf.subarray(0, end).toString("latin1"))?.[1] ?? 0), used: end + 4 };
      });
      if (status !== 200) throw new OpError("connect", `proxy answered ${status}`);
    } else {
      s.write(Buffer.from([5, 1, 0]));
      const method = await readMessage(s, "socks-greeting", (buf) => (buf.length >= 2 ? { value: buf[1], used: 2 } : undefined));
      if (method !== 0) throw new OpError("socks-greeting", `method ${method}`);
      const ip = net.isIPv4(host) ? host.split(".").map(Number) : undefined;
      if (!ip) throw new OpError("socks-connect", "only IPv4 targets are used");
      s.write(Buffer.from([5, 1, 0, 1, ...ip, port >> 8, port & 255]));
      const rep = await readMessage(s, "socks-connect", (buf) => {
        if (buf.length < 5) return undefined;
        const len = buf[3] === 1 ? 10 : buf[3] === 4 ? 22 : 7 + buf[4];
        return buf.length >= len ? { value: buf[1], used: len } : undefined;
      });
      if (rep !== 0) throw new OpError("socks-connect", `reply ${rep}`);
    }
  } catch (err) {
    s.destroy();
    throw err;
  }
  if (timings) timings.tunnel = now() - t0;
  return s;
}

let caPem: Buffer | undefined;

function tlsOver(raw: net.Socket, host: string, caFile: string): Promise<tls.TLSSocket> {
  caPem ??= readFileSync(caFile);
  return new Promise((resolve, reject) => {
    const s = tls.connect({ socket: raw, host, servername: net.isIP(host) ? undefined : host, ca: caPem, ALPNProtocols: ["http/1.1"] });
    const onError = (err: NodeJS.ErrnoException): void => {
      s.destroy();
      reject(new OpError("tls", err.code ?? err.message));
    };
    s.once("error", onError);
    s.once("secureConnect", () => {
      s.off("error", onError);
      resolve(s);
    });
  });
}

interface Response {
  status: number;
  bodyBytes: number;
  firstByteAt: number;
  /** Body compared with the pattern (only when asked); false at the first mismatch. */
  contentOk: boolean;
  closeAfter: boolean;
}

/**
 * Reads one HTTP/1.1 response with a Content-Length body from `s`. Bytes past
 * the body (none without pipelining) are an error.
 */
function readResponse(s: Duplex, stage: string, checkPattern: boolean): Promise<Response> {
  return new Promise((resolve, reject) => {
    let head: Buffer | undefined = Buffer.alloc(0) as Buffer;
    let firstByteAt = 0;
    let status = 0;
    let length = -1;
    let got = 0;
    let contentOk = true;
    let closeAfter = false;
    const cleanup = (): void => {
      s.off("data", onData);
      s.off("error", onError);
      s.off("end", onEnd);
      s.off("close", onEnd);
    };
    const done = (): void => {
      cleanup();
      resolve({ status, bodyBytes: got, firstByteAt, contentOk, closeAfter });
    };
    const onError = (err: NodeJS.ErrnoException): void => {
      cleanup();
      reject(new OpError(stage, err.code ?? err.message));
    };
    const onEnd = (): void => {
      cleanup();
      reject(new OpError(stage, head ? `closed before the response head (${head.length} bytes)` : `closed after ${got} of ${length} body bytes`));
    };
    const body = (chunk: Buffer): void => {
      if (checkPattern && contentOk) {
        let off = 0;
        while (off < chunk.length) {
          const p = (got + off) % PATTERN.length;
          const n = Math.min(chunk.length - off, PATTERN.length - p);
          if (!chunk.subarray(off, off + n).equals(PATTERN.subarray(p, p + n))) {
            contentOk = false;
            break;
          }
          off += n;
        }
      }
      got += chunk.length;
    };
    const onData = (chunk: Buffer): void => {
      if (!firstByteAt) firstByteAt = now();
      if (head) {
        head = head.length ? Buffer.concat([head, chunk]) : chunk;
        const end = head.indexOf("\r\n\r\n");
        if (end < 0) {
          if (head.length > 65536) onError(Object.assign(new Error("response head too long")));
          return;
        }
        const text = head.subarray(0, end).toString("latin1");
        status = Number(/^HTTP\/1\.[01] (\d{3})/.exec(text)?.[1] ?? 0);
        const cl = /\r\ncontent-length:\s*(\d+)/i.exec(text);
        if (!cl) {
          onError(new Error(`status ${status}, no Content-Length`));
          return;
        }
        length = Number(cl[1]);
        closeAfter = /\r\nconnection:\s*close/i.test(text);
        const rest = head.subarray(end + 4);
        head = undefined;
        if (rest.length) body(rest);
      } else {
        body(chunk);
      }
      if (got > length) onError(new Error(`${got - length} bytes past the body`));
      else if (got === length) done();
    };
    s.on("data", onData);
    s.on("error", onError);
    s.on("end", onEnd);
    s.on("close", onEnd);
  });
}

function withTimeout<T>(p: Promise<T>, ms: number, stage: string, onTimeout: () => void): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    p,
    new Promise<T>((_, reject) => {
      timer = setTimeout(() => {
        onTimeout();
        reject(new OpError(stage, `timed out after ${ms} ms`));
      }, ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

interface Failure {
  stage: string;
  message: string;
}
const failureOf = (err: unknown): Failure => ({ stage: err instanceof OpError ? err.stage : "other", message: (err as Error).message });

/** One HTTPS GET on a fresh tunnel; times from before the first TCP connect. */
async function httpsGet(job: ClientJob, path: string, checkPattern: boolean): Promise<{ timings: Timings & { tls: number; firstByte: number; total: number }; res: Response }> {
  const sockets: Duplex[] = [];
  const run = async () => {
    const t0 = now();
    const timings = { tcp: 0, tunnel: 0, tls: 0, firstByte: 0, total: 0 };
    const raw = await openStream(job.via, job.host, job.httpsPort, t0, timings);
    sockets.push(raw);
    // node:tls takes over the socket's handle: bytes already buffered would be lost.
    if (raw.readableLength > 0) throw new OpError("tunnel", "unexpected bytes after the tunnel reply");
    const s = await tlsOver(raw, job.host, job.caFile);
    sockets.push(s);
    timings.tls = now() - t0;
    s.write(`GET ${path} HTTP/1.1\r\nHost: ${job.host}:${job.httpsPort}\r\nConnection: close\r\n\r\n`);
    const res = await readResponse(s, "response", checkPattern);
    timings.firstByte = res.firstByteAt - t0;
    timings.total = now() - t0;
    s.destroy();
    return { timings, res };
  };
  try {
    return await withTimeout(run(), job.timeoutMs, "request", () => sockets.forEach((s) => s.destroy()));
  } finally {
    for (const s of sockets) s.destroy();
  }
}

async function rtt(job: ClientJob) {
  const samples: number[] = [];
  const failures: Failure[] = [];
  const stop = now() + job.deadlineMs;
  for (let i = 0; i < job.count && now() < stop; i++) {
    const t0 = now();
    try {
      const s = await withTimeout(tcpConnect(job.httpPort, job.host), job.timeoutMs, "tcp", () => {});
      samples.push(now() - t0);
      s.destroy();
    } catch (err) {
      failures.push(failureOf(err));
    }
  }
  return { samplesMs: samples, failures };
}

async function ttfb(job: ClientJob) {
  const samples: Array<Timings & { tls: number; firstByte: number; total: number }> = [];
  const failures: Failure[] = [];
  const stop = now() + job.deadlineMs;
  for (let i = 0; i < job.count && now() < stop; i++) {
    try {
      const { timings, res } = await httpsGet(job, "/small", false);
      if (res.status !== 200) failures.push({ stage: "response", message: `status ${res.status}` });
      else samples.push(timings);
    } catch (err) {
      failures.push(failureOf(err));
    }
  }
  return { samples, failures };
}

async function concurrent(job: ClientJob) {
  const bytes = job.bytes ?? 1024 * 1024;
  const t0 = now();
  const results = await Promise.all(
    Array.from({ length: job.count }, async () => {
      try {
        const { timings, res } = await httpsGet(job, `/bytes/${bytes}`, true);
        if (res.status !== 200) return { ok: false as const, failure: { stage: "response", message: `status ${res.status}` } };
        if (res.bodyBytes !== bytes || !res.contentOk) return { ok: false as const, failure: { stage: "response", message: `wrong body (${res.bodyBytes} bytes, content ${res.contentOk ? "ok" : "differs"})` } };
        return { ok: true as const, ms: timings.total, firstByteMs: timings.firstByte };
      } catch (err) {
        return { ok: false as const, failure: failureOf(err) };
      }
    }),
  );
  const totalMs = now() - t0;
  const ok = results.filter((r) => r.ok);
  return {
    totalMs,
    ok: ok.length,
    failed: results.length - ok.length,
    failures: results.flatMap((r) => (r.ok ? [] : [r.failure])),
    tunnelMs: ok.map((r) => r.ms),
    firstByteMs: ok.map((r) => r.firstByteMs),
    bytes: ok.length * bytes,
  };
}

async function rps(job: ClientJob) {
  const seconds = job.seconds ?? 5;
  const target = `${job.host}:${job.httpPort}`;
  const request = Buffer.from(`GET ${job.via.kind === "http" ? `http://${target}` : ""}/small HTTP/1.1\r\nHost: ${target}\r\n\r\n`);
  const latencies: number[] = [];
  const failures: Failure[] = [];
  let completed = 0;
  let connections = 0;
  const t0 = now();
  const end = t0 + seconds * 1000;
  const worker = async (): Promise<void> => {
    let s: net.Socket | undefined;
    while (now() < end) {
      try {
        if (!s) {
          // A plain-HTTP proxy gets the absolute-form request on its own port;
          // SOCKS5 and direct carry origin-form requests to the target.
          s = job.via.kind === "http" ? await tcpConnect(job.via.port!, job.via.host ?? "127.0.0.1") : await openStream(job.via, job.host, job.httpPort, now());
          connections++;
        }
        const conn = s;
        const start = now();
        conn.write(request);
        const res = await withTimeout(readResponse(conn, "response", false), job.timeoutMs, "response", () => conn.destroy());
        if (res.status !== 200) throw new OpError("response", `status ${res.status}`);
        latencies.push(now() - start);
        completed++;
        if (res.closeAfter) {
          conn.destroy();
          s = undefined;
        }
      } catch (err) {
        failures.push(failureOf(err));
        s?.destroy();
        s = undefined;
        if (failures.length > 10_000) return;
      }
    }
    s?.destroy();
  };
  await Promise.all(Array.from({ length: job.count }, worker));
  const ms = now() - t0;
  latencies.sort((a, b) => a - b);
  const q = (p: number): number | null => (latencies.length ? latencies[Math.min(latencies.length - 1, Math.floor(p * latencies.length))] : null);
  return { completed, seconds: ms / 1000, rps: completed / (ms / 1000), connections, latencyMs: { p50: q(0.5), p90: q(0.9), p99: q(0.99) }, failures: failures.slice(0, 50), failureCount: failures.length };
}

interface Held {
  socket: tls.TLSSocket;
  /** Closed or failed before the client closed it. */
  lostEarly?: string;
}

/** GET /small on an open keep-alive TLS connection; ms from the write to the whole response. */
async function roundTrip(s: tls.TLSSocket, job: ClientJob, stage: string): Promise<number> {
  const t0 = now();
  s.write(`GET /small HTTP/1.1\r\nHost: ${job.host}:${job.httpsPort}\r\n\r\n`);
  const res = await withTimeout(readResponse(s, stage, false), job.timeoutMs, stage, () => s.destroy());
  if (res.status !== 200) throw new OpError(stage, `status ${res.status}`);
  if (res.closeAfter) throw new OpError(stage, "the target closes the connection");
  return now() - t0;
}

/** A tunnel with TLS to the target and one request done on it, left open. */
async function openHeld(job: ClientJob, closing: { now: boolean }): Promise<{ held: Held; setupMs: number; tlsMs: number; firstRequestMs: number }> {
  const sockets: Duplex[] = [];
  const run = async () => {
    const t0 = now();
    const timings: Timings = { tcp: 0, tunnel: 0 };
    const raw = await openStream(job.via, job.host, job.httpsPort, t0, timings);
    sockets.push(raw);
    if (raw.readableLength > 0) throw new OpError("tunnel", "unexpected bytes after the tunnel reply");
    const s = await tlsOver(raw, job.host, job.caFile);
    sockets.push(s);
    const tlsMs = now() - t0 - timings.tunnel;
    const held: Held = { socket: s };
    // Kept for the tunnel's whole life: an error on an idle socket would
    // otherwise end this process.
    s.on("error", (err: NodeJS.ErrnoException) => {
      if (!closing.now) held.lostEarly ??= `error ${err.code ?? err.message}`;
    });
    s.on("close", () => {
      if (!closing.now) held.lostEarly ??= "closed";
    });
    const firstRequestMs = await roundTrip(s, job, "first-request");
    // CONNECT written (right after the TCP connect) to "200" read.
    return { held, setupMs: timings.tunnel - timings.tcp, tlsMs, firstRequestMs };
  };
  try {
    return await withTimeout(run(), job.timeoutMs, "open", () => sockets.forEach((s) => s.destroy()));
  } catch (err) {
    for (const s of sockets) s.destroy();
    throw err;
  }
}

async function hold(job: ClientJob) {
  const emit = (o: object): void => void process.stdout.write(`${JSON.stringify(o)}\n`);
  const lines = createInterface({ input: process.stdin });
  const waiting: Array<(line: string) => void> = [];
  lines.on("line", (l) => waiting.shift()?.(l.trim()));
  // The parent is gone: nothing will ask for the next phase.
  lines.on("close", () => process.exit(4));
  const command = (): Promise<string> => new Promise((resolve) => waiting.push(resolve));
  const round = (xs: number[]): number[] => xs.map((x) => Math.round(x * 1000) / 1000);
  const stop = now() + job.deadlineMs;
  const closing = { now: false };

  // Open: a window of tunnels in flight, so that setup latency measures the
  // cost of one tunnel with the others open, not a queue of N handshakes.
  const held: Held[] = [];
  const setupMs: number[] = [];
  const tlsMs: number[] = [];
  const firstRequestMs: number[] = [];
  const openFailures: Failure[] = [];
  const window = Math.max(1, Math.min(job.window ?? 10, job.count));
  let next = 0;
  const t0 = now();
  await Promise.all(
    Array.from({ length: window }, async () => {
      while (next < job.count && now() < stop) {
        next++;
        try {
          const r = await openHeld(job, closing);
          held.push(r.held);
          setupMs.push(r.setupMs);
          tlsMs.push(r.tlsMs);
          firstRequestMs.push(r.firstRequestMs);
        } catch (err) {
          openFailures.push(failureOf(err));
        }
      }
    }),
  );
  emit({ phase: "open", openSeconds: (now() - t0) / 1000, tried: next, ok: held.length, failed: openFailures.length, failures: openFailures.slice(0, 50), setupMs: round(setupMs), tlsMs: round(tlsMs), firstRequestMs: round(firstRequestMs) });

  if ((await command()) !== "measure") throw new Error("expected measure");
  const lostBeforeMeasure = held.filter((h) => h.lostEarly).length;
  const live = held.filter((h) => !h.lostEarly);
  // One at a time over an even sample: the latency of a request while N
  // tunnels are open, not the queue of N requests at once (that is "burst").
  const sample = Math.max(0, Math.min(job.sample ?? live.length, live.length));
  const rttMs: number[] = [];
  const rttFailures: Failure[] = [];
  for (let i = 0; i < sample && now() < stop; i++) {
    const h = live[Math.floor((i * live.length) / sample)];
    try {
      rttMs.push(await roundTrip(h.socket, job, "rtt"));
    } catch (err) {
      rttFailures.push(failureOf(err));
    }
  }
  // Every open tunnel sends one request at the same moment.
  const burstStart = now();
  const burst = await Promise.all(
    live.map(async (h) => {
      try {
        await roundTrip(h.socket, job, "burst");
        return { ms: now() - burstStart };
      } catch (err) {
        return { failure: failureOf(err) };
      }
    }),
  );
  const burstMs = burst.flatMap((b) => (b.ms === undefined ? [] : [b.ms]));
  const burstFailures = burst.flatMap((b) => (b.failure ? [b.failure] : []));
  emit({ phase: "measured", lostBeforeMeasure, rttMs: round(rttMs), rttFailed: rttFailures.length, burstMs: round(burstMs), burstFailed: burstFailures.length, failures: [...rttFailures, ...burstFailures].slice(0, 50) });

  if ((await command()) !== "close") throw new Error("expected close");
  const lostBeforeClose = held.filter((h) => h.lostEarly);
  closing.now = true;
  // As a browser leaves: TLS close_notify and FIN, then wait for the other side.
  const closeStart = now();
  await withTimeout(
    Promise.all(held.map((h) => (h.socket.closed ? undefined : new Promise<void>((resolve) => {
      h.socket.once("close", () => resolve());
      h.socket.end();
    })))),
    5000,
    "close",
    () => {},
  ).catch(() => {});
  const notClosed = held.filter((h) => !h.socket.closed).length;
  for (const h of held) h.socket.destroy();
  return { phase: "closed", closeSeconds: (now() - closeStart) / 1000, notClosedIn5s: notClosed, lostWhileHeld: lostBeforeClose.length, lostReasons: [...new Set(lostBeforeClose.map((h) => h.lostEarly))].slice(0, 10) };
}

async function main(): Promise<void> {
  const job = JSON.parse(process.argv[2] ?? "") as ClientJob;
  // The whole job is bounded: whatever happens, the process ends.
  setTimeout(() => {
    process.stdout.write(`${JSON.stringify({ error: `client deadline of ${job.deadlineMs} ms passed` })}\n`);
    process.exit(3);
  }, job.deadlineMs + 5_000).unref();
  const modes = { rtt, ttfb, concurrent, rps, hold };
  const result = await modes[job.mode](job);
  process.stdout.write(`${JSON.stringify(result)}\n`);
  process.exit(0);
}

main().catch((err: unknown) => {
  process.stdout.write(`${JSON.stringify({ error: (err as Error).stack ?? String(err) })}\n`);
  process.exit(1);
});
