import assert from "node:assert/strict";
import { randomInt } from "node:crypto";
import { existsSync, readdirSync, rmSync } from "node:fs";
import type { AddressInfo } from "node:net";
import net from "node:net";
import tls from "node:tls";
import { after, before, describe, test } from "node:test";
import { generateCertificate, type KeyPair } from "../src/tls/certs.ts";
import { decodeMessage as decodeStun, getAttribute, MAGIC_COOKIE, messageType, METHOD_BINDING, StunFramer, type StunClass } from "../src/stun.ts";
import { decodeMessage as decodeWire, encodeMessage as encodeWire, encodeOpen, encodeSession, MessageType, resultOf } from "../src/protocol/wire.ts";
import { httpsThrough, proxiedRequest } from "../scripts/lib/proxy-client.ts";
import { testPki } from "../scripts/lib/pki.ts";
import { startStack, TOKEN, type Stack } from "../scripts/lib/stack.ts";
import { startHttpsTarget, startHttpTarget, type Target } from "../scripts/lib/targets.ts";
import { freePort } from "../scripts/lib/ports.ts";
import { waitUntil } from "./helpers/wait.ts";

// Fuzzing of every listening port of the three roles: the local proxy's
// browser port and its tunnel port (the connect-back listener, where the
// local proxy is the TLS *client*), the coordinator's HTTPS port (raw TCP,
// inside TLS, HTTP API, Upgrade, and the upgraded tunnel), and the reporter
// (STUN over TCP). Every case is generated from a seeded PRNG:
//
//   FUZZ_SEED=<n> node --test test/fuzz.test.ts          same cases again
//   FUZZ_SEED=<n> FUZZ_ONLY=<tag>#<i> node --test ...     one case only (or #<i>-<j>, a range)
//   FUZZ_CASES=<n>                                        cases per port (300)
//
// Each port's loop is bounded in count and in time (a few seconds), so the
// file takes about 20 s when everything passes.
//
// Each case sends its bytes, half-closes, and must see the server close the
// connection within CASE_DEADLINE_MS (no hang) without answering anything a
// correct server would not. Afterwards every role must still serve and the
// socket/descriptor counts must return to the baseline. The slowloris part
// opens connections that stop mid-request and checks each is closed within
// its configured timeout while normal traffic still gets through.

const SEED = process.env.FUZZ_SEED ? Number(process.env.FUZZ_SEED) : randomInt(1, 2 ** 31 - 1);
const ONLY = process.env.FUZZ_ONLY;
console.log(`fuzz seed ${SEED} (reproduce with FUZZ_SEED=${SEED})`);

// Small timeouts so that a hang shows within the test's time.
const T = {
  localConnect: 1500, // [local] connect_timeout: browser head deadline, connect-back wait, tunnel-port hold
  coordHandshake: 1000, // [coordinator] handshake_timeout: TLS handshakes; also caps the header timeout
  coordRequest: 1500, // [coordinator] request_timeout
  coordKeepAlive: 1000, // [coordinator] keep_alive_timeout: idle API connections; an upgraded tunnel's wait for Open
  reporterHandshake: 1000, // [reporter] handshake_timeout
};
/** After its last byte and FIN, a fuzz case must see the server close within this. */
const CASE_DEADLINE_MS = 5000;
/**
 * A slowloris connection must be closed by its configured timeout plus this:
 * room for timer scheduling and for a deadline checker that runs once a
 * second (Node's http servers check header/request deadlines on an interval).
 */
const SLOWLORIS_SLACK_MS = 1250;
const SLOWLORIS_N = 20;
const CASES = Number(process.env.FUZZ_CASES ?? 300);
const CONCURRENCY = 32;

// ---------------------------------------------------------------- PRNG

/** mulberry32: small, fast, and the same sequence for the same seed everywhere. */
class Rng {
  #s: number;
  constructor(seed: number) {
    this.#s = seed >>> 0;
  }
  next(): number {
    this.#s = (this.#s + 0x6d2b79f5) >>> 0;
    let t = this.#s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  /** Inclusive. */
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)];
  }
  bytes(n: number): Buffer {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i++) b[i] = this.int(256);
    return b;
  }
  printable(n: number): string {
    let s = "";
    for (let i = 0; i < n; i++) s += String.fromCharCode(this.range(0x21, 0x7e));
    return s;
  }
  /** A UUID v4 (version and variant bits set), from this generator. */
  uuid(): string {
    const b = this.bytes(16);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = b.toString("hex");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }
}

/** One independent generator per case, so a single case can be replayed alone. */
function caseRng(tag: string, i: number): Rng {
  let h = 0x811c9dc5 ^ SEED;
  for (const c of `${tag}#${i}`) h = Math.imul(h ^ c.charCodeAt(0), 0x01000193);
  return new Rng(h >>> 0);
}

const INTERESTING = [0x00, 0xff, 0x7f, 0x80, 0x0d, 0x0a, 0x3a, 0x20, 0x25, 0x2f, 0x3f, 0x40, 0x5b, 0x5d];

/** Byte-level mutations: flips, interesting bytes, inserts, deletes, duplicates, truncation. */
function mutate(rng: Rng, input: Buffer): Buffer {
  let b = Buffer.from(input);
  for (let k = rng.range(1, 4); k > 0 && b.length > 0; k--) {
    const at = rng.int(b.length);
    switch (rng.int(6)) {
      case 0:
        b[at] ^= 1 << rng.int(8);
        break;
      case 1:
        b[at] = rng.pick(INTERESTING);
        break;
      case 2:
        b = Buffer.concat([b.subarray(0, at), rng.bytes(rng.range(1, 16)), b.subarray(at)]);
        break;
      case 3:
        b = Buffer.concat([b.subarray(0, at), b.subarray(Math.min(b.length, at + rng.range(1, 32)))]);
        break;
      case 4: {
        const len = rng.range(1, 64);
        b = Buffer.concat([b.subarray(0, at), b.subarray(at, at + len), b.subarray(at)]);
        break;
      }
      default:
        b = b.subarray(0, at);
    }
  }
  return b;
}

/** Splits a payload into 1-4 writes at random places (parsers must cope with any split). */
function split(rng: Rng, payload: Buffer): Buffer[] {
  const cuts = new Set<number>();
  for (let k = rng.int(4); k > 0 && payload.length > 1; k--) cuts.add(rng.range(1, payload.length - 1));
  const at = [0, ...[...cuts].sort((a, b) => a - b), payload.length];
  return at.slice(1).map((end, i) => payload.subarray(at[i], end)).filter((c) => c.length > 0);
}

const show = (b: Buffer, max = 160) => JSON.stringify(b.subarray(0, max).toString("latin1")) + (b.length > max ? `… (${b.length} bytes)` : "");

// ---------------------------------------------------------------- connections

interface Exchange {
  data: Buffer;
  /** Our end's port (read at connect: a destroyed socket no longer knows it). */
  localPort: number;
  hung: boolean;
  ready: boolean;
  ms: number;
  error?: string;
}

const MAX_KEEP = 256 * 1024;

/**
 * Waits for `readyEvent`, writes the chunks (one event-loop turn apart, so
 * they often arrive as separate segments), half-closes, and collects what
 * comes back until the server closes or the deadline. With `finDelay` the
 * half-close waits until an answer has arrived and gone quiet (or that many
 * ms passed): HTTP servers take a FIN for an abort and would otherwise drop
 * a complete request unanswered, and the answer is what the checks look at.
 */
function talk(socket: net.Socket, readyEvent: "connect" | "secureConnect", chunks: Buffer[], opts: { finDelay?: number; deadline?: number } = {}): Promise<Exchange> {
  const deadline = opts.deadline ?? CASE_DEADLINE_MS;
  return new Promise((resolve) => {
    const t0 = performance.now();
    const data: Buffer[] = [];
    let kept = 0;
    let ready = false;
    let localPort = 0;
    let error: string | undefined;
    let done = false;
    let timer: NodeJS.Timeout | undefined;
    const finish = (hung: boolean) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.destroy();
      resolve({ data: Buffer.concat(data), localPort, hung, ready, ms: Math.round(performance.now() - t0), error });
    };
    socket.once("connect", () => (localPort = socket.localPort ?? 0));
    socket.on("data", (c: Buffer) => {
      if (kept < MAX_KEEP) data.push(c);
      kept += c.length;
    });
    socket.on("error", (e: NodeJS.ErrnoException) => {
      error ??= e.code ?? e.message;
    });
    socket.on("close", () => finish(false));
    const answered = (max: number) =>
      new Promise<void>((resolve) => {
        let quiet: NodeJS.Timeout | undefined;
        const stop = () => {
          clearTimeout(hard);
          clearTimeout(quiet);
          socket.off("data", onData);
          socket.off("close", stop);
          resolve();
        };
        const onData = () => {
          clearTimeout(quiet);
          quiet = setTimeout(stop, 30);
        };
        const hard = setTimeout(stop, max);
        if (kept > 0) onData();
        socket.on("data", onData);
        socket.once("close", stop);
      });
    socket.once(readyEvent, async () => {
      ready = true;
      for (let i = 0; i < chunks.length; i++) {
        if (socket.destroyed || !socket.writable) return;
        socket.write(chunks[i]);
        if (i < chunks.length - 1) await new Promise((r) => setImmediate(r));
      }
      if (opts.finDelay) await answered(opts.finDelay);
      // The deadline counts from the FIN.
      clearTimeout(timer);
      timer = setTimeout(() => finish(true), deadline);
      if (!socket.destroyed) socket.end();
    });
    // Connecting (and the TLS handshake) gets its own bound.
    timer = setTimeout(() => finish(true), deadline);
  });
}

