import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import net from "node:net";
import { join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { connectThrough } from "../scripts/lib/proxy-client.ts";
import { testPki } from "../scripts/lib/pki.ts";
import { startStack, startTestCoordinator, TOKEN } from "../scripts/lib/stack.ts";
import { resolveConfig } from "../src/config.ts";
import { startReporter } from "../src/reporter/index.ts";
import { reloadSignal, shutdownSignals } from "../src/signals.ts";
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

test("signals: Ctrl-C, SIGTERM (and on Windows Ctrl-Break and closing the console) shut down; SIGHUP reloads only on POSIX", () => {
  assert.deepEqual(shutdownSignals("linux"), ["SIGINT", "SIGTERM"]);
  assert.deepEqual(shutdownSignals("darwin"), ["SIGINT", "SIGTERM"]);
  assert.deepEqual(shutdownSignals("win32"), ["SIGINT", "SIGTERM", "SIGBREAK", "SIGHUP"]);
  assert.equal(reloadSignal("linux"), "SIGHUP");
  assert.equal(reloadSignal("win32"), undefined);
});

// Ctrl-C on a local proxy process, as a person at a console sends it: an idle
// proxy (its ready tunnels and the reporter link are not "live") goes at once
// without a "waiting" line; one with a browser tunnel open says it waits, and
// a second Ctrl-C ends it at once with 130.
test("Ctrl-C on a local proxy process: idle exits 0 without waiting; a live tunnel is waited for, and a second Ctrl-C exits 130", async () => {
  const root = fileURLToPath(new URL("..", import.meta.url));
  const pki = await testPki();
  const reporter = await startReporter(resolveConfig({ reporter: { listen: "127.0.0.1:0" } }, "reporter").reporter);
  const coordinator = await startTestCoordinator(pki);
  const web = await startHttpTarget();
  const spawnLocal = () => {
    const child = spawn(join(root, "node_modules/.bin/node"), [join(root, "src/cli.ts"), "local", "--listen", "127.0.0.1:0", "--coordinator", `https://127.0.0.1:${coordinator.addresses[0].port}`, "--token", TOKEN, "--reporter", `127.0.0.1:${reporter.addresses[0].port}`, "--ca", pki.caFile, "--tunnel", "outbound"], { stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, NO_COLOR: "1" } });
    let err = "";
    const waiters: { re: RegExp; resolve: (m: RegExpMatchArray) => void }[] = [];
    child.stderr.on("data", (c: Buffer) => {
      err += c.toString();
      for (const w of waiters.splice(0)) {
        const m = err.match(w.re);
        if (m) w.resolve(m);
        else waiters.push(w);
      }
    });
    const exited = once(child, "exit") as Promise<[number | null, NodeJS.Signals | null]>;
    const waitFor = (re: RegExp) =>
      new Promise<RegExpMatchArray>((resolve, reject) => {
        const m = err.match(re);
        if (m) return resolve(m);
        waiters.push({ re, resolve });
        // Bounded: 15 s, or the process ending first (the data before exit has been read by then).
        const t = setTimeout(() => reject(new Error(`no ${re} in 15 s; stderr so far:\n${err}`)), 15_000);
        void exited.then(() => {
          clearTimeout(t);
          setImmediate(() => reject(new Error(`exited before ${re}; stderr:\n${err}`)));
        });
      });
    return { child, exited, waitFor, stderr: () => err };
  };
  try {
    const idle = spawnLocal();
    await idle.waitFor(/tunnel path: outbound/);
    const port = Number((await idle.waitFor(/HTTP proxy listening on 127\.0\.0\.1:(\d+)/))[1]);
    const first = await connectThrough(port, `127.0.0.1:${web.port}`);
    assert.equal(first.status, 200);
    first.socket.destroy();
    idle.child.kill("SIGINT");
    const [idleCode] = await idle.exited;
    assert.equal(idleCode, 0, idle.stderr());
    assert.match(idle.stderr(), /SIGINT: shutting down/);
    assert.doesNotMatch(idle.stderr(), /waiting up to/, "nothing was live");

    const busy = spawnLocal();
    await busy.waitFor(/tunnel path: outbound/);
    const busyPort = Number((await busy.waitFor(/HTTP proxy listening on 127\.0\.0\.1:(\d+)/))[1]);
    const live = await connectThrough(busyPort, `127.0.0.1:${web.port}`);
    assert.equal(live.status, 200);
    live.socket.on("error", () => {});
    busy.child.kill("SIGINT");
    // The browser's socket and its tunnel: both live.
    await busy.waitFor(/waiting up to 10000 ms for [12] open connection\(s\) to finish/);
    busy.child.kill("SIGINT");
    const [busyCode] = await busy.exited;
    assert.equal(busyCode, 130, busy.stderr());
    assert.match(busy.stderr(), /SIGINT again: exiting now/);
    live.socket.destroy();
  } finally {
    await web.close();
    await coordinator.close();
    await reporter.close();
  }
});
