import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, test } from "node:test";
import { parse as parseToml } from "smol-toml";
import { loadConfig, resolveConfig } from "../src/config.ts";
import { startCoordinator } from "../src/coordinator/index.ts";
import { InitError, runInit, tomlPath } from "../src/init.ts";
import { startLocal } from "../src/local/index.ts";
import { setLogLevel } from "../src/log.ts";

setLogLevel("silent");
const dir = mkdtempSync(path.join(tmpdir(), "natproxy-init-"));
after(() => rmSync(dir, { recursive: true, force: true }));

test("init local and init reporter write configs that load and validate; an existing file is kept unless --force", async () => {
  const local = path.join(dir, "local", "proxy.toml");
  await runInit({ role: "local", file: local, force: false });
  assert.equal(statSync(local).mode & 0o777, 0o600);
  assert.equal(loadConfig({ path: local, role: "local", env: {} }).local.listen.port, 8080);
  writeFileSync(local, "# mine\n");
  await assert.rejects(runInit({ role: "local", file: local, force: false }), InitError);
  assert.equal(readFileSync(local, "utf8"), "# mine\n");
  await runInit({ role: "local", file: local, force: true });
  assert.notEqual(readFileSync(local, "utf8"), "# mine\n");
  const reporter = path.join(dir, "reporter.toml");
  await runInit({ role: "reporter", file: reporter, force: false });
  assert.equal(loadConfig({ path: reporter, role: "reporter", env: {} }).reporter.listen.port, 3478);
});

test("a Windows path is written as a TOML literal string and read back unchanged", () => {
  const p = "C:\\Users\\me\\natproxy\\cert.pem";
  assert.equal((parseToml(`cert = ${tomlPath(p)}`) as { cert: string }).cert, p);
  assert.equal((parseToml(`cert = ${tomlPath("C:\\it's\\x.pem")}`) as { cert: string }).cert, "C:\\it's\\x.pem");
});

test("init coordinator: token, stable certificate, and a printed [local] section that connects", async (t) => {
  const file = path.join(dir, "coord", "proxy.toml");
  const r = await runInit({ role: "coordinator", file, force: false, publicHost: "127.0.0.1" });
  assert.equal(statSync(file).mode & 0o777, 0o600);
  assert.equal(statSync(path.join(dir, "coord", "key.pem")).mode & 0o777, 0o600);
  const loaded = loadConfig({ path: file, role: "coordinator", env: {} });
  assert.match(loaded.coordinator.tokens[0], /^[0-9a-f]{64}$/);
  const fp = r.lines.find((l) => l.startsWith("certificate fingerprint: "))!.split(": ")[1];

  const target = http.createServer((_req, res) => res.end("hello from the target"));
  await new Promise<void>((resolve) => target.listen(0, "127.0.0.1", resolve));
  t.after(() => target.close());
  const coordinator = await startCoordinator(
    resolveConfig({ ...(parseToml(readFileSync(file, "utf8")) as object), coordinator: { ...(parseToml(readFileSync(file, "utf8")) as { coordinator: object }).coordinator, listen: "127.0.0.1:0", reporter: false, allow_targets: ["127.0.0.1"] } }, "coordinator").coordinator,
  );
  t.after(() => coordinator.close());
  assert.equal(coordinator.fingerprint, fp);

  const section = r.lines.slice(r.lines.indexOf("[local]")).join("\n").replace(":8443", `:${coordinator.addresses[0].port}`);
  const printed = (parseToml(section) as { local: Record<string, unknown> }).local;
  const local = await startLocal(resolveConfig({ local: { ...printed, listen: "127.0.0.1:0", tunnel: "outbound", reporter_retries: 0 } }, "local").local);
  t.after(() => local.close());
  const body = await new Promise<string>((resolve, reject) => {
    const port = (target.address() as AddressInfo).port;
    http
      .get({ host: "127.0.0.1", port: local.proxyAddress.port, path: `http://127.0.0.1:${port}/`, headers: { host: `127.0.0.1:${port}` } }, (res) => {
        let text = "";
        res.on("data", (c: Buffer) => (text += c));
        res.on("end", () => resolve(`${res.statusCode} ${text}`));
      })
      .on("error", reject);
  });
  assert.equal(body, "200 hello from the target");
});
