// Secrets and the files they live in: tokens from a file or the environment
// instead of the command line (which every user reads with ps), a warning for
// secret files others can read, and certificate, key, CA, token and config
// paths that are not small regular files (cert = "/dev/zero" used to abort
// the coordinator with std::bad_alloc).
import assert from "node:assert/strict";
import { execFile, execFileSync } from "node:child_process";
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { after, before, describe, test } from "node:test";
import { ConfigError, loadConfig, resolveConfig } from "../src/config.ts";
import { startReporter, type ReporterHandle } from "../src/reporter/index.ts";
import { loadKeyPair } from "../src/tls/certs.ts";
import { makeTrust } from "../src/tls/trust.ts";
import { startProc, type Proc } from "../scripts/lib/proc.ts";
import { proxiedRequest } from "../scripts/lib/proxy-client.ts";
import { testPki, type TestPki } from "../scripts/lib/pki.ts";
import { TOKEN } from "../scripts/lib/stack.ts";
import { startHttpTarget, type Target } from "../scripts/lib/targets.ts";

const dir = mkdtempSync(join(tmpdir(), "natproxy-secrets-"));
after(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;
function file(text: string | Buffer, mode = 0o600): string {
  const p = join(dir, `f${n++}`);
  writeFileSync(p, text);
  chmodSync(p, mode);
  return p;
}
const LOCAL = `[local]\ncoordinator = "https://coord.example:8443"\n`;
const TOKEN_B = "another-token-0123456789";

function problems(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    assert.ok(err instanceof ConfigError, `expected ConfigError, got ${err}`);
    return err.problems.join("\n");
  }
  assert.fail("expected a ConfigError");
}

test("tokens from a file or the environment; a higher source replaces the other key of its pair", () => {
  const tokenFile = file(`${TOKEN}\n`);
  assert.equal(loadConfig({ path: file(`${LOCAL}token_file = "${tokenFile}"\n`), role: "local", env: {} }).local.token, TOKEN);
  assert.equal(loadConfig({ path: file(LOCAL), role: "local", env: { NATPROXY_TOKEN: TOKEN } }).local.token, TOKEN);
  assert.equal(loadConfig({ path: file(LOCAL), role: "local", env: {}, overrides: { local: { token_file: tokenFile } } }).local.token, TOKEN);
  // environment over file, flag over both, whichever key each uses
  assert.equal(loadConfig({ path: file(`${LOCAL}token_file = "${tokenFile}"\n`), role: "local", env: { NATPROXY_TOKEN: TOKEN_B } }).local.token, TOKEN_B);
  assert.equal(loadConfig({ path: file(`${LOCAL}token = "${TOKEN_B}"\n`), role: "local", env: {}, overrides: { local: { token_file: tokenFile } } }).local.token, TOKEN);
  assert.match(problems(() => loadConfig({ path: file(`${LOCAL}token = "${TOKEN}"\ntoken_file = "${tokenFile}"\n`), role: "local", env: {} })), /local.token_file: set local.token or local.token_file, not both/);
  assert.match(problems(() => loadConfig({ path: file(`${LOCAL}token_file = "${file(`${TOKEN}\n${TOKEN_B}\n`)}"\n`), role: "local", env: {} })), /must hold exactly one token \(one line\), it holds 2/);
  assert.match(problems(() => loadConfig({ path: file(LOCAL), role: "local", env: {} })), /local.token: required .*token_file, --token-file.*NATPROXY_TOKEN/);

  const tokensFile = file(`# laptop\n${TOKEN}\n\n  ${TOKEN_B}  \n`);
  assert.deepEqual(loadConfig({ path: file(`[coordinator]\ntokens_file = "${tokensFile}"\n`), role: "coordinator", env: {} }).coordinator.tokens, [TOKEN, TOKEN_B]);
  assert.deepEqual(loadConfig({ role: "coordinator", env: { NATPROXY_TOKENS: `${TOKEN}, ${TOKEN_B}` } }).coordinator.tokens, [TOKEN, TOKEN_B]);
  assert.deepEqual(loadConfig({ path: file(`[coordinator]\ntokens = ["${TOKEN_B}"]\n`), role: "coordinator", env: {}, overrides: { coordinator: { tokens_file: file(`${TOKEN}\n`) } } }).coordinator.tokens, [TOKEN]);
  assert.match(problems(() => loadConfig({ path: file(`[coordinator]\ntokens = ["${TOKEN}"]\ntokens_file = "${tokensFile}"\n`), role: "coordinator", env: {} })), /set coordinator.tokens or coordinator.tokens_file, not both/);
  // The tokens from a file are held to the same rules.
  assert.match(problems(() => loadConfig({ path: file(`[coordinator]\ntokens_file = "${file("short\n")}"\n`), role: "coordinator", env: {} })), /tokens\[0\]: a token needs at least 16 characters/);
});

