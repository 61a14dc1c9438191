import assert from "node:assert/strict";
import { once } from "node:events";
import net, { type AddressInfo } from "node:net";
import { after, before, test } from "node:test";
import type { Coordinator } from "../src/coordinator/index.ts";
import type { Local } from "../src/local/index.ts";
import { connectThrough } from "../scripts/lib/proxy-client.ts";
import { captureLogs } from "./helpers/logs.ts";
import { testPki, type TestPki } from "../scripts/lib/pki.ts";
import { startLocalFor, startStack, startTestCoordinator } from "../scripts/lib/stack.ts";
import { startHttpTarget, type Target } from "../scripts/lib/targets.ts";
import { freePort } from "../scripts/lib/ports.ts";
import { waitUntil } from "./helpers/wait.ts";

// The pools of ready connections: outbound ones (TLS'd, authenticated,
// upgraded) and connect-backs opened ahead of need. Used when there, refilled
// on demand, gone when idle, and never a trap when a pooled connection died
// without a word.

/** A TCP relay to the coordinator whose existing connections can be frozen (a NAT that forgot them). */
async function startRelay(to: number): Promise<{ port: number; freeze(): void; close(): void }> {
  const pairs: [net.Socket, net.Socket][] = [];
  const server = net.createServer((a) => {
    const b = net.connect(to, "127.0.0.1");
    for (const s of [a, b]) s.on("error", () => {});
    a.pipe(b);
    b.pipe(a);
    a.on("close", () => b.destroy());
    b.on("close", () => a.destroy());
    pairs.push([a, b]);
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  return {
    port: (server.address() as AddressInfo).port,
    freeze() {
      // Packets vanish: nothing is forwarded, nothing is closed.
      for (const [a, b] of pairs.splice(0)) {
        a.unpipe(b);
        b.unpipe(a);
        a.pause();
        b.pause();
      }
    },
    close() {
      for (const [a, b] of pairs) {
        a.destroy();
        b.destroy();
      }
      server.close();
    },
  };
}

let pki: TestPki;
let coordinator: Coordinator;
let web: Target;
before(async () => {
  pki = await testPki();
  coordinator = await startTestCoordinator(pki);
  web = await startHttpTarget();
});
after(async () => {
  await coordinator?.close();
  await web?.close();
});

/** A local proxy on the outbound path with a pool of 3; it needs no reporter. */
function local(port: number, extra: Record<string, unknown> = {}): Promise<Local> {
  return startLocalFor(port, 1, pki, { tunnel: "outbound", pool_size: 3, ...extra });
}

async function fetchThrough(l: Local, path: string): Promise<string> {
  const c = await connectThrough(l.proxyAddress.port, `127.0.0.1:${web.port}`);
  assert.equal(c.status, 200, c.body);
  let text = "";
  c.socket.on("data", (d: Buffer) => (text += d.toString("latin1")));
  c.socket.write(`GET ${path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
  await once(c.socket, "close");
  return text;
}

test("after the first tunnel the pool fills, later tunnels come from it, and the byte counts stay exact", async () => {
  const logs = captureLogs("local");
  const l = await local(coordinator.addresses[0].port);
  try {
    assert.match(await fetchThrough(l, "/pooled-f"), /^HTTP\/1\.1 200/);
    await waitUntil(() => l.outboundPool.size === 3, 3000, "the pool filled to pool_size");
    for (let i = 0; i < 3; i++) assert.match(await fetchThrough(l, `/pooled-${i}`), /"url":"\/pooled-\d"/);
    assert.equal(l.outboundPool.hits, 3);
    await waitUntil(() => logs.sessions().length >= 4, 3000, "four session lines");
    // Requests and answers of the same size: the same counts whether the
    // tunnel was dialled (the first) or pooled (the rest).
    const sizes = logs.sessions().map((line) => /up=(\d+) down=(\d+)/.exec(line)?.slice(1).join("/"));
    assert.equal(new Set(sizes).size, 1, sizes.join(" "));
  } finally {
    logs.restore();
    await l.close();
  }
});

test("an idle pool empties after pool_idle_timeout and is not refilled until it is needed", async () => {
  const l = await local(coordinator.addresses[0].port, { pool_idle_timeout: 300 });
  try {
    await fetchThrough(l, "/warm");
    await waitUntil(() => l.outboundPool.size === 3, 3000, "filled");
    await waitUntil(() => l.outboundPool.size === 0, 3000, "emptied after 300 ms");
    await waitUntil(() => coordinator.liveSockets() <= 1, 3000, "the coordinator holds no ready connection any more");
  } finally {
    await l.close();
  }
});

test("pooled connections that died silently (frozen by the network) cost pool_hedge_delay, not a timeout", async () => {
  const relay = await startRelay(coordinator.addresses[0].port);
  // connect_back_grace far off: the pool's hedge has its own key.
  const l = await local(relay.port, { pool_hedge_delay: 400, connect_back_grace: 60_000, connect_timeout: 10_000 });
  try {
    await fetchThrough(l, "/warm");
    await waitUntil(() => l.outboundPool.size === 3, 3000, "filled");
    relay.freeze();
    const t0 = performance.now();
    // The request went out right after the (optimistic) 200, into the
    // frozen connection; the fresh dial got it replayed.
    assert.match(await fetchThrough(l, "/after-freeze"), /"url":"\/after-freeze"/);
    const ms = performance.now() - t0;
    assert.ok(ms >= 350 && ms < 3000, `served by a fresh dial after pool_hedge_delay (${Math.round(ms)} ms)`);
    assert.equal(l.outboundPool.hits, 0, "the frozen pooled connection did not carry it");
  } finally {
    await l.close();
    relay.close();
  }
});

test("a coordinator that goes away empties the pool at once; browsers get 502 at once, not a hang", async () => {
  const second = await startTestCoordinator(pki);
  const l = await local(second.addresses[0].port);
  try {
    await fetchThrough(l, "/warm");
    await waitUntil(() => l.outboundPool.size === 3, 3000, "filled");
    await second.close();
    await waitUntil(() => l.outboundPool.size === 0, 3000, "the pool saw its connections close");
    const t0 = performance.now();
    const c = await connectThrough(l.proxyAddress.port, `127.0.0.1:${web.port}`);
    assert.equal(c.status, 502);
    assert.ok(performance.now() - t0 < 2000);
  } finally {
    await l.close();
  }
});

test("optimistic CONNECT: with a ready connection the 200 does not wait for the target, the first bytes ride with the Open, and the counts stay exact", async () => {
  const logs = captureLogs("local");
  const l = await local(coordinator.addresses[0].port);
  try {
    await fetchThrough(l, "/warm");
    await waitUntil(() => l.outboundPool.size === 3, 3000, "filled");
    // A refused target: the 200 came anyway, so the coordinator's answer was
    // not waited for; the failure is a reset, and the log names it.
    const refusedPort = await freePort();
    const c = await connectThrough(l.proxyAddress.port, `127.0.0.1:${refusedPort}`);
    assert.equal(c.status, 200);
    const err = await new Promise<NodeJS.ErrnoException | undefined>((resolve) => {
      c.socket.once("error", resolve);
      c.socket.once("close", () => resolve(undefined));
      c.socket.write("hello?");
    });
    assert.equal(err?.code, "ECONNRESET");
    await waitUntil(() => logs.sessions().some((s) => s.includes(`target=127.0.0.1:${refusedPort}`) && s.includes("outcome=TARGET_REFUSED")), 3000, "outcome=TARGET_REFUSED in the log");
    // A good target: the request written right after the 200 arrives whole,
    // and the log counts it once.
    const request = `GET /optimistic HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`;
    const hits = l.outboundPool.hits;
    assert.match(await fetchThrough(l, "/optimistic"), /"url":"\/optimistic"/);
    assert.equal(l.outboundPool.hits, hits + 1);
    await waitUntil(() => logs.sessions().some((s) => s.includes("outcome=ok") && s.includes(`up=${request.length} `)), 3000, `a session line with up=${request.length}`);
  } finally {
    logs.restore();
    await l.close();
  }
});

test("optimistic_connect = false: a warm pool still waits for the target, and a refused target is a 502", async () => {
  const l = await local(coordinator.addresses[0].port, { optimistic_connect: false });
  try {
    await fetchThrough(l, "/warm");
    await waitUntil(() => l.outboundPool.size === 3, 3000, "filled");
    const c = await connectThrough(l.proxyAddress.port, `127.0.0.1:${await freePort()}`);
    assert.equal(c.status, 502);
    assert.equal(c.headers["x-natproxy-error"], "TARGET_REFUSED");
  } finally {
    await l.close();
  }
});

test("connect-back: ready connect-backs opened ahead of need carry later tunnels (an Open, no API call), with exact byte counts", async () => {
  const logs = captureLogs("local");
  const stack = await startStack({ local: { tunnel: "connect-back", pool_size: 3 } });
  const l = stack.local;
  try {
    assert.match(await fetchThrough(l, "/cb-f"), /^HTTP\/1\.1 200/);
    await waitUntil(() => l.connectBackPool.size === 3, 3000, "three ready connect-backs");
    for (let i = 0; i < 3; i++) assert.match(await fetchThrough(l, `/cb-${i}`), /"url":"\/cb-\d"/);
    assert.equal(l.connectBackPool.hits, 3);
    assert.equal(l.outboundPool.hits, 0, "all on the connect-back path");
    await waitUntil(() => logs.sessions().length >= 4, 3000, "four session lines");
    assert.ok(logs.sessions().every((s) => s.includes("path=connect-back")), logs.sessions().join("\n"));
    const sizes = logs.sessions().map((line) => /up=(\d+) down=(\d+)/.exec(line)?.slice(1).join("/"));
    assert.equal(new Set(sizes).size, 1, sizes.join(" "));
  } finally {
    logs.restore();
    await stack.close();
  }
});
