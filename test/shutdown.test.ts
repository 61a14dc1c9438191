import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import net from "node:net";
import { join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { connectThrough } from "../scripts/lib/proxy-client.ts";
import { startStack } from "../scripts/lib/stack.ts";
import { startHttpTarget } from "../scripts/lib/targets.ts";

// Graceful shutdown: stop accepting at once, let live tunnels finish up to a
// deadline, then cut what is left.

function refused(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(port, "127.0.0.1");
    s.once("connect", () => {
      s.destroy();
      resolve(false);
    });
    s.once("error", (err: NodeJS.ErrnoException) => resolve(err.code === "ECONNREFUSED"));
  });
}

for (const path of ["connect-back", "outbound"] as const) {
  test(`local close with a grace period (${path}): new connections refused at once, a live tunnel finishes its request, close returns when it ends`, async () => {
    const stack = await startStack({ local: { tunnel: path } });
    const web = await startHttpTarget();
    try {
      const live = await connectThrough(stack.proxyPort, `127.0.0.1:${web.port}`);
      assert.equal(live.status, 200);
      const t0 = performance.now();
      const closing = stack.local.close({ graceMs: 5000 });
      assert.equal(await refused(stack.proxyPort), true, "the browser port stops accepting at once");
      let text = "";
      live.socket.on("data", (c: Buffer) => (text += c.toString()));
      // Half-closed after the request, as `nc -N` would: the answer must still come.
      live.socket.end(`GET /during-shutdown HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
      await once(live.socket, "close");
      assert.match(text, /^HTTP\/1\.1 200 OK/);
      assert.match(text, /"url":"\/during-shutdown"/);
      await closing;
      assert.ok(performance.now() - t0 < 4000, `close waited for the tunnel, not for the deadline (${Math.round(performance.now() - t0)} ms)`);
      assert.equal(stack.local.liveSockets(), 0);
    } finally {
      await stack.close();
      await web.close();
    }
  });
}

test("coordinator close with a grace period cuts a tunnel that does not end by the deadline", async () => {
  const stack = await startStack({ local: { tunnel: "outbound" } });
  const web = await startHttpTarget();
  try {
    const live = await connectThrough(stack.proxyPort, `127.0.0.1:${web.port}`);
    assert.equal(live.status, 200);
    assert.equal(stack.coordinator.activeSessions(), 1);
    const t0 = performance.now();
    const ended = once(live.socket, "close");
    await stack.coordinator.close({ graceMs: 400 });
    const ms = performance.now() - t0;
    assert.ok(ms >= 350 && ms < 3000, `cut after the grace period (${Math.round(ms)} ms)`);
    await ended;
    assert.equal(stack.coordinator.liveSockets(), 0);
  } finally {
    await stack.close();
    await web.close();
  }
});

test("SIGTERM: a role process says it is shutting down and exits 0", async () => {
  const root = fileURLToPath(new URL("..", import.meta.url));
  const child = spawn(join(root, "node_modules/.bin/node"), [join(root, "src/cli.ts"), "reporter", "--listen", "127.0.0.1:0"], { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  child.stderr.on("data", (c: Buffer) => {
    err += c.toString();
    if (/listening on/.test(err) && !child.killed) child.kill("SIGTERM");
  });
  const [code] = (await once(child, "exit")) as [number | null];
  assert.equal(code, 0, err);
  assert.match(err, /SIGTERM: shutting down/);
});
