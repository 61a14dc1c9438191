import { randomInt } from "node:crypto";
import type net from "node:net";

// The fuzzing machinery shared by test/fuzz/*.test.ts, which fuzz every
// listening port of the three roles: the local proxy's browser port
// (browser-port.test.ts) and its tunnel port, the connect-back listener where
// the local proxy is the TLS *client* (tunnel-port.test.ts), the
// coordinator's HTTPS port: raw TCP, inside TLS, HTTP API, Upgrade, and the
// upgraded tunnel (coordinator-port.test.ts), and the reporter, STUN over TCP
// (reporter-port.test.ts). Every case is generated from a seeded PRNG:
//
//   FUZZ_SEED=<n> node --test test/fuzz/*.test.ts          same cases again
//   FUZZ_SEED=<n> FUZZ_ONLY=<tag>#<i> node --test ...     one case only (or #<i>-<j>, a range)
//   FUZZ_CASES=<n>                                        cases per port (300)
//   FUZZ_DEBUG=1                                          print each browser-port payload
//
// Tags: browser, coordinator-raw, coordinator-api, coordinator-upgrade,
// coordinator-tunnel, tunnel, reporter. Each port's loop is bounded in count
// and in time (a few seconds), so each file takes a few seconds when
// everything passes.
//
// Each case sends its bytes, half-closes, and must see the server close the
// connection within CASE_DEADLINE_MS (no hang) without answering anything a
// correct server would not. Afterwards every role must still serve and the
// socket/descriptor counts must return to the baseline (stack.ts). The
// slowloris file opens connections that stop mid-request and checks each is
// closed within its configured timeout while normal traffic still gets
// through.

export const SEED = process.env.FUZZ_SEED ? Number(process.env.FUZZ_SEED) : randomInt(1, 2 ** 31 - 1);
export const ONLY = process.env.FUZZ_ONLY;
console.log(`fuzz seed ${SEED} (reproduce with FUZZ_SEED=${SEED})`);

/** After its last byte and FIN, a fuzz case must see the server close within this. */
export const CASE_DEADLINE_MS = 5000;
export const CASES = Number(process.env.FUZZ_CASES ?? 300);
const CONCURRENCY = 32;

// ---------------------------------------------------------------- PRNG

/** mulberry32: small, fast, and the same sequence for the same seed everywhere. */
export class Rng {
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
export function mutate(rng: Rng, input: Buffer): Buffer {
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
export function split(rng: Rng, payload: Buffer): Buffer[] {
  const cuts = new Set<number>();
  for (let k = rng.int(4); k > 0 && payload.length > 1; k--) cuts.add(rng.range(1, payload.length - 1));
  const at = [0, ...[...cuts].sort((a, b) => a - b), payload.length];
  return at.slice(1).map((end, i) => payload.subarray(at[i], end)).filter((c) => c.length > 0);
}

export const show = (b: Buffer, max = 160) => JSON.stringify(b.subarray(0, max).toString("latin1")) + (b.length > max ? `… (${b.length} bytes)` : "");

// ---------------------------------------------------------------- connections

export interface Exchange {
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
export function talk(socket: net.Socket, readyEvent: "connect" | "secureConnect", chunks: Buffer[], opts: { finDelay?: number; deadline?: number } = {}): Promise<Exchange> {
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
export const finDelay = (rng: Rng) => (rng.chance(0.5) ? 400 : undefined);

// ---------------------------------------------------------------- runner

export async function runCases(tag: string, budgetMs: number, one: (rng: Rng, i: number) => Promise<string | undefined>, concurrency = CONCURRENCY): Promise<{ ran: number; failures: string[]; ms: number }> {
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

export function count(stats: Map<string, number>, key: string): void {
  stats.set(key, (stats.get(key) ?? 0) + 1);
}

/** Status codes of every response head in `data` that starts a line (pipelined answers included). */
export function statusLines(data: Buffer): number[] {
  // Interim answers (100 Continue, which Node sends on its own for Expect) are not answers.
  return [...data.toString("latin1").matchAll(/(?:^|\n)HTTP\/1\.[01] (\d{3}) /g)].map((m) => Number(m[1])).filter((s) => s >= 200 || s === 101);
}
