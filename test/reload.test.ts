import assert from "node:assert/strict";
import { once } from "node:events";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import https from "node:https";
import net, { type AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { after, before, describe, test } from "node:test";
import { startProc, type Proc } from "../scripts/lib/proc.ts";
import { resolveConfig } from "../src/config.ts";
import type { Coordinator } from "../src/coordinator/index.ts";
import type { Local } from "../src/local/index.ts";
import { API } from "../src/protocol/api.ts";
import { connectThrough, proxiedRequest } from "../scripts/lib/proxy-client.ts";
import { testPki, type TestPki } from "../scripts/lib/pki.ts";
import { LOOPBACK_CONNECT_BACK, LOOPBACK_TARGETS, startLocalFor, startTestCoordinator, TOKEN } from "../scripts/lib/stack.ts";
import { startHttpTarget, type Target } from "../scripts/lib/targets.ts";
import { waitUntil } from "./helpers/wait.ts";

// A configuration reload: new sessions get the new tokens, limits, rules and
// timers; live tunnels keep flowing; a file that fails validation changes
// nothing. In process through reload(), then through the packaged binary and
// SIGHUP, which is how systemctl reload reaches it.

/** A TCP echo server: what a live tunnel talks to. */
async function startEcho(): Promise<Target> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((s) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
    s.on("error", () => {});
    s.pipe(s);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return {
    port: (server.address() as AddressInfo).port,
    close: () =>
      new Promise((r) => {
        for (const s of sockets) s.destroy();
        server.close(() => r());
      }),
  };
}

/** Opens a CONNECT tunnel to the echo server; its `echo()` checks the tunnel still carries bytes both ways. */
async function liveTunnel(proxyPort: number, echoPort: number): Promise<{ socket: net.Socket; echo(text: string): Promise<string> }> {
  const t = await connectThrough(proxyPort, `127.0.0.1:${echoPort}`);
  assert.equal(t.status, 200, t.body);
  return {
    socket: t.socket,
    async echo(text) {
      t.socket.write(text);
      let got = "";
      while (got.length < text.length) got += String((await once(t.socket, "data"))[0]);
      return got;
    },
  };
}

const TOKEN_A = "reload-token-a-0123456789abcdef";
const TOKEN_B = "reload-token-b-0123456789abcdef";
const TOKEN_C = "reload-token-c-0123456789abcdef";

describe("reload() on a running coordinator", () => {
  let pki: TestPki;
  let echo: Target;
  let coordinator: Coordinator;
  let local: Local;

  before(async () => {
    pki = await testPki();
    echo = await startEcho();
    coordinator = await startTestCoordinator(pki);
    // No ready connections: each CONNECT waits for its own Result, so a refusal is a status.
    local = await startLocalFor(coordinator.addresses[0].port, 1, pki, { tunnel: "outbound", pool_size: 0 });
  });
  after(async () => {
    await local?.close();
    await coordinator?.close();
    await echo?.close();
  });

  const next = (coordinator: object) =>
    resolveConfig({ coordinator: { listen: "127.0.0.1:0", cert: pki.combinedFile, tokens: [TOKEN], allow_targets: LOOPBACK_TARGETS, allow_connect_back: LOOPBACK_CONNECT_BACK, ...coordinator } }, "coordinator").coordinator;

  test("a lower max_sessions leaves live tunnels alone and refuses new ones; restart-only keys are named", async () => {
    const live = [await liveTunnel(local.proxyAddress.port, echo.port), await liveTunnel(local.proxyAddress.port, echo.port)];
    assert.equal(coordinator.activeSessions(), 2);
    const restart = coordinator.reload(next({ max_sessions: 2, listen: "127.0.0.1:1", proxy_protocol: true, handshake_timeout: 5000 }));
    assert.deepEqual(restart.slice(0, 2), ["listen", "proxy_protocol"]);
    assert.match(restart[2], /^handshake_timeout \(/);
    const third = await connectThrough(local.proxyAddress.port, `127.0.0.1:${echo.port}`);
    assert.equal(third.status, 429);
    assert.equal(third.headers["x-natproxy-error"], "TOO_MANY");
    assert.match(third.body, /limit of 2 tunnels/);
    for (const [i, t] of live.entries()) assert.equal(await t.echo(`still here ${i}`), `still here ${i}`);

    // Back up: the two live ones still hold their slots, a third one fits.
    assert.deepEqual(coordinator.reload(next({ max_sessions: 3 })), []);
    const fits = await liveTunnel(local.proxyAddress.port, echo.port);
    assert.equal(await fits.echo("third"), "third");
    assert.equal(coordinator.activeSessions(), 3);
    for (const t of [...live, fits]) t.socket.destroy();
  });

  test("a reload whose rules cannot be built changes nothing", async () => {
    const bad = next({ max_sessions: 1 });
    // As if validation had let a broken rule through: the policy refuses it first.
    bad.targetRules = { ...bad.targetRules, problems: ["broken"] };
    await waitUntil(() => coordinator.activeSessions() === 0, 5000, "the last test's tunnels released");
    assert.throws(() => coordinator.reload(bad), /invalid target rules/);
    const a = await liveTunnel(local.proxyAddress.port, echo.port);
    const b = await liveTunnel(local.proxyAddress.port, echo.port);
    assert.equal(await b.echo("max_sessions is still 3"), "max_sessions is still 3");
    a.socket.destroy();
    b.socket.destroy();
  });
});

// --- The packaged binary and SIGHUP -----------------------------------------------

const BINARY = resolve(import.meta.dirname, "..", "dist", "natproxy");
const missing = !existsSync(BINARY);
if (missing && process.env.CI) throw new Error(`${BINARY} is missing: npm test builds it first (node scripts/build.ts)`);

function hello(port: number, token: string, ca: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = https.get({ host: "127.0.0.1", port, path: API.hello, servername: "localhost", ca, agent: false, headers: { Authorization: `Bearer ${token}` } }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on("error", reject);
  });
}

describe("SIGHUP to a natproxy coordinator process", { skip: missing ? `${BINARY} not built; run npm run build` : false }, () => {
  let pki: TestPki;
  let dir: string;
  let echo: Target;
  let web: Target;
  let denied: Target;
  let coord: Proc;
  let port: number;
  const locals: Local[] = [];

  const config = (tokens: string[], extra = "") =>
    `[coordinator]\nlisten = "127.0.0.1:0"\ncert = "${pki.combinedFile}"\ntokens = ${JSON.stringify(tokens)}\n` +
    `allow_targets = ["127.0.0.1"]\nallow_connect_back = ["127.0.0.1"]\n${extra}`;
  const write = (text: string) => writeFileSync(join(dir, "proxy.toml"), text, { mode: 0o600 });
  const localWith = async (token: string) => {
    // CONNECTs wait for the coordinator's Result, so a refusal is a status, not a reset.
    const l = await startLocalFor(port, 1, pki, { tunnel: "outbound", token, optimistic_connect: false });
    locals.push(l);
    return l;
  };

  before(async () => {
    pki = await testPki();
    dir = mkdtempSync(join(tmpdir(), "natproxy-reload-"));
    echo = await startEcho();
    web = await startHttpTarget();
    denied = await startHttpTarget();
    write(config([TOKEN_A, TOKEN_B]));
    coord = startProc(BINARY, ["coordinator", "-c", join(dir, "proxy.toml")], { PATH: "/nonexistent", HOME: tmpdir() });
    port = Number((await coord.waitFor(/HTTPS API listening on 127\.0\.0\.1:(\d+)/, 15_000))[1]);
  });
  after(async () => {
    for (const l of locals) await l.close();
    await coord?.stop();
    await echo?.close();
    await web?.close();
    await denied?.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  test("tokens and deny rules change for new sessions, a live tunnel keeps flowing, a broken file changes nothing", async () => {
    const a = await localWith(TOKEN_A);
    const b = await localWith(TOKEN_B);
    const tunnel = await liveTunnel(a.proxyAddress.port, echo.port);
    assert.equal(await tunnel.echo("before"), "before");
    // What the reload will change, as it is before.
    assert.equal(await hello(port, TOKEN_C, pki.ca.cert), 401);
    const allowed = await connectThrough(b.proxyAddress.port, `127.0.0.1:${denied.port}`);
    assert.equal(allowed.status, 200);
    allowed.socket.destroy();
    // The pool refilled after the tunnel's CONNECT: ready connections made with token A.
    await waitUntil(() => a.outboundPool.size === 4, 5000, "local A's ready connections");

    write(config([TOKEN_B, TOKEN_C], `deny_targets = ["127.0.0.1:${denied.port}"]\nlisten = "127.0.0.1:1"\n`).replace('listen = "127.0.0.1:0"\n', ""));
    coord.child.kill("SIGHUP");
    await coord.waitFor(/SIGHUP: configuration reloaded from \S+proxy\.toml/, 10_000);
    assert.match(coord.output(), /configuration reloaded: 2 token\(s\) \(1 added, 1 removed\)/);
    assert.match(coord.output(), /SIGHUP: changed, but takes a restart to apply: \[coordinator\] listen\n/);

    assert.equal(await tunnel.echo("after the reload"), "after the reload", "the live tunnel of the removed token still flows");
    assert.equal(await hello(port, TOKEN_A, pki.ca.cert), 401);
    assert.equal(await hello(port, TOKEN_C, pki.ca.cert), 200);
    // The removed token's local proxy: refused for a new session, also on
    // the ready connections it opened (and authenticated) before the reload.
    const refused = await proxiedRequest(a.proxyAddress.port, `http://127.0.0.1:${web.port}/`);
    assert.equal(refused.status, 401, refused.body.toString());
    assert.equal(refused.headers["x-natproxy-error"], "UNAUTHORIZED");
    assert.match(refused.body.toString(), /the token this connection was opened with is no longer accepted/);
    const c = await localWith(TOKEN_C);
    assert.equal((await proxiedRequest(c.proxyAddress.port, `http://127.0.0.1:${web.port}/new-token`)).status, 200);
    // A new tunnel each time (a CONNECT): plain-HTTP tunnels kept alive for
    // reuse are live tunnels, which a reload leaves alone.
    const deniedNow = await connectThrough(b.proxyAddress.port, `127.0.0.1:${denied.port}`);
    assert.equal(deniedNow.status, 403);
    assert.equal(deniedNow.headers["x-natproxy-error"], "FORBIDDEN");
    assert.match(deniedNow.body, /deny_targets entry "127\.0\.0\.1:\d+"/);

    write(config([TOKEN_A], 'max_sessions = "many"\nbogus = 1\n'));
    coord.child.kill("SIGHUP");
    await coord.waitFor(/SIGHUP: configuration not reloaded; the running one stays in force\./, 10_000);
    assert.match(coord.output(), /proxy\.toml: invalid configuration/);
    assert.match(coord.output(), /coordinator\.max_sessions: expected number, got "many"/);
    assert.match(coord.output(), /unknown key "bogus" in \[coordinator\]/);
    assert.equal(await hello(port, TOKEN_A, pki.ca.cert), 401, "still the reloaded tokens");
    assert.equal(await hello(port, TOKEN_C, pki.ca.cert), 200);
    assert.equal((await connectThrough(b.proxyAddress.port, `127.0.0.1:${denied.port}`)).headers["x-natproxy-error"], "FORBIDDEN");
    assert.equal(await tunnel.echo("after the refused one"), "after the refused one");
    tunnel.socket.destroy();
    assert.equal(await coord.stop(), 0, "SIGTERM still ends it cleanly");
  });
});
