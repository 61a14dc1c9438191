import assert from "node:assert/strict";
import { randomBytes, createHash } from "node:crypto";
import http from "node:http";
import https from "node:https";
import type { AddressInfo } from "node:net";
import { after, before, describe, test } from "node:test";
import { connectThrough, httpsThrough, proxiedRequest } from "../scripts/lib/proxy-client.ts";
import { startLocalFor, startStack, type Stack } from "../scripts/lib/stack.ts";
import { captureLogs } from "./helpers/logs.ts";
import { waitUntil } from "./helpers/wait.ts";
import { expectedSha256, startHttpsTarget, startHttpTarget, type Target } from "../scripts/lib/targets.ts";
import { freePort } from "../scripts/lib/ports.ts";

// Every scenario runs on both tunnel paths: the specification's connect-back
// (which loopback lets in, so `auto` would pick it too) and the outbound path.
const PATHS = ["connect-back", "outbound"] as const;

for (const path of PATHS)
describe(`end to end on loopback (${path} path): reporter, coordinator and local proxy`, () => {
  let stack: Stack;
  let web: Target;
  let web6: Target | undefined;
  let secure: Target;
  let logs: ReturnType<typeof captureLogs>;

  before(async () => {
    logs = captureLogs("local");
    stack = await startStack({ local: { pool_idle_timeout: 300, fin_timeout: 500, tunnel: path }, coordinator: { fin_timeout: 500 } });
    web = await startHttpTarget();
    secure = await startHttpsTarget(stack.pki);
  });
  after(async () => {
    logs?.restore();
    await stack?.close();
    await web?.close();
    await web6?.close();
    await secure?.close();
  });

  test(path === "connect-back" ? "the start-up workflow learned P' from the reporter, listens on P, and the probe got through" : "tunnel = outbound needs no reporter: no tunnel service runs", () => {
    assert.equal(stack.local.path(), path);
    if (path === "outbound") {
      assert.equal(stack.local.mapping(), undefined);
      return;
    }
    const t = stack.local.mapping();
    assert.ok(t, "tunnel service is up");
    assert.equal(t.publicAddress.host, "127.0.0.1");
    // On loopback there is no NAT: P' is P.
    assert.equal(t.publicAddress.port, t.localPort);
    const r = stack.local.reachability();
    assert.ok(r?.probe.ok, `probe: ${r?.probe.error?.message}`);
    assert.equal(r.nat, false);
    assert.match(r.behaviour, /^no NAT/);
  });

  test(`every session line of the request log names the ${path} path`, async () => {
    const before = logs.sessions().length;
    const r = await proxiedRequest(stack.proxyPort, `http://127.0.0.1:${web.port}/logged`, { headers: { Connection: "close" } });
    assert.equal(r.status, 200);
    const c = await connectThrough(stack.proxyPort, `127.0.0.1:${web.port}`);
    c.socket.end(`GET /logged-too HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
    await waitUntil(() => logs.sessions().length >= before + 2, 5000, "two session lines");
    for (const line of logs.sessions().slice(before)) {
      assert.match(line, new RegExp(`path=${path} outcome=ok up=\\d+ down=\\d+ ms=\\d+`), line);
      assert.match(line, /^session=[0-9a-f-]{36} client=127\.0\.0\.1:\d+ target=127\.0\.0\.1:\d+/, line);
    }
  });

  test("a client that half-closes after its request (CONNECT) still gets the whole response", async () => {
    const c = await connectThrough(stack.proxyPort, `127.0.0.1:${web.port}`);
    assert.equal(c.status, 200);
    const chunks: Buffer[] = [];
    c.socket.on("data", (d: Buffer) => chunks.push(d));
    c.socket.end(`GET /bytes/3000000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
    await new Promise((r) => c.socket.once("close", r));
    const all = Buffer.concat(chunks);
    const body = all.subarray(all.indexOf("\r\n\r\n") + 4);
    assert.match(all.subarray(0, 20).toString(), /^HTTP\/1\.1 200 OK/);
    assert.equal(body.length, 3_000_000);
    assert.equal(createHash("sha256").update(body).digest("hex"), expectedSha256(3_000_000));
  });

  test("plain HTTP GET arrives with its path and Host, and the response comes back", async () => {
    const r = await proxiedRequest(stack.proxyPort, `http://127.0.0.1:${web.port}/hello?x=1`);
    assert.equal(r.status, 200);
    const echo = JSON.parse(r.body.toString());
    assert.equal(echo.method, "GET");
    assert.equal(echo.url, "/hello?x=1", "absolute form rewritten to origin form");
    assert.equal(echo.host, `127.0.0.1:${web.port}`);
    assert.equal(echo.headers["proxy-connection"], undefined);
    assert.equal(r.headers["x-target"], "yes");
  });

  test("POST bodies arrive byte for byte, fixed-length and chunked", async () => {
    const body = randomBytes(300_000);
    const fixed = await proxiedRequest(stack.proxyPort, `http://127.0.0.1:${web.port}/post`, { method: "POST", body, headers: { "Content-Length": String(body.length) } });
    const e1 = JSON.parse(fixed.body.toString());
    assert.equal(e1.size, body.length);
    assert.equal(e1.sha256, createHash("sha256").update(body).digest("hex"));
    assert.equal(e1.chunked, false);

    const parts = [randomBytes(1000), randomBytes(70_000), randomBytes(5)];
    const chunked = await proxiedRequest(stack.proxyPort, `http://127.0.0.1:${web.port}/post`, { method: "POST", body: parts });
    const e2 = JSON.parse(chunked.body.toString());
    assert.equal(e2.chunked, true);
    assert.equal(e2.sha256, createHash("sha256").update(Buffer.concat(parts)).digest("hex"));
  });

  test("keep-alive: one browser connection, requests to two different hosts", async () => {
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    try {
      const a = await proxiedRequest(stack.proxyPort, `http://127.0.0.1:${web.port}/one`, { agent });
      const b = await proxiedRequest(stack.proxyPort, `http://localhost:${web.port}/two`, { agent });
      const c = await proxiedRequest(stack.proxyPort, `http://127.0.0.1:${web.port}/three`, { agent });
      assert.deepEqual([a.status, b.status, c.status], [200, 200, 200]);
      assert.equal(JSON.parse(b.body.toString()).host, `localhost:${web.port}`);
      assert.equal(JSON.parse(c.body.toString()).url, "/three");
      assert.equal(b.reusedSocket, true, "second request reused the browser connection");
      assert.equal(c.reusedSocket, true);
    } finally {
      agent.destroy();
    }
  });

  test("CONNECT to an HTTPS server: TLS end to end through the tunnel", async () => {
    const r = await httpsThrough(stack.proxyPort, "localhost", secure.port, "/secure", stack.pki.ca.cert);
    assert.equal(r.status, 200);
    assert.equal(JSON.parse(r.body.toString()).url, "/secure");
  });

  test("a 64 MiB download through CONNECT arrives with a matching SHA-256", async (t) => {
    const size = 64 * 1024 * 1024;
    const t0 = performance.now();
    const r = await httpsThrough(stack.proxyPort, "localhost", secure.port, `/bytes/${size}`, stack.pki.ca.cert);
    const ms = performance.now() - t0;
    assert.equal(r.status, 200);
    assert.equal(r.sha256, expectedSha256(size));
    t.diagnostic(`64 MiB in ${ms.toFixed(0)} ms (${((size * 8) / (ms / 1000) / 1e6).toFixed(0)} Mbit/s)`);
  });

  test("100 concurrent tunnels each deliver their bytes", async () => {
    const size = 256 * 1024;
    const results = await Promise.all(
      Array.from({ length: 100 }, (_, i) =>
        i % 2 === 0
          ? httpsThrough(stack.proxyPort, "localhost", secure.port, `/bytes/${size}`, stack.pki.ca.cert)
          : proxiedRequest(stack.proxyPort, `http://127.0.0.1:${web.port}/bytes/${size}`),
      ),
    );
    const want = expectedSha256(size);
    assert.equal(results.filter((r) => r.status === 200 && r.sha256 === want).length, 100);
  });

  /**
   * A CONNECT whose target fails, with a ready connection waiting on the
   * path: the 200 went out before the coordinator's answer (optimistic
   * CONNECT), so the failure can only be a reset; the request log still says
   * why. (The statuses are tested with optimistic_connect = false below.)
   */
  async function failingConnect(authority: string, code: string): Promise<void> {
    const logs = captureLogs("local");
    try {
      const pool = path === "outbound" ? stack.local.outboundPool : stack.local.connectBackPool;
      await waitUntil(() => pool.size > 0, 3000, `a ready ${path} connection`);
      const c = await connectThrough(stack.proxyPort, authority);
      assert.equal(c.status, 200, "optimistic: the 200 does not wait for the target");
      const received: Buffer[] = [];
      c.socket.on("data", (d: Buffer) => received.push(d));
      const err = await new Promise<NodeJS.ErrnoException | undefined>((resolve) => {
        c.socket.once("error", resolve);
        c.socket.once("close", () => resolve(undefined));
        c.socket.write("\x16\x03\x01 a ClientHello would go here");
      });
      assert.equal(err?.code, "ECONNRESET", "a reset, not a clean close");
      assert.equal(Buffer.concat(received).length, 0);
      await waitUntil(() => logs.sessions().some((l) => l.includes(`target=${authority}`) && l.includes(`outcome=${code}`)), 3000, `a session line with outcome=${code}`);
    } finally {
      logs.restore();
    }
  }

  test("a target that refuses: CONNECT gets a reset after its optimistic 200, with the reason in the log; plain HTTP gets 502", async () => {
    const port = await freePort();
    await failingConnect(`127.0.0.1:${port}`, "TARGET_REFUSED");
    const p = await proxiedRequest(stack.proxyPort, `http://127.0.0.1:${port}/`);
    assert.equal(p.status, 502);
    assert.match(p.body.toString(), /TARGET_REFUSED/);
  });

  test("an unresolvable host name: a reset after the optimistic 200, DNS_FAILED in the log", async () => {
    await failingConnect("no-such-host.invalid:443", "DNS_FAILED");
  });

  test("malformed requests get 400, not a crash", async () => {
    const c = await connectThrough(stack.proxyPort, "no-port-here");
    assert.equal(c.status, 400);
    const direct = await new Promise<number>((resolve, reject) => {
      http.get({ host: "127.0.0.1", port: stack.proxyPort, path: "/" }, (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      }).on("error", reject);
    });
    assert.equal(direct, 400);
    const ok = await proxiedRequest(stack.proxyPort, `http://127.0.0.1:${web.port}/after`);
    assert.equal(ok.status, 200);
  });

  test("when the browser closes, both sides close every socket of the session", async () => {
    const baseline = { local: stack.local.liveSockets(), coordinator: stack.coordinator.liveSockets() };
    const tunnel = await connectThrough(stack.proxyPort, `localhost:${secure.port}`);
    assert.equal(tunnel.status, 200);
    await waitUntil(() => stack.coordinator.liveSockets() > baseline.coordinator, 2000);
    tunnel.socket.destroy();
    await waitUntil(() => stack.local.liveSockets() <= baseline.local && stack.coordinator.liveSockets() <= baseline.coordinator, 3000, "sockets back to the baseline");
  });

  test("nothing is left behind: no pending session, no socket but idle pooled ones", async () => {
    assert.equal(stack.local.pendingSessions(), 0);
    // Pooled plain-HTTP tunnels close after pool_idle_timeout (300 ms here).
    await waitUntil(() => stack.local.liveSockets() === 0, 5000);
    // The coordinator keeps only the local proxy's idle API connection.
    await waitUntil(() => stack.coordinator.liveSockets() <= 1, 5000);
  });
});

for (const path of PATHS)
describe(`failures the browser must see as real statuses (${path} path)`, () => {
  let web: Target;
  before(async () => {
    web = await startHttpTarget();
  });
  after(async () => web?.close());

  /** A real HTTPS server with the coordinator's certificate that accepts API calls and never answers them. */
  async function silentCoordinator(pki: Stack["pki"]) {
    let requests = 0;
    const server = https.createServer({ key: pki.server.key, cert: pki.server.cert }, (req) => {
      requests++;
      req.resume();
    });
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    return {
      port: (server.address() as AddressInfo).port,
      requests: () => requests,
      close() {
        server.closeAllConnections();
        server.close();
      },
    };
  }

  test("a coordinator that never connects back gives 504 after connect_timeout", { skip: path === "outbound" ? "connect-back only" : false }, async () => {
    const stack = await startStack({ local: { tunnel: path } });
    const silent = await silentCoordinator(stack.pki);
    const local = await startLocalFor(silent.port, stack.reporter.addresses[0].port, stack.pki, { connect_timeout: 400, tunnel: "connect-back" });
    try {
      const t0 = performance.now();
      const c = await connectThrough(local.proxyAddress.port, `127.0.0.1:${web.port}`);
      const ms = performance.now() - t0;
      assert.equal(c.status, 504);
      assert.equal(c.headers["x-natproxy-error"], "CONNECT_BACK_TIMEOUT");
      assert.ok(ms >= 380 && ms < 3000, `answered after ${ms} ms`);
      assert.ok(silent.requests() >= 1, "the session request did reach the coordinator");
      assert.equal(local.pendingSessions(), 0);
    } finally {
      silent.close();
      await local.close();
      await stack.close();
    }
  });

  test("optimistic_connect = false: with a ready connection waiting, a refused target is 502 TARGET_REFUSED and an unknown name 502 DNS_FAILED", async () => {
    const stack = await startStack({ local: { tunnel: path, optimistic_connect: false } });
    try {
      const warm = await connectThrough(stack.proxyPort, `127.0.0.1:${web.port}`);
      assert.equal(warm.status, 200);
      warm.socket.destroy();
      const pool = path === "outbound" ? stack.local.outboundPool : stack.local.connectBackPool;
      await waitUntil(() => pool.size > 0, 3000, `a ready ${path} connection`);
      const refused = await connectThrough(stack.proxyPort, `127.0.0.1:${await freePort()}`);
      assert.equal(refused.status, 502);
      assert.equal(refused.headers["x-natproxy-error"], "TARGET_REFUSED");
      assert.match(refused.body, /refused/);
      const dns = await connectThrough(stack.proxyPort, "no-such-host.invalid:443");
      assert.equal(dns.status, 502);
      assert.equal(dns.headers["x-natproxy-error"], "DNS_FAILED");
    } finally {
      await stack.close();
    }
  });

  test("by default the coordinator refuses loopback and private targets in every spelling (403)", async () => {
    // Statuses, not resets: no optimistic 200 (tested in the end-to-end block).
    const stack = await startStack({ coordinator: { allow_targets: [] }, local: { tunnel: path, optimistic_connect: false } });
    try {
      for (const target of [`127.0.0.1:${web.port}`, `localhost:${web.port}`, `0x7f.1:${web.port}`, `2130706433:${web.port}`, `[::ffff:127.0.0.1]:${web.port}`, "169.254.169.254:80", "10.1.2.3:80"]) {
        const c = await connectThrough(stack.proxyPort, target);
        assert.equal(c.status, 403, target);
        assert.equal(c.headers["x-natproxy-error"], "FORBIDDEN", target);
        assert.match(c.body, /allow_targets/, target);
      }
      const p = await proxiedRequest(stack.proxyPort, `http://127.0.0.1:${web.port}/`);
      assert.equal(p.status, 403);
    } finally {
      await stack.close();
    }
  });

  test("a wrong token is refused, and the browser is told why", async () => {
    const stack = await startStack({ local: { token: "wrong-token-wrong-token", tunnel: path } });
    try {
      const c = await connectThrough(stack.proxyPort, `127.0.0.1:${web.port}`);
      assert.equal(c.status, 502);
      assert.equal(c.headers["x-natproxy-error"], "COORDINATOR_REFUSED");
      assert.match(c.body, /token/);
    } finally {
      await stack.close();
    }
  });

  test("an untrusted coordinator certificate is refused before any request is sent", async () => {
    const stack = await startStack({ local: { tunnel: path } });
    const silent = await silentCoordinator(stack.pki);
    // No `ca`: the test CA that signed the coordinator's certificate is not trusted.
    const local = await startLocalFor(silent.port, stack.reporter.addresses[0].port, stack.pki, { ca: "", tunnel: path });
    try {
      const c = await connectThrough(local.proxyAddress.port, `127.0.0.1:${web.port}`);
      assert.equal(c.status, 502);
      assert.equal(c.headers["x-natproxy-error"], "CERT_UNTRUSTED");
      assert.match(c.body, /not trusted/);
      assert.match(c.body, /fingerprint = "sha256:/, "tells the user how to pin it");
      assert.equal(silent.requests(), 0, "the token never went to an untrusted server");
    } finally {
      silent.close();
      await local.close();
      await stack.close();
    }
  });

  test("a pinned fingerprint: a mismatch is refused, the right one works without any CA", async () => {
    const stack = await startStack({ local: { tunnel: path } });
    const wrong = await startLocalFor(stack.coordinator.addresses[0].port, stack.reporter.addresses[0].port, stack.pki, { ca: "", fingerprint: `sha256:${"00".repeat(32)}`, tunnel: path });
    const pinned = await startLocalFor(stack.coordinator.addresses[0].port, stack.reporter.addresses[0].port, stack.pki, { ca: "", fingerprint: stack.coordinator.fingerprint, tunnel: path });
    try {
      const c = await connectThrough(wrong.proxyAddress.port, `127.0.0.1:${web.port}`);
      assert.equal(c.status, 502);
      assert.equal(c.headers["x-natproxy-error"], "CERT_PIN_MISMATCH");
      const ok = await proxiedRequest(pinned.proxyAddress.port, `http://127.0.0.1:${web.port}/pinned`);
      assert.equal(ok.status, 200);
    } finally {
      await wrong.close();
      await pinned.close();
      await stack.close();
    }
  });
});
