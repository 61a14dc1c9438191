import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import { resolveConfig } from "../src/config.ts";
import { startCoordinator, type Coordinator } from "../src/coordinator/index.ts";
import { startReporter, type ReporterHandle } from "../src/reporter/index.ts";
import { testPki, type TestPki } from "../scripts/lib/pki.ts";
import { TOKEN } from "../scripts/lib/stack.ts";

// `natproxy local --check` as a user runs it: a separate process, its report
// on stdout, and an exit code that says whether a path works.

const root = fileURLToPath(new URL("..", import.meta.url));
const NODE = join(root, "node_modules/.bin/node");
const CLI = join(root, "src/cli.ts");

let pki: TestPki;
let coordinator: Coordinator;
let reporter: ReporterHandle;
let dir: string;

before(async () => {
  pki = await testPki();
  dir = mkdtempSync(join(tmpdir(), "natproxy-check-"));
  coordinator = await startCoordinator(resolveConfig({ coordinator: { listen: "127.0.0.1:0", cert: pki.combinedFile, tokens: [TOKEN], allow_connect_back: ["127.0.0.1"] } }, "coordinator").coordinator);
  reporter = await startReporter(resolveConfig({ reporter: { listen: "127.0.0.1:0" } }, "reporter").reporter);
});
after(async () => {
  await coordinator?.close();
  await reporter?.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

function check(local: Record<string, string>): Promise<{ code: number; stdout: string; stderr: string }> {
  const cfg = join(dir, `check-${Math.random().toString(36).slice(2)}.toml`);
  const lines = Object.entries({
    coordinator: `"https://localhost:${coordinator.addresses[0].port}"`,
    token: `"${TOKEN}"`,
    reporter: `"127.0.0.1:${reporter.addresses[0].port}"`,
    ca: `"${pki.caFile}"`,
    probe_timeout: "1500",
    ...local,
  }).map(([k, v]) => `${k} = ${v}`);
  writeFileSync(cfg, `[local]\n${lines.join("\n")}\n`);
  return new Promise((resolve) => {
    execFile(NODE, [CLI, "local", "-c", cfg, "--check"], { timeout: 30_000 }, (err, stdout, stderr) => {
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr });
    });
  });
}

describe("natproxy local --check", () => {
  test("everything in order: public address, NAT behaviour, the path, exit 0", async () => {
    const r = await check({});
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.match(r.stdout, /token accepted/);
    assert.match(r.stdout, /public address 127\.0\.0\.1:\d+/);
    assert.match(r.stdout, /connect-back: +ok, the coordinator connected back in \d+ ms/);
    assert.match(r.stdout, /NAT: +no NAT/);
    assert.match(r.stdout, /tunnel path: +connect-back \(auto: the probe got through\)/);
    assert.match(r.stdout, /result: +OK/);
  });

  test("a wrong token is named, and with no working path the exit code is 1", async () => {
    const r = await check({ token: `"wrong-token-wrong-token"` });
    assert.equal(r.code, 1, r.stdout);
    assert.match(r.stdout, /PROBLEM .*token/);
    assert.match(r.stdout, /NONE works/);
  });

  test("an untrusted certificate is named with its fingerprint", async () => {
    const r = await check({ ca: `""` });
    assert.equal(r.code, 1, r.stdout);
    assert.match(r.stdout, /PROBLEM .*not trusted.*fingerprint = "sha256:/);
  });

  test("an unreachable reporter: auto still works outbound (exit 0); connect-back alone cannot (exit 1)", async () => {
    // Port 1: nothing listens there. A port closed a moment ago can come
    // back as the proxy's own tunnel port, and connecting from a port to
    // itself succeeds on Linux (a TCP self-connect).
    const port = 1;
    const auto = await check({ reporter: `"127.0.0.1:${port}"` });
    assert.equal(auto.code, 0, auto.stdout);
    assert.match(auto.stdout, /reporter: .*\n +PROBLEM .*ECONNREFUSED/);
    assert.match(auto.stdout, /tunnel path: +outbound/);
    const back = await check({ reporter: `"127.0.0.1:${port}"`, tunnel: `"connect-back"` });
    assert.equal(back.code, 1, back.stdout);
    assert.match(back.stdout, /result: +FAILED/);
  });
});
