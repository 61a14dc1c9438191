import assert from "node:assert/strict";
import { once } from "node:events";
import { describe, test } from "node:test";
import { resolveConfig } from "../src/config.ts";
import { startReporter } from "../src/reporter/index.ts";
import type { NatMapping } from "../src/local/nat/mapping-service.ts";
import { connectThrough, proxiedRequest } from "../scripts/lib/proxy-client.ts";
import { testPki } from "../scripts/lib/pki.ts";
import { startLocalFor, startStack, startTestCoordinator } from "../scripts/lib/stack.ts";
import { startHttpTarget } from "../scripts/lib/targets.ts";
import { freePort } from "../scripts/lib/ports.ts";

// The start-up workflow's liveness: the tunnel service must come back by
// itself when the reporter goes away and returns, and when nothing arrives
// for tunnel_idle_timeout; and a self-signed coordinator works when allowed.

function reporterConfig(port: number, interval = 2000) {
  return resolveConfig({ reporter: { listen: `127.0.0.1:${port}`, nat_keep_alive_interval: interval } }, "reporter").reporter;
}

describe("tunnel service liveness", () => {
  test("nothing received for tunnel_idle_timeout: the service restarts on the same P and keeps serving", async () => {
    // The reporter's first keepalive is a minute away, so only the idle timer can fire.
    const stack = await startStack({ reporter: { nat_keep_alive_interval: 60_000 }, local: { tunnel_idle_timeout: 300, nat_keep_alive_interval: 60_000 } });
    const web = await startHttpTarget();
    try {
      const first = stack.local.mapping() as NatMapping;
      const [err] = (await once(stack.local.mappingService, "down")) as [Error];
      assert.match(err.message, /nothing received for 300 ms/);
      const [again] = (await once(stack.local.mappingService, "ready")) as [NatMapping];
      assert.equal(again.localPort, first.localPort, "P is kept across restarts");
      assert.notEqual(again, first);
      const r = await proxiedRequest(stack.proxyPort, `http://127.0.0.1:${web.port}/after-idle`);
      assert.equal(r.status, 200);
    } finally {
      await stack.close();
      await web.close();
    }
  });

  test("tunnel = connect-back, reporter down at start: 503 until it is up, then sessions work without a restart", async () => {
    const pki = await testPki();
    const reporterPort = await freePort();
    const coordinator = await startTestCoordinator(pki);
    const local = await startLocalFor(coordinator.addresses[0].port, reporterPort, pki, { reporter_retries: 1, retry_delay: 20, retry_max_delay: 100, tunnel: "connect-back" });
    const web = await startHttpTarget();
    let reporter: Awaited<ReturnType<typeof startReporter>> | undefined;
    try {
      assert.equal(local.mapping(), undefined);
      assert.match(local.mappingService.lastError?.message ?? "", /ECONNREFUSED/);
      const refused = await connectThrough(local.proxyAddress.port, `127.0.0.1:${web.port}`);
      assert.equal(refused.status, 503);
      assert.equal(refused.headers["x-natproxy-error"], "TUNNEL_NOT_READY");
      const ready = once(local.mappingService, "ready");
      reporter = await startReporter(reporterConfig(reporterPort));
      await ready;
      const ok = await proxiedRequest(local.proxyAddress.port, `http://127.0.0.1:${web.port}/late-reporter`);
      assert.equal(ok.status, 200);
      assert.equal(local.path(), "connect-back");
    } finally {
      await local.close();
      await coordinator.close();
      await reporter?.close();
      await web.close();
    }
  });

  test("the reporter restarts: the link closes, the workflow runs again, live tunnels survive", async () => {
    const stack = await startStack({ local: { retry_delay: 20, retry_max_delay: 200 } });
    const web = await startHttpTarget();
    const port = stack.reporter.addresses[0].port;
    let second: Awaited<ReturnType<typeof startReporter>> | undefined;
    try {
      // A tunnel opened before the restart must outlive it.
      const live = await connectThrough(stack.proxyPort, `127.0.0.1:${web.port}`);
      assert.equal(live.status, 200);
      const down = once(stack.local.mappingService, "down");
      await stack.reporter.close();
      await down;
      const ready = once(stack.local.mappingService, "ready");
      second = await startReporter(reporterConfig(port));
      await ready;
      const r = await proxiedRequest(stack.proxyPort, `http://127.0.0.1:${web.port}/after-restart`);
      assert.equal(r.status, 200);
      // The old tunnel still carries a request.
      live.socket.write(`GET /old-tunnel HTTP/1.1\r\nHost: 127.0.0.1:${web.port}\r\nConnection: close\r\n\r\n`);
      let text = "";
      live.socket.on("data", (c: Buffer) => (text += c.toString()));
      await once(live.socket, "end");
      assert.match(text, /^HTTP\/1\.1 200 OK/);
      assert.match(text, /"url":"\/old-tunnel"/);
    } finally {
      await stack.close();
      // The stack closes the reporter it started; the replacement is ours.
      await second?.close();
      await web.close();
    }
  });
});

describe("coordinator certificates", () => {
  test("no --cert: a self-signed certificate is generated, and allow_self_signed or its fingerprint lets the local proxy in", async () => {
    const pki = await testPki();
    const reporter = await startReporter(reporterConfig(0));
    // No certificate: the coordinator generates a self-signed one.
    const coordinator = await startTestCoordinator(pki, { cert: "" });
    const web = await startHttpTarget();
    const locals = [
      await startLocalFor(coordinator.addresses[0].port, reporter.addresses[0].port, pki, { ca: "", allow_self_signed: true }),
      await startLocalFor(coordinator.addresses[0].port, reporter.addresses[0].port, pki, { ca: "", fingerprint: coordinator.fingerprint }),
      await startLocalFor(coordinator.addresses[0].port, reporter.addresses[0].port, pki, { ca: "" }),
    ];
    try {
      assert.match(coordinator.fingerprint, /^sha256:([0-9A-F]{2}:){31}[0-9A-F]{2}$/);
      for (const l of locals.slice(0, 2)) {
        const r = await proxiedRequest(l.proxyAddress.port, `http://127.0.0.1:${web.port}/self-signed`);
        assert.equal(r.status, 200);
      }
      const refused = await connectThrough(locals[2].proxyAddress.port, `127.0.0.1:${web.port}`);
      assert.equal(refused.status, 502);
      assert.match(refused.body, /self-signed/);
    } finally {
      for (const l of locals) await l.close();
      await coordinator.close();
      await reporter.close();
      await web.close();
    }
  });
});
