import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";
import { startBinaryRoles } from "../scripts/lib/binary-stack.ts";
import type { Proc } from "../scripts/lib/proc.ts";
import { testPki, type TestPki } from "../scripts/lib/pki.ts";
import { findProgram } from "./helpers/programs.ts";
import { expectedSha256, startHttpsTarget, startHttpTarget, type Target } from "../scripts/lib/targets.ts";

// `npm i -g natproxy`, done the way a user's npm does it: the tarball
// `npm pack` makes, installed offline into a fresh prefix, then all three
// roles run from that install, with nothing but Node on PATH.

const ROOT = resolve(import.meta.dirname, "..");
const PKG = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as { version: string; dependencies?: object; private?: boolean };
const NPM = findProgram("npm", "NATPROXY_NPM");
if (NPM === undefined && process.env.CI) throw new Error("npm is not on PATH");
const run = promisify(execFile);

describe("npm pack, then npm i -g from the tarball", { skip: NPM === undefined ? "npm is not on PATH" : false }, () => {
  let dir: string;
  let prefix: string;
  let installed: string;
  let env: NodeJS.ProcessEnv;
  let pki: TestPki;
  const procs: Proc[] = [];
  const targets: Target[] = [];

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "natproxy-npm-"));
    prefix = join(dir, "prefix");
    pki = await testPki();
    // The user's Node, and nothing else: no node_modules/.bin, no project.
    env = { PATH: dirname(realpathSync(process.execPath)), HOME: dir };
  });
  after(async () => {
    for (const p of procs) await p.stop();
    for (const t of targets) await t.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  test("the tarball holds the bundle, README and proxy.toml.example, and declares no dependencies", async (t) => {
    assert.equal(PKG.private, undefined, "a private package cannot be published");
    assert.equal(PKG.dependencies, undefined, "everything the bin needs is in its bundle");
    // prepack builds dist/natproxy.cjs first.
    const packed = await run(NPM!, ["pack", "--json", "--pack-destination", dir], { cwd: ROOT, maxBuffer: 16 * 1024 * 1024 });
    const [info] = JSON.parse(packed.stdout.slice(packed.stdout.indexOf("["))) as { filename: string; files: { path: string }[] }[];
    assert.deepEqual(info.files.map((f) => f.path).sort(), ["README.md", "dist/natproxy.cjs", "package.json", "proxy.toml.example"]);
    const tarball = join(dir, info.filename);
    assert.equal(info.filename, `natproxy-${PKG.version}.tgz`);

    const t0 = performance.now();
    const r = await run(NPM!, ["install", "--global", "--prefix", prefix, "--offline", "--no-audit", "--no-fund", tarball], { cwd: dir, env: { ...process.env, HOME: dir, npm_config_cache: join(dir, "npm-cache") } });
    const said = `${r.stdout}${r.stderr}`;
    assert.match(said, /added 1 package/, said);
    assert.doesNotMatch(said, /install.scripts/i, "no lifecycle script asks the user for permission");
    installed = join(prefix, "lib", "node_modules", "natproxy");
    assert.deepEqual(readdirSync(installed).sort(), ["README.md", "dist", "package.json", "proxy.toml.example"], "no node_modules: nothing else was installed");
    assert.ok(existsSync(join(prefix, "bin", "natproxy")));
    t.diagnostic(`npm i -g from the tarball in ${(performance.now() - t0).toFixed(0)} ms, with an empty npm cache and --offline`);
  });

  test("natproxy --version from the install", async () => {
    const v = await run(join(prefix, "bin", "natproxy"), ["--version"], { env });
    assert.equal(v.stdout.trim(), `natproxy/${PKG.version} ${process.platform}-${process.arch} node-${process.version}`);
  });

  test("reporter, coordinator and local from the install fetch pages through each other", async () => {
    const natproxy = join(prefix, "bin", "natproxy");
    const web = await startHttpTarget();
    const secure = await startHttpsTarget(pki);
    targets.push(web, secure);
    const { local, coordinator: coord, reporter } = await startBinaryRoles(natproxy, { env, dir, pki, procs });
    const proxy = `http://127.0.0.1:${local.port}`;

    const plain = await run("curl", ["-sS", "--max-time", "20", "-x", proxy, `http://127.0.0.1:${web.port}/via-npm`]);
    assert.equal(JSON.parse(plain.stdout).url, "/via-npm");
    const size = 1024 * 1024;
    const hashed = await run("sh", ["-c", `curl -sS --max-time 30 -x ${proxy} --cacert ${pki.caFile} https://localhost:${secure.port}/bytes/${size} | sha256sum`]);
    assert.equal(hashed.stdout.split(" ")[0], expectedSha256(size));
    await local.p.waitFor(/target=localhost:\d+ path=\S+ outcome=ok/, 5000);
    for (const p of [local.p, coord.p, reporter.p]) assert.equal(await p.stop(), 0, "SIGTERM ends each role cleanly");
  });
});