/** Half the cases half-close at once, half after the answer (see talk). */
const finDelay = (rng: Rng) => (rng.chance(0.5) ? 400 : undefined);

function fdCount(): number {
  return existsSync("/proc/self/fd") ? readdirSync("/proc/self/fd").length : 0;
}

// ---------------------------------------------------------------- the stack

let stack: Stack;
let web: Target;
let secure: Target;
let refused: number;
let coordPort: number;
let reporterPort: number;
let tunnelPort: number;
let tunnelSince: Date;
let clientHello: Buffer;
/** A server that the coordinator's target policy must never let anyone reach. */
let canary: { port: number; connections: () => number; close(): Promise<void> };
const certs: Record<string, KeyPair> = {};
const warnings: string[] = [];
const onWarning = (w: Error) => warnings.push(`${w.name}: ${w.message}`);
const processErrors: string[] = [];
const describeError = (err: unknown) => (err as Error)?.stack?.split("\n").slice(0, 3).join(" |") ?? String(err);
const onRejection = (err: unknown) => processErrors.push(`unhandled rejection: ${describeError(err)}`);
const onException = (err: unknown) => processErrors.push(`uncaught exception: ${describeError(err)}`);

/** Fails with the distinct errors among `errors`, if any. */
function assertNoProcessErrors(errors: string[], what: string): void {
  const distinct = [...new Set(errors)];
  assert.equal(errors.length, 0, `${what}: ${errors.length} unhandled rejection(s) / uncaught exception(s) in a role:\n${distinct.slice(0, 3).join("\n")}`);
}
let baseline: Counts;

/** Every IPv4 address except 127.0.0.1, as CIDRs, plus all of IPv6: the fuzz stack may dial 127.0.0.1 only. */
function everythingBut127001(): string[] {
  const ip = ((127 << 24) | 1) >>> 0;
  const out: string[] = [];
  for (let len = 1; len <= 32; len++) {
    const v = ((ip ^ (1 << (32 - len))) & (~0 << (32 - len))) >>> 0;
    out.push(`${v >>> 24}.${(v >>> 16) & 255}.${(v >>> 8) & 255}.${v & 255}/${len}`);
  }
  return [...out, "::/0"];
}

async function startCanary() {
  let connections = 0;
  const servers: net.Server[] = [];
  const sockets = new Set<net.Socket>();
  const track = (s: net.Socket) => {
    connections++;
    sockets.add(s);
    s.on("error", () => {});
    s.on("close", () => sockets.delete(s));
  };
  const v4 = net.createServer(track);
  await new Promise<void>((r) => v4.listen(0, "127.0.0.1", r));
  servers.push(v4);
  const port = (v4.address() as AddressInfo).port;
  // The same port on ::1 where the machine has IPv6, so "[::1]:port" is watched too.
  const v6 = net.createServer(track);
  await new Promise<void>((r) => {
    v6.once("error", () => r());
    v6.listen(port, "::1", () => {
      servers.push(v6);
      r();
    });
  });
  return {
    port,
    connections: () => connections,
    close: async () => {
      for (const s of sockets) s.destroy();
      await Promise.all(servers.map((s) => new Promise<void>((r) => s.close(() => r()))));
    },
  };
}

/** The first flight of a real TLS client, to mutate and to cut short. */
async function captureClientHello(): Promise<Buffer> {
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const got = new Promise<Buffer>((resolve) => server.once("connection", (s) => s.once("data", (d: Buffer) => (resolve(d), s.destroy()))));
  const c = tls.connect({ host: "127.0.0.1", port: (server.address() as AddressInfo).port, servername: "localhost" });
  c.on("error", () => {});
  const hello = await got;
  c.destroy();
  server.close();
  return hello;
}

before(async () => {
  process.on("warning", onWarning);
  // The test runner reports these too, but against whichever test happens to
  // be running; counting them lets each fuzz test claim its own.
  process.on("unhandledRejection", onRejection);
  process.on("uncaughtExceptionMonitor", onException);
  web = await startHttpTarget();
  refused = await freePort();
  canary = await startCanary();
  secure = await startHttpsTarget(await testPki());
  stack = await startStack({
    local: { tunnel: "connect-back", connect_timeout: T.localConnect, fin_timeout: 500, pool_idle_timeout: 300 },
    coordinator: {
      handshake_timeout: T.coordHandshake,
      request_timeout: T.coordRequest,
      keep_alive_timeout: T.coordKeepAlive,
      connect_timeout: 1000,
      fin_timeout: 500,
      // Only the test's own targets; the canary and every other address are refused.
      allow_targets: [`127.0.0.1:${web.port}`, `127.0.0.1:${secure.port}`, `127.0.0.1:${refused}`],
      deny_targets: everythingBut127001(),
    },
    reporter: { handshake_timeout: T.reporterHandshake },
  });
  coordPort = stack.coordinator.addresses[0].port;
  reporterPort = stack.reporter.addresses[0].port;
  const state = stack.local.mapping();
  assert.ok(state, "the tunnel service is up");
  tunnelPort = state.localPort;
  tunnelSince = state.since;
  clientHello = await captureClientHello();
  const pki = stack.pki;
  certs.selfSigned = await generateCertificate({ commonName: "localhost", dnsNames: ["localhost"], ipAddresses: ["127.0.0.1"], days: 2 });
  const otherCa = await generateCertificate({ commonName: "some other CA", isCa: true, days: 2 });
  certs.otherCa = await generateCertificate({ commonName: "localhost", dnsNames: ["localhost"], ipAddresses: ["127.0.0.1"], ca: { key: otherCa.key, cert: otherCa.cert }, days: 2 });
  certs.expired = await generateCertificate({
    commonName: "localhost",
    dnsNames: ["localhost"],
    ipAddresses: ["127.0.0.1"],
    ca: { key: pki.ca.key, cert: pki.ca.cert },
    notBefore: new Date(Date.now() - 10 * 86_400_000),
    notAfter: new Date(Date.now() - 86_400_000),
  });
  certs.wrongName = await generateCertificate({ commonName: "evil.example", dnsNames: ["evil.example"], ipAddresses: ["192.0.2.66"], ca: { key: pki.ca.key, cert: pki.ca.cert }, days: 2 });
  // Quiescent state: the start-up API calls and the probe are done.
  await waitUntil(() => stack.local.liveSockets() === 0 && stack.coordinator.liveSockets() <= 1, 5000, "quiescent start");
  baseline = counts();
});

after(async () => {
  process.off("warning", onWarning);
  process.off("unhandledRejection", onRejection);
  process.off("uncaughtExceptionMonitor", onException);
  await stack?.close();
  await web?.close();
  await secure?.close();
  await canary?.close();
  if (stack) rmSync(stack.pki.dir, { recursive: true, force: true });
});

// ---------------------------------------------------------------- runner

