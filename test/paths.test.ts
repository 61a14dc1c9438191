import assert from "node:assert/strict";
import { once } from "node:events";
import tls from "node:tls";
import { after, before, describe, test } from "node:test";
import { v4 as uuidv4 } from "uuid";
import { resolveConfig } from "../src/config.ts";
import type { Coordinator } from "../src/coordinator/index.ts";
import { startLocal } from "../src/local/index.ts";
import { startReporter } from "../src/reporter/index.ts";
import { decodeMessage, encodeOpen, MessageType, resultOf } from "../src/protocol/wire.ts";
import { connectThrough, proxiedRequest } from "../scripts/lib/proxy-client.ts";
import { testPki, type TestPki } from "../scripts/lib/pki.ts";
import { startTestCoordinator, TOKEN } from "../scripts/lib/stack.ts";
import { startHttpTarget, type Target } from "../scripts/lib/targets.ts";
import { freePort } from "../scripts/lib/ports.ts";

// How the local proxy picks its tunnel path, and how the coordinator guards
// the outbound path's Upgrade.

let pki: TestPki;
let coordinator: Coordinator;
let web: Target;

before(async () => {
  pki = await testPki();
  coordinator = await startTestCoordinator(pki, { open_timeout: 300 });
  web = await startHttpTarget();
});
after(async () => {
  await coordinator?.close();
  await web?.close();
});

function localConfig(reporter: string, extra: Record<string, unknown> = {}) {
  return resolveConfig(
    {
      local: {
        listen: "127.0.0.1:0",
        coordinator: `https://127.0.0.1:${coordinator.addresses[0].port}`,
        token: TOKEN,
        reporter,
        ca: pki.caFile,
        reporter_retries: 0,
        probe_timeout: 1500,
        ...extra,
      },
    },
    "local",
  ).local;
}

describe("tunnel = auto", () => {
  test("a probe that cannot get in makes auto choose the outbound path, and sessions work", async () => {
    // The reporter is reached over IPv6 and the API over IPv4, so the
    // coordinator's same-ip rule refuses the connect-back: a real refusal,
    // as a user with split address families would meet it.
    const reporter = await startReporter(resolveConfig({ reporter: { listen: "[::1]:0" } }, "reporter").reporter);
    const local = await startLocal(localConfig(`[::1]:${reporter.addresses[0].port}`));
    try {
      const r = local.reachability();
      assert.ok(r, "the probe ran at start-up");
      assert.equal(r.probe.ok, false);
      assert.equal(r.probe.error?.code, "FORBIDDEN");
      assert.match(r.behaviour, /refused to connect back/);
      assert.equal(local.path(), "outbound");
      const res = await proxiedRequest(local.proxyAddress.port, `http://127.0.0.1:${web.port}/auto-outbound`);
      assert.equal(res.status, 200);
      const c = await connectThrough(local.proxyAddress.port, `127.0.0.1:${web.port}`);
      assert.equal(c.status, 200);
      c.socket.destroy();
    } finally {
      await local.close();
      await reporter.close();
    }
  });

  test("with no reporter at all, auto serves over the outbound path from the start", async () => {
    const local = await startLocal(localConfig(`127.0.0.1:${await freePort()}`, { retry_max_delay: 60_000 }));
    try {
      assert.equal(local.mapping(), undefined);
      assert.equal(local.path(), "outbound");
      const res = await proxiedRequest(local.proxyAddress.port, `http://127.0.0.1:${web.port}/no-reporter`);
      assert.equal(res.status, 200);
    } finally {
      await local.close();
    }
  });

  test("on loopback the probe gets through and auto uses connect-back", async () => {
    const reporter = await startReporter(resolveConfig({ reporter: { listen: "127.0.0.1:0" } }, "reporter").reporter);
    const local = await startLocal(localConfig(`127.0.0.1:${reporter.addresses[0].port}`));
    try {
      assert.equal(local.reachability()?.probe.ok, true);
      assert.equal(local.path(), "connect-back");
      const res = await proxiedRequest(local.proxyAddress.port, `http://127.0.0.1:${web.port}/auto-back`);
      assert.equal(res.status, 200);
    } finally {
      await local.close();
      await reporter.close();
    }
  });
});

