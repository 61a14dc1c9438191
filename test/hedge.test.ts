import assert from "node:assert/strict";
import { getEventListeners } from "node:events";
import { duplexPair, type Duplex } from "node:stream";
import type { TLSSocket } from "node:tls";
import { describe, test, type TestContext } from "node:test";
import { createConsola } from "consola";
import { NatproxyError } from "../src/errors.ts";
import { both, hedge, type Attempt } from "../src/hedge.ts";
import { EarlyBytes } from "../src/local/tunnel/early-bytes.ts";
import { openTunnel, type TunnelOpenerOptions } from "../src/local/tunnel/opener.ts";
import { PathChooser, type DataPathMode } from "../src/local/tunnel/path.ts";
import { ReadyPool, type DialedConnection, type ReadyDialer } from "../src/local/tunnel/ready-pool.ts";
import { encodeResult } from "../src/protocol/wire.ts";
import type { HostPort } from "../src/address.ts";
import { SocketRegistry } from "../src/sockets.ts";

// The two-attempt combinators on their own (fake attempts, mocked clock), and
// the bound they keep for one browser connection: the opener's hedge and the
// pools' together never have more than two attempts in flight.

/** Lets promise callbacks and stream events run; setImmediate is not mocked. */
const flush = async () => {
  for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
};

