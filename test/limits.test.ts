import assert from "node:assert/strict";
import { once } from "node:events";
import https from "node:https";
import type { AddressInfo } from "node:net";
import { after, before, describe, test } from "node:test";
import tls from "node:tls";
import { resolveConfig } from "../src/config.ts";
import type { Coordinator } from "../src/coordinator/index.ts";
import type { Local } from "../src/local/index.ts";
import { startReporter, type ReporterHandle } from "../src/reporter/index.ts";
import { connectThrough } from "../scripts/lib/proxy-client.ts";
import { testPki, type TestPki } from "../scripts/lib/pki.ts";
import { startLocalFor, startTestCoordinator, TOKEN } from "../scripts/lib/stack.ts";
import { startHttpTarget, type Target } from "../scripts/lib/targets.ts";
import { waitUntil } from "./helpers/wait.ts";

// Limits answer with a status and a reason, free their slot when a tunnel
// ends, and leave everything else serving.

const TOKEN_B = "second-token-0123456789abcdef";

let pki: TestPki;
let reporter: ReporterHandle;
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

function startLocalWith(port: number, token: string, extra: Record<string, unknown>): Promise<Local> {
  return startLocalFor(port, reporter.addresses[0].port, pki, { token, connect_timeout: 3000, ...extra });
}

for (const path of ["connect-back", "outbound"] as const) {
  describe(`coordinator session limits (${path} path)`, () => {
    let coordinator: Coordinator;
    before(async () => {
      coordinator = await startTestCoordinator(pki, { tokens: [TOKEN, TOKEN_B], max_sessions: 3, max_sessions_per_token: 2 });
    });
    after(async () => coordinator?.close());

    test("per token, then in all: 429 TOO_MANY naming the limit; a closed tunnel frees its slot", async () => {
      // The coordinator's refusal as a status: no optimistic 200 before it.
      const a = await startLocalWith(coordinator.addresses[0].port, TOKEN, { tunnel: path, optimistic_connect: false });
      const b = await startLocalWith(coordinator.addresses[0].port, TOKEN_B, { tunnel: path, optimistic_connect: false });
      const open: Awaited<ReturnType<typeof connectThrough>>[] = [];
      try {
        for (let i = 0; i < 2; i++) open.push(await connectThrough(a.proxyAddress.port, `127.0.0.1:${web.port}`));
        assert.deepEqual(open.map((c) => c.status), [200, 200]);
        const perToken = await connectThrough(a.proxyAddress.port, `127.0.0.1:${web.port}`);
        assert.equal(perToken.status, 429);
        assert.equal(perToken.headers["x-natproxy-error"], "TOO_MANY");
        assert.match(perToken.body, /max_sessions_per_token/);
        // The other token still has room, up to the global limit.
        open.push(await connectThrough(b.proxyAddress.port, `127.0.0.1:${web.port}`));
        assert.equal(open[2]?.status, 200);
        const global = await connectThrough(b.proxyAddress.port, `127.0.0.1:${web.port}`);
        assert.equal(global.status, 429);
        assert.match(global.body, /max_sessions\)/);
        assert.equal(coordinator.activeSessions(), 3);
        open.shift()?.socket.destroy();
        await waitUntil(() => coordinator.activeSessions() === 2, 3000, "the slot is given back");
        const again = await connectThrough(a.proxyAddress.port, `127.0.0.1:${web.port}`);
        assert.equal(again.status, 200);
        open.push(again);
      } finally {
        for (const c of open) c.socket.destroy();
        await a.close();
        await b.close();
      }
      await waitUntil(() => coordinator.activeSessions() === 0, 3000, "every slot is free");
    });
  });
}

describe("local proxy pending limit", () => {
  test("browser connections beyond max_pending waiting for a tunnel get 429 at once; the count returns to 0", async () => {
    // An HTTPS server with the coordinator's certificate that takes every
    // request and Upgrade and never answers: every tunnel stays pending.
    const silent = https.createServer({ key: pki.server.key, cert: pki.server.cert }, (req) => req.resume());
    silent.on("upgrade", () => {});
    await new Promise<void>((r) => silent.listen(0, "127.0.0.1", r));
    const local = await startLocalWith((silent.address() as AddressInfo).port, TOKEN, { tunnel: "outbound", max_pending: 2, connect_timeout: 1500 });
    try {
      const waiting = [connectThrough(local.proxyAddress.port, `127.0.0.1:${web.port}`), connectThrough(local.proxyAddress.port, `127.0.0.1:${web.port}`)];
      await waitUntil(() => local.openingTunnels() === 2, 3000, "two tunnels pending");
      const t0 = performance.now();
      const third = await connectThrough(local.proxyAddress.port, `127.0.0.1:${web.port}`);
      assert.equal(third.status, 429);
      assert.match(third.body, /max_pending/);
      assert.ok(performance.now() - t0 < 1000, "refused at once, not after a timeout");
      const settled = await Promise.all(waiting);
      assert.deepEqual(settled.map((c) => c.status), [502, 502]);
      assert.equal(local.openingTunnels(), 0);
    } finally {
      await local.close();
      silent.closeAllConnections();
      silent.close();
    }
  });
});

describe("ready connections waiting for their Open", () => {
  test("count against the token's limit: one more gets 429 before any 101, and a closed one frees its place", async () => {
    const coordinator = await startTestCoordinator(pki, { max_sessions_per_token: 2 });
    const opened: tls.TLSSocket[] = [];
    /** An upgraded connection that never sends its Open; resolves with the answer's status line. */
    const upgrade = async (): Promise<string> => {
      const s = tls.connect({ host: "127.0.0.1", port: coordinator.addresses[0].port, ca: [pki.ca.cert], servername: "localhost" });
      s.on("error", () => {});
      opened.push(s);
      await once(s, "secureConnect");
      s.write(`GET /v1/tunnel HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${TOKEN}\r\nConnection: Upgrade\r\nUpgrade: natproxy-tunnel/1\r\n\r\n`);
      const [first] = (await once(s, "data")) as [Buffer];
      return first.toString("latin1").split("\r\n")[0] + (first.includes("TOO_MANY") ? " TOO_MANY" : "");
    };
    try {
      assert.match(await upgrade(), / 101 /);
      assert.match(await upgrade(), / 101 /);
      const third = await upgrade();
      assert.match(third, / 429 .*TOO_MANY/);
      opened[0]?.destroy();
      await waitUntil(() => coordinator.liveSockets() <= 2, 3000, "the first ready connection gone");
      assert.match(await upgrade(), / 101 /);
    } finally {
      for (const s of opened) s.destroy();
      await coordinator.close();
    }
  });
});