/** A raw TLS connection to the coordinator; resolves with everything it sent until it closed. */
async function rawExchange(write: Buffer | string, opts: { closeAfterMs?: number } = {}): Promise<string> {
  const socket = tls.connect({ host: "127.0.0.1", port: coordinator.addresses[0].port, ca: [pki.ca.cert], servername: "localhost" });
  await once(socket, "secureConnect");
  socket.write(write);
  const chunks: Buffer[] = [];
  socket.on("data", (c: Buffer) => chunks.push(c));
  const timer = opts.closeAfterMs ? setTimeout(() => socket.destroy(), opts.closeAfterMs) : undefined;
  await once(socket, "close");
  clearTimeout(timer);
  return Buffer.concat(chunks).toString("latin1");
}

const upgrade = (headers: string) => `GET /v1/tunnel HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n${headers}\r\n`;

describe("the coordinator guards the outbound path", () => {
  test("no token, a wrong token, or a wrong Upgrade: refused with a status and nothing dialled", async () => {
    const open = encodeOpen({ session: uuidv4(), target: { host: "127.0.0.1", port: web.port } });
    const none = await rawExchange(Buffer.concat([Buffer.from(upgrade("Upgrade: natproxy-tunnel/1\r\n")), open]));
    assert.match(none, /^HTTP\/1\.1 401 /);
    assert.match(none, /WWW-Authenticate: Bearer/);
    const wrong = await rawExchange(Buffer.concat([Buffer.from(upgrade("Authorization: Bearer not-the-token-at-all\r\nUpgrade: natproxy-tunnel/1\r\n")), open]));
    assert.match(wrong, /^HTTP\/1\.1 401 /);
    const proto = await rawExchange(upgrade(`Authorization: Bearer ${TOKEN}\r\nUpgrade: websocket\r\n`));
    assert.match(proto, /^HTTP\/1\.1 400 /);
    const plain = await rawExchange(`GET /v1/tunnel HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${TOKEN}\r\nConnection: close\r\n\r\n`);
    assert.match(plain, /^HTTP\/1\.1 400 /);
    assert.match(plain, /Upgrade/);
  });

  test("an Open that is malformed, or names a forbidden target, gets a Result with its code", async () => {
    const ok = upgrade(`Authorization: Bearer ${TOKEN}\r\nUpgrade: natproxy-tunnel/1\r\n`);
    const result = (text: string) => {
      const body = Buffer.from(text.slice(text.indexOf("\r\n\r\n") + 4), "latin1");
      const d = decodeMessage(body);
      assert.ok(d, `a whole message in ${JSON.stringify(text)}`);
      assert.equal(d.message.type, MessageType.Result);
      return resultOf(d.message);
    };
    const forbidden = await rawExchange(Buffer.concat([Buffer.from(ok), encodeOpen({ session: uuidv4(), target: { host: "10.1.2.3", port: 80 } })]));
    assert.match(forbidden, /^HTTP\/1\.1 101 /);
    assert.equal(result(forbidden).code, "FORBIDDEN");
    const badHost = await rawExchange(Buffer.concat([Buffer.from(ok), encodeOpen({ session: uuidv4(), target: { host: "bad host!", port: 80 } })]));
    assert.equal(result(badHost).code, "BAD_REQUEST");
    const refused = await rawExchange(Buffer.concat([Buffer.from(ok), encodeOpen({ session: uuidv4(), target: { host: "127.0.0.1", port: await freePort() } })]));
    assert.equal(result(refused).code, "TARGET_REFUSED");
  });

  test("garbage after the Upgrade, or silence, closes the connection", async () => {
    const ok = upgrade(`Authorization: Bearer ${TOKEN}\r\nUpgrade: natproxy-tunnel/1\r\n`);
    const garbage = await rawExchange(`${ok}GET / HTTP/1.1\r\n\r\n`);
    assert.match(garbage, /^HTTP\/1\.1 101 /);
    // open_timeout is 300 ms here: a silent upgraded connection is dropped by then.
    const t0 = performance.now();
    await rawExchange(ok, { closeAfterMs: 5000 });
    assert.ok(performance.now() - t0 < 3000, "the coordinator closed the silent connection");
  });

  test("the probe API: same-ip refuses another address; a bad body is 400; no token is 401", async () => {
    const post = (body: string, auth = `Authorization: Bearer ${TOKEN}\r\n`) =>
      rawExchange(`POST /v1/probe HTTP/1.1\r\nHost: x\r\n${auth}Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
    const elsewhere = await post(JSON.stringify({ probe: uuidv4(), reply: { host: "203.0.113.9", port: 40000 } }));
    assert.match(elsewhere, /^HTTP\/1\.1 403 /);
    assert.match(elsewhere, /same-ip/);
    const bad = await post(JSON.stringify({ probe: "nope", reply: { host: "x", port: 0 } }));
    assert.match(bad, /^HTTP\/1\.1 400 /);
    assert.match(bad, /probe: expected a UUID v4/);
    const anon = await post("{}", "");
    assert.match(anon, /^HTTP\/1\.1 401 /);
  });
});

describe("the coordinator's API refuses what it must", () => {
  const api = (text: string) => rawExchange(text);
  test("a body over 16 KiB is 413, by its declared length or by what arrives", async () => {
    const big = "x".repeat(17 * 1024);
    const declared = await api(`POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${TOKEN}\r\nContent-Length: ${big.length}\r\nConnection: close\r\n\r\n${big}`);
    assert.match(declared, /^HTTP\/1\.1 413 /);
    assert.match(declared, /PAYLOAD_TOO_LARGE/);
    const chunked = await api(`POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${TOKEN}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n${big.length.toString(16)}\r\n${big}\r\n0\r\n\r\n`);
    assert.match(chunked, /^HTTP\/1\.1 413 /);
  });

  test("TLS below 1.2 is refused by the coordinator", async () => {
    const socket = tls.connect({ host: "127.0.0.1", port: coordinator.addresses[0].port, ca: [pki.ca.cert], servername: "localhost", minVersion: "TLSv1", maxVersion: "TLSv1.1" });
    const [err] = (await once(socket, "error")) as [NodeJS.ErrnoException];
    assert.match(String(err.code), /ERR_SSL_(TLSV1_ALERT_PROTOCOL_VERSION|UNSUPPORTED_PROTOCOL|NO_PROTOCOLS_AVAILABLE)/);
  });
});

describe("proxy authentication on the browser port", () => {
  test("with users configured: 407 and a Basic challenge without credentials, or with wrong ones; through with the right ones", async () => {
    const reporter = await startReporter(resolveConfig({ reporter: { listen: "127.0.0.1:0" } }, "reporter").reporter);
    const local = await startLocal(localConfig(`127.0.0.1:${reporter.addresses[0].port}`, { users: ["alice:correct horse"], tunnel: "outbound" }));
    try {
      const none = await connectThrough(local.proxyAddress.port, `127.0.0.1:${web.port}`);
      assert.equal(none.status, 407);
      assert.match(String(none.headers["proxy-authenticate"]), /^Basic realm="natproxy"/);
      const basic = (cred: string) => ({ "Proxy-Authorization": `Basic ${Buffer.from(cred).toString("base64")}` });
      const wrong = await connectThrough(local.proxyAddress.port, `127.0.0.1:${web.port}`, basic("alice:wrong"));
      assert.equal(wrong.status, 407);
      const plainNone = await proxiedRequest(local.proxyAddress.port, `http://127.0.0.1:${web.port}/auth`);
      assert.equal(plainNone.status, 407);
      const ok = await connectThrough(local.proxyAddress.port, `127.0.0.1:${web.port}`, basic("alice:correct horse"));
      assert.equal(ok.status, 200);
      ok.socket.destroy();
      const plainOk = await proxiedRequest(local.proxyAddress.port, `http://127.0.0.1:${web.port}/auth`, { headers: basic("alice:correct horse") });
      assert.equal(plainOk.status, 200);
      // The credentials stop at the proxy: the target never sees them.
      assert.doesNotMatch(plainOk.body.toString(), /proxy-authorization/i);
    } finally {
      await local.close();
      await reporter.close();
    }
  });
});
