import assert from "node:assert/strict";
import { randomUUID, X509Certificate } from "node:crypto";
import { existsSync, mkdtempSync, readdirSync, statSync, writeFileSync } from "node:fs";
import https from "node:https";
import net, { type AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import tls from "node:tls";
import { after, before, describe, test } from "node:test";
import { resolveConfig, type ConfigInput } from "../src/config.ts";
import { startCoordinator, type Coordinator } from "../src/coordinator/index.ts";
import type { Local } from "../src/local/index.ts";
import { startReporter } from "../src/reporter/index.ts";
import { connectThrough, httpsThrough, proxiedRequest } from "../scripts/lib/proxy-client.ts";
import { captureLogs } from "./helpers/logs.ts";
import { PEBBLE, startPebble, type Pebble } from "./helpers/pebble.ts";
import { startProc } from "../scripts/lib/proc.ts";
import { testPki, type TestPki } from "../scripts/lib/pki.ts";
import { LOOPBACK_CONNECT_BACK, LOOPBACK_TARGETS, TOKEN, startLocalFor } from "../scripts/lib/stack.ts";
import { startHttpsTarget, startHttpTarget, type Target } from "../scripts/lib/targets.ts";
import { freePort } from "../scripts/lib/ports.ts";
import { waitUntil } from "./helpers/wait.ts";

// The coordinator against a real ACME CA: Debian's pebble on loopback, which
// validates every challenge against the coordinator itself (TLS-ALPN-01 on its
// HTTPS port, HTTP-01 on its challenge listener) and resolves the names
// through a DNS responder this test runs. Local proxies then trust only
// pebble's root: no fingerprint, no allow_self_signed.

if (!PEBBLE && process.env.CI) throw new Error("pebble is missing: .ci/run installs it (APT_PACKAGES)");
const skip = PEBBLE ? false : "pebble not installed (apt-get install pebble)";

const BINARY = resolve(import.meta.dirname, "..", "dist", "natproxy");

// "localhost" is what the local proxies dial (the system resolves it without
// help); the other name exists only in this test's DNS responder.
const DOMAINS = ["natproxy-coord.test", "localhost"];
// pebble's certificates live this long (s): the default renewal rule (a
// third of the lifetime left) then renews after about 11 s.
const VALIDITY = 18;

function acmeConfig(pebble: Pebble, pki: TestPki, cache: string, acme: Record<string, unknown> = {}) {
  return {
    domains: DOMAINS,
    email: "ops@natproxy-coord.test",
    directory: pebble.directory,
    ca: pki.caFile,
    cache,
    retry_delay: 300,
    retry_max_delay: 1000,
    poll_interval: 100,
    request_timeout: 5000,
    order_timeout: 20_000,
    ...acme,
  };
}

function coordinatorWith(coordinator: NonNullable<ConfigInput["coordinator"]>): Promise<Coordinator> {
  const cfg = resolveConfig({ coordinator: { tokens: [TOKEN], allow_targets: LOOPBACK_TARGETS, allow_connect_back: LOOPBACK_CONNECT_BACK, ...coordinator } }, "coordinator");
  return startCoordinator(cfg.coordinator);
}

/** The certificate a TLS client gets from `port`, whether `ca` verifies it for `servername`, and the ALPN agreed. */
function handshake(port: number, servername: string, opts: { ca?: string; ALPNProtocols?: string[] } = {}): Promise<{ cert: X509Certificate; authorized: boolean; error?: string; alpn: string | false }> {
  return new Promise((resolve, reject) => {
    const s = tls.connect({ host: "127.0.0.1", port, servername, rejectUnauthorized: false, ...opts }, () => {
      const cert = s.getPeerX509Certificate()!;
      resolve({ cert, authorized: s.authorized, error: s.authorizationError ? String(s.authorizationError) : undefined, alpn: s.alpnProtocol ?? false });
      s.destroy();
    });
    s.on("error", reject);
    s.setTimeout(5000, () => s.destroy(new Error("handshake timed out")));
  });
}

/** Asks the coordinator to connect back (POST /v1/probe) and returns the certificate it presents on that connection. */
async function connectBackCertificate(coordPort: number, root: string): Promise<string> {
  const listener = net.createServer();
  await new Promise<void>((r) => listener.listen(0, "127.0.0.1", r));
  const seen = new Promise<string>((resolve, reject) => {
    listener.once("connection", (raw) => {
      const s = tls.connect({ socket: raw, servername: "localhost", ca: root }, () => resolve(`sha256:${s.getPeerX509Certificate()!.fingerprint256}`));
      // As a local proxy does: read the probe's id, then close.
      s.on("data", () => s.end());
      s.on("error", reject);
    });
  });
  const body = JSON.stringify({ probe: randomUUID(), reply: { host: "127.0.0.1", port: (listener.address() as AddressInfo).port } });
  await new Promise<void>((resolve, reject) => {
    const req = https.request({ host: "127.0.0.1", port: coordPort, servername: "localhost", ca: root, method: "POST", path: "/v1/probe", agent: false, headers: { Authorization: `Bearer ${TOKEN}`, "Content-Type": "application/json" } }, (res) => {
      res.resume();
      res.on("end", () => (res.statusCode === 200 ? resolve() : reject(new Error(`probe: ${res.statusCode}`))));
    });
    req.on("error", reject);
    req.end(body);
  });
  try {
    return await seen;
  } finally {
    listener.close();
  }
}

/** A TCP echo server: a tunnel to it stays up as long as natproxy keeps it (no keep-alive timeout of a web server). */
async function startEchoTarget(): Promise<Target> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((s) => {
    sockets.add(s);
    s.on("error", () => {});
    s.on("close", () => sockets.delete(s));
    s.pipe(s);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return {
    port: (server.address() as AddressInfo).port,
    close: () =>
      new Promise((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

/** Sends `text` on a tunnel to the echo target and waits for it to come back. */
function echoOn(socket: net.Socket, text: string): Promise<string> {
  return new Promise((resolve, reject) => {
    let got = "";
    const done = (err?: Error) => {
      socket.off("data", onData);
      socket.off("error", done);
      socket.off("close", onClose);
      if (err) reject(err);
      else resolve(got);
    };
    const onData = (c: Buffer) => {
      got += c.toString();
      if (got.length >= text.length) done();
    };
    const onClose = () => done(new Error(`the tunnel closed after ${JSON.stringify(got)}`));
    socket.on("data", onData);
    socket.on("error", done);
    socket.on("close", onClose);
    socket.write(text);
  });
}

function cacheModes(cache: string): Record<string, string> {
  const modes: Record<string, string> = {};
  for (const sub of readdirSync(cache)) {
    const dir = join(cache, sub);
    modes[sub] = (statSync(dir).mode & 0o777).toString(8);
    for (const f of readdirSync(dir)) modes[`${sub}/${f}`] = (statSync(join(dir, f)).mode & 0o777).toString(8);
  }
  return modes;
}

describe("ACME against pebble", { skip, timeout: 120_000 }, () => {
  let pki: TestPki;
  let pebble: Pebble;
  let root: string;
  let rootFile: string;
  let web: Target;
  let secure: Target;
  let echo: Target;
  let reporter: { addresses: { port: number }[]; close(): Promise<void> };
  const closers: { close(): Promise<void> }[] = [];
  const dir = mkdtempSync(join(tmpdir(), "natproxy-acme-"));

  before(async () => {
    pki = await testPki();
    pebble = await startPebble(pki, DOMAINS, VALIDITY);
    root = await pebble.root();
    rootFile = join(dir, "pebble-root.pem");
    writeFileSync(rootFile, root);
    web = await startHttpTarget();
    secure = await startHttpsTarget(pki);
    echo = await startEchoTarget();
    reporter = await startReporter(resolveConfig({ reporter: { listen: "127.0.0.1:0" } }, "reporter").reporter);
  });
  after(async () => {
    for (const c of closers.reverse()) await c.close();
    await reporter?.close();
    await web?.close();
    await secure?.close();
    await echo?.close();
    await pebble?.close();
  });

  describe("tls-alpn-01 on the coordinator's HTTPS port", () => {
    const cache = join(dir, "cache-alpn");
    let coordinator: Coordinator;
    const locals: Partial<Record<"connect-back" | "outbound", Local>> = {};
    const logs = captureLogs("coordinator");
    after(() => logs.restore());

    test("at start the coordinator obtains a certificate that pebble's root verifies for its names", async (t) => {
      const t0 = performance.now();
      coordinator = await coordinatorWith({ listen: `127.0.0.1:${pebble.tlsPort}`, acme: acmeConfig(pebble, pki, cache) });
      closers.push(coordinator);
      t.diagnostic(`startCoordinator with a first tls-alpn-01 issuance: ${Math.round(performance.now() - t0)} ms; ${logs.lines.find((l) => l.includes("certificate issued in"))}`);
      for (const name of DOMAINS) {
        const served = await handshake(pebble.tlsPort, name, { ca: root });
        assert.ok(served.authorized, `${name}: ${served.error}`);
        assert.equal(`sha256:${served.cert.fingerprint256}`, coordinator.fingerprint);
      }
      for (const name of DOMAINS) assert.ok(pebble.dns.questions.includes(`A ${name}`), `pebble resolved ${name} through the test's DNS: ${pebble.dns.questions.join(", ")}`);
      // pebble logs its http-01 attempts only; this coordinator has no challenge listener.
      assert.doesNotMatch(pebble.proc.output(), /validate w\/ HTTP/);
    });

    test("clients other than the CA are unaffected: no ALPN, http/1.1 or h2 get the served certificate; acme-tls/1 with no challenge pending is refused", async () => {
      for (const ALPNProtocols of [undefined, ["http/1.1"], ["h2", "http/1.1"]]) {
        const r = await handshake(pebble.tlsPort, "localhost", { ca: root, ...(ALPNProtocols ? { ALPNProtocols } : {}) });
        assert.ok(r.authorized);
        assert.equal(r.alpn, ALPNProtocols ? "http/1.1" : false);
      }
      await assert.rejects(handshake(pebble.tlsPort, "localhost", { ALPNProtocols: ["acme-tls/1"] }), /no application protocol|alert number 120/i);
    });

    test("key and certificate are cached with mode 0600, in a directory of mode 0700", () => {
      const modes = cacheModes(cache);
      const slug = Object.keys(modes).find((k) => !k.includes("/"))!;
      assert.match(slug, /^localhost_\d+_dir$/);
      assert.deepEqual(modes, { [slug]: "700", [`${slug}/account-key.pem`]: "600", [`${slug}/natproxy-coord.test.pem`]: "600" });
    });

    for (const path of ["connect-back", "outbound"] as const)
      test(`a local proxy with only ca = pebble's root (no fingerprint, no allow_self_signed) fetches pages over the ${path} path`, async () => {
        const local = await startLocalFor(pebble.tlsPort, reporter.addresses[0].port, pki, { ca: rootFile, tunnel: path, fingerprint: "", allow_self_signed: false });
        closers.push(local);
        locals[path] = local;
        assert.equal(local.path(), path);
        const plain = await proxiedRequest(local.proxyAddress.port, `http://127.0.0.1:${web.port}/acme-${path}`);
        assert.equal(plain.status, 200);
        assert.equal(JSON.parse(plain.body.toString()).url, `/acme-${path}`);
        const tlsPage = await httpsThrough(local.proxyAddress.port, "localhost", secure.port, `/acme-secure-${path}`, pki.ca.cert);
        assert.equal(tlsPage.status, 200);
      });

    test("renewal (a third of the lifetime left): the served certificate changes without a restart, and tunnels that were up stay up", async (t) => {
      const before = coordinator.fingerprint;
      const issuedBefore = logs.lines.filter((l) => l.includes("certificate issued in")).length;
      const tunnels = new Map<string, net.Socket>();
      for (const [path, local] of Object.entries(locals)) {
        const c = await connectThrough(local!.proxyAddress.port, `127.0.0.1:${echo.port}`);
        assert.equal(c.status, 200);
        tunnels.set(path, c.socket);
        assert.equal(await echoOn(c.socket, `before ${path}`), `before ${path}`);
      }
      assert.equal(await connectBackCertificate(pebble.tlsPort, root), before);
      const t0 = performance.now();
      await waitUntil(() => coordinator.fingerprint !== before, VALIDITY * 1000, "a renewed certificate");
      const line = logs.lines.filter((l) => l.includes("certificate issued in"))[issuedBefore];
      t.diagnostic(`renewed after waiting ${Math.round(performance.now() - t0)} ms: ${line}`);
      assert.match(line, /renewal at \S+ \(a third of its \d+ s lifetime left\)/);
      const after = coordinator.fingerprint;
      const served = await handshake(pebble.tlsPort, "natproxy-coord.test", { ca: root });
      assert.ok(served.authorized);
      assert.equal(`sha256:${served.cert.fingerprint256}`, after, "new API connections get the new certificate");
      assert.equal(await connectBackCertificate(pebble.tlsPort, root), after, "new connect-backs present it too");
      for (const [path, socket] of tunnels) {
        assert.equal(await echoOn(socket, `after ${path}`), `after ${path}`, `the ${path} tunnel survived the swap`);
        socket.destroy();
      }
      for (const [path, local] of Object.entries(locals)) {
        const r = await proxiedRequest(local!.proxyAddress.port, `http://127.0.0.1:${web.port}/renewed-${path}`, { headers: { Connection: "close" } });
        assert.equal(r.status, 200);
      }
    });

    test("a restart uses the cached, still-valid certificate without contacting the CA", async () => {
      const cached = coordinator.fingerprint;
      for (const local of Object.values(locals)) await local!.close();
      await coordinator.close();
      const requests = pebble.requests();
      const again = await coordinatorWith({ listen: `127.0.0.1:${pebble.tlsPort}`, acme: acmeConfig(pebble, pki, cache) });
      closers.push(again);
      assert.equal(again.fingerprint, cached);
      const served = await handshake(pebble.tlsPort, "localhost", { ca: root });
      assert.equal(`sha256:${served.cert.fingerprint256}`, cached);
      assert.equal(pebble.requests(), requests, "no request reached pebble");
      await again.close();
    });
  });

  test("http-01 on the challenge listener (http_listen), in a second run", async (t) => {
    const logs = captureLogs("coordinator");
    const cache = join(dir, "cache-http");
    try {
      const t0 = performance.now();
      const coordinator = await coordinatorWith({ listen: "127.0.0.1:0", acme: acmeConfig(pebble, pki, cache, { challenge: "http-01", http_listen: `127.0.0.1:${pebble.httpPort}` }) });
      closers.push(coordinator);
      t.diagnostic(`startCoordinator with a first http-01 issuance: ${Math.round(performance.now() - t0)} ms; ${logs.lines.find((l) => l.includes("certificate issued in"))}`);
      assert.match(pebble.proc.output(), /Attempting to validate w\/ HTTP: http:\/\/natproxy-coord\.test:\d+\/\.well-known\/acme-challenge\//);
      const port = coordinator.addresses[0].port;
      const served = await handshake(port, "natproxy-coord.test", { ca: root });
      assert.ok(served.authorized, served.error);
      assert.equal(`sha256:${served.cert.fingerprint256}`, coordinator.fingerprint);
      const slug = readdirSync(cache)[0];
      assert.equal((statSync(join(cache, slug, "natproxy-coord.test.pem")).mode & 0o777).toString(8), "600");
      // Anything but a pending token is a 404.
      const other = await fetch(`http://127.0.0.1:${pebble.httpPort}/.well-known/acme-challenge/nothing-pending`);
      assert.equal(other.status, 404);
      const local = await startLocalFor(port, reporter.addresses[0].port, pki, { ca: rootFile, tunnel: "outbound" });
      const r = await proxiedRequest(local.proxyAddress.port, `http://127.0.0.1:${web.port}/via-http-01`);
      assert.equal(r.status, 200);
      await local.close();
      await coordinator.close();
      await assert.rejects(fetch(`http://127.0.0.1:${pebble.httpPort}/`), "close() closes the challenge listener");
    } finally {
      logs.restore();
    }
  });

  test("the packaged binary (acme-client bundled, loaded on first use) obtains a certificate too", { skip: existsSync(BINARY) ? false : `${BINARY} not built` }, async (t) => {
    const cfg = join(dir, "binary.toml");
    const acme = acmeConfig(pebble, pki, join(dir, "cache-binary"), { challenge: "http-01", http_listen: `127.0.0.1:${pebble.httpPort}` });
    const toml = Object.entries(acme).map(([k, v]) => `${k} = ${JSON.stringify(v)}`).join("\n");
    writeFileSync(cfg, `[coordinator]\nlisten = "127.0.0.1:0"\ntokens = ["${TOKEN}"]\n[coordinator.acme]\n${toml}\n`);
    const proc = startProc(BINARY, ["coordinator", "-c", cfg], { PATH: "/nonexistent", HOME: tmpdir() });
    try {
      const issued = await proc.waitFor(/ACME: certificate issued in (\d+) ms/, 20_000);
      const port = Number((await proc.waitFor(/HTTPS API listening on 127\.0\.0\.1:(\d+)/, 5000))[1]);
      t.diagnostic(`binary: http-01 issuance in ${issued[1]} ms`);
      const served = await handshake(port, "localhost", { ca: root });
      assert.ok(served.authorized, served.error);
    } finally {
      assert.equal(await proc.stop(), 0, proc.output());
    }
  });

  test("a CA that was unreachable at start: a later retry registers, orders and serves the certificate", async () => {
    const logs = captureLogs("coordinator");
    const port = await freePort();
    const forwarder = net.createServer((c) => {
      const up = net.connect(Number(new URL(pebble.directory).port), "127.0.0.1");
      c.on("error", () => up.destroy());
      up.on("error", () => c.destroy());
      c.pipe(up).pipe(c);
    });
    try {
      const coordinator = await coordinatorWith({ listen: `127.0.0.1:${pebble.tlsPort}`, acme: acmeConfig(pebble, pki, join(dir, "cache-late"), { directory: `https://localhost:${port}/dir` }) });
      closers.push(coordinator);
      await waitUntil(() => logs.lines.some((l) => l.includes("(attempt 2)")), 10_000, "a second failed attempt");
      assert.match(logs.lines.find((l) => l.includes("(attempt 1)"))!, /CA unreachable: cannot connect to localhost:\d+ \(ECONNREFUSED\)/);
      // Only the directory is fetched through this port: its answer names pebble's own URLs.
      await new Promise<void>((r) => forwarder.listen(port, "127.0.0.1", r));
      await waitUntil(() => logs.lines.some((l) => l.includes("certificate issued in")), 15_000, "an issuance once the CA is back");
      const served = await handshake(pebble.tlsPort, "localhost", { ca: root });
      assert.ok(served.authorized, served.error);
      assert.equal(`sha256:${served.cert.fingerprint256}`, coordinator.fingerprint);
      await coordinator.close();
    } finally {
      forwarder.close();
      logs.restore();
    }
  });

  test("failures are logged with what to fix and retried with backoff, while the placeholder is served", async (t) => {
    const cases: { name: string; coordinator: NonNullable<ConfigInput["coordinator"]>; want: RegExp }[] = [
      { name: "port", coordinator: { listen: "127.0.0.1:0", acme: acmeConfig(pebble, pki, join(dir, "fail-port")) }, want: /port: the CA could not connect to \S+ on TCP port 443 .*let TCP 443 in/ },
      { name: "dns", coordinator: { listen: `127.0.0.1:${pebble.tlsPort}`, acme: acmeConfig(pebble, pki, join(dir, "fail-dns"), { domains: ["not-in-dns.test"] }) }, want: /DNS: the CA cannot resolve not-in-dns\.test .*A\/AAAA records/ },
      { name: "untrusted", coordinator: { listen: "127.0.0.1:0", acme: acmeConfig(pebble, pki, join(dir, "fail-ca"), { ca: "" }) }, want: /CA not trusted: the certificate of localhost:\d+ did not verify \(\w+\); for a private or test CA set acme\.ca/ },
      { name: "unreachable", coordinator: { listen: "127.0.0.1:0", acme: acmeConfig(pebble, pki, join(dir, "fail-down"), { directory: `https://localhost:${await freePort()}/dir` }) }, want: /CA unreachable: cannot connect to localhost:\d+ \(ECONNREFUSED\)/ },
    ];
    for (const c of cases) {
      const logs = captureLogs("coordinator");
      try {
        const coordinator = await coordinatorWith(c.coordinator);
        closers.push(coordinator);
        const port = coordinator.addresses[0].port;
        const served = await handshake(port, "localhost");
        assert.equal(`sha256:${served.cert.fingerprint256}`, coordinator.fingerprint);
        assert.equal(served.cert.issuer, served.cert.subject, `${c.name}: the self-signed placeholder is served`);
        await waitUntil(() => logs.lines.some((l) => l.includes("(attempt 2)")), 10_000, `${c.name}: a second attempt`);
        const failure = logs.lines.find((l) => l.includes("(attempt 1)"))!;
        t.diagnostic(failure);
        assert.match(failure, c.want, c.name);
        assert.match(logs.lines.find((l) => l.includes("(attempt 2)"))!, c.want, `${c.name}: the retry fails the same way`);
        assert.match(failure, /retrying in \d+ m?s; local proxies refuse the placeholder until then/);
        await coordinator.close();
      } finally {
        logs.restore();
      }
    }
  });
});
