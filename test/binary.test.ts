import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";
import { testPki, type TestPki } from "../scripts/lib/pki.ts";
import { startProc, type Proc } from "../scripts/lib/proc.ts";
import { expectedSha256, startHttpsTarget, startHttpTarget, type Target } from "../scripts/lib/targets.ts";
import { TOKEN } from "../scripts/lib/stack.ts";

// The same core scenario as e2e.test.ts, but through the packaged binary as
// three processes, so that a bundling or packaging fault fails the tests.

const BINARY = resolve(import.meta.dirname, "..", "dist", "natproxy");
const run = promisify(execFile);
// No Node on PATH: the binary must carry its own runtime.
const ENV = { PATH: "/nonexistent", HOME: tmpdir() };
const missing = !existsSync(BINARY);
if (missing && process.env.CI) throw new Error(`${BINARY} is missing: npm test builds it first (node scripts/build.ts)`);
const skip = missing ? `${BINARY} not built; run npm run build` : false;

function curl(args: string[]): Promise<{ stdout: string; code: number }> {
  return run("curl", ["-sS", "--max-time", "20", ...args], { encoding: "buffer", maxBuffer: 64 * 1024 * 1024 }).then(
    (r) => ({ stdout: r.stdout.toString("latin1"), code: 0 }),
    (e: { code: number; stdout?: Buffer }) => ({ stdout: e.stdout?.toString("latin1") ?? "", code: e.code }),
  );
}