test("a config file with secrets, a token file or a key file that others can read is named with the chmod that fixes it", () => {
  const open = file(`${LOCAL}token = "${TOKEN}"\n`, 0o644);
  const w = loadConfig({ path: open, role: "local", env: {} }).warnings;
  assert.equal(w.length, 1, w.join("\n"));
  assert.equal(w[0], `${open} holds [local] token and is readable by every user of this machine (mode 0644); fix: chmod 600 '${open}'`);
  const group = file(`[coordinator]\ntokens = ["${TOKEN}"]\n`, 0o640);
  assert.match(loadConfig({ path: group, role: "coordinator", env: {} }).warnings.join("\n"), /holds \[coordinator\] tokens and is readable by its group \(mode 0640\)/);
  assert.deepEqual(loadConfig({ path: file(`${LOCAL}token = "${TOKEN}"\n`, 0o600), role: "local", env: {} }).warnings, []);
  // Nothing secret in it: nothing to say.
  assert.deepEqual(loadConfig({ path: file(`[reporter]\nlisten = "*:3478"\n`, 0o644), role: "reporter", env: {} }).warnings, []);

  const tokenFile = file(`${TOKEN}\n`, 0o604);
  assert.match(loadConfig({ path: file(`${LOCAL}token_file = "${tokenFile}"\n`), role: "local", env: {} }).warnings.join("\n"), new RegExp(`${tokenFile} holds tokens .*chmod 600`));
});

describe("keys and certificates others can read", () => {
  let pki: TestPki;
  before(async () => {
    pki = await testPki();
  });
  test("the coordinator's key file, or its certificate file when that holds the key", () => {
    const key = file(readFileSync(pki.serverKeyFile), 0o644);
    const cert = file(readFileSync(pki.serverCertFile), 0o644);
    const separate = resolveConfig({ coordinator: { tokens: [TOKEN], cert, key } }, "coordinator").warnings;
    assert.deepEqual(separate.length, 1, separate.join("\n"));
    assert.match(separate[0], new RegExp(`^${key} holds the coordinator's private key .*chmod 600`));
    const combined = file(readFileSync(pki.combinedFile), 0o644);
    assert.match(resolveConfig({ coordinator: { tokens: [TOKEN], cert: combined } }, "coordinator").warnings.join(), new RegExp(`${combined} holds the coordinator's private key`));
    assert.deepEqual(resolveConfig({ coordinator: { tokens: [TOKEN], cert: pki.combinedFile } }, "coordinator").warnings, [], "the helper writes its key with mode 0600");
  });
});

