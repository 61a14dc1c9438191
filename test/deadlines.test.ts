import assert from "node:assert/strict";
import { once } from "node:events";
import https from "node:https";
import type { IncomingMessage, ServerResponse } from "node:http";
import net, { type AddressInfo } from "node:net";
import tls from "node:tls";
import { after, before, describe, test } from "node:test";
import { resolveConfig, type ConfigInput } from "../src/config.ts";
import { connectBack } from "../src/coordinator/connect-back.ts";
import { startReporter } from "../src/reporter/index.ts";
import { API, sessionRequestSchema } from "../src/protocol/api.ts";
import { encodeSession } from "../src/protocol/wire.ts";
import { connectThrough } from "../scripts/lib/proxy-client.ts";
import { testPki, type TestPki } from "../scripts/lib/pki.ts";
import { startLocalFor, TOKEN } from "../scripts/lib/stack.ts";
import { startHttpTarget, type Target } from "../scripts/lib/targets.ts";
import { waitUntil } from "./helpers/wait.ts";

// Each timer of the local proxy follows the one key that names it, and the
// bound a key documents holds: connect_timeout is the browser's whole wait
// on the connect-back path, not one wait per step.

let pki: TestPki;
let reporter: Awaited<ReturnType<typeof startReporter>>;
let web: Target;
before(async () => {
  pki = await testPki();
  reporter = await startReporter(resolveConfig({ reporter: { listen: "127.0.0.1:0" } }, "reporter").reporter);
  web = await startHttpTarget();
});
after(async () => {
  await reporter?.close();
  await web?.close();
});

function sendJson(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { "Content-Type": "application/json" }).end(JSON.stringify(body));
}

async function readBody(req: IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  for await (const c of req) chunks.push(c as Buffer);
  return chunks.length ? JSON.parse(Buffer.concat(chunks).toString()) : undefined;
}

/**
 * A coordinator stand-in with the test certificate: it answers hello, refuses
 * probes, and for a session connects back after `delay` ms and sends the
 * session id, then neither a Result nor an answer to the API call.
 */