describe("the packaged binary", { skip }, () => {
  let pki: TestPki;
  let dir: string;
  let web: Target;
  let secure: Target;
  const procs: Proc[] = [];

  before(async () => {
    pki = await testPki();
    dir = mkdtempSync(join(tmpdir(), "natproxy-bin-"));
    web = await startHttpTarget();
    secure = await startHttpsTarget(pki);
  });
  after(async () => {
    for (const p of procs) await p.stop();
    await web?.close();
    await secure?.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  test("--version, --help and per-role help", async () => {
    const v = await run(BINARY, ["--version"], { env: ENV });
    assert.match(v.stdout, /natproxy\/0\.\d+\.\d+/);
    const h = await run(BINARY, ["--help"], { env: ENV });
    for (const word of ["local", "coordinator", "reporter", "--config"]) assert.ok(h.stdout.includes(word), word);
    const lh = await run(BINARY, ["local", "--help"], { env: ENV });
    assert.match(lh.stdout, /--tunnel-port/);
    const ch = await run(BINARY, ["coordinator", "--help"], { env: ENV });
    assert.match(ch.stdout, /--cert <file>/);
  });

  test("a bad config is refused with exit code 2 and every problem listed", async () => {
    const bad = join(dir, "bad.toml");
    writeFileSync(bad, `[local]\ncoordinator = "http://x"\nconnect_timeout = "soon"\nnope = 1\n`);
    const r = await run(BINARY, ["local", "-c", bad], { env: ENV }).then(
      () => ({ code: 0, stderr: "" }),
      (e: { code: number; stderr: string }) => e,
    );
    assert.equal(r.code, 2);
    assert.match(r.stderr, /bad.toml: invalid configuration/);
    assert.match(r.stderr, /local.connect_timeout: expected number/);
    assert.match(r.stderr, /unknown key "nope" in \[local\]/);
  });

  test("three processes: reporter, coordinator --cert key.pem, local -c proxy.toml; HTTP and HTTPS through them", async (t) => {
    const timings: string[] = [];
    const startRole = async (args: string[], ready: RegExp) => {
      const t0 = performance.now();
      const p = startProc(BINARY, args, ENV);
      procs.push(p);
      const m = await p.waitFor(ready, 15_000);
      timings.push(`${args[0]} ${(performance.now() - t0).toFixed(0)} ms`);
      return { p, port: Number(m[1]) };
    };
    const reporter = await startRole(["reporter", "--listen", "127.0.0.1:0"], /listening on 127\.0\.0\.1:(\d+)/);
    const cfg = join(dir, "proxy.toml");
    writeFileSync(
      cfg,
      `[coordinator]\nlisten = "127.0.0.1:0"\ntokens = ["${TOKEN}"]\nallow_targets = ["127.0.0.1"]\nallow_connect_back = ["127.0.0.1"]\n` +
        `[local]\nlisten = "127.0.0.1:0"\ntoken = "${TOKEN}"\nca = "${pki.caFile}"\nreporter = "127.0.0.1:${reporter.port}"\n`,
    );
    const coord = await startRole(["coordinator", "-c", cfg, "--cert", pki.combinedFile], /HTTPS API listening on 127\.0\.0\.1:(\d+)/);
    const local = await startRole(["local", "-c", cfg, "--coordinator", `https://localhost:${coord.port}`], /HTTP proxy listening on 127\.0\.0\.1:(\d+)/);
    t.diagnostic(`start-up to listening: ${timings.join(", ")}`);
    // The browser port opens first; the tunnel service follows once the reporter answered.
    await local.p.waitFor(/tunnel service listening on port \d+; public address 127\.0\.0\.1:\d+/, 15_000);
    await local.p.waitFor(/reachability: public address/, 15_000);

    const proxy = `http://127.0.0.1:${local.port}`;
    const plain = await curl(["-x", proxy, `http://127.0.0.1:${web.port}/via-binary`]);
    assert.equal(plain.code, 0);
    assert.equal(JSON.parse(plain.stdout).url, "/via-binary");
    const size = 8 * 1024 * 1024;
    const hashed = await run("sh", ["-c", `curl -sS --max-time 30 -x ${proxy} --cacert ${pki.caFile} https://localhost:${secure.port}/bytes/${size} | sha256sum`]);
    assert.equal(hashed.stdout.split(" ")[0], expectedSha256(size));

    // One line per session on both sides.
    await local.p.waitFor(/session=[0-9a-f-]{36} client=\S+ target=localhost:\d+ path=connect-back outcome=ok up=\d+ down=\d+ ms=\d+/, 5000);
    await coord.p.waitFor(/session=[0-9a-f-]{36} client=\S+ target=127\.0\.0\.1:\d+ path=connect-back outcome=ok up=\d+ down=\d+/, 5000);

    for (const p of [local.p, coord.p, reporter.p]) assert.equal(await p.stop(), 0, "SIGTERM ends each role cleanly");
  });

  test("coordinator with the reporter in the same process ([coordinator] reporter = true)", async () => {
    const cfg = join(dir, "combined.toml");
    writeFileSync(cfg, `[coordinator]\nlisten = "127.0.0.1:0"\ntokens = ["${TOKEN}"]\nallow_targets = ["127.0.0.1"]\nallow_connect_back = ["127.0.0.1"]\nreporter = true\ncert = "${pki.serverCertFile}"\nkey = "${pki.serverKeyFile}"\n[reporter]\nlisten = "127.0.0.1:0"\n`);
    const coord = startProc(BINARY, ["coordinator", "-c", cfg], ENV);
    procs.push(coord);
    const api = Number((await coord.waitFor(/HTTPS API listening on 127\.0\.0\.1:(\d+)/, 15_000))[1]);
    const rep = Number((await coord.waitFor(/listening on 127\.0\.0\.1:(\d+) \(STUN/, 15_000))[1]);
    const lcfg = join(dir, "local2.toml");
    writeFileSync(lcfg, `[local]\nlisten = "127.0.0.1:0"\ncoordinator = "https://localhost:${api}"\ntoken = "${TOKEN}"\nca = "${pki.caFile}"\nreporter = "127.0.0.1:${rep}"\n`);
    const local = startProc(BINARY, ["local", "-c", lcfg], ENV);
    procs.push(local);
    const port = Number((await local.waitFor(/HTTP proxy listening on 127\.0\.0\.1:(\d+)/, 15_000))[1]);
    const r = await curl(["-x", `http://127.0.0.1:${port}`, `http://127.0.0.1:${web.port}/combined`]);
    assert.equal(JSON.parse(r.stdout).url, "/combined");
    assert.equal(await local.stop(), 0);
    assert.equal(await coord.stop(), 0);
  });
});
