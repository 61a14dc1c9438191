import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { setLogLevel } from "../src/log.ts";
import { openReporterLink } from "../src/local/nat/reporter-link.ts";
import type { DecodedStunMessage } from "../src/stun.ts";
import { proxiedRequest } from "../scripts/lib/proxy-client.ts";
import { testPki } from "../scripts/lib/pki.ts";
import { startLocalFor, startTestCoordinator } from "../scripts/lib/stack.ts";
import { startHttpTarget } from "../scripts/lib/targets.ts";
import { freePort } from "../scripts/lib/ports.ts";
import { findProgram } from "./helpers/programs.ts";
import { within } from "./helpers/wait.ts";

// The link against an independent STUN server: coturn serves Binding over TCP
// (docs/NAT.md, "STUN over TCP peers") and, unlike our reporter, never sends
// keepalives of its own, so only the link's own Binding requests can keep the
// link alive.

setLogLevel("silent");

const INTERVAL = 100;
const BOUND = 10_000;


const TURNSERVER = findProgram("turnserver", "NATPROXY_TURNSERVER");
const MISSING = "turnserver (Debian/Ubuntu package coturn) is not installed: apt-get install -y coturn";

function hasIPv6Loopback(): Promise<boolean> {
  const s = createServer();
  return new Promise((resolve) => {
    s.once("error", () => resolve(false));
    s.listen(0, "::1", () => s.close(() => resolve(true)));
  });
}

interface Coturn {
  port: number;
  output: () => string;
  stop(): Promise<void>;
}

/** Thrown when turnserver cannot bind the port it was given. */
class PortTaken extends Error {}

/**
 * Starts turnserver as a STUN-only server on loopback and resolves once its
 * TCP listeners are open. turnserver must be told its port, so the port comes
 * from freePort() and may be taken meanwhile; turnserver then retries the
 * bind forever, so that is spotted in its output and another port is tried.
 */
async function startCoturn(binary: string, ipv6: boolean): Promise<Coturn> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await startCoturnOn(binary, ipv6, await freePort());
    } catch (err) {
      if (!(err instanceof PortTaken) || attempt === 3) throw err;
    }
  }
}

async function startCoturnOn(binary: string, ipv6: boolean, port: number): Promise<Coturn> {
  const dir = mkdtempSync(join(tmpdir(), "natproxy-coturn-"));
  const ips = ipv6 ? ["127.0.0.1", "::1"] : ["127.0.0.1"];
  const args = [
    "-n", // no configuration file
    "-v", // prints "TCP listener opened on", which is what readiness waits for
    "--stun-only",
    ...ips.map((ip) => `--listening-ip=${ip}`),
    `--listening-port=${port}`,
    "--no-udp",
    "--no-tls",
    "--no-dtls",
    "--no-cli",
    "--log-file=stdout",
    "--simple-log",
    `--pidfile=${join(dir, "turnserver.pid")}`,
    `--userdb=${join(dir, "turndb")}`,
  ];
  const child: ChildProcess = spawn(binary, args, { stdio: ["ignore", "pipe", "pipe"] });
  let output = "";
  let exited = false;
  const exit = new Promise<void>((resolve) => child.once("exit", () => ((exited = true), resolve())));
  // If the test process dies some other way, the child must not outlive it.
  const killOnExit = () => child.kill("SIGKILL");
  process.once("exit", killOnExit);

  const stop = async (): Promise<void> => {
    process.off("exit", killOnExit);
    if (!exited) {
      child.kill("SIGTERM");
      try {
        await within(exit, 3000, "turnserver to exit on SIGTERM");
      } catch {
        child.kill("SIGKILL");
        await within(exit, 3000, "turnserver to exit on SIGKILL");
      }
    }
    rmSync(dir, { recursive: true, force: true });
  };

  const wanted = ips.map((ip) => `TCP listener opened on : ${ip}:${port}`);
  try {
    await within(
      new Promise<void>((resolve, reject) => {
        const onData = (chunk: Buffer) => {
          output += chunk.toString();
          if (wanted.every((w) => output.includes(w))) resolve();
          else if (output.includes("Cannot bind TLS/TCP listener socket")) reject(new PortTaken(`port ${port} is taken:\n${output}`));
        };
        child.stdout?.on("data", onData);
        child.stderr?.on("data", onData);
        child.once("error", reject);
        child.once("exit", (code, signal) => reject(new Error(`turnserver exited early (${code ?? signal}):\n${output}`)));
      }),
      BOUND,
      `turnserver to open ${wanted.join(" and ")}`,
    );
  } catch (err) {
    await stop();
    throw err;
  }
  return { port, output: () => output, stop };
}

