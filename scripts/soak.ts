// Soak test: all three roles on loopback, and sessions of every outcome
// churned through them for a while, watching for leaks.
//
//   node scripts/soak.ts --seconds 60 [--concurrency 16] [--path connect-back|outbound]
//
// Outcomes churned (each has an expected result; anything else is counted as
// an unexpected failure and a sample is printed):
//   ok-http       GET of 256 KiB through the proxy, hash checked
//   ok-connect    CONNECT, TLS to an HTTPS target through the tunnel, 256 KiB, hash checked
//   refused       CONNECT and plain GET to a closed port: 502 TARGET_REFUSED (a CONNECT
//                 over a ready connection: 200, then the tunnel is reset)
//   browser-abort GET of 8 MiB, the browser hangs up after the first 64 KiB
//   target-reset  a target that sends part of a response and then resets (TCP RST),
//                 through CONNECT and through plain HTTP: the browser sees the stream cut short
//
// Every ~5 s, and at the end, it prints sessions per outcome, unexpected
// failures, this process's open descriptors (/proc/self/fd), RSS and heap,
// and the roles' liveSockets()/pendingSessions(). After the churn it waits
// (bounded) for the descriptors and tables to return to the baseline taken
// before the churn, and exits 1 if they do not (or if anything unexpected
// happened), 0 otherwise. It closes everything it started, also on Ctrl-C.
import { createHash } from "node:crypto";
import { existsSync, readdirSync, rmSync } from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import net from "node:net";
import tls from "node:tls";
import { parseArgs } from "node:util";
import { connectThrough } from "./lib/proxy-client.ts";
import { startStack, type Stack } from "./lib/stack.ts";
import { expectedSha256, startHttpsTarget, startHttpTarget, type Target } from "./lib/targets.ts";
import { freePort } from "./lib/ports.ts";
import { testPki } from "./lib/pki.ts";

const { values } = parseArgs({
  options: {
    seconds: { type: "string", default: "60" },
    concurrency: { type: "string", default: "16" },
    path: { type: "string", default: "connect-back" },
    "report-every": { type: "string", default: "5000" },
  },
});
const SECONDS = Number(values.seconds);
const CONCURRENCY = Number(values.concurrency);
const REPORT_MS = Number(values["report-every"]);
const PATH = values.path as "connect-back" | "outbound";
if (!(SECONDS > 0) || !(CONCURRENCY >= 1) || !["connect-back", "outbound"].includes(PATH)) {
  console.error("usage: node scripts/soak.ts --seconds N [--concurrency C] [--path connect-back|outbound]");
  process.exit(2);
}

const OK_SIZE = 256 * 1024;
const ABORT_SIZE = 8 * 1024 * 1024;
const ABORT_AFTER = 64 * 1024;
const RESET_DECLARED = 4 * 1024 * 1024;
const RESET_SENT = 32 * 1024;
/** A session taking longer than this is a hang. */
const SESSION_DEADLINE_MS = 15_000;
/** How long the roles get after the churn to close what they hold. */
const SETTLE_MS = 15_000;
/** Descriptors above the baseline still accepted at the end (timers, DNS, a late close). */
const FD_TOLERANCE = 4;

const OUTCOMES = ["ok-http", "ok-connect", "refused", "browser-abort", "target-reset"] as const;
type Outcome = (typeof OUTCOMES)[number];

// ---------------------------------------------------------------- measurements

function fdCount(): number {
  return existsSync("/proc/self/fd") ? readdirSync("/proc/self/fd").length : -1;
}

const mb = (n: number) => (n / 1024 / 1024).toFixed(1);

// ---------------------------------------------------------------- targets