test("cert, key, ca, token and config paths that are not small regular files are refused with a sentence", () => {
  const fifo = join(dir, "fifo");
  execFileSync("mkfifo", [fifo]);
  const big = file(Buffer.alloc(1024 * 1024 + 1, 0x41));
  const coord = (extra: Record<string, string>) => problems(() => resolveConfig({ coordinator: { tokens: [TOKEN], ...extra } }, "coordinator"));
  assert.match(coord({ cert: "/dev/zero" }), /coordinator.cert: cannot read "\/dev\/zero" \(a character device, not a regular file\)/);
  assert.match(coord({ cert: big, key: "/dev/zero" }), new RegExp(`coordinator.cert: cannot read "${big}" \\(1048577 bytes; at most 1048576 \\(1 MiB\\) are read\\)[\\s\\S]*coordinator.key: cannot read "/dev/zero" \\(a character device`));
  // A FIFO would block an open() until a writer came: it is judged without opening it.
  assert.match(coord({ cert: fifo }), /coordinator.cert: cannot read ".*fifo" \(a named pipe, not a regular file\)/);
  assert.match(coord({ cert: dir }), /\(a directory, not a regular file\)/);
  assert.match(problems(() => resolveConfig({ coordinator: { tokens_file: "/dev/zero" } }, "coordinator")), /coordinator.tokens_file: cannot read "\/dev\/zero" \(a character device/);
  assert.match(problems(() => resolveConfig({ local: { coordinator: "https://c.example", token: TOKEN, ca: "/dev/zero" } }, "local")), /local.ca: cannot read "\/dev\/zero" \(a character device/);
  assert.match(problems(() => loadConfig({ path: "/dev/zero", role: "reporter", env: {} })), /cannot read the file: a character device, not a regular file/);
  // The readers themselves refuse too, for callers that skip the config check.
  assert.throws(() => loadKeyPair("/dev/zero"), /^Error: \/dev\/zero: cannot read the certificate \(a character device, not a regular file\)$/);
  assert.throws(() => loadKeyPair(big), /cannot read the certificate \(1048577 bytes; at most 1048576/);
  assert.throws(() => makeTrust({ hostname: "c.example", allow_self_signed: false, fingerprint: "", ca: fifo }), /fifo: cannot read the CA bundle \(a named pipe, not a regular file\)/);
});

test("own_addresses and allow_connect_back are checked like the other address lists", () => {
  const text = problems(() => resolveConfig({ coordinator: { tokens: [TOKEN], own_addresses: ["203.0.113.5", "coord.example"], allow_connect_back: ["10.0.0.0/33"] } }, "coordinator"));
  assert.match(text, /coordinator.own_addresses\[1\]: expected an IP address, got "coord.example"/);
  assert.match(text, /coordinator.allow_connect_back\[0\]: .*prefix length/);
  assert.doesNotMatch(text, /own_addresses\[0\]/);
});

const BINARY = resolve(import.meta.dirname, "..", "dist", "natproxy");
const missing = !existsSync(BINARY);
if (missing && process.env.CI) throw new Error(`${BINARY} is missing: npm test builds it first (node scripts/build.ts)`);
const ENV = { PATH: "/nonexistent", HOME: tmpdir() };

function cmdline(p: Proc): string {
  return readFileSync(`/proc/${p.child.pid}/cmdline`, "utf8").split("\0").join(" ");
}

describe("the packaged binary", { skip: missing ? `${BINARY} not built; run npm run build` : false }, () => {
  let pki: TestPki;
  let web: Target;
  let reporter: ReporterHandle;
  const procs: Proc[] = [];
  before(async () => {
    pki = await testPki();
    web = await startHttpTarget();
    reporter = await startReporter(resolveConfig({ reporter: { listen: "127.0.0.1:0" } }, "reporter").reporter);
  });
  after(async () => {
    for (const p of procs) await p.stop();
    await web?.close();
    await reporter?.close();
  });

  test('cert = "/dev/zero" is refused at start with exit code 2 and a sentence, not an abort', async () => {
    const r = await new Promise<{ code: number | null; signal: string | null; stderr: string }>((done) => {
      execFile(BINARY, ["coordinator", "--listen", "127.0.0.1:0", "--cert", "/dev/zero", "--token-file", file(`${TOKEN}\n`)], { env: ENV, timeout: 20_000 }, (err, _stdout, stderr) =>
        done({ code: err ? ((err as { code?: number }).code ?? null) : 0, signal: err ? ((err as { signal?: string }).signal ?? null) : null, stderr }),
      );
    });
    assert.equal(r.signal, null, r.stderr);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /coordinator.cert: cannot read "\/dev\/zero" \(a character device, not a regular file\)/);
    assert.doesNotMatch(r.stderr, /bad_alloc/);
  });

  test("tokens from a file and from the environment keep them off the command line; --token and a readable config are warned about", async () => {
    const tokens = file(`${TOKEN}\n`);
    const coordCfg = file(`[coordinator]\nlisten = "127.0.0.1:0"\nallow_targets = ["127.0.0.1"]\n`);
    const coord = startProc(BINARY, ["coordinator", "-c", coordCfg, "--cert", pki.combinedFile, "--token-file", tokens], ENV);
    procs.push(coord);
    const api = Number((await coord.waitFor(/HTTPS API listening on 127\.0\.0\.1:(\d+)/, 15_000))[1]);
    const localCfg = file(`[local]\nlisten = "127.0.0.1:0"\ncoordinator = "https://localhost:${api}"\nca = "${pki.caFile}"\nreporter = "127.0.0.1:${reporter.addresses[0].port}"\ntunnel = "outbound"\n`);
    const local = startProc(BINARY, ["local", "-c", localCfg], { ...ENV, NATPROXY_TOKEN: TOKEN });
    procs.push(local);
    const proxyPort = Number((await local.waitFor(/HTTP proxy listening on 127\.0\.0\.1:(\d+)/, 15_000))[1]);
    const r = await proxiedRequest(proxyPort, `http://127.0.0.1:${web.port}/secret-files`);
    assert.equal(r.status, 200, "the coordinator accepted the token the local proxy read from NATPROXY_TOKEN");
    for (const p of [coord, local]) {
      assert.ok(!cmdline(p).includes(TOKEN), cmdline(p));
      assert.doesNotMatch(p.output(), /--token puts the token on the command line|readable by/);
    }

    const exposed = file(`[local]\nlisten = "127.0.0.1:0"\ncoordinator = "https://localhost:${api}"\ntoken = "${TOKEN}"\nca = "${pki.caFile}"\nreporter = "127.0.0.1:${reporter.addresses[0].port}"\ntunnel = "outbound"\n`, 0o644);
    const flagged = startProc(BINARY, ["local", "-c", exposed, "--token", TOKEN], ENV);
    procs.push(flagged);
    await flagged.waitFor(/HTTP proxy listening on/, 15_000);
    assert.match(flagged.output(), /--token puts the token on the command line, where every user of this machine can read it/);
    assert.match(flagged.output(), new RegExp(`${exposed} holds \\[local\\] token and is readable by every user of this machine \\(mode 0644\\); fix: chmod 600 '${exposed}'`));
  });
});