test("reporter link against coturn (turnserver --stun-only over TCP)", { timeout: 60_000 }, async (t: TestContext) => {
  if (TURNSERVER === undefined) {
    if (process.env.CI) assert.fail(`${MISSING}. CI must have it so the link is checked against an independent STUN server.`);
    t.skip(`${MISSING}; skipped outside CI`);
    return;
  }
  const ipv6 = await hasIPv6Loopback();
  const coturn = await startCoturn(TURNSERVER, ipv6);
  try {
    for (const host of ipv6 ? ["127.0.0.1", "::1"] : ["127.0.0.1"]) {
      await t.test(`over ${host}: the mapped address is the link's local address`, async () => {
        const link = await openReporterLink({ reporter: { host, port: coturn.port }, localPort: 0, keepAliveInterval: 60_000, timeout: 5000 });
        try {
          assert.equal(link.localAddress, host);
          assert.deepEqual(link.publicAddress, { host, port: link.localPort });
          assert.match(link.remoteSoftware ?? "", /coturn/i);
        } finally {
          link.close();
        }
      });
    }

    await t.test("the link's own Binding requests keep it alive over many intervals", async () => {
      // Silence for 3 intervals would close the link; coturn never speaks
      // first, so only answered requests can keep it open this long.
      const link = await openReporterLink({
        reporter: { host: "127.0.0.1", port: coturn.port },
        localPort: 0,
        keepAliveInterval: INTERVAL,
        timeout: 2 * INTERVAL,
      });
      let closeReason: unknown = "open";
      link.on("close", function recordClose(reason) {
        closeReason = reason;
      });
      let changed = false;
      link.on("mapping-changed", function recordChange() {
        changed = true;
      });
      try {
        const started = performance.now();
        let responses = 0;
        await within(
          new Promise<void>((resolve, reject) => {
            link.on("packet", function countResponses(msg: DecodedStunMessage) {
              if (msg.class === "success" && ++responses === 8) resolve();
            });
            link.once("close", (reason) => reject(reason ?? new Error("closed")));
          }),
          BOUND,
          "8 answered keepalive requests",
        );
        const elapsed = performance.now() - started;
        assert.ok(elapsed >= 7 * INTERVAL, `8 keepalives took only ${elapsed.toFixed(0)} ms: more than one per interval`);
        assert.ok(elapsed > 3 * INTERVAL, "longer than the silence the link tolerates");
        assert.equal(link.closed, false);
        assert.equal(closeReason, "open");
        assert.equal(changed, false, "the mapping did not move on loopback");
        assert.deepEqual(link.publicAddress, { host: "127.0.0.1", port: link.localPort });
      } finally {
        link.close();
      }
    });

    await t.test("the local proxy uses coturn as its reporter and stays up on its own keepalives", async () => {
      const pki = await testPki();
      const coordinator = await startTestCoordinator(pki);
      const local = await startLocalFor(coordinator.addresses[0].port, coturn.port, pki, { nat_keep_alive_interval: INTERVAL, tunnel_idle_timeout: 10 * INTERVAL });
      const web = await startHttpTarget();
      try {
        const before = local.mapping();
        assert.ok(before, "the start-up workflow succeeded against coturn");
        assert.deepEqual(before.publicAddress, { host: "127.0.0.1", port: before.localPort });
        const first = await proxiedRequest(local.proxyAddress.port, `http://127.0.0.1:${web.port}/via-coturn`);
        assert.equal(first.status, 200);
        let downs = 0;
        local.mappingService.on("down", () => downs++);
        // coturn only ever answers: 12 packets means 12 of our own keepalives
        // were answered, well past tunnel_idle_timeout (10 intervals).
        await within(
          new Promise<void>((resolve) => {
            let n = 0;
            local.mappingService.on("packet", () => {
              if (++n === 12) resolve();
            });
          }),
          BOUND,
          "12 keepalive answers from coturn",
        );
        assert.equal(downs, 0, "the tunnel service never restarted");
        assert.equal(local.mapping(), before, "same tunnel state: no restart");
        const second = await proxiedRequest(local.proxyAddress.port, `http://localhost:${web.port}/still`);
        assert.equal(second.status, 200);
      } finally {
        await local.close();
        await coordinator.close();
        await web.close();
      }
    });
  } catch (err) {
    t.diagnostic(`turnserver output:\n${coturn.output()}`);
    throw err;
  } finally {
    await coturn.stop();
  }
});