/** An attempt the test settles by hand; like a real dialer it rejects with the signal's reason when aborted, unless told to ignore it. */
class Fake<T> {
  calls = 0;
  signal: AbortSignal | undefined;
  #resolve: ((v: T) => void) | undefined;
  #reject: ((e: unknown) => void) | undefined;
  readonly obeysAbort: boolean;
  constructor(obeysAbort = true) {
    this.obeysAbort = obeysAbort;
  }
  readonly attempt: Attempt<T> = (signal) => {
    this.calls++;
    this.signal = signal;
    return new Promise<T>((resolve, reject) => {
      this.#resolve = resolve;
      this.#reject = reject;
      if (!this.obeysAbort) return;
      if (signal.aborted) reject(signal.reason);
      else signal.addEventListener("abort", () => reject(signal.reason), { once: true });
    });
  };
  succeed(v: T): void {
    assert.ok(this.#resolve, "started");
    this.#resolve(v);
  }
  fail(e: unknown): void {
    assert.ok(this.#reject, "started");
    this.#reject(e);
  }
}

const fixable = new NatproxyError("CONNECT_BACK_TIMEOUT", "fixable");
const final = new NatproxyError("TARGET_REFUSED", "final");
const isFixable = (err: unknown) => err === fixable;

function race(t: TestContext, extra: { secondaryFinal?: boolean; attempts?: 1 | 2; signal?: AbortSignal; primaryObeys?: boolean } = {}) {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const primary = new Fake<string>(extra.primaryObeys ?? true);
  const secondary = new Fake<string>();
  const discarded: string[] = [];
  const settled: { value?: string; error?: unknown } = {};
  const result = hedge({ primary: primary.attempt, secondary: secondary.attempt, delay: 1000, fixable: isFixable, discard: (v) => discarded.push(v), ...extra });
  result.then(
    (value) => (settled.value = value),
    (error: unknown) => (settled.error = error),
  );
  return { primary, secondary, discarded, settled, result };
}

describe("hedge(): the first of two attempts to succeed", () => {
  test("a primary that answers within the delay is the only attempt", async (t) => {
    const r = race(t);
    t.mock.timers.tick(999);
    r.primary.succeed("p");
    assert.equal(await r.result, "p");
    t.mock.timers.tick(10_000);
    await flush();
    assert.equal(r.secondary.calls, 0);
  });

  test("a silent primary gets the secondary beside it at the delay, not before; the first success wins and the loser is cancelled", async (t) => {
    const r = race(t);
    t.mock.timers.tick(999);
    await flush();
    assert.equal(r.secondary.calls, 0);
    t.mock.timers.tick(1);
    assert.equal(r.secondary.calls, 1);
    assert.equal(r.primary.signal?.aborted, false, "the primary runs on beside it");
    r.secondary.succeed("s");
    assert.equal(await r.result, "s");
    assert.equal(r.primary.signal?.aborted, true);
    assert.equal((r.primary.signal?.reason as NatproxyError).code, "CANCELLED");
    assert.equal(r.secondary.signal?.aborted, false, "the winner is left alone");
  });

  test("a winner that comes too late is handed to discard, not lost", async (t) => {
    const r = race(t, { primaryObeys: false });
    t.mock.timers.tick(1000);
    r.secondary.succeed("s");
    assert.equal(await r.result, "s");
    r.primary.succeed("late");
    await flush();
    assert.deepEqual(r.discarded, ["late"]);
  });

  test("a primary failure the secondary can fix starts it at once; both failing gives the secondary's error", async (t) => {
    const r = race(t);
    r.primary.fail(fixable);
    await flush();
    assert.equal(r.secondary.calls, 1, "started without waiting for the delay");
    const theirs = new NatproxyError("COORDINATOR_UNREACHABLE");
    r.secondary.fail(theirs);
    await assert.rejects(r.result, (e) => e === theirs);
    t.mock.timers.tick(5000);
    assert.equal(r.secondary.calls, 1, "the timer did not start it again");
  });

  test("a final primary failure is the answer, and cancels a secondary still running", async (t) => {
    const r = race(t);
    t.mock.timers.tick(1000);
    r.primary.fail(final);
    await assert.rejects(r.result, (e) => e === final);
    assert.equal(r.secondary.signal?.aborted, true);
  });

  test("by default a failed secondary waits for the primary, whose outcome decides", async (t) => {
    for (const [outcome, want] of [
      ["succeeds", "p"],
      ["fails fixably", "secondary's error"],
      ["fails finally", "primary's error"],
    ] as const) {
      const r = race(t);
      t.mock.timers.tick(1000);
      const theirs = new NatproxyError("COORDINATOR_UNREACHABLE");
      r.secondary.fail(theirs);
      await flush();
      assert.deepEqual(r.settled, {}, `${outcome}: still open after the secondary failed`);
      if (outcome === "succeeds") r.primary.succeed("p");
      else r.primary.fail(outcome === "fails fixably" ? fixable : final);
      await flush();
      if (want === "p") assert.equal(r.settled.value, "p");
      else assert.equal(r.settled.error, want === "secondary's error" ? theirs : final, outcome);
      t.mock.timers.reset();
    }
  });

  test("secondaryFinal: a failed secondary is the answer at once and cancels the primary", async (t) => {
    const r = race(t, { secondaryFinal: true });
    t.mock.timers.tick(1000);
    const theirs = new NatproxyError("COORDINATOR_UNREACHABLE");
    r.secondary.fail(theirs);
    await assert.rejects(r.result, (e) => e === theirs);
    assert.equal(r.primary.signal?.aborted, true);
  });

  test("attempts: 1: at the delay the secondary takes the primary's place; the replaced primary's failure is ignored", async (t) => {
    const r = race(t, { attempts: 1 });
    t.mock.timers.tick(1000);
    assert.equal(r.primary.signal?.aborted, true, "aborted before the secondary started");
    assert.equal((r.primary.signal?.reason as NatproxyError).code, "CANCELLED");
    assert.equal(r.secondary.calls, 1);
    await flush();
    assert.deepEqual(r.settled, {}, "the primary's rejection did not decide");
    r.secondary.succeed("s");
    assert.equal(await r.result, "s");
  });

  test("the caller's abort reaches both attempts, no secondary starts after it, and the next failure is the answer", async (t) => {
    const caller = new AbortController();
    const r = race(t, { signal: caller.signal });
    caller.abort(new NatproxyError("CLIENT_GONE"));
    await assert.rejects(r.result, (e: NatproxyError) => e.code === "CLIENT_GONE");
    t.mock.timers.tick(5000);
    assert.equal(r.secondary.calls, 0);
    // Whichever attempt fails first once the caller has left is the answer
    // (here the secondary: this primary ignores its abort), and the race
    // stops listening to the caller once decided.
    const c2 = new AbortController();
    t.mock.timers.reset();
    const r2 = race(t, { signal: c2.signal, primaryObeys: false });
    t.mock.timers.tick(1000);
    c2.abort();
    await flush();
    assert.equal(r2.secondary.signal?.aborted, true);
    assert.ok(r2.settled.error, "the secondary's abort error decided");
    assert.equal(getEventListeners(c2.signal, "abort").length, 0);
  });

  test("a decided race leaves no listener on a long-lived caller signal", async (t) => {
    const long = new AbortController();
    for (let i = 0; i < 3; i++) {
      const r = race(t, { signal: long.signal });
      r.primary.succeed("p");
      await r.result;
      t.mock.timers.reset();
    }
    assert.equal(getEventListeners(long.signal, "abort").length, 0);
  });
});

describe("both(): two attempts, both needed", () => {
  const legs = () => {
    const a = new Fake<string>();
    const b = new Fake<string>();
    const released: [string, unknown][] = [];
    const leg = (f: Fake<string>) => ({ attempt: f.attempt, release: (v: string, err: unknown) => released.push([v, err]) });
    return { a, b, released, leg };
  };

  test("both succeed, in either order: both values", async () => {
    const { a, b, leg } = legs();
    const p = both(leg(a), leg(b));
    b.succeed("B");
    await flush();
    a.succeed("A");
    assert.deepEqual(await p, ["A", "B"]);
  });

  test("the first failure is the answer and cancels the other; a value already there is released with that failure", async () => {
    const { a, b, released, leg } = legs();
    const p = both(leg(a), leg(b));
    a.succeed("A");
    await flush();
    b.fail(final);
    await assert.rejects(p, (e) => e === final);
    assert.deepEqual(released, [["A", final]]);
  });

  test("a failure while the other runs aborts it; if it answers anyway, its value is released too", async () => {
    const { b, released } = legs();
    const stubborn = new Fake<string>(false);
    const p = both({ attempt: stubborn.attempt, release: (v, err) => released.push([v, err]) }, { attempt: b.attempt, release: () => assert.fail("b never succeeded") });
    b.fail(final);
    await assert.rejects(p, (e) => e === final);
    assert.equal(stubborn.signal?.aborted, true);
    assert.equal((stubborn.signal?.reason as NatproxyError).code, "CANCELLED");
    stubborn.succeed("late");
    await flush();
    assert.deepEqual(released, [["late", final]]);
  });

  test("the caller's abort stops both with its reason; afterwards nothing listens on it", async () => {
    const { a, b, leg } = legs();
    const shutdown = new AbortController();
    const p = both(leg(a), leg(b), shutdown.signal);
    shutdown.abort(new NatproxyError("SHUTTING_DOWN"));
    await assert.rejects(p, (e: NatproxyError) => e.code === "SHUTTING_DOWN");
    assert.equal(a.signal?.aborted && b.signal?.aborted, true);
    const q = both(leg(new Fake<string>()), { attempt: async () => "x", release: () => {} }, shutdown.signal);
    await assert.rejects(q, (e: NatproxyError) => e.code === "SHUTTING_DOWN", "an already aborted signal stops a new race at once");
    const live = new AbortController();
    const { a: a2, b: b2, leg: leg2 } = legs();
    const r = both(leg2(a2), leg2(b2), live.signal);
    a2.succeed("A");
    b2.succeed("B");
    await r;
    assert.equal(getEventListeners(live.signal, "abort").length, 0);
  });
});

// One browser connection through openTunnel and two real ReadyPools, with
// dialers that count what is in flight: a pooled connection from the moment
// its Open is written until it is destroyed or answered, a fresh dial from
// its call until it settles or is aborted.

/** What a candidate does `after` ms: answers, never answers, dies (pooled only), or fails with an error (for a pooled one: a Result naming it). */
type Behaviour = { after: number; then: "ok" | "silent" | "dead" | NatproxyError };

class CountingDialer implements ReadyDialer {
  pooled: Behaviour = { after: 0, then: "ok" };
  fresh: Behaviour = { after: 0, then: "ok" };
  /** Where the bytes written on each winning candidate's socket arrive. */
  readonly peers = new Map<Duplex, Duplex>();
  readonly name: string;
  readonly live: Set<() => boolean>;
  readonly onStart: () => void;
  constructor(name: string, live: Set<() => boolean>, onStart: () => void) {
    this.name = name;
    this.live = live;
    this.onStart = onStart;
  }

  upgrade(): Promise<DialedConnection> {
    const [mine, theirs] = duplexPair();
    this.peers.set(mine, theirs);
    let opened = false;
    let answered = false;
    const write = mine.write.bind(mine) as (chunk: Buffer) => boolean;
    // The first write on a pooled connection is its Open: an attempt begins.
    mine.write = ((chunk: Buffer) => {
      if (!opened) {
        opened = true;
        this.live.add(() => !mine.destroyed && !answered);
        this.onStart();
        const b = this.pooled;
        const then = b.then;
        if (then === "dead") setTimeout(() => theirs.destroy(), b.after);
        else if (then !== "silent") {
          const result = then === "ok" ? { code: "OK", target_address: this.name } : { code: then.code, message: then.message };
          setTimeout(() => ((answered = true), theirs.write(encodeResult(result))), b.after);
        }
        // A dead pooled connection: its peer's end closes, which ends ours.
        theirs.once("close", () => mine.push(null));
      }
      return write(chunk);
    }) as typeof mine.write;
    return Promise.resolve({ socket: mine as unknown as TLSSocket, overhead: 0, sentOverhead: 0 });
  }

  open(_session: string, _target: HostPort, signal?: AbortSignal, early?: EarlyBytes): Promise<DialedConnection> {
    const b = this.fresh;
    let running = true;
    this.live.add(() => running);
    this.onStart();
    const [mine, theirs] = duplexPair();
    this.peers.set(mine, theirs);
    early?.attach(mine);
    return new Promise((resolve, reject) => {
      const end = (err?: unknown) => {
        running = false;
        clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
        if (!err) return resolve({ socket: mine as unknown as TLSSocket, overhead: 0, sentOverhead: 0, targetAddress: this.name });
        early?.detach(mine);
        mine.destroy();
        reject(err);
      };
      const onAbort = () => end(signal?.reason ?? new NatproxyError("CLIENT_GONE"));
      signal?.addEventListener("abort", onAbort, { once: true });
      // A silent dial still ends, as a real one does at connect_timeout.
      const silent = new NatproxyError(this.name === "connect-back" ? "CONNECT_BACK_TIMEOUT" : "COORDINATOR_UNREACHABLE", "connect_timeout");
      const timer = setTimeout(() => end(b.then === "ok" ? undefined : b.then === "silent" || b.then === "dead" ? silent : b.then), b.then === "silent" ? 10_000 : b.after);
    });
  }
}

async function connectOnce(t: TestContext, mode: DataPathMode, set: (cb: CountingDialer, out: CountingDialer) => void, poolsWarm = { cb: true, out: true }) {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const live = new Set<() => boolean>();
  let most = 0;
  const onStart = () => (most = Math.max(most, [...live].filter((inFlight) => inFlight()).length));
  const cbDialer = new CountingDialer("connect-back", live, onStart);
  const outDialer = new CountingDialer("outbound", live, onStart);
  const poolOpts = { size: 1, maxAge: 1e9, grace: 1000 };
  const connectBack = new ReadyPool(cbDialer, poolOpts);
  const outbound = new ReadyPool(outDialer, poolOpts);
  const paths = new PathChooser(mode, "https://coordinator", createConsola({ level: -999 }));
  paths.probed({ publicAddress: "p", localAddress: "l", nat: true, portPreserved: true, probe: { ok: true, ms: 1 }, behaviour: "test" });
  // Warm-up: one tunnel on a path fills its pool with one ready connection.
  for (const [pool, warm] of [
    [connectBack, poolsWarm.cb],
    [outbound, poolsWarm.out],
  ] as const) {
    if (!warm) continue;
    const warming = pool.open("warm", { host: "t", port: 1 });
    t.mock.timers.tick(1);
    (await warming).socket.destroy();
    await flush();
    assert.equal(pool.size, 1);
  }
  live.clear();
  most = 0;
  set(cbDialer, outDialer);
  const opts: TunnelOpenerOptions = { outbound, connectBack, paths, connectBackGrace: () => 1000, opening: { count: 0 }, maxPending: 10, sockets: new SocketRegistry() };
  const [browser, browserPeer] = duplexPair();
  const early = new EarlyBytes(browser, 64 * 1024, Buffer.from("hello"));
  const settled: { via?: string; error?: NatproxyError; ms?: number; replayed?: boolean } = {};
  let winner: Duplex | undefined;
  void openTunnel(opts, { host: "t", port: 1 }, undefined, early).then(
    (tunnel) => {
      settled.via = tunnel.path;
      winner = tunnel.socket;
    },
    (error: NatproxyError) => (settled.error = error),
  );
  let ms = 0;
  while (!settled.via && !settled.error && ms < 30_000) {
    t.mock.timers.tick(50);
    ms += 50;
    await flush();
  }
  settled.ms = ms;
  if (winner) {
    // What the winner's far end was sent: its Open (if pooled), then the browser's bytes.
    const sent = (cbDialer.peers.get(winner) ?? outDialer.peers.get(winner))?.read() as Buffer | null;
    settled.replayed = sent?.toString("latin1").endsWith("hello") === true;
  }
  browserPeer.destroy();
  connectBack.close();
  outbound.close();
  return { most, settled, paths };
}

describe("one browser connection never has more than two attempts in flight", () => {
  test("pooled connect-back silent: outbound beside it at the grace period wins, and auto switches", async (t) => {
    const r = await connectOnce(t, "auto", (cb, out) => {
      cb.pooled = { after: 0, then: "silent" };
      cb.fresh = { after: 0, then: "silent" };
      out.pooled = { after: 20, then: "ok" };
    });
    assert.equal(r.settled.via, "outbound", JSON.stringify(r.settled));
    assert.ok(r.settled.ms && r.settled.ms >= 1000 && r.settled.ms <= 1100, `${r.settled.ms} ms`);
    assert.equal(r.settled.replayed, true, "the early bytes reached the winner");
    assert.equal(r.paths.current(), "outbound");
    assert.ok(r.most <= 2, `${r.most} attempts at once`);
    assert.equal(r.most, 2, "it did hedge");
  });

  test("connect-back late (no ready one, the fresh one silent): outbound wins; at most two", async (t) => {
    const r = await connectOnce(
      t,
      "auto",
      (cb, out) => {
        cb.fresh = { after: 0, then: "silent" };
        out.pooled = { after: 20, then: "ok" };
      },
      { cb: false, out: true },
    );
    assert.equal(r.settled.via, "outbound");
    assert.ok(r.most <= 2, `${r.most} attempts at once`);
  });

  test("both late (every pooled connection silent, the fresh connect-back too): a fresh outbound dial wins, never more than two at once", async (t) => {
    const r = await connectOnce(t, "auto", (cb, out) => {
      cb.pooled = { after: 0, then: "silent" };
      cb.fresh = { after: 0, then: "silent" };
      out.pooled = { after: 0, then: "silent" };
      out.fresh = { after: 300, then: "ok" };
    });
    assert.equal(r.settled.via, "outbound", JSON.stringify(r.settled));
    // Outbound joins at 1000; its silent pooled connection gives way to a
    // fresh dial 1000 later, which answers 300 after that.
    assert.ok(r.settled.ms && r.settled.ms >= 2300 && r.settled.ms <= 2400, `${r.settled.ms} ms`);
    assert.equal(r.settled.replayed, true, "the late fresh dial got the early bytes replayed");
    assert.ok(r.most <= 2, `${r.most} attempts at once`);
  });

  test("everything fails (dead pooled connections, both paths refused): the outbound path's error, at most two at once", async (t) => {
    const r = await connectOnce(t, "auto", (cb, out) => {
      cb.pooled = { after: 10, then: "dead" };
      cb.fresh = { after: 30, then: new NatproxyError("CONNECT_BACK_FAILED", "refused") };
      out.pooled = { after: 10, then: "dead" };
      out.fresh = { after: 30, then: new NatproxyError("COORDINATOR_UNREACHABLE", "down") };
    });
    assert.equal(r.settled.error?.code, "COORDINATOR_UNREACHABLE", JSON.stringify(r.settled));
    assert.ok(r.settled.ms !== undefined && r.settled.ms < 1000, "no grace period waited: each failure moved on at once");
    assert.ok(r.most <= 2, `${r.most} attempts at once`);
  });

  test("one path only (outbound): the pool's own hedge, pooled and fresh side by side, is the two", async (t) => {
    const r = await connectOnce(t, "outbound", (_cb, out) => {
      out.pooled = { after: 0, then: "silent" };
      out.fresh = { after: 300, then: "ok" };
    });
    assert.equal(r.settled.via, "outbound");
    assert.ok(r.settled.ms && r.settled.ms >= 1300 && r.settled.ms <= 1400, `${r.settled.ms} ms`);
    assert.equal(r.most, 2);
  });
});