async function runCases(tag: string, budgetMs: number, one: (rng: Rng, i: number) => Promise<string | undefined>, concurrency = CONCURRENCY): Promise<{ ran: number; failures: string[]; ms: number }> {
  const started = performance.now();
  const failures: string[] = [];
  let ran = 0;
  let indices = Array.from({ length: CASES }, (_, i) => i);
  if (ONLY) {
    // "<tag>#<i>" replays one case, "<tag>#<i>-<j>" a range (to bisect).
    const [onlyTag, index = ""] = ONLY.split("#");
    if (onlyTag !== tag) return { ran: 0, failures, ms: 0 };
    const [from, to = from] = index.split("-").map(Number);
    indices = indices.filter((i) => i >= (from as number) && i <= (to as number));
  }
  let next = 0;
  const worker = async () => {
    while (next < indices.length && performance.now() - started < budgetMs) {
      const i = indices[next++];
      let problem: string | undefined;
      try {
        problem = await one(caseRng(tag, i), i);
      } catch (err) {
        problem = `the case itself threw: ${(err as Error).stack}`;
      }
      ran++;
      if (problem) failures.push(`${tag}#${i}: ${problem}`);
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  return { ran, failures, ms: Math.round(performance.now() - started) };
}

interface Counts {
  local: number;
  coordinator: number;
  pending: number;
  fds: number;
  /** Unhandled rejections and uncaught exceptions so far (a role's bug, whatever the test saw). */
  errors: number;
}

function counts(): Counts {
  return { local: stack.local.liveSockets(), coordinator: stack.coordinator.liveSockets(), pending: stack.local.pendingSessions(), fds: fdCount(), errors: processErrors.length };
}

/** Waits (bounded) until the roles hold no more sockets than at `start` (the coordinator may keep one idle API connection). */
async function settled(start: Counts, ms = 4000): Promise<string | undefined> {
  const ok = (n: Counts) => n.local <= start.local && n.coordinator <= start.coordinator + 1 && n.pending === 0 && n.fds <= start.fds + 4;
  try {
    await waitUntil(() => ok(counts()), ms);
    return undefined;
  } catch {
    return `not back to ${JSON.stringify(start)} within ${ms} ms (coordinator +1, fds +4 allowed): now ${JSON.stringify(counts())}`;
  }
}

async function finishFuzz(t: { diagnostic(msg: string): void }, tag: string, r: { ran: number; failures: string[]; ms: number }, stats: Map<string, number>, start: Counts): Promise<void> {
  t.diagnostic(`${tag}: ${r.ran} cases in ${r.ms} ms, seed ${SEED}; answers ${[...stats].sort().map(([k, v]) => `${k}:${v}`).join(" ")}`);
  const leak = await settled(start);
  if (!ONLY) assert.ok(r.ran >= Math.min(CASES, 50), `${tag}: only ${r.ran} cases ran within the time budget`);
  assert.equal(r.failures.length, 0, `seed ${SEED}: ${r.failures.length} ${tag} case(s) misbehaved (replay one with FUZZ_SEED=${SEED} FUZZ_ONLY=<tag>#<i>):\n${r.failures.slice(0, 8).join("\n")}`);
  assertNoProcessErrors(processErrors.slice(start.errors), `the ${tag} cases`);
  assert.equal(leak, undefined, `after the ${tag} cases, sockets ${leak}`);
}

function count(stats: Map<string, number>, key: string): void {
  stats.set(key, (stats.get(key) ?? 0) + 1);
}

/** Status codes of every response head in `data` that starts a line (pipelined answers included). */
function statusLines(data: Buffer): number[] {
  // Interim answers (100 Continue, which Node sends on its own for Expect) are not answers.
  return [...data.toString("latin1").matchAll(/(?:^|\n)HTTP\/1\.[01] (\d{3}) /g)].map((m) => Number(m[1])).filter((s) => s >= 200 || s === 101);
}

// ---------------------------------------------------------------- generators: HTTP

const EOLS = ["\r\n", "\r\n", "\r\n", "\n", "\r"];

function headerPool(rng: Rng, ctx: { authority: string }): string[] {
  // Mostly well-formed headers, so that requests get past the parser and into
  // natproxy's own code; now and then one that a parser must refuse.
  const valid = [
    `Content-Length: ${rng.range(0, 64)}`,
    "Transfer-Encoding: chunked",
    "Expect: 100-continue",
    "Connection: close",
    "Connection: keep-alive",
    "Connection: Upgrade",
    "Upgrade: websocket",
    "Proxy-Connection: keep-alive",
    "Proxy-Authorization: Basic dXNlcjpwYXNz",
    `Proxy-Authorization: Basic ${Buffer.from(rng.printable(rng.range(0, 20))).toString("base64")}`,
    "Accept: */*",
    "User-Agent: natproxy-fuzz",
    `X-Fuzz: ${rng.printable(rng.range(0, 200))}`,
    `Cookie: ${rng.printable(rng.range(0, 100)).replace(/;/g, "")}`,
  ];
  const hostile = [
    "Host: ",
    `Host: ${rng.printable(rng.range(1, 40))}`,
    "Content-Length: -1",
    "Content-Length: 99999999999999999999",
    "Content-Length: 1, 2",
    "Transfer-Encoding: gzip, chunked",
    "Transfer-Encoding: identity",
    "Upgrade: h2c",
    "No-Colon-Here",
    "X-Nul: a\0b",
    " Folded: continuation",
    `X-Bin: ${rng.bytes(rng.range(1, 30)).toString("latin1")}`,
    `${rng.printable(rng.range(1, 20))}: ${rng.printable(rng.range(0, 20))}`,
  ];
  const out: string[] = [];
  if (rng.chance(0.85)) out.push(`Host: ${ctx.authority}`);
  for (let n = rng.range(0, 4); n > 0; n--) out.push(rng.pick(valid));
  if (rng.chance(0.2)) out.splice(rng.int(out.length + 1), 0, rng.pick(hostile));
  if (rng.chance(0.03)) out.push(`X-Huge: ${"a".repeat(70_000)}`); // beyond max_header_size
  if (rng.chance(0.02)) for (let i = 0; i < 3000; i++) out.push(`X-${i}: y`);
  return out;
}

function body(rng: Rng, chunked: boolean): Buffer {
  if (rng.chance(0.5)) return Buffer.alloc(0);
  if (!chunked) return rng.chance(0.5) ? rng.bytes(rng.range(1, 300)) : Buffer.from(rng.printable(rng.range(1, 100)));
  const parts: string[] = [];
  for (let k = rng.range(0, 3); k > 0; k--) {
    const data = rng.printable(rng.range(0, 40));
    parts.push(rng.chance(0.8) ? `${data.length.toString(16)}\r\n${data}\r\n` : `${rng.pick(["zz", "-1", "ffffffffffffffff", ""])}\r\n${data}\r\n`);
  }
  if (rng.chance(0.8)) parts.push("0\r\n\r\n");
  return Buffer.from(parts.join(""), "latin1");
}

function httpRequest(rng: Rng, method: string, target: string, extra: string[] = [], authority = "127.0.0.1"): Buffer {
  const eol = rng.chance(0.9) ? "\r\n" : rng.pick(EOLS);
  const version = rng.chance(0.85) ? "HTTP/1.1" : rng.pick(["HTTP/1.0", "HTTP/0.9", "HTTP/2.0", "HTTP/1.1x", "", "HTTP/1.1 extra", "http/1.1"]);
  const headers = [...extra, ...headerPool(rng, { authority })];
  const chunked = headers.some((h) => /transfer-encoding:.*chunked/i.test(h));
  const head = `${method} ${target}${version ? ` ${version}` : ""}${eol}${headers.map((h) => h + eol).join("")}${rng.chance(0.92) ? eol : ""}`;
  return Buffer.concat([Buffer.from(head, "latin1"), body(rng, chunked)]);
}

const METHODS = ["GET", "GET", "GET", "POST", "PUT", "HEAD", "OPTIONS", "DELETE", "PATCH", "TRACE", "get", "PRI", "M-SEARCH"];

// ---------------------------------------------------------------- fuzz: the browser port

describe(`fuzz (seed ${SEED})`, () => {
  test("the local proxy's browser port: random bytes, malformed and hostile HTTP, CONNECT, pipelining", async (t) => {
    const stats = new Map<string, number>();
    const start = counts();
    const port = stack.proxyPort;
    const absTargets = (rng: Rng) => [
      `http://127.0.0.1:${web.port}/fuzz?q=${rng.int(1000)}`,
      `http://localhost:${web.port}/`,
      `http://127.0.0.1:${web.port}`,
      `http://[::1]:${web.port}/`,
      `http://127.0.0.1:${refused}/`,
      `http://127.0.0.1:${canary.port}/`,
      `http://localhost:${canary.port}/`,
      `http://0x7f.1:${canary.port}/`,
      `http://2130706433:${canary.port}/`,
      `http://[::ffff:127.0.0.1]:${canary.port}/`,
      `http://10.1.2.3/`,
      `http://169.254.169.254/latest/meta-data/`,
      `https://127.0.0.1:${secure.port}/`,
      `ftp://127.0.0.1/`,
      `http://user:pw@127.0.0.1:${web.port}/`,
      `http://127.0.0.1:0/`,
      `http://127.0.0.1:99999/`,
      `http://%zz/`,
      `http:///nohost`,
      `http://127.0.0.1:${web.port}/${"a".repeat(rng.int(9000))}`,
      "/",
      "*",
      "",
      `/${rng.printable(rng.range(0, 40))}`,
      rng.printable(rng.range(1, 40)),
    ];
    const connectTargets = [
      `127.0.0.1:${web.port}`,
      `127.0.0.1:${secure.port}`,
      `localhost:${secure.port}`,
      `127.0.0.1:${refused}`,
      `127.0.0.1:${canary.port}`,
      `[::1]:${canary.port}`,
      `0177.0.0.1:${canary.port}`,
      "10.1.2.3:443",
      "169.254.169.254:80",
      "no-port",
      "127.0.0.1:0",
      "127.0.0.1:65536",
      ":443",
      "[::1",
      "http://x/",
      "",
    ];
    const r = await runCases("browser", 6000, async (rng) => {
      let payload: Buffer;
      const kind = rng.int(10);
      if (kind <= 1) payload = rng.bytes(rng.range(1, 2000));
      else if (kind <= 4) payload = httpRequest(rng, rng.chance(0.9) ? rng.pick(METHODS) : rng.printable(rng.range(1, 8)), rng.pick(absTargets(rng)));
      else if (kind <= 6) {
        const target = rng.pick(connectTargets);
        payload = Buffer.concat([httpRequest(rng, "CONNECT", target, [], target), rng.chance(0.6) ? rng.bytes(rng.range(1, 400)) : Buffer.from(`GET / HTTP/1.1\r\nHost: x\r\n\r\n`)]);
      } else if (kind <= 8) payload = mutate(rng, httpRequest(rng, rng.pick(METHODS), rng.pick(absTargets(rng))));
      else {
        // Pipelined requests, the later ones possibly broken.
        const parts: Buffer[] = [];
        for (let k = rng.range(2, 4); k > 0; k--) {
          const req = httpRequest(rng, rng.pick(METHODS), rng.pick(absTargets(rng)));
          parts.push(rng.chance(0.3) ? mutate(rng, req) : req);
        }
        payload = Buffer.concat(parts);
      }
      if (process.env.FUZZ_DEBUG) console.log("payload", JSON.stringify(payload.toString("latin1")));
      const x = await talk(net.connect(port, "127.0.0.1"), "connect", split(rng, payload), { finDelay: finDelay(rng) });
      if (!x.ready) return `could not connect (${x.error}): the listener is gone?`;
      if (x.hung) return `no close within ${CASE_DEADLINE_MS} ms after the request and FIN; sent ${show(payload)}, got ${show(x.data)}`;
      if (x.data.length === 0) {
        count(stats, "closed");
        return undefined;
      }
      const statuses = statusLines(x.data);
      if (!x.data.subarray(0, 5).equals(Buffer.from("HTTP/"))) return `answered something that is not HTTP: ${show(x.data)} to ${show(payload)}`;
      count(stats, String(statuses[0] ?? "1xx"));
      if (statuses.includes(500)) return `answered 500 (an internal error, not a reason): ${show(x.data, 400)} to ${show(payload, 400)}`;
      return undefined;
    });
    await finishFuzz(t, "browser", r, stats, start);
    assert.equal(canary.connections(), 0, "a browser request reached a target the policy refuses");
  });

  // ------------------------------------------------------------ fuzz: the coordinator

  test("the coordinator's HTTPS port, raw TCP: garbage, cleartext HTTP, broken ClientHellos", async (t) => {
    const stats = new Map<string, number>();
    const start = counts();
    const r = await runCases("coordinator-raw", 5000, async (rng) => {
      const kind = rng.int(6);
      let payload: Buffer;
      if (kind === 0) payload = rng.bytes(rng.range(1, 3000));
      else if (kind === 1) payload = Buffer.from(`GET /v1/hello HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${TOKEN}\r\n\r\n`);
      else if (kind === 2) payload = Buffer.concat([Buffer.from([0x16, 0x03, rng.int(5), rng.int(256), rng.int(256)]), rng.bytes(rng.range(0, 600))]);
      else if (kind === 3) payload = Buffer.concat([Buffer.from([0x80, rng.int(256), 0x01, 0x03, 0x01]), rng.bytes(rng.range(0, 100))]); // SSLv2-style hello
      else if (kind === 4) payload = clientHello.subarray(0, rng.range(1, clientHello.length - 1));
      else payload = mutate(rng, clientHello);
      const x = await talk(net.connect(coordPort, "127.0.0.1"), "connect", split(rng, payload));
      if (!x.ready) return `could not connect (${x.error})`;
      if (x.hung) return `no close within ${CASE_DEADLINE_MS} ms; sent ${show(payload)}`;
      count(stats, x.data.length ? `tls-${x.data[0]}` : "closed");
      if (x.data.includes("HTTP/")) return `answered cleartext HTTP on the TLS port: ${show(x.data)}`;
      return undefined;
    }, 80); // a handshake cut short is dropped only at handshake_timeout: many at once
    await finishFuzz(t, "coordinator-raw", r, stats, start);
  });

  const coordinatorTls = () => tls.connect({ host: "127.0.0.1", port: coordPort, servername: "localhost", ca: stack.pki.ca.cert });
  const AUTH_RE = new RegExp(`\\nauthorization: *bearer +${TOKEN}[ \\t]*\\r?\\n`, "i");

  test("the coordinator's HTTPS port, inside TLS: garbage and hostile API requests", async (t) => {
    const stats = new Map<string, number>();
    const start = counts();
    const paths = (rng: Rng) => ["/v1/hello", "/v1/sessions", "/v1/sessions", "/v1/probe", "/v1/tunnel", "/", "/v1/hello?x=1", "/V1/HELLO", "//v1/hello", "/v1/hello/..", "*", `/${rng.printable(rng.range(0, 30))}`, `/v1/sessions${"/x".repeat(rng.int(3000))}`];
    const auths = [`Authorization: Bearer ${TOKEN}`, `Authorization: Bearer ${TOKEN}`, "Authorization: Bearer wrong-token-wrong-token", "Authorization: Bearer", `Authorization: Basic ${TOKEN}`, `Authorization: bearer ${TOKEN.toUpperCase()}`, `Authorization: Bearer ${TOKEN}x`, `Authorization: Bearer ${"A".repeat(9000)}`, ""];
    // Where a connect-back may be aimed (same-ip: any port of 127.0.0.1). Not
    // the canary: a connect-back is not a target, and may reach any port.
    const replies = () => [tunnelPort, tunnelPort, refused, coordPort, reporterPort, stack.proxyPort];
    const targets = () => [
      { host: "127.0.0.1", port: web.port },
      { host: "127.0.0.1", port: refused },
      { host: "127.0.0.1", port: canary.port },
      { host: "localhost", port: canary.port },
      { host: "::ffff:127.0.0.1", port: canary.port },
      { host: "10.1.2.3", port: 80 },
      { host: "bad host!", port: 80 },
      { host: "127.0.0.1", port: 0 },
    ];
    const jsonBody = (rng: Rng): string => {
      const pick = rng.int(8);
      if (pick === 0) return JSON.stringify({ session: rng.uuid(), target: rng.pick(targets()), reply: { host: "127.0.0.1", port: rng.pick(replies()) } });
      if (pick === 1) return JSON.stringify({ probe: rng.uuid(), reply: { host: rng.pick(["127.0.0.1", "::1", "203.0.113.9", "x"]), port: rng.pick(replies()) } });
      if (pick === 2) return JSON.stringify({ session: rng.pick(["", "nope", rng.uuid().toUpperCase(), 7, null]), target: rng.pick([null, [], "x", { host: 1, port: "2" }]), reply: rng.pick([{}, null, { host: "127.0.0.1", port: 1e9 }]) });
      if (pick === 3) return "[".repeat(rng.range(1, 20_000));
      if (pick === 4) return JSON.stringify({ session: rng.uuid(), target: rng.pick(targets()), reply: { host: "127.0.0.1", port: tunnelPort }, __proto__: { x: 1 }, constructor: { prototype: { polluted: true } } });
      if (pick === 5) return `{"a":"${"x".repeat(rng.range(16_000, 20_000))}"}`;
      if (pick === 6) return rng.bytes(rng.range(1, 200)).toString("latin1");
      return JSON.stringify(rng.printable(rng.range(0, 50)));
    };
    const r = await runCases("coordinator-api", 6000, async (rng) => {
      let payload: Buffer;
      const kind = rng.int(10);
      if (kind === 0) payload = rng.bytes(rng.range(1, 2000));
      else if (kind <= 3) {
        // A well-formed call, so that sessions, probes and connect-backs really run.
        const which = rng.int(3);
        const text =
          which === 0
            ? JSON.stringify({ session: rng.uuid(), target: rng.pick(targets()), reply: { host: "127.0.0.1", port: rng.pick(replies()) } })
            : which === 1
              ? JSON.stringify({ probe: rng.uuid(), reply: { host: "127.0.0.1", port: rng.pick(replies()) } })
              : "";
        const head = [
          `${which === 2 ? "GET" : "POST"} ${["/v1/sessions", "/v1/probe", "/v1/hello"][which]} HTTP/1.1`,
          "Host: localhost",
          rng.chance(0.85) ? `Authorization: Bearer ${TOKEN}` : "Authorization: Bearer wrong-token-wrong-token",
          "Content-Type: application/json",
          `Content-Length: ${Buffer.byteLength(text)}`,
        ];
        payload = Buffer.from(`${head.join("\r\n")}\r\n\r\n${text}`, "latin1");
      } else {
        const text = jsonBody(rng);
        const method = rng.chance(0.85) ? rng.pick(["GET", "POST", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"]) : rng.printable(rng.range(1, 8));
        const extra = [rng.pick(auths), rng.pick(["Content-Type: application/json", "Content-Type: text/plain", ""]), rng.chance(0.8) ? `Content-Length: ${Buffer.byteLength(text, "latin1")}` : rng.pick(["Transfer-Encoding: chunked", "Content-Length: 5", ""])].filter(Boolean);
        payload = Buffer.concat([httpRequest(rng, method, rng.pick(paths(rng)), extra, "localhost"), Buffer.from(text, "latin1")]);
        if (kind >= 8) payload = mutate(rng, payload);
      }
      const authorized = AUTH_RE.test(payload.toString("latin1"));
      const x = await talk(coordinatorTls(), "secureConnect", split(rng, payload), { finDelay: finDelay(rng) });
      if (!x.ready) return `TLS handshake failed (${x.error})`;
      if (x.hung) return `no close within ${CASE_DEADLINE_MS} ms after FIN; sent ${show(payload)}, got ${show(x.data)}`;
      if (x.data.length === 0) {
        count(stats, "closed");
        return undefined;
      }
      if (!x.data.subarray(0, 5).equals(Buffer.from("HTTP/"))) return `answered something that is not HTTP: ${show(x.data)}`;
      const statuses = statusLines(x.data);
      count(stats, `${authorized ? "auth" : "anon"}-${statuses[0] ?? "1xx"}`);
      if (statuses.includes(500)) return `answered 500: ${show(x.data, 400)} to ${show(payload, 400)}`;
      if (!authorized && statuses.some((s) => ![400, 401, 404, 408, 413, 431].includes(s)))
        return `a request without the token got ${statuses.join(",")} (only 400/401/404/408/413/431 may answer it): ${show(x.data, 300)} to ${show(payload, 300)}`;
      return undefined;
    });
    await finishFuzz(t, "coordinator-api", r, stats, start);
    assert.equal(canary.connections(), 0, "an API request made the coordinator dial a refused target");
  });

  const upgradeHead = (extra = `Authorization: Bearer ${TOKEN}\r\n`) => `GET /v1/tunnel HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: natproxy-tunnel/1\r\n${extra}\r\n`;

  test("the coordinator's Upgrade to /v1/tunnel: bad tokens, paths and protocols never get a 101", async (t) => {
    const stats = new Map<string, number>();
    const start = counts();
    const r = await runCases("coordinator-upgrade", 4000, async (rng) => {
      const path = rng.pick(["/v1/tunnel", "/v1/tunnel", "/v1/tunnel?x=1", "/v1/hello", "/", "/v1/tunnel/", "/V1/TUNNEL", `/${rng.printable(rng.range(0, 20))}`]);
      const auth = rng.pick([`Bearer ${TOKEN}`, `Bearer ${TOKEN}`, "", "Bearer wrong-token-wrong-token", `Basic ${TOKEN}`, `Bearer ${TOKEN} extra`, `Bearer ${TOKEN.slice(0, -1)}`]);
      const upgrade = rng.pick(["natproxy-tunnel/1", "natproxy-tunnel/1", "NATPROXY-TUNNEL/1", "websocket", "natproxy-tunnel/2", "", rng.printable(rng.range(1, 20))]);
      const connection = rng.pick(["Upgrade", "Upgrade", "keep-alive, Upgrade", "close", ""]);
      const lines = [`${rng.pick(["GET", "GET", "POST", "PUT"])} ${path} HTTP/1.1`, "Host: localhost"];
      if (connection) lines.push(`Connection: ${connection}`);
      if (upgrade) lines.push(`Upgrade: ${upgrade}`);
      if (auth) lines.push(`Authorization: ${auth}`);
      let payload: Buffer = Buffer.from(`${lines.join("\r\n")}\r\n\r\n`, "latin1");
      const after = rng.chance(0.5) ? encodeOpen({ session: rng.uuid(), target: { host: "127.0.0.1", port: rng.pick([web.port, canary.port]) } }) : rng.bytes(rng.range(0, 200));
      payload = Buffer.concat([payload, after]);
      if (rng.chance(0.2)) payload = mutate(rng, payload);
      const text = payload.toString("latin1");
      const headEnd = text.indexOf("\r\n\r\n");
      const head = headEnd < 0 ? text : text.slice(0, headEnd + 2);
      // What a 101 requires: the tunnel path, the right token, the right protocol.
      const mayUpgrade = /^[A-Z]+ \/v1\/tunnel(\?[^ ]*)? HTTP\/1\.1\r\n/.test(head) && AUTH_RE.test(head) && /\r\nupgrade: *natproxy-tunnel\/1[ \t]*\r\n/i.test(head) && /\r\nconnection:[^\r\n]*upgrade/i.test(head);
      const x = await talk(coordinatorTls(), "secureConnect", split(rng, payload), { finDelay: finDelay(rng) });
      if (!x.ready) return `TLS handshake failed (${x.error})`;
      if (x.hung) return `no close within ${CASE_DEADLINE_MS} ms after FIN; sent ${show(payload)}`;
      const statuses = statusLines(x.data.subarray(0, 4096));
      count(stats, x.data.length ? `${mayUpgrade ? "valid" : "invalid"}-${statuses[0]}` : "closed");
      if (statuses[0] === 101 && !mayUpgrade) return `upgraded a request that lacks the token, path or protocol: ${show(payload, 400)}`;
      if (statuses.includes(500)) return `answered 500: ${show(x.data, 300)}`;
      return undefined;
    });
    await finishFuzz(t, "coordinator-upgrade", r, stats, start);
    assert.equal(canary.connections(), 0, "an Upgrade made the coordinator dial a refused target");
  });

  test("the coordinator's upgraded tunnel: garbage, broken and hostile Open messages after a good Upgrade", async (t) => {
    const stats = new Map<string, number>();
    const start = counts();
    // The policy lets 127.0.0.1 be reached on these ports only (in any spelling of 127.0.0.1).
    const allowedPorts = new Set([web.port, secure.port]);
    const r = await runCases("coordinator-tunnel", 4000, async (rng) => {
      const hosts = ["127.0.0.1", "127.0.0.1", "localhost", "::1", "::ffff:127.0.0.1", "0x7f.1", "10.1.2.3", "169.254.169.254", "bad host!", "a\0b", "x".repeat(255), "é.example"];
      const port = rng.pick([web.port, secure.port, refused, canary.port, 0, 65535]);
      const host = rng.pick(hosts);
      const session = rng.uuid();
      let open: Buffer;
      const kind = rng.int(9);
      let what = `Open ${host}:${port}`;
      const payloadOf = (h: string, p: number) => {
        const hb = Buffer.from(h, "utf8");
        const b = Buffer.alloc(18 + hb.length);
        Buffer.from(session.replace(/-/g, ""), "hex").copy(b);
        b.writeUInt16BE(p, 16);
        hb.copy(b, 18);
        return b;
      };
      if (kind <= 2) open = encodeWire(MessageType.Open, payloadOf(host, port));
      else if (kind === 3) {
        // Header fields mutated: magic, version, type, length.
        open = encodeWire(MessageType.Open, payloadOf("127.0.0.1", web.port));
        const field = rng.int(4);
        if (field === 0) open[rng.int(4)] ^= 1 << rng.int(8);
        else if (field === 1) open[4] = rng.pick([0, 2, 255]);
        else if (field === 2) open[5] = rng.pick([0, MessageType.Session, MessageType.Result, 4, 255]);
        else open.writeUInt16BE(rng.pick([0, 1, 17, 18, 1025, 65535]), 6);
        what = `Open with header ${open.subarray(0, 8).toString("hex")}`;
      } else if (kind === 4) {
        open = rng.pick([encodeSession(session), encodeWire(MessageType.Result, Buffer.from('{"code":"OK"}')), encodeWire(MessageType.Open, Buffer.alloc(0))]);
        what = `message type ${open[5]}`;
      } else if (kind === 5) {
        open = encodeWire(MessageType.Open, payloadOf(host, port)).subarray(0, rng.range(1, 20));
        what = "a truncated Open";
      } else if (kind === 6) {
        open = rng.bytes(rng.range(1, 1500));
        what = "random bytes";
      } else if (kind === 7) {
        open = Buffer.concat([encodeWire(MessageType.Open, payloadOf("127.0.0.1", web.port)), rng.chance(0.5) ? Buffer.from("GET /after-open HTTP/1.1\r\nHost: x\r\n\r\n") : rng.bytes(rng.range(1, 300))]);
        what = "a good Open to the web target, then bytes";
      } else {
        open = Buffer.concat([encodeWire(MessageType.Open, payloadOf(host, port)), encodeWire(MessageType.Open, payloadOf("127.0.0.1", canary.port))]);
        what = `two Opens (${host}:${port}, then the canary)`;
      }
      const payload = Buffer.concat([Buffer.from(upgradeHead(), "latin1"), open]);
      const x = await talk(coordinatorTls(), "secureConnect", [Buffer.from(upgradeHead(), "latin1"), ...split(rng, open)], { finDelay: finDelay(rng) });
      if (!x.ready) return `TLS handshake failed (${x.error})`;
      if (x.hung) return `no close within ${CASE_DEADLINE_MS} ms after FIN; sent ${what}: ${show(payload)}`;
      const text = x.data.toString("latin1");
      if (!text.startsWith("HTTP/1.1 101 ")) return `a valid Upgrade was not answered 101: ${show(x.data)}`;
      const rest = x.data.subarray(text.indexOf("\r\n\r\n") + 4);
      if (rest.length === 0) {
        count(stats, "closed");
        return undefined;
      }
      let code: string;
      try {
        const d = decodeWire(rest);
        if (!d) return `sent a truncated message after the 101: ${show(rest)}`;
        code = resultOf(d.message).code;
      } catch (err) {
        return `sent something that is not a Result after the 101 (${(err as Error).message}): ${show(rest)}`;
      }
      count(stats, code);
      if (code === "INTERNAL") return `Result INTERNAL for ${what}: ${show(rest)}`;
      if (code === "OK" && !((kind <= 2 || kind === 8) ? allowedPorts.has(port) : kind === 7)) return `Result OK for a target the policy refuses (${what})`;
      return undefined;
    });
    await finishFuzz(t, "coordinator-tunnel", r, stats, start);
    assert.equal(canary.connections(), 0, "an Open made the coordinator dial a refused target");
  });

  test("the coordinator refuses a TLS 1.1 client", async () => {
    const x = await talk(tls.connect({ host: "127.0.0.1", port: coordPort, servername: "localhost", ca: stack.pki.ca.cert, minVersion: "TLSv1", maxVersion: "TLSv1.1", ciphers: "DEFAULT@SECLEVEL=0" }), "secureConnect", [Buffer.from("GET /v1/hello HTTP/1.1\r\n\r\n")]);
    assert.equal(x.ready, false, "a TLS 1.1 handshake succeeded");
    assert.equal(x.hung, false);
  });

  // ------------------------------------------------------------ fuzz: the tunnel port

  /**
   * We dial the tunnel port like a coordinator would and then act as the TLS
   * server (or as something that is not TLS at all). Returns what the local
   * proxy sent: handshake records only, and never an application byte.
   */
  function tunnelPeer(chunks: Buffer[], tlsServer?: tls.SecureContextOptions): Promise<{ hung: boolean; secure: boolean; appBytes: number; raw: Buffer; error?: string; ms: number }> {
    return new Promise((resolve) => {
      const t0 = performance.now();
      const raw = net.connect(tunnelPort, "127.0.0.1");
      const got: Buffer[] = [];
      let appBytes = 0;
      let secure = false;
      let error: string | undefined;
      let done = false;
      const timer = setTimeout(() => finish(true), CASE_DEADLINE_MS);
      const finish = (hung: boolean) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        raw.destroy();
        resolve({ hung, secure, appBytes, raw: Buffer.concat(got), error, ms: Math.round(performance.now() - t0) });
      };
      raw.on("error", (e: NodeJS.ErrnoException) => (error ??= e.code));
      raw.on("close", () => finish(false));
      raw.once("connect", async () => {
        if (!tlsServer) {
          raw.on("data", (c: Buffer) => got.push(c));
          for (const c of chunks) {
            if (raw.destroyed) return;
            raw.write(c);
            await new Promise((r) => setImmediate(r));
          }
          if (!raw.destroyed) raw.end();
          return;
        }
        const s = new tls.TLSSocket(raw, { isServer: true, secureContext: tls.createSecureContext(tlsServer) });
        s.on("data", (c: Buffer) => (appBytes += c.length));
        s.on("error", (e: NodeJS.ErrnoException) => (error ??= e.code ?? e.message));
        s.on("close", () => finish(false));
        s.once("secure", async () => {
          secure = true;
          for (const c of chunks) {
            if (s.destroyed) return;
            s.write(c);
            await new Promise((r) => setImmediate(r));
          }
          if (!s.destroyed) s.end();
        });
      });
    });
  }

  /** TLS record content types in what the local proxy sent (it must be the handshake only). */
  function recordTypes(b: Buffer): number[] {
    const types: number[] = [];
    for (let at = 0; at + 5 <= b.length; at += 5 + b.readUInt16BE(at + 3)) types.push(b[at]);
    return types;
  }

  test("the local proxy's tunnel port: garbage peers, foreign TLS servers, garbage inside a trusted TLS connection", async (t) => {
    const stats = new Map<string, number>();
    const start = counts();
    const pki = stack.pki;
    const r = await runCases("tunnel", 5000, async (rng) => {
      const kind = rng.int(8);
      const session = rng.uuid();
      if (kind <= 1) {
        const payload = rng.pick([
          rng.bytes(rng.range(0, 1500)),
          Buffer.concat([Buffer.from([rng.pick([0x14, 0x15, 0x16, 0x17]), 0x03, rng.range(0, 4)]), rng.bytes(rng.range(0, 600))]),
          Buffer.from("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
          Buffer.from("SSH-2.0-OpenSSH_9.6\r\n"),
          encodeSession(session),
        ]);
        const x = await tunnelPeer(split(rng, payload));
        count(stats, "raw");
        if (x.hung) return `a raw peer was not dropped within ${CASE_DEADLINE_MS} ms: ${show(payload)}`;
        if (recordTypes(x.raw).some((ty) => ty === 0x17)) return `sent application data to a peer that never completed a handshake`;
        return undefined;
      }
      const which = rng.pick(["selfSigned", "otherCa", "expired", "wrongName", "tls11", "right", "right", "right"] as const);
      const context: tls.SecureContextOptions =
        which === "right"
          ? { key: pki.server.key, cert: pki.server.cert }
          : which === "tls11"
            ? { key: pki.server.key, cert: pki.server.cert, minVersion: "TLSv1", maxVersion: "TLSv1.1", ciphers: "DEFAULT@SECLEVEL=0" }
            : { key: certs[which].key, cert: certs[which].cert };
      const inside = rng.pick([
        encodeSession(session),
        Buffer.concat([encodeSession(session), rng.bytes(rng.range(1, 200))]),
        mutate(rng, encodeSession(session)),
        rng.bytes(rng.range(1, 1200)),
        encodeOpen({ session, target: { host: "127.0.0.1", port: canary.port } }),
        encodeWire(MessageType.Result, Buffer.from('{"code":"OK"}')),
        Buffer.from([0x4e, 0x41, 0x54, 0x50, 1, 1, 0xff, 0xff]),
        encodeSession(session).subarray(0, rng.range(1, 23)),
      ]);
      const x = await tunnelPeer(split(rng, inside), context);
      count(stats, `${which}-${x.secure ? "handshake" : "no-handshake"}`);
      if (x.hung) return `a ${which} TLS peer was not dropped within ${CASE_DEADLINE_MS} ms, sending ${show(inside)}`;
      if (x.appBytes > 0) return `the local proxy wrote ${x.appBytes} application bytes to a connect-back it never matched (${which})`;
      if (which === "tls11" && x.secure) return "completed a TLS 1.1 handshake (TLS 1.2 is the minimum)";
      return undefined;
    }, 40);
    await finishFuzz(t, "tunnel", r, stats, start);
    assert.equal(stack.local.pendingSessions(), 0);
  });

  // ------------------------------------------------------------ fuzz: the reporter

  function stunHeader(type: number, length: number, tid: Buffer, cookie = MAGIC_COOKIE): Buffer {
    const h = Buffer.alloc(20);
    h.writeUInt16BE(type & 0xffff, 0);
    h.writeUInt16BE(length & 0xffff, 2);
    h.writeUInt32BE(cookie >>> 0, 4);
    tid.copy(h, 8);
    return h;
  }

  function tlv(type: number, value: Buffer, declared = value.length): Buffer {
    const h = Buffer.alloc(4);
    h.writeUInt16BE(type, 0);
    h.writeUInt16BE(declared & 0xffff, 2);
    return Buffer.concat([h, value, Buffer.alloc((4 - (value.length % 4)) % 4)]);
  }

  function garbageAttributes(rng: Rng): Buffer {
    const out: Buffer[] = [];
    for (let k = rng.range(1, 6); k > 0; k--) {
      switch (rng.int(10)) {
        case 0:
          out.push(tlv(rng.int(0x10000), rng.bytes(rng.range(0, 40))));
          break;
        case 1:
          out.push(tlv(0x0020, Buffer.concat([Buffer.from([0, rng.int(4)]), rng.bytes(rng.range(0, 20))])));
          break;
        case 2:
          out.push(tlv(0x0008, rng.bytes(rng.pick([20, 20, 19, 32]))));
          break;
        case 3:
          out.push(tlv(0x8028, rng.bytes(rng.pick([4, 4, 8]))));
          break;
        case 4:
          out.push(tlv(0x8022, rng.chance(0.5) ? Buffer.from([0xc3, 0x28, 0xff]) : Buffer.alloc(800, 0x61)));
          break;
        case 5:
          out.push(tlv(0x0006, Buffer.alloc(rng.pick([10, 600]), 0x75)));
          break;
        case 6:
          out.push(tlv(0x0009, rng.bytes(rng.range(0, 12))));
          break;
        case 7:
          out.push(tlv(0x000a, rng.bytes(rng.pick([1, 3, 4]))));
          break;
        case 8:
          out.push(tlv(rng.range(0, 0x7fff), rng.bytes(rng.range(0, 8)))); // comprehension-required: 420
          break;
        default:
          out.push(tlv(rng.int(0x10000), rng.bytes(rng.range(0, 8)), rng.int(0x10000))); // lying length
      }
    }
    return Buffer.concat(out);
  }

  test("the reporter: random bytes, truncated and oversized STUN headers, valid headers with garbage attributes", async (t) => {
    const stats = new Map<string, number>();
    const start = counts();
    const r = await runCases("reporter", 3000, async (rng) => {
      const tids: Buffer[] = [];
      const message = (cls: StunClass = "request", method = METHOD_BINDING, attrs: Buffer = Buffer.alloc(0), length = attrs.length) => {
        const tid = rng.bytes(12);
        tids.push(tid);
        return Buffer.concat([stunHeader(messageType(method, cls), length, tid), attrs]);
      };
      let payload: Buffer;
      const kind = rng.int(9);
      if (kind === 0) payload = rng.bytes(rng.range(1, 1500));
      else if (kind === 1) payload = message().subarray(0, rng.range(1, 19)); // truncated header
      else if (kind === 2) payload = Buffer.concat([stunHeader(messageType(METHOD_BINDING, "request"), rng.pick([2032, 4096, 0xfffc, 0xffff]), rng.bytes(12)), rng.bytes(rng.range(0, 3000))]); // oversized
      else if (kind === 3) payload = Buffer.concat([stunHeader(messageType(METHOD_BINDING, "request"), rng.range(1, 3) * 1 + 4 * rng.int(4), rng.bytes(12)), rng.bytes(20)]); // length not a multiple of 4
      else if (kind === 4) payload = stunHeader(rng.int(0x10000) | 0xc000, 0, rng.bytes(12)); // top bits set
      else if (kind === 5) payload = stunHeader(messageType(METHOD_BINDING, "request"), 0, rng.bytes(12), rng.int(2 ** 32)); // wrong cookie
      else if (kind === 6) {
        const attrs = garbageAttributes(rng);
        payload = message("request", METHOD_BINDING, attrs, rng.chance(0.85) ? attrs.length : rng.int(0x800) & ~3);
      } else if (kind === 7) payload = message(rng.pick(["request", "indication", "success", "error"] as const), rng.int(0x1000), rng.chance(0.5) ? garbageAttributes(rng) : Buffer.alloc(0));
      else {
        const parts: Buffer[] = [message()];
        for (let k = rng.range(1, 3); k > 0; k--) parts.push(rng.chance(0.5) ? message() : mutate(rng, message()));
        payload = Buffer.concat(parts);
      }
      if (rng.chance(0.1) && kind !== 1) payload = mutate(rng, payload);
      const x = await talk(net.connect(reporterPort, "127.0.0.1"), "connect", split(rng, payload));
      if (!x.ready) return `could not connect (${x.error})`;
      if (x.hung) return `no close within ${CASE_DEADLINE_MS} ms after FIN: ${show(payload)}`;
      if (x.data.length === 0) {
        count(stats, "closed");
        return undefined;
      }
      let frames: Buffer[];
      try {
        frames = new StunFramer(65_555).push(x.data);
      } catch (err) {
        return `answered something that is not STUN (${(err as Error).message}): ${x.data.toString("hex").slice(0, 200)}`;
      }
      for (const f of frames) {
        let msg;
        try {
          msg = decodeStun(f);
        } catch (err) {
          return `answered an undecodable STUN message (${(err as Error).message})`;
        }
        count(stats, `${msg.class}`);
        if (msg.class === "success" || msg.class === "error") {
          if (!tids.some((tid) => tid.equals(msg.transactionId)) && !payload.includes(msg.transactionId)) return `answered a transaction id it was never sent`;
          if (!getAttribute(msg, "FINGERPRINT")) return "answered without FINGERPRINT";
        }
        if (msg.class === "success") {
          const mapped = getAttribute(msg, "XOR-MAPPED-ADDRESS");
          if (!mapped || mapped.address.port !== x.localPort) return `a success answer with the wrong mapped address: ${JSON.stringify(mapped)} (we are port ${x.localPort})`;
        }
      }
      return undefined;
    });
    await finishFuzz(t, "reporter", r, stats, start);
  });

  // ------------------------------------------------------------ afterwards

  test("after the fuzzing every role is alive and still serving", async () => {
    const get = await proxiedRequest(stack.proxyPort, `http://127.0.0.1:${web.port}/after-fuzz`, { headers: { Connection: "close" } });
    assert.equal(get.status, 200, "a proxied HTTP GET");
    assert.equal(JSON.parse(get.body.toString()).url, "/after-fuzz");
    const https = await httpsThrough(stack.proxyPort, "localhost", secure.port, "/after-fuzz-tls", stack.pki.ca.cert);
    assert.equal(https.status, 200, "an HTTPS GET through CONNECT");
    assert.equal(JSON.parse(https.body.toString()).url, "/after-fuzz-tls");
    await assertReporterAnswers();
    const hello = await talk(coordinatorTls(), "secureConnect", [Buffer.from(`GET /v1/hello HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${TOKEN}\r\nConnection: close\r\n\r\n`)]);
    assert.match(hello.data.toString(), /^HTTP\/1\.1 200 [\s\S]*"software":"natproxy"/, "the coordinator's API answers");
    const state = stack.local.mapping();
    assert.ok(state, "the tunnel service is still up");
    assert.equal(state.localPort, tunnelPort);
    assert.equal(state.since, tunnelSince, "the tunnel service did not restart during the fuzzing");
    assert.equal(stack.local.path(), "connect-back");
    assert.equal(canary.connections(), 0, "nothing reached the canary");
    assert.deepEqual(warnings, [], "process warnings (e.g. MaxListenersExceeded: a listener leak)");
    assertNoProcessErrors(processErrors, "during the fuzzing");
  });

  test("after the fuzzing, sockets, sessions and descriptors return to the baseline", async () => {
    assert.equal(await settled(baseline), undefined, "the baseline taken before the fuzzing");
  });
});

async function assertReporterAnswers(): Promise<void> {
  const tid = Buffer.from("fuzz-check-1");
  const socket = net.connect(reporterPort, "127.0.0.1");
  let localPort = 0;
  const x = await new Promise<Buffer>((resolve, reject) => {
    const framer = new StunFramer();
    const timer = setTimeout(() => reject(new Error("the reporter did not answer a Binding request within 3 s")), 3000);
    socket.on("error", reject);
    socket.once("connect", () => {
      localPort = socket.localPort ?? 0;
      socket.write(stunHeader0(tid));
    });
    socket.on("data", (c: Buffer) => {
      const frames = framer.push(c);
      if (frames.length) {
        clearTimeout(timer);
        resolve(frames[0]);
      }
    });
  }).finally(() => socket.destroy());
  const msg = decodeStun(x);
  assert.equal(msg.class, "success");
  assert.ok(msg.transactionId.equals(tid));
  assert.equal(getAttribute(msg, "XOR-MAPPED-ADDRESS")?.address.port, localPort);
}

function stunHeader0(tid: Buffer): Buffer {
  const h = Buffer.alloc(20);
  h.writeUInt16BE(messageType(METHOD_BINDING, "request"), 0);
  h.writeUInt32BE(MAGIC_COOKIE, 4);
  tid.copy(h, 8);
  return h;
}

// ---------------------------------------------------------------- slowloris

interface Slow {
  closedAfter: number | undefined;
  socket: net.Socket;
}

/** Opens `n` connections that each send `partial` (after `prefix`, if any) and then nothing. */
async function openSlow(n: number, open: () => net.Socket, readyEvent: "connect" | "secureConnect" | "secure", partial: () => Buffer | undefined): Promise<Slow[]> {
  const slow: Slow[] = [];
  await Promise.all(
    Array.from(
      { length: n },
      () =>
        new Promise<void>((resolve, reject) => {
          const socket = open();
          // The clock starts when the connection has stalled (its partial request sent).
          let t0 = performance.now();
          const entry: Slow = { closedAfter: undefined, socket };
          slow.push(entry);
          socket.on("error", () => {});
          socket.resume();
          socket.on("close", () => {
            entry.closedAfter = Math.round(performance.now() - t0);
            resolve();
          });
          socket.once(readyEvent, () => {
            const p = partial();
            if (p) socket.write(p);
            t0 = performance.now();
            resolve();
          });
          setTimeout(() => reject(new Error("slow connection not established in 3 s")), 3000).unref();
        }),
    ),
  );
  return slow;
}

/** Waits for every slow connection to be closed by the server; fails naming those that stay past `limit`. */
async function expectAllClosed(what: string, slow: Slow[], timeout: number): Promise<void> {
  const limit = timeout + SLOWLORIS_SLACK_MS;
  try {
    await waitUntil(() => slow.every((s) => s.closedAfter !== undefined), limit + 200, what);
  } catch {
    // judged below
  } finally {
    const open = slow.filter((s) => s.closedAfter === undefined).length;
    const times = slow.map((s) => s.closedAfter).filter((v): v is number => v !== undefined);
    for (const s of slow) s.socket.destroy();
    assert.equal(open, 0, `${what}: ${open} of ${slow.length} connections were still open ${limit} ms after they stalled (configured timeout ${timeout} ms)`);
    const late = times.filter((ms) => ms > limit);
    assert.equal(late.length, 0, `${what}: closed after ${late.join(", ")} ms, the limit is ${limit} ms (timeout ${timeout} ms + ${SLOWLORIS_SLACK_MS} ms)`);
  }
}

async function normalTrafficWorks(): Promise<void> {
  const get = await proxiedRequest(stack.proxyPort, `http://127.0.0.1:${web.port}/while-slowloris`, { headers: { Connection: "close" } });
  assert.equal(get.status, 200, "a normal proxied GET while slow connections are open");
}

// One port at a time, so that each measures its own server's timers and not
// an event loop busy with the others' handshakes.
describe("slowloris: connections that stall mid-request are closed within their timeout", () => {
  test(`the browser port: ${SLOWLORIS_N} partial request heads, closed within connect_timeout (${T.localConnect} ms)`, async () => {
    const slow = await openSlow(SLOWLORIS_N, () => net.connect(stack.proxyPort, "127.0.0.1"), "connect", () => Buffer.from(`GET http://127.0.0.1:${web.port}/slow HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: `));
    try {
      await normalTrafficWorks();
    } finally {
      await expectAllClosed("browser port", slow, T.localConnect);
    }
  });

  test(`the coordinator, TLS handshake: ${SLOWLORIS_N} partial ClientHellos, closed within handshake_timeout (${T.coordHandshake} ms)`, async () => {
    const slow = await openSlow(SLOWLORIS_N, () => net.connect(coordPort, "127.0.0.1"), "connect", () => clientHello.subarray(0, 40));
    try {
      await normalTrafficWorks();
    } finally {
      await expectAllClosed("coordinator TLS handshake", slow, T.coordHandshake);
    }
  });

  test(`the coordinator, HTTP inside TLS: ${SLOWLORIS_N} partial API request heads, closed within the header timeout (${Math.min(T.coordHandshake, T.coordRequest)} ms)`, async () => {
    const slow = await openSlow(SLOWLORIS_N, () => tls.connect({ host: "127.0.0.1", port: coordPort, servername: "localhost", ca: stack.pki.ca.cert }), "secureConnect", () =>
      Buffer.from(`POST /v1/sessions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${TOKEN}\r\n`),
    );
    try {
      await normalTrafficWorks();
    } finally {
      await expectAllClosed("coordinator HTTP head", slow, Math.min(T.coordHandshake, T.coordRequest));
    }
  });

  test(`the coordinator, HTTP body: ${SLOWLORIS_N} partial API request bodies, closed within request_timeout (${T.coordRequest} ms)`, async () => {
    const slow = await openSlow(SLOWLORIS_N, () => tls.connect({ host: "127.0.0.1", port: coordPort, servername: "localhost", ca: stack.pki.ca.cert }), "secureConnect", () =>
      Buffer.from(`POST /v1/sessions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{"session":`),
    );
    try {
      await normalTrafficWorks();
    } finally {
      await expectAllClosed("coordinator HTTP body", slow, T.coordRequest);
    }
  });

  test(`the coordinator, upgraded tunnel: ${SLOWLORIS_N} partial Open messages, closed within keep_alive_timeout (${T.coordKeepAlive} ms)`, async () => {
    const slow = await openSlow(SLOWLORIS_N, () => tls.connect({ host: "127.0.0.1", port: coordPort, servername: "localhost", ca: stack.pki.ca.cert }), "secureConnect", () =>
      Buffer.concat([Buffer.from(upgradeHeadFor(TOKEN), "latin1"), encodeOpen({ session: "6f1c1a52-4c1e-4d6a-9a51-2f0c1e7d9b10", target: { host: "127.0.0.1", port: 80 } }).subarray(0, 6)]),
    );
    try {
      await normalTrafficWorks();
    } finally {
      await expectAllClosed("coordinator upgraded tunnel", slow, T.coordKeepAlive);
    }
  });

  test(`the tunnel port: ${SLOWLORIS_N} raw peers that stall mid-record and ${SLOWLORIS_N} trusted TLS peers that stall mid-message, closed within connect_timeout (${T.localConnect} ms)`, async () => {
    const raw = await openSlow(SLOWLORIS_N, () => net.connect(tunnelPort, "127.0.0.1"), "connect", () => Buffer.from([0x16, 0x03, 0x03]));
    const trusted = await openSlow(
      SLOWLORIS_N,
      () => new tls.TLSSocket(net.connect(tunnelPort, "127.0.0.1"), { isServer: true, secureContext: tls.createSecureContext({ key: stack.pki.server.key, cert: stack.pki.server.cert }) }),
      "secure",
      () => encodeSession("6f1c1a52-4c1e-4d6a-9a51-2f0c1e7d9b10").subarray(0, 4),
    );
    try {
      await normalTrafficWorks();
    } finally {
      await expectAllClosed("tunnel port, raw", raw, T.localConnect);
      await expectAllClosed("tunnel port, trusted TLS", trusted, T.localConnect);
    }
  });

  test(`the reporter: ${SLOWLORIS_N} partial STUN headers, closed within handshake_timeout (${T.reporterHandshake} ms)`, async () => {
    const slow = await openSlow(SLOWLORIS_N, () => net.connect(reporterPort, "127.0.0.1"), "connect", () => stunHeader0(Buffer.from("slowloris-01")).subarray(0, 10));
    try {
      await assertReporterAnswers();
    } finally {
      await expectAllClosed("reporter", slow, T.reporterHandshake);
    }
  });
});

describe("after the slowloris", () => {
  test("sockets, sessions and descriptors return to the baseline", async () => {
    assert.equal(await settled(baseline), undefined, "the baseline taken before the fuzzing");
  });
});

function upgradeHeadFor(token: string): string {
  return `GET /v1/tunnel HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: natproxy-tunnel/1\r\nAuthorization: Bearer ${token}\r\n\r\n`;
}