/** Answers any request with a head promising RESET_DECLARED bytes, sends RESET_SENT of them, then resets. */
async function startResetTarget(): Promise<Target> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((s) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
    s.on("error", () => {});
    s.once("data", () => {
      s.write(`HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: ${RESET_DECLARED}\r\n\r\n`);
      s.write(Buffer.alloc(RESET_SENT, 0x61), () => s.resetAndDestroy());
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return {
    port: (server.address() as AddressInfo).port,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

// ---------------------------------------------------------------- browser side

interface Done {
  /** Undefined when the session went as this outcome expects; otherwise what went wrong. */
  unexpected?: string;
}

/** Every socket a session opened, so a hang can be cut and nothing outlives the run. */
const clientSockets = new Set<net.Socket>();
function trackClient<T extends net.Socket>(s: T): T {
  clientSockets.add(s);
  s.once("close", () => clientSockets.delete(s));
  return s;
}

/** A plain-HTTP GET in absolute form through the proxy; `abortAfter` hangs up once that many body bytes arrived. */
function proxyGet(proxyPort: number, url: string, abortAfter?: number): Promise<{ status: number; bytes: number; sha256: string; headers: http.IncomingHttpHeaders; cut: boolean; aborted: boolean }> {
  return new Promise((resolve, reject) => {
    const u = new URL(url);
    const req = http.request({ host: "127.0.0.1", port: proxyPort, path: url, headers: { Host: u.host, Connection: "close" }, agent: false });
    req.on("socket", (s) => trackClient(s));
    req.on("error", reject);
    req.on("response", (res) => {
      const hash = createHash("sha256");
      let bytes = 0;
      let settled = false;
      const finish = (cut: boolean, aborted: boolean) => {
        if (settled) return;
        settled = true;
        resolve({ status: res.statusCode ?? 0, bytes, sha256: hash.digest("hex"), headers: res.headers, cut, aborted });
      };
      res.on("data", (c: Buffer) => {
        bytes += c.length;
        hash.update(c);
        if (abortAfter !== undefined && bytes >= abortAfter) {
          req.destroy();
          finish(false, true);
        }
      });
      res.on("end", () => finish(false, false));
      res.on("error", () => finish(true, false));
      res.on("aborted", () => finish(true, false));
      res.on("close", () => finish(!res.complete, false));
    });
    req.end();
  });
}

/** CONNECT through the proxy (the tests' client), with the tunnel's socket tracked for clean-up. */
async function connect(proxyPort: number, authority: string): ReturnType<typeof connectThrough> {
  const c = await connectThrough(proxyPort, authority);
  trackClient(c.socket);
  // Under TLS (ok-connect) nothing else listens on the raw socket, and a reset
  // there would crash the run; the session's reader sees the failure anyway.
  c.socket.on("error", () => {});
  return c;
}

/** Reads a raw HTTP/1.1 response (Connection: close) off a stream until it ends or breaks. */
function readAll(stream: net.Socket | tls.TLSSocket): Promise<{ data: Buffer; broken: boolean }> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let broken = false;
    stream.on("data", (c: Buffer) => chunks.push(c));
    stream.on("error", () => (broken = true));
    stream.on("close", () => resolve({ data: Buffer.concat(chunks), broken }));
  });
}

function bodyOf(data: Buffer): { status: number; body: Buffer } {
  const end = data.indexOf("\r\n\r\n");
  const m = /^HTTP\/1\.1 (\d{3})/.exec(data.subarray(0, 20).toString("latin1"));
  return { status: m ? Number(m[1]) : 0, body: end < 0 ? Buffer.alloc(0) : data.subarray(end + 4) };
}

interface Env {
  stack: Stack;
  web: Target;
  secure: Target;
  reset: Target;
  refused: number;
  ca: string;
}

async function runSession(kind: Outcome, env: Env, n: number): Promise<Done> {
  const proxy = env.stack.proxyPort;
  switch (kind) {
    case "ok-http": {
      const r = await proxyGet(proxy, `http://127.0.0.1:${env.web.port}/bytes/${OK_SIZE}`);
      if (r.status !== 200) return { unexpected: `status ${r.status} (${r.headers["x-natproxy-error"] ?? ""})` };
      if (r.sha256 !== expectedSha256(OK_SIZE)) return { unexpected: `body of ${r.bytes} bytes does not match` };
      return {};
    }
    case "ok-connect": {
      const c = await connect(proxy, `localhost:${env.secure.port}`);
      if (c.status !== 200) return { unexpected: `CONNECT answered ${c.status} (${c.headers["x-natproxy-error"] ?? ""})` };
      const s = trackClient(tls.connect({ socket: c.socket, servername: "localhost", ca: env.ca }));
      s.write(`GET /bytes/${OK_SIZE} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n`);
      const { data } = await readAll(s);
      const { status, body } = bodyOf(data);
      if (status !== 200) return { unexpected: `HTTPS answered ${status}` };
      if (createHash("sha256").update(body).digest("hex") !== expectedSha256(OK_SIZE)) return { unexpected: `HTTPS body of ${body.length} bytes does not match` };
      return {};
    }
    case "refused": {
      if (n % 2 === 0) {
        const c = await connect(proxy, `127.0.0.1:${env.refused}`);
        if (c.status === 200) {
          // Over a ready connection (optimistic_connect) the 200 does not wait
          // for the target, so the refusal arrives as a reset of the tunnel.
          c.socket.write("hello?");
          const { data, broken } = await readAll(c.socket);
          if (!broken || data.length > 0) return { unexpected: `CONNECT to a closed port answered 200, then ${broken ? `${data.length} bytes and a reset` : "a clean close"}` };
        } else if (c.status !== 502 || c.headers["x-natproxy-error"] !== "TARGET_REFUSED") return { unexpected: `CONNECT to a closed port answered ${c.status} ${c.headers["x-natproxy-error"] ?? ""}` };
      } else {
        const r = await proxyGet(proxy, `http://127.0.0.1:${env.refused}/`);
        if (r.status !== 502 || r.headers["x-natproxy-error"] !== "TARGET_REFUSED") return { unexpected: `GET to a closed port answered ${r.status} ${r.headers["x-natproxy-error"] ?? ""}` };
      }
      return {};
    }
    case "browser-abort": {
      const r = await proxyGet(proxy, `http://127.0.0.1:${env.web.port}/bytes/${ABORT_SIZE}`, ABORT_AFTER);
      if (r.status !== 200) return { unexpected: `status ${r.status} before the abort` };
      if (!r.aborted) return { unexpected: `the download ended (${r.bytes} bytes) before the browser could abort it` };
      return {};
    }
    case "target-reset": {
      if (n % 2 === 0) {
        const c = await connect(proxy, `127.0.0.1:${env.reset.port}`);
        if (c.status !== 200) return { unexpected: `CONNECT answered ${c.status} ${c.headers["x-natproxy-error"] ?? ""}` };
        c.socket.write("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        const { data } = await readAll(c.socket);
        const { body } = bodyOf(data);
        if (body.length >= RESET_DECLARED) return { unexpected: "the reset stream arrived whole" };
      } else {
        const r = await proxyGet(proxy, `http://127.0.0.1:${env.reset.port}/`);
        // The head may or may not have gone out before the reset: a cut body or a 502 are both right.
        if (r.status === 200 ? !r.cut && r.bytes >= RESET_DECLARED : r.status !== 502) return { unexpected: `plain HTTP to a resetting target: status ${r.status}, ${r.bytes} bytes, cut=${r.cut}` };
      }
      return {};
    }
  }
}

// ---------------------------------------------------------------- main

async function main(): Promise<number> {
  const started: { close(): Promise<void> }[] = [];
  let stopping = false;
  const onSignal = () => {
    if (stopping) return;
    stopping = true;
    console.log("\ninterrupted: stopping the churn and cleaning up");
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  let pkiDir: string | undefined;
  try {
    const pki = await testPki();
    pkiDir = pki.dir;
    const web = await startHttpTarget();
    started.push(web);
    const secure = await startHttpsTarget(pki);
    started.push(secure);
    const reset = await startResetTarget();
    started.push(reset);
    const refused = await freePort();
    const stack = await startStack({
      // Short pool and keep-alive timeouts so that idle connections are gone
      // within the settle time at the end.
      local: { tunnel: PATH, pool_idle_timeout: 1000, fin_timeout: 2000, connect_timeout: 5000 },
      coordinator: { keep_alive_timeout: 2000, fin_timeout: 2000 },
    });
    started.push(stack);
    const env: Env = { stack, web, secure, reset, refused, ca: pki.ca.cert };

    // Baseline: the roles idle after start-up (the API connection from the start-up checks closed).
    await waitFor(() => stack.local.liveSockets() === 0 && stack.coordinator.liveSockets() === 0 && stack.local.pendingSessions() === 0, 10_000);
    const baseline = snapshot(stack);
    console.log(`soak: ${SECONDS} s, concurrency ${CONCURRENCY}, path ${stack.local.path()}; pid ${process.pid}`);
    console.log(`baseline: ${format(baseline)}`);

    const done = new Map<Outcome, number>(OUTCOMES.map((o) => [o, 0]));
    const unexpected = new Map<Outcome, number>(OUTCOMES.map((o) => [o, 0]));
    const samples: string[] = [];
    const t0 = performance.now();
    const deadline = t0 + SECONDS * 1000;
    let counter = 0;
    const peak = { fds: baseline.fds, rss: baseline.rss, local: 0, coordinator: 0, pending: 0 };
    const report = (label: string) => {
      const s = snapshot(stack);
      peak.fds = Math.max(peak.fds, s.fds);
      peak.rss = Math.max(peak.rss, s.rss);
      const outcomes = OUTCOMES.map((o) => `${o}=${done.get(o)}${unexpected.get(o) ? `(!${unexpected.get(o)})` : ""}`).join(" ");
      console.log(`[${label.padStart(6)}] ${outcomes} | unexpected ${sum(unexpected)} | ${format(s)}`);
    };
    const sampler = setInterval(() => {
      const s = snapshot(stack);
      peak.local = Math.max(peak.local, s.local);
      peak.coordinator = Math.max(peak.coordinator, s.coordinator);
      peak.pending = Math.max(peak.pending, s.pending);
    }, 250);
    const ticker = setInterval(() => report(`${((performance.now() - t0) / 1000).toFixed(0)} s`), REPORT_MS);

    const worker = async () => {
      while (!stopping && performance.now() < deadline) {
        const n = counter++;
        const kind = OUTCOMES[n % OUTCOMES.length];
        let result: Done;
        let timer: NodeJS.Timeout | undefined;
        try {
          result = await Promise.race([
            runSession(kind, env, Math.floor(n / OUTCOMES.length)),
            new Promise<Done>((resolve) => (timer = setTimeout(() => resolve({ unexpected: `no end within ${SESSION_DEADLINE_MS} ms` }), SESSION_DEADLINE_MS))),
          ]);
        } catch (err) {
          result = { unexpected: `${(err as NodeJS.ErrnoException).code ?? ""} ${(err as Error).message}` };
        } finally {
          clearTimeout(timer);
        }
        done.set(kind, (done.get(kind) ?? 0) + 1);
        if (result.unexpected) {
          unexpected.set(kind, (unexpected.get(kind) ?? 0) + 1);
          if (samples.length < 10) samples.push(`${kind}: ${result.unexpected}`);
        }
      }
    };
    await Promise.all(Array.from({ length: CONCURRENCY }, worker));
    clearInterval(ticker);
    clearInterval(sampler);
    const churnMs = performance.now() - t0;
    report("churn");
    // Whatever a hung session left open on our side goes now; the roles must then let go of theirs.
    for (const s of clientSockets) s.destroy();

    const settleStart = performance.now();
    const back = (s: Snapshot) => s.local <= baseline.local && s.coordinator <= baseline.coordinator && s.pending === 0 && s.fds <= baseline.fds + FD_TOLERANCE;
    const settled = await waitFor(() => back(snapshot(stack)), SETTLE_MS);
    const settleMs = Math.round(performance.now() - settleStart);
    const total = sum(done);
    report("end");
    console.log(
      `\nsessions: ${total} in ${(churnMs / 1000).toFixed(1)} s (${(total / (churnMs / 1000)).toFixed(0)}/s); ` +
        OUTCOMES.map((o) => `${o} ${done.get(o)}`).join(", "),
    );
    console.log(`unexpected failures: ${sum(unexpected)}${samples.length ? `\n  ${samples.join("\n  ")}` : ""}`);
    console.log(`peaks during the churn: fds ${peak.fds}, rss ${mb(peak.rss)} MiB, local sockets ${peak.local}, coordinator sockets ${peak.coordinator}, pending sessions ${peak.pending}`);
    const end = snapshot(stack);
    console.log(`baseline: ${format(baseline)}`);
    console.log(`after:    ${format(end)} (${settled ? `back within ${settleMs} ms` : `NOT back after ${settleMs} ms`}; fd tolerance +${FD_TOLERANCE})`);
    let code = 0;
    if (!settled) {
      console.log("FAIL: descriptors or tables did not return to the baseline");
      code = 1;
    }
    if (sum(unexpected) > 0) {
      console.log("FAIL: unexpected session failures");
      code = 1;
    }
    if (total === 0) {
      console.log("FAIL: no session ran");
      code = 1;
    }
    if (stopping) {
      console.log("INTERRUPTED: the figures cover a shortened run");
      return code || 130;
    }
    if (code === 0) console.log("PASS");
    return code;
  } finally {
    for (const s of clientSockets) s.destroy();
    for (const s of started.reverse()) await s.close();
    if (pkiDir) rmSync(pkiDir, { recursive: true, force: true });
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  }
}

interface Snapshot {
  fds: number;
  rss: number;
  heap: number;
  local: number;
  coordinator: number;
  pending: number;
}

function snapshot(stack: Stack): Snapshot {
  const m = process.memoryUsage();
  return { fds: fdCount(), rss: m.rss, heap: m.heapUsed, local: stack.local.liveSockets(), coordinator: stack.coordinator.liveSockets(), pending: stack.local.pendingSessions() };
}

function format(s: Snapshot): string {
  return `fds ${s.fds}, rss ${mb(s.rss)} MiB, heap ${mb(s.heap)} MiB, local.liveSockets ${s.local}, coordinator.liveSockets ${s.coordinator}, local.pendingSessions ${s.pending}`;
}

function sum(m: Map<string, number>): number {
  let n = 0;
  for (const v of m.values()) n += v;
  return n;
}

/** Polls `cond` every 50 ms until it holds (true) or `ms` passed (false). */
async function waitFor(cond: () => boolean, ms: number): Promise<boolean> {
  const end = performance.now() + ms;
  while (!cond()) {
    if (performance.now() > end) return false;
    await new Promise((r) => setTimeout(r, 50));
  }
  return true;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    console.error("soak failed to run:", err);
    process.exitCode = 2;
  },
);
