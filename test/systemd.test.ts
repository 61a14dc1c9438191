import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";
import { findProgram } from "./helpers/programs.ts";

// The systemd units in contrib/systemd, checked by systemd itself:
// `systemd-analyze verify` parses them as the manager would (an unknown key,
// a bad value or a missing executable is a warning or an error) and
// `systemd-analyze security --offline` rates their sandbox. Neither needs a
// running systemd, which CI does not have; verify does need the ExecStart
// binary to exist, so each unit is checked as a copy that points at one.

const run = promisify(execFile);
const UNITS = resolve(import.meta.dirname, "..", "contrib", "systemd");
const ANALYZE = findProgram("systemd-analyze", "NATPROXY_SYSTEMD_ANALYZE");
const MISSING = "systemd-analyze (Debian package systemd) is not installed: apt-get install -y systemd";
const SKIP = ANALYZE === undefined && !process.env.CI ? `${MISSING}; skipped outside CI` : false;
const INSTALLED = "/usr/local/bin/natproxy";

const unit = (name: string) => readFileSync(join(UNITS, name), "utf8");
/** The values a key is given in the [Service] section, in order. */
const values = (text: string, key: string) => [...text.matchAll(new RegExp(`^${key}=(.*)$`, "gm"))].map((m) => m[1]);

describe("systemd units", { skip: SKIP }, () => {
  let dir: string;
  let stub: string;
  let home: string;
  let runtime: string;

  before(() => {
    if (ANALYZE === undefined) assert.fail(`${MISSING}. CI must have it to check contrib/systemd.`);
    dir = mkdtempSync(join(tmpdir(), "natproxy-units-"));
    // What ExecStart names must exist and be executable for verify.
    stub = join(dir, "natproxy");
    writeFileSync(stub, "#!/bin/sh\nexit 0\n");
    chmodSync(stub, 0o755);
    home = join(dir, "home");
    mkdirSync(join(home, ".local", "bin"), { recursive: true });
    writeFileSync(join(home, ".local", "bin", "natproxy"), "#!/bin/sh\nexit 0\n");
    chmodSync(join(home, ".local", "bin", "natproxy"), 0o755);
    runtime = join(dir, "run");
    mkdirSync(runtime, { mode: 0o700 });
  });
  after(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  /** verify's exit code and everything it said (warnings go to stderr with exit code 0). */
  async function verify(name: string, text: string, user = false): Promise<{ code: number; said: string }> {
    const path = join(dir, name);
    writeFileSync(path, text);
    const args = [...(user ? ["--user"] : []), "verify", "--man=no", path];
    // A user manager's paths come from HOME and XDG_RUNTIME_DIR (%h is HOME).
    const env = { ...process.env, HOME: home, XDG_RUNTIME_DIR: runtime, SYSTEMD_LOG_COLOR: "0" };
    return run(ANALYZE!, args, { env }).then(
      (r) => ({ code: 0, said: `${r.stdout}${r.stderr}`.trim() }),
      (e: { code: number; stdout: string; stderr: string }) => ({ code: e.code, said: `${e.stdout}${e.stderr}`.trim() }),
    );
  }

  const systemCopy = (name: string) => {
    const text = unit(name);
    assert.deepEqual(values(text, "ExecStart").map((v) => v.split(" ")[0]), [INSTALLED], `${name} runs ${INSTALLED}`);
    return text.replace(INSTALLED, stub);
  };

  test("a unit with a typo fails the check (the check sees warnings)", async () => {
    const r = await verify("natproxy-typo.service", `${systemCopy("natproxy-coordinator.service")}\n[Service]\nRestrat=always\n`);
    assert.match(r.said, /Unknown key 'Restrat' in section \[Service\]/);
  });

  for (const name of ["natproxy-coordinator.service", "natproxy-reporter.service"]) {
    test(`${name}: systemd-analyze verify says nothing; exposure 2.0 or less`, async () => {
      const r = await verify(name, systemCopy(name));
      assert.deepEqual(r, { code: 0, said: "" });
      const s = await run(ANALYZE!, ["security", "--offline=yes", "--no-pager", join(dir, name)], { env: { ...process.env, SYSTEMD_COLORS: "0" } });
      const m = /Overall exposure level for \S+: (\d+\.\d+)/.exec(s.stdout);
      assert.ok(m, s.stdout.slice(-300));
      assert.ok(Number(m[1]) <= 2.0, `exposure ${m[1]}`);
    });
  }

  test("natproxy-local.service: a user unit that systemd-analyze --user verify accepts as it is", async () => {
    assert.deepEqual(await verify("natproxy-local.service", unit("natproxy-local.service"), true), { code: 0, said: "" });
  });

  test("what each unit must say: restart on failure, reload by SIGHUP, no capabilities, descriptors for max_sessions", () => {
    for (const name of ["natproxy-coordinator.service", "natproxy-reporter.service", "natproxy-local.service"]) {
      const text = unit(name);
      assert.deepEqual(values(text, "Restart"), ["on-failure"], name);
      assert.deepEqual(values(text, "ExecReload"), ["/bin/kill -HUP $MAINPID"], name);
      assert.deepEqual(values(text, "NoNewPrivileges"), ["yes"], name);
      assert.deepEqual(values(text, "SystemCallArchitectures"), ["native"], name);
    }
    const coordinator = unit("natproxy-coordinator.service");
    assert.deepEqual(values(coordinator, "CapabilityBoundingSet"), [""]);
    assert.deepEqual(values(coordinator, "AmbientCapabilities"), [], "CAP_NET_BIND_SERVICE only when uncommented for a port below 1024");
    assert.match(coordinator, /^#AmbientCapabilities=CAP_NET_BIND_SERVICE$/m);
    assert.deepEqual(values(coordinator, "StateDirectory"), ["natproxy"]);
    // 2 per tunnel, 1 per ready connection (as many as max_sessions) and the API: 4 x max_sessions (4096 by default).
    assert.ok(Number(values(coordinator, "LimitNOFILE")[0]) >= 4 * 4096);
    // The target policy reads the interfaces' addresses over netlink.
    assert.match(values(coordinator, "RestrictAddressFamilies")[0], /\bAF_NETLINK\b/);
    for (const key of ["ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables", "ProtectKernelModules"])
      assert.equal(values(coordinator, key).length, 1, key);
    assert.deepEqual(values(unit("natproxy-reporter.service"), "DynamicUser"), ["yes"]);
    assert.deepEqual(values(unit("natproxy-reporter.service"), "CapabilityBoundingSet"), [""]);
  });
});
