import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { once } from "node:events";
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { resolveConfig } from "../src/config.ts";
import { startReporter, type ReporterHandle } from "../src/reporter/index.ts";
import { proxiedRequest } from "../scripts/lib/proxy-client.ts";
import { testPki, type TestPki } from "../scripts/lib/pki.ts";
import { TOKEN } from "../scripts/lib/stack.ts";
import { startHttpTarget, type Target } from "../scripts/lib/targets.ts";

// File descriptors run out (EMFILE): each role runs as its own process with a
// small descriptor limit, is flooded with connections until accept() fails,
// and must still be alive, log no bug, and serve once the flood is gone.

const root = fileURLToPath(new URL("..", import.meta.url));
const NODE = join(root, "node_modules/.bin/node");
const CLI = join(root, "src/cli.ts");
const FD_LIMIT = 72;
const FLOOD = 150;

let pki: TestPki;
let reporter: ReporterHandle;
let web: Target;
let dir: string;
const children: ChildProcess[] = [];

before(async () => {
  pki = await testPki();
  dir = mkdtempSync(join(tmpdir(), "natproxy-emfile-"));
  reporter = await startReporter(resolveConfig({ reporter: { listen: "127.0.0.1:0" } }, "reporter").reporter);
  web = await startHttpTarget();
});
after(async () => {
  for (const c of children) c.kill("SIGKILL");
  await reporter?.close();
  await web?.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** Starts a role with `ulimit -n FD_LIMIT`; resolves with the port its log names, and its output so far. */
async function role(args: string[], ready: RegExp): Promise<{ port: number; output: () => string; child: ChildProcess }> {
  const child = spawn("bash", ["-c", `ulimit -n ${FD_LIMIT} && exec "$0" "$@"`, NODE, CLI, ...args], { stdio: ["ignore", "ignore", "pipe"] });
  children.push(child);
  let out = "";
  child.stderr?.on("data", (c: Buffer) => (out += c.toString()));
  const port = await new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`not ready: ${out}`)), 15_000);
    const check = () => {
      const m = ready.exec(out);
      if (m) {
        clearTimeout(timer);
        child.stderr?.off("data", check);
        resolve(Number(m[1]));
      }
    };
    child.stderr?.on("data", check);
    child.once("exit", (code) => reject(new Error(`exited ${code}: ${out}`)));
  });
  return { port, output: () => out, child };
}

/** Opens FLOOD connections and holds them; returns the role's descriptor count at the peak, and a release. */
async function flood(port: number, pid: number): Promise<{ peak: number; release(): void }> {
  const sockets: net.Socket[] = [];
  await Promise.all(
    Array.from({ length: FLOOD }, () => {
      const s = net.connect(port, "127.0.0.1");
      s.on("error", () => {});
      sockets.push(s);
      return Promise.race([once(s, "connect"), once(s, "close")]).catch(() => undefined);
    }),
  );
  // Long enough for the role to try (and fail) to accept what is queued.
  await new Promise((r) => setTimeout(r, 300));
  const peak = readdirSync(`/proc/${pid}/fd`).length;
  return {
    peak,
    release() {
      for (const s of sockets) s.destroy();
    },
  };
}

test("the coordinator and the local proxy survive running out of descriptors, and serve again", async () => {
  const coordCfg = join(dir, "coordinator.toml");
  writeFileSync(coordCfg, `[coordinator]\nallow_targets = ["127.0.0.1"]\nallow_connect_back = ["127.0.0.1"]\n`);
  const coordinator = await role(["coordinator", "-c", coordCfg, "--listen", "127.0.0.1:0", "--cert", pki.combinedFile, "--token", TOKEN], /HTTPS API listening on 127\.0\.0\.1:(\d+)/);
  const localCfg = join(dir, "local.toml");
  writeFileSync(
    localCfg,
    `[local]\nlisten = "127.0.0.1:0"\ncoordinator = "https://localhost:${coordinator.port}"\ntoken = "${TOKEN}"\nca = "${pki.caFile}"\nreporter = "127.0.0.1:${reporter.addresses[0].port}"\ntunnel = "outbound"\n`,
  );
  const local = await role(["local", "-c", localCfg, "--log-level", "debug"], /HTTP proxy listening on 127\.0\.0\.1:(\d+)/);

  for (const [name, target] of [
    ["local proxy", local],
    ["coordinator", coordinator],
  ] as const) {
    const { peak, release } = await flood(target.port, target.child.pid as number);
    release();
    assert.ok(peak >= FD_LIMIT - 2, `the ${name} ran out of descriptors (${peak} of ${FD_LIMIT} open at the peak)`);
    // Both processes are alive and the chain serves again.
    assert.equal(local.child.exitCode, null, `local proxy alive after flooding the ${name}`);
    assert.equal(coordinator.child.exitCode, null, `coordinator alive after flooding the ${name}`);
    let status = 0;
    for (let attempt = 0; attempt < 20 && status !== 200; attempt++) {
      status = (await proxiedRequest(local.port, `http://127.0.0.1:${web.port}/after-${name.replace(" ", "-")}`, { headers: { Connection: "close" } }).catch(() => ({ status: 0 }))).status;
      if (status !== 200) await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(status, 200, `serving again after the ${name} ran out of descriptors`);
  }
  for (const p of [local, coordinator]) assert.doesNotMatch(p.output(), /BUG/, p.output());
});
