import assert from "node:assert/strict";
import { readdirSync } from "node:fs";
import { after, before, describe, test } from "node:test";
import { connectThrough, proxiedRequest } from "../scripts/lib/proxy-client.ts";
import { startStack, type Stack } from "../scripts/lib/stack.ts";
import { startHttpTarget, type Target } from "../scripts/lib/targets.ts";
import { freePort } from "../scripts/lib/ports.ts";
import { waitUntil } from "./helpers/wait.ts";

// No socket, timer or session-table entry outlives its session: after
// 10,000 sessions of every outcome on each path, descriptors and tables are
// back to where they started.

const SESSIONS = 10_000;
const CONCURRENCY = 32;
// Pooled keep-alive connections (API, plain-HTTP tunnels) may come and go.
const FD_TOLERANCE = 8;

const fds = () => readdirSync("/proc/self/fd").length;

type Outcome = "ok-http" | "ok-connect" | "refused" | "forbidden" | "aborted";
const OUTCOMES: Outcome[] = ["ok-http", "ok-connect", "refused", "forbidden", "aborted"];

for (const path of ["connect-back", "outbound"] as const) {
  describe(`leaks (${path} path)`, () => {
    let stack: Stack;
    let web: Target;
    let refusedPort: number;
    before(async () => {
      stack = await startStack({ local: { tunnel: path, pool_idle_timeout: 200 } });
      web = await startHttpTarget();
      refusedPort = await freePort();
    });
    after(async () => {
      await stack?.close();
      await web?.close();
    });

    async function one(outcome: Outcome): Promise<string | undefined> {
      switch (outcome) {
        case "ok-http": {
          const r = await proxiedRequest(stack.proxyPort, `http://127.0.0.1:${web.port}/leak`, { headers: { Connection: "close" } });
          return r.status === 200 ? undefined : `ok-http: ${r.status}`;
        }
        case "ok-connect": {
          const c = await connectThrough(stack.proxyPort, `127.0.0.1:${web.port}`);
          if (c.status !== 200) return `ok-connect: ${c.status}`;
          let text = "";
          c.socket.on("data", (d: Buffer) => (text += d.toString("latin1")));
          c.socket.write("GET /bytes/2000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
          await new Promise((r) => c.socket.once("close", r));
          return text.startsWith("HTTP/1.1 200") ? undefined : `ok-connect: ${text.slice(0, 40)}`;
        }
        case "refused":
          return failed("refused", await connectThrough(stack.proxyPort, `127.0.0.1:${refusedPort}`), 502);
        case "forbidden":
          return failed("forbidden", await connectThrough(stack.proxyPort, "10.0.0.1:80"), 403);
        case "aborted": {
          const c = await connectThrough(stack.proxyPort, `127.0.0.1:${web.port}`);
          if (c.status !== 200) return `aborted: ${c.status}`;
          c.socket.write("GET /bytes/50000000 HTTP/1.1\r\nHost: x\r\n\r\n");
          await new Promise<void>((resolve) => {
            c.socket.once("data", () => {
              c.socket.destroy();
              resolve();
            });
            c.socket.once("close", () => resolve());
          });
          return undefined;
        }
      }
    }

    /**
     * A CONNECT whose target fails: its status, or with a ready connection
     * waiting (optimistic CONNECT) a 200 and then a reset, no byte.
     */
    async function failed(outcome: Outcome, c: Awaited<ReturnType<typeof connectThrough>>, status: number): Promise<string | undefined> {
      if (c.status === status) return undefined;
      if (c.status !== 200) return `${outcome}: ${c.status}`;
      let bytes = 0;
      c.socket.on("data", (d: Buffer) => (bytes += d.length));
      const err = await new Promise<string | undefined>((resolve) => {
        c.socket.once("error", (e: NodeJS.ErrnoException) => resolve(e.code));
        c.socket.once("close", () => resolve(undefined));
      });
      return err === "ECONNRESET" && bytes === 0 ? undefined : `${outcome}: 200, then ${err ?? "a clean close"} after ${bytes} bytes`;
    }

    test(`${SESSIONS} sessions of every outcome leave descriptors and tables at their baseline`, async () => {
      // Warm up, so that pools and lazily created handles exist in the baseline too.
      for (const o of OUTCOMES) await one(o);
      await waitUntil(() => stack.local.liveSockets() === 0, 5000, "warm-up sockets closed");
      const base = { fds: fds(), coordinatorSockets: stack.coordinator.liveSockets() };
      const t0 = performance.now();
      const failures: string[] = [];
      let next = 0;
      await Promise.all(
        Array.from({ length: CONCURRENCY }, async () => {
          while (next < SESSIONS) {
            const i = next++;
            const f = await one(OUTCOMES[i % OUTCOMES.length] as Outcome).catch((e: Error) => `${OUTCOMES[i % OUTCOMES.length]}: ${e.message}`);
            if (f && failures.length < 20) failures.push(f);
          }
        }),
      );
      const seconds = (performance.now() - t0) / 1000;
      assert.deepEqual(failures, []);
      await waitUntil(
        () =>
          stack.local.pendingSessions() === 0 &&
          stack.local.openingTunnels() === 0 &&
          stack.local.liveSockets() === 0 &&
          stack.coordinator.activeSessions() === 0 &&
          stack.coordinator.liveSockets() <= base.coordinatorSockets + 1,
        10_000,
        "every table and socket registry back to its baseline",
      );
      await waitUntil(() => fds() <= base.fds + FD_TOLERANCE, 10_000, `descriptors back to the baseline of ${base.fds}`);
      const mem = process.memoryUsage();
      console.log(`# ${path}: ${SESSIONS} sessions in ${seconds.toFixed(1)} s; descriptors ${base.fds} -> ${fds()}; rss ${(mem.rss / 1048576).toFixed(0)} MiB, heap ${(mem.heapUsed / 1048576).toFixed(0)} MiB`);
    });
  });
}