async function resultlessCoordinator(delay: number) {
  const secureContext = tls.createSecureContext({ key: pki.server.key, cert: pki.server.cert });
  const sessions: { at: number; back: tls.TLSSocket; backClosed: Promise<number>; apiClosed: Promise<number> }[] = [];
  // The connect-back is half-open (as the coordinator's is): the local proxy closing it shows as its end.
  const endOf = (s: tls.TLSSocket) => new Promise<number>((resolve) => {
    const done = () => resolve(performance.now());
    s.once("end", done);
    s.once("close", done);
  });
  const shutdown = new AbortController();
  const server = https.createServer({ key: pki.server.key, cert: pki.server.cert }, (req, res) => {
    void (async () => {
      const body = await readBody(req);
      if (req.url === API.hello) return sendJson(res, 200, { software: "natproxy", version: "test", client: { host: "127.0.0.1", port: req.socket.remotePort }, connect_back: "same-ip" });
      if (req.url !== API.sessions) return sendJson(res, 403, { error: { code: "FORBIDDEN", message: "forbidden: not in this test" } });
      const apiClosed = once(res, "close").then(() => performance.now());
      const s = sessionRequestSchema.parse(body);
      await new Promise((r) => setTimeout(r, delay));
      const back = await connectBack(s.reply, secureContext, 2000, 2000, shutdown.signal);
      back.write(encodeSession(s.session));
      sessions.push({ at: performance.now(), back, backClosed: endOf(back), apiClosed });
    })().catch(() => res.destroy());
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  return {
    port: (server.address() as AddressInfo).port,
    sessions,
    close() {
      shutdown.abort();
      for (const s of sessions) s.back.destroy();
      server.closeAllConnections();
      server.close();
    },
  };
}

/** `event` (a promise of its performance.now() time), or a failure once `deadline` has passed without it. */
function by(event: Promise<number>, deadline: number, what: string): Promise<number> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not come by the deadline`)), Math.max(0, deadline - performance.now()) + 1);
  });
  return Promise.race([event, late]).finally(() => clearTimeout(timer));
}

function local(coordinatorPort: number, extra: ConfigInput["local"]) {
  return startLocalFor(coordinatorPort, reporter.addresses[0].port, pki, { tunnel: "connect-back", pool_size: 0, ...extra });
}

describe("[local] connect_timeout is one deadline for a connect-back tunnel", () => {
  // The connect-back arrives late in the budget; a fresh wait for the Result
  // would end at DELAY + CONNECT_TIMEOUT, well past the bound checked here.
  const CONNECT_TIMEOUT = 1500;
  const DELAY = 1000;
  const MARGIN = 400;

  test("a Result that never comes: the browser has its 504 within connect_timeout, and nothing is left waiting", async () => {
    const coordinator = await resultlessCoordinator(DELAY);
    const l = await local(coordinator.port, { connect_timeout: CONNECT_TIMEOUT });
    try {
      const t0 = performance.now();
      const c = await connectThrough(l.proxyAddress.port, `127.0.0.1:${web.port}`);
      const ms = performance.now() - t0;
      assert.equal(c.status, 504, c.body);
      assert.equal(c.headers["x-natproxy-error"], "TARGET_TIMEOUT");
      assert.equal(coordinator.sessions.length, 1, "the connect-back did arrive, with the session id");
      const { at, backClosed, apiClosed } = coordinator.sessions[0];
      assert.ok(at - t0 >= DELAY, "the connect-back came late in the budget");
      assert.ok(ms < CONNECT_TIMEOUT + MARGIN, `answered after ${Math.round(ms)} ms; connect_timeout is ${CONNECT_TIMEOUT}`);
      assert.ok(ms >= CONNECT_TIMEOUT - 50, `not before the deadline (${Math.round(ms)} ms)`);
      // The local proxy closed the connect-back, and gave up the API call the
      // coordinator never answered, by the same deadline.
      const bound = t0 + CONNECT_TIMEOUT + MARGIN;
      assert.ok((await by(backClosed, bound, "the connect-back's end")) < bound, "the connect-back was closed");
      assert.ok((await by(apiClosed, bound, "the API call's end")) < bound, "the unanswered API call was ended");
      assert.equal(l.pendingSessions(), 0);
      assert.equal(l.openingTunnels(), 0);
    } finally {
      await l.close();
      coordinator.close();
    }
  });
});

describe("each local timer follows its own key", () => {
  /** A TLS server that accepts API calls and never answers them. */
  async function silentCoordinator() {
    const server = https.createServer({ key: pki.server.key, cert: pki.server.cert }, (req) => req.resume());
    server.listen(0, "127.0.0.1");
    await once(server, "listening");
    return {
      port: (server.address() as AddressInfo).port,
      close() {
        server.closeAllConnections();
        server.close();
      },
    };
  }

  test("hello_timeout, not connect_timeout, bounds the start-up hello", async () => {
    const silent = await silentCoordinator();
    try {
      const t0 = performance.now();
      const l = await startLocalFor(silent.port, reporter.addresses[0].port, pki, { tunnel: "outbound", hello_timeout: 300, connect_timeout: 20_000 });
      const ms = performance.now() - t0;
      await l.close();
      assert.ok(ms < 3000, `started after ${Math.round(ms)} ms; the hello gave up after hello_timeout`);
    } finally {
      silent.close();
    }
  });

  test("handshake_timeout, not connect_timeout, closes a silent browser connection and a silent tunnel-port connection", async () => {
    const coordinator = await resultlessCoordinator(0);
    const l = await local(coordinator.port, { handshake_timeout: 300, connect_timeout: 20_000 });
    try {
      const port = l.mapping()?.localPort;
      assert.ok(port, "the tunnel service is up");
      const t0 = performance.now();
      const browser = net.connect(l.proxyAddress.port, "127.0.0.1");
      const tunnel = net.connect(port, "127.0.0.1");
      for (const s of [browser, tunnel]) s.on("error", () => {}).resume();
      // A request head begun and never finished; a TLS record begun and never finished.
      browser.write("GET http://127.0.0.1/ HTTP/1.1\r\nHost: 127.0.0.1\r\n");
      tunnel.write(Buffer.from([0x16, 0x03, 0x03]));
      // The header deadline is checked on an interval (at most half the timeout); 1 s covers it.
      const bound = t0 + 300 + 1000;
      // The tunnel port may reset a stranger at accept (no connect-back is
      // expected: src/local/tunnel/tunnel-port-gate.ts); either way it must be
      // gone by the bound. test/tunnel-port.test.ts times the deadline itself.
      const closedAt = (s: net.Socket, what: string) => by(new Promise<number>((resolve) => s.once("close", () => resolve(performance.now()))), bound, what);
      await Promise.all([closedAt(browser, "the browser connection's close"), closedAt(tunnel, "the tunnel-port connection's close")]);
      await waitUntil(() => l.liveSockets() === 0, 3000, "no socket left");
    } finally {
      await l.close();
      coordinator.close();
    }
  });
});

describe("the new keys", () => {
  test("default to the values the timers had, and are validated like every duration", () => {
    const c = resolveConfig({ local: { coordinator: "https://c.example", token: TOKEN } }, "local");
    assert.equal(c.local.handshake_timeout, c.local.connect_timeout);
    assert.equal(c.local.hello_timeout, c.local.connect_timeout);
    assert.equal(c.local.pool_hedge_delay, c.local.connect_back_grace);
    assert.equal(c.coordinator.open_timeout, c.coordinator.keep_alive_timeout);
    assert.throws(
      () => resolveConfig({ local: { handshake_timeout: 0, hello_timeout: "soon", pool_hedge_delay: 1.5 }, coordinator: { open_timeout: 86_400_001 } }, "any"),
      (err: Error & { problems?: string[] }) => {
        const text = err.problems?.join("\n") ?? "";
        assert.match(text, /local\.handshake_timeout: expected at least 1 \(whole milliseconds\), got 0/);
        assert.match(text, /local\.hello_timeout: expected number/);
        assert.match(text, /local\.pool_hedge_delay: expected int/);
        assert.match(text, /coordinator\.open_timeout: expected at most 86400000/);
        return true;
      },
    );
  });
});
