import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, test } from "node:test";
import { configCandidates, findConfig, missingConfigMessage, userConfigPath, type SearchContext } from "../src/config-find.ts";
import { ConfigError, loadConfig } from "../src/config.ts";
import { wantColors } from "../src/log.ts";

const win: SearchContext = {
  platform: "win32",
  env: { APPDATA: "C:\\Users\\me\\AppData\\Roaming" },
  execPath: "C:\\Tools\\natproxy\\natproxy.exe",
  cwd: "D:\\work",
  home: "C:\\Users\\me",
  packaged: true,
};
const linux: SearchContext = { platform: "linux", env: {}, execPath: "/usr/local/bin/natproxy", cwd: "/srv", home: "/home/me", packaged: true };

test("Windows: working directory, beside natproxy.exe, then %APPDATA%\\natproxy", () => {
  assert.deepEqual(configCandidates(win), ["D:\\work\\proxy.toml", "C:\\Tools\\natproxy\\proxy.toml", "C:\\Users\\me\\AppData\\Roaming\\natproxy\\proxy.toml"]);
  assert.equal(userConfigPath({ ...win, env: {} }), "C:\\Users\\me\\AppData\\Roaming\\natproxy\\proxy.toml");
});

test("POSIX: ~/.config/natproxy, or an absolute XDG_CONFIG_HOME; a relative one is ignored", () => {
  assert.deepEqual(configCandidates(linux), ["/srv/proxy.toml", "/usr/local/bin/proxy.toml", "/home/me/.config/natproxy/proxy.toml"]);
  assert.equal(userConfigPath({ ...linux, env: { XDG_CONFIG_HOME: "/xdg" } }), "/xdg/natproxy/proxy.toml");
  assert.equal(userConfigPath({ ...linux, env: { XDG_CONFIG_HOME: "rel" } }), "/home/me/.config/natproxy/proxy.toml");
});

test("run from source, execPath is node itself: its folder is not searched", () => {
  assert.deepEqual(configCandidates({ ...linux, packaged: false, execPath: "/usr/bin/node" }), ["/srv/proxy.toml", "/home/me/.config/natproxy/proxy.toml"]);
});

test("the first existing candidate wins; none found names every path and natproxy init", () => {
  const present = new Set(["C:\\Tools\\natproxy\\proxy.toml", "C:\\Users\\me\\AppData\\Roaming\\natproxy\\proxy.toml"]);
  assert.equal(findConfig(win, (f) => present.has(f)).path, "C:\\Tools\\natproxy\\proxy.toml");
  const none = findConfig(win, () => false);
  assert.equal(none.path, undefined);
  const msg = missingConfigMessage("local", none.searched);
  assert.match(msg, /natproxy init local/);
  for (const f of none.searched) assert.ok(msg.includes(f), f);
});

const dir = mkdtempSync(path.join(tmpdir(), "natproxy-find-"));
after(() => rmSync(dir, { recursive: true, force: true }));

test("a Windows path in a TOML literal string reaches the problem message unmangled", () => {
  const file = path.join(dir, "win.toml");
  writeFileSync(file, `[local]\ncoordinator = "https://c.example:8443"\ntoken = "0123456789abcdef"\nca = 'C:\\Users\\me\\natproxy\\ca.pem'\n`);
  assert.throws(
    () => loadConfig({ path: file, role: "local", env: {} }),
    (e: ConfigError) => e.problems.some((p) => p.startsWith("local.ca:") && p.includes('"C:\\Users\\me\\natproxy\\ca.pem"')),
  );
});

test("a TOML syntax error names its line and column", () => {
  const file = path.join(dir, "bad.toml");
  writeFileSync(file, `log_level = "info"\n[local]\nlisten = = "x"\n`);
  assert.throws(() => loadConfig({ path: file, role: "local", env: {} }), (e: ConfigError) => /line 3, column \d+: not valid TOML/.test(e.problems[0]));
});

test("colours: NO_COLOR wins, FORCE_COLOR next, else only a console that has colours", () => {
  const tty = { isTTY: true, hasColors: () => true };
  assert.equal(wantColors({}, tty), true);
  assert.equal(wantColors({ NO_COLOR: "1", FORCE_COLOR: "1" }, tty), false);
  assert.equal(wantColors({ FORCE_COLOR: "0" }, tty), false);
  assert.equal(wantColors({ FORCE_COLOR: "1" }, { isTTY: false }), true);
  assert.equal(wantColors({}, { isTTY: true, hasColors: () => false }), false);
  assert.equal(wantColors({}, { isTTY: false }), false);
});
