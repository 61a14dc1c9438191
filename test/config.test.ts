import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { ConfigError, loadConfig, resolveConfig } from "../src/config.ts";
import { createTargetPolicy } from "../src/coordinator/target-policy.ts";

const dir = mkdtempSync(join(tmpdir(), "natproxy-config-"));
after(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;
function file(text: string): string {
  const p = join(dir, `c${n++}.toml`);
  writeFileSync(p, text);
  return p;
}
const TOKEN = "0123456789abcdef-token";
const LOCAL_OK = `[local]\ncoordinator = "https://coord.example:8443"\ntoken = "${TOKEN}"\n`;

function problems(fn: () => unknown): string[] {
  try {
    fn();
  } catch (err) {
    assert.ok(err instanceof ConfigError, `expected ConfigError, got ${err}`);
    return err.problems;
  }
  assert.fail("expected a ConfigError");
}

test("defaults fill every key; the reporter defaults to the coordinator's host on 3478", () => {
  const c = loadConfig({ path: file(LOCAL_OK), role: "local", env: {} });
  assert.equal(c.local.listen.host, "127.0.0.1");
  assert.equal(c.local.listen.port, 8080);
  assert.deepEqual(c.local.reporterAddress, { host: "coord.example", port: 3478 });
  assert.equal(c.local.nat_keep_alive_interval, 15000);
  assert.equal(c.local.tunnel_idle_timeout, 60000);
  assert.equal(c.local.connect_timeout, 10000);
  assert.equal(c.local.allow_self_signed, false);
  assert.deepEqual(c.coordinator.listen, { host: "*", port: 8443 });
  assert.equal(c.coordinator.connect_back, "same-ip");
  assert.deepEqual(c.reporter.listen, { host: "*", port: 3478 });
  assert.equal(c.log_level, "info");
});

test("the example file is valid for every role", () => {
  const example = join(import.meta.dirname, "..", "proxy.toml.example");
  const text = readFileSync(example, "utf8").replace("tokens = []", `tokens = ["${TOKEN}"]`);
  const p = file(text);
  for (const role of ["local", "coordinator", "reporter"] as const) loadConfig({ path: p, role, env: {} });
});

test("precedence: defaults < file < NAT_KEEP_ALIVE_INTERVAL < flags", () => {
  const p = file(`${LOCAL_OK}nat_keep_alive_interval = 5000\nconnect_timeout = 2000\n[reporter]\nnat_keep_alive_interval = 7000\n`);
  const fromFile = loadConfig({ path: p, role: "local", env: {} });
  assert.equal(fromFile.local.nat_keep_alive_interval, 5000);
  assert.equal(fromFile.local.connect_timeout, 2000);
  const fromEnv = loadConfig({ path: p, role: "local", env: { NAT_KEEP_ALIVE_INTERVAL: "1000" } });
  assert.equal(fromEnv.local.nat_keep_alive_interval, 1000);
  assert.equal(fromEnv.reporter.nat_keep_alive_interval, 1000);
  const fromFlags = loadConfig({ path: p, role: "local", env: { NAT_KEEP_ALIVE_INTERVAL: "1000" }, overrides: { local: { nat_keep_alive_interval: 250, connect_timeout: undefined } } });
  assert.equal(fromFlags.local.nat_keep_alive_interval, 250);
  assert.equal(fromFlags.local.connect_timeout, 2000, "an unset flag leaves the file's value");
});

test("every problem in a file is reported at once, with key, expectation and value", () => {
  const p = file(`
log_level = "loud"
bogus = 1
[local]
coordinator = "http://plain.example"
listen = "localhost"
connect_timeout = "10s"
nat_keep_alive_interval = -5
tunnel_port = 70000
allow_self_signed = "yes"
fingerprint = "md5:abc"
extra_key = true
[coordinator]
connect_back = "everywhere"
`);
  const list = problems(() => loadConfig({ path: p, role: "local", env: {} }));
  const text = list.join("\n");
  for (const want of [
    /log_level: expected one of .*"info".*got "loud"/,
    /unknown key "bogus" in the top level/,
    /local.listen: expected "host:port"/,
    /local.connect_timeout: expected number.*whole milliseconds.*got "10s"/,
    /local.nat_keep_alive_interval: expected at least 1.*got -5/,
    /local.tunnel_port: expected at most 65535, got 70000/,
    /local.allow_self_signed: expected boolean, got "yes"/,
    /unknown key "extra_key" in \[local\]/,
    /coordinator.connect_back: expected one of "same-ip", "any", got "everywhere"/,
  ]) {
    assert.match(text, want);
  }
  assert.ok(list.length >= 9, text);
});

test("role rules: what each role needs, and what it refuses", () => {
  assert.deepEqual(problems(() => loadConfig({ role: "local", env: {} })).length, 2);
  const local = problems(() => resolveConfig({ local: { coordinator: "http://x.example", token: TOKEN, fingerprint: "sha256:zz", ca: "/nonexistent/ca.pem", listen: "0.0.0.0:8080" } }, "local")).join("\n");
  assert.match(local, /must be an https:\/\/ URL/);
  assert.match(local, /fingerprint: expected "sha256:"/);
  assert.match(local, /local.ca: cannot read "\/nonexistent\/ca.pem" \(ENOENT\)/);
  assert.match(local, /reachable from other machines; set local.users/);
  const coord = problems(() => resolveConfig({ coordinator: { tokens: ["short"], key: "/k.pem" } }, "coordinator")).join("\n");
  assert.match(coord, /tokens\[0\]: a token needs at least 16 characters/);
  assert.match(coord, /coordinator.key: set coordinator.cert as well/);
  assert.match(problems(() => resolveConfig({}, "coordinator")).join(), /at least one token is required/);
  // The reporter needs nothing.
  assert.equal(resolveConfig({}, "reporter").reporter.listen.port, 3478);
});

test("a LAN listener is accepted with proxy users, and addresses parse in every spelling", () => {
  const c = resolveConfig({ local: { coordinator: "https://[2001:db8::1]:9443", token: TOKEN, listen: "0.0.0.0:3128", users: ["alice:pw"], reporter: "[2001:db8::2]:3479" } }, "local");
  assert.deepEqual(c.local.listen, { host: "0.0.0.0", port: 3128 });
  assert.deepEqual(c.local.reporterAddress, { host: "2001:db8::2", port: 3479 });
  assert.equal(c.local.coordinatorUrl.port, "9443");
  const d = resolveConfig({ local: { coordinator: "https://[2001:db8::1]", token: TOKEN, reporter: "stun.example" } }, "local");
  assert.deepEqual(d.local.reporterAddress, { host: "stun.example", port: 3478 });
  const e = resolveConfig({ local: { coordinator: "https://[2001:db8::1]", token: TOKEN } }, "local");
  assert.deepEqual(e.local.reporterAddress, { host: "2001:db8::1", port: 3478 });
  assert.match(problems(() => resolveConfig({ local: { coordinator: "https://c.example", token: TOKEN, users: ["nocolon"] } }, "local")).join(), /users\[0\]: expected "name:password"/);
});

test("file errors: missing file, broken TOML, bad NAT_KEEP_ALIVE_INTERVAL", () => {
  assert.match(problems(() => loadConfig({ path: join(dir, "missing.toml"), role: "reporter" })).join(), /cannot read the file: ENOENT/);
  assert.match(problems(() => loadConfig({ path: file("[local\n"), role: "reporter" })).join(), /not valid TOML/);
  assert.match(problems(() => loadConfig({ path: file(LOCAL_OK), role: "local", env: { NAT_KEEP_ALIVE_INTERVAL: "1s" } })).join(), /NAT_KEEP_ALIVE_INTERVAL: expected whole milliseconds/);
});

test("target rules: parsed once by the validation, the lists as written kept; both lists' problems reported together", () => {
  const c = resolveConfig({ coordinator: { tokens: [TOKEN], allow_targets: ["10.0.0.0/8:8000-8100", "intranet.example"], deny_targets: ["[2001:db8::/32]:443"] } }, "coordinator").coordinator;
  assert.deepEqual(c.allow_targets, ["10.0.0.0/8:8000-8100", "intranet.example"]);
  assert.deepEqual(c.targetRules.allow.map((r) => [r.entry, r.target.kind, r.ports]), [
    ["10.0.0.0/8:8000-8100", "net", { min: 8000, max: 8100 }],
    ["intranet.example", "host", undefined],
  ]);
  assert.deepEqual(c.targetRules.deny.map((r) => r.entry), ["[2001:db8::/32]:443"]);
  assert.deepEqual(c.targetRules.problems, []);
  const policy = createTargetPolicy(c.targetRules);
  assert.deepEqual(policy.checkName("10.1.2.3", 8000), { allowed: true });
  assert.equal(policy.checkName("2001:db8::1", 443).allowed, false);

  const bad = { coordinator: { tokens: [TOKEN], allow_targets: ["ok.example", "bad host"], deny_targets: ["10.0.0.1/8"] } };
  const list = problems(() => resolveConfig(bad, "coordinator"));
  assert.equal(list.length, 2, list.join("\n"));
  assert.match(list[0], /^coordinator\.allow_targets\[1\]: "bad host"/);
  assert.match(list[1], /^coordinator\.deny_targets\[0\]: "10\.0\.0\.1\/8" has bits set after the prefix; did you mean 10\.0\.0\.0\/8\?/);
  // Other roles do not judge the coordinator's rules, and a policy refuses to start from rules with problems.
  const other = resolveConfig(bad, "reporter").coordinator.targetRules;
  assert.equal(other.problems.length, 2);
  assert.throws(() => createTargetPolicy(other), /invalid target rules:\n  - coordinator\.allow_targets\[1\]/);
});
