import assert from "node:assert/strict";
import { once } from "node:events";
import { writeFileSync } from "node:fs";
import net, { type AddressInfo } from "node:net";
import { join } from "node:path";
import tls from "node:tls";
import { after, before, describe, test } from "node:test";
import { v4 as uuidv4 } from "uuid";
import { startCoordinator } from "../src/coordinator/index.ts";
import { generateCertificate } from "../src/tls/certs.ts";
import { connectThrough, proxiedRequest } from "../scripts/lib/proxy-client.ts";
import { testPki } from "../scripts/lib/pki.ts";
import { type Stack, startLocalFor, startStack, startTestCoordinator, TOKEN } from "../scripts/lib/stack.ts";
import { startHttpTarget, type Target } from "../scripts/lib/targets.ts";
import { waitUntil } from "./helpers/wait.ts";

// Misbehaving peers and failing parts: every role survives, the browser gets
// a real answer, nothing leaks, and a normal session works afterwards.

/** A TCP server whose every connection is handled by `behave`. */
async function rawServer(behave: (s: net.Socket) => void): Promise<{ port: number; received: () => number; close(): void }> {
  let received = 0;
  const sockets = new Set<net.Socket>();
  const server = net.createServer((s) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
    s.on("error", () => {});
    s.on("data", (c: Buffer) => (received += c.length));
    behave(s);
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  return {
    port: (server.address() as AddressInfo).port,
    received: () => received,
    close() {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

/** Reads a CONNECT tunnel until it closes; what arrived and how it ended. */
async function drain(socket: net.Socket): Promise<{ bytes: number; error?: string }> {
  let bytes = 0;
  let error: string | undefined;
  socket.on("data", (c: Buffer) => (bytes += c.length));
  socket.on("error", (e: NodeJS.ErrnoException) => (error = e.code ?? e.message));
  await once(socket, "close");
  return { bytes, error };
}

for (const path of ["connect-back", "outbound"] as const) {
  describe(`misbehaving targets and browsers (${path} path)`, () => {
    let stack: Stack;
    let web: Target;
    before(async () => {
      stack = await startStack({ local: { tunnel: path, session_idle_timeout: 600, fin_timeout: 300 }, coordinator: { session_idle_timeout: 600, fin_timeout: 300 } });
      web = await startHttpTarget();
    });
    after(async () => {
      await stack?.close();
      await web?.close();
    });

    async function baselineHolds(): Promise<void> {
      const ok = await proxiedRequest(stack.proxyPort, `http://127.0.0.1:${web.port}/still-serving`, { headers: { Connection: "close" } });
      assert.equal(ok.status, 200);
      await waitUntil(() => stack.coordinator.activeSessions() === 0 && stack.local.pendingSessions() === 0 && stack.local.openingTunnels() === 0, 5000, "no session left open");
    }

    test("a target that resets mid-stream: the browser's tunnel is cut, not left hanging", async () => {
      const target = await rawServer((s) => {
        s.write("HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + "x".repeat(50_000));
        setImmediate(() => s.resetAndDestroy());
      });
      try {
        const c = await connectThrough(stack.proxyPort, `127.0.0.1:${target.port}`);
        assert.equal(c.status, 200);
        c.socket.write("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        const r = await drain(c.socket);
        assert.ok(r.bytes < 1_000_000, "the cut is visible to the browser");
      } finally {
        target.close();
      }
      await baselineHolds();
    });

    test("a target that stalls: the idle timeout closes both sides", async () => {
      const target = await rawServer(() => {});
      try {
        const c = await connectThrough(stack.proxyPort, `127.0.0.1:${target.port}`);
        assert.equal(c.status, 200);
        c.socket.write("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        const t0 = performance.now();
        await drain(c.socket);
        const ms = performance.now() - t0;
        assert.ok(ms >= 500 && ms < 4000, `closed by session_idle_timeout (600 ms) after ${Math.round(ms)} ms`);
      } finally {
        target.close();
      }
      await baselineHolds();
    });

    test("a target that trickles a byte at a time keeps its tunnel, and every byte arrives", async () => {
      const text = "HTTP/1.1 200 OK\r\nContent-Length: 20\r\nConnection: close\r\n\r\nabcdefghijklmnopqrst";
      const target = await rawServer((s) => {
        let i = 0;
        const timer = setInterval(() => {
          if (i >= text.length) {
            clearInterval(timer);
            s.end();
            return;
          }
          s.write(text[i++] as string);
        }, 5);
        s.on("close", () => clearInterval(timer));
      });
      try {
        const r = await proxiedRequest(stack.proxyPort, `http://127.0.0.1:${target.port}/trickle`, { headers: { Connection: "close" } });
        assert.equal(r.status, 200);
        assert.equal(r.body.toString(), "abcdefghijklmnopqrst");
      } finally {
        target.close();
      }
      await baselineHolds();
    });

    test("a browser that aborts mid-download frees both sides of its tunnel", async () => {
      const c = await connectThrough(stack.proxyPort, `127.0.0.1:${web.port}`);
      assert.equal(c.status, 200);
      c.socket.write("GET /bytes/200000000 HTTP/1.1\r\nHost: x\r\n\r\n");
      let got = 0;
      c.socket.on("data", (d: Buffer) => {
        got += d.length;
        if (got > 1_000_000) c.socket.destroy();
      });
      await once(c.socket, "close");
      await baselineHolds();
    });
  });
}

describe("the coordinator restarts", () => {
  test("live tunnels fail cleanly, and new sessions work once it is back, without restarting the local proxy", async () => {
    const web = await startHttpTarget();
    for (const path of ["connect-back", "outbound"] as const) {
      const stack = await startStack({ local: { tunnel: path } });
      const port = stack.coordinator.addresses[0].port;
      let second: Awaited<ReturnType<typeof startCoordinator>> | undefined;
      try {
        const before = await proxiedRequest(stack.proxyPort, `http://127.0.0.1:${web.port}/before`);
        assert.equal(before.status, 200);
        const live = await connectThrough(stack.proxyPort, `127.0.0.1:${web.port}`);
        assert.equal(live.status, 200);
        // Live means bytes flowed: an optimistic 200 comes before the tunnel is.
        live.socket.write("GET /live HTTP/1.1\r\nHost: x\r\n\r\n");
        await once(live.socket, "data");
        const cut = drain(live.socket);
        await stack.coordinator.close();
        await cut;
        // Ready outbound connections are dropped as their close arrives; one
        // not yet seen would carry an optimistic 200 and then a reset.
        await waitUntil(() => stack.local.outboundPool.size === 0, 3000, "the pool saw the coordinator go");
        // While it is down: a real status, quickly.
        const down = await connectThrough(stack.proxyPort, `127.0.0.1:${web.port}`);
        assert.equal(down.status, 502, `${path}: ${down.body}`);
        second = await startTestCoordinator(stack.pki, { listen: `127.0.0.1:${port}` });
        const after = await proxiedRequest(stack.proxyPort, `http://127.0.0.1:${web.port}/after`, { headers: { Connection: "close" } });
        assert.equal(after.status, 200, `${path}: ${after.body}`);
        const tunnel = await connectThrough(stack.proxyPort, `127.0.0.1:${web.port}`);
        assert.equal(tunnel.status, 200);
        tunnel.socket.destroy();
      } finally {
        await stack.close();
        await second?.close();
      }
    }
    await web.close();
  });
});

describe("what a connect-back can be aimed at", () => {
  test("aimed at a service that is not natproxy, it delivers not one byte; aimed at another address, it is refused", async () => {
    const pki = await testPki();
    const victim = await rawServer(() => {});
    const coordinator = await startTestCoordinator(pki, { connect_back: "any", handshake_timeout: 500 });
    const strict = await startTestCoordinator(pki);
    const web = await startHttpTarget();
    try {
      const post = async (port: number, reply: { host: string; port: number }) => {
        const body = JSON.stringify({ session: uuidv4(), target: { host: "127.0.0.1", port: web.port }, reply });
        const s = tls.connect({ host: "127.0.0.1", port, ca: [pki.ca.cert], servername: "localhost" });
        await once(s, "secureConnect");
        s.write(`POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${TOKEN}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`);
        let text = "";
        s.on("data", (c: Buffer) => (text += c.toString()));
        await once(s, "close");
        return text;
      };
      const aimed = await post(coordinator.addresses[0].port, { host: "127.0.0.1", port: victim.port });
      assert.match(aimed, /^HTTP\/1\.1 50[24] /);
      assert.match(aimed, /CONNECT_BACK_(TIMEOUT|FAILED)/);
      assert.equal(victim.received(), 0, "the coordinator waits for a ClientHello and sends nothing first");
      const elsewhere = await post(strict.addresses[0].port, { host: "192.0.2.1", port: 80 });
      assert.match(elsewhere, /^HTTP\/1\.1 403 /);
      assert.match(elsewhere, /same-ip/);
    } finally {
      victim.close();
      await coordinator.close();
      await strict.close();
      await web.close();
    }
  });
});

describe("certificates the local proxy refuses, saying which check failed", () => {
  test("expired, not yet valid, and issued for another name", async () => {
    const pki = await testPki();
    const web = await startHttpTarget();
    const cases = [
      { name: "expired", opts: { notBefore: new Date(Date.now() - 3 * 86_400_000), notAfter: new Date(Date.now() - 86_400_000) }, says: /has expired \[CERT_HAS_EXPIRED\]/ },
      { name: "not yet valid", opts: { notBefore: new Date(Date.now() + 86_400_000), notAfter: new Date(Date.now() + 3 * 86_400_000) }, says: /not valid yet \[CERT_NOT_YET_VALID\]/ },
      { name: "another name", opts: { dnsNames: ["elsewhere.example"], ipAddresses: [] }, says: /not issued for this host name/ },
    ];
    for (const c of cases) {
      const kp = await generateCertificate({ commonName: "coordinator", dnsNames: ["localhost"], ipAddresses: ["127.0.0.1"], ca: { key: pki.ca.key, cert: pki.ca.cert }, ...c.opts });
      const file = join(pki.dir, `bad-${c.name.replace(/ /g, "-")}.pem`);
      writeFileSync(file, `${kp.key}\n${kp.cert}`, { mode: 0o600 });
      const coordinator = await startTestCoordinator(pki, { cert: file });
      const local = await startLocalFor(coordinator.addresses[0].port, 1, pki, { tunnel: "outbound" });
      try {
        const r = await connectThrough(local.proxyAddress.port, `127.0.0.1:${web.port}`);
        assert.equal(r.status, 502, c.name);
        assert.equal(r.headers["x-natproxy-error"], "CERT_UNTRUSTED", c.name);
        assert.match(r.body, c.says, c.name);
      } finally {
        await local.close();
        await coordinator.close();
      }
    }
    await web.close();
  });
});
