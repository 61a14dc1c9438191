// Where the coordinator may connect back to. Behind a same-host TLS
// passthrough or a Kubernetes Service without proxy_protocol every caller
// appears as loopback or a private address, so `same-ip` alone let a token
// holder aim connect-backs at the coordinator's own ports and read back, from
// the API's error, whether each was closed, silent or speaking: a port
// scanner. Connect-backs now get the target policy's default refusals
// (loopback, private, link-local, own addresses, in every spelling), with
// [coordinator] allow_connect_back for exceptions, and one answer for every
// way a connect-back can fail.
import assert from "node:assert/strict";
import https from "node:https";
import net, { type AddressInfo } from "node:net";
import { test } from "node:test";
import tls from "node:tls";
import { v4 as uuidv4 } from "uuid";
import type { Coordinator } from "../src/coordinator/index.ts";
import { roleLogger } from "../src/log.ts";
import { captureLogs } from "./helpers/logs.ts";
import { testPki, type TestPki } from "../scripts/lib/pki.ts";
import { connectThrough } from "../scripts/lib/proxy-client.ts";
import { startStack, startTestCoordinator, TOKEN } from "../scripts/lib/stack.ts";
import { freePort } from "../scripts/lib/ports.ts";

interface Answer {
  status: number;
  code: string;
  message: string;
}

function post(pki: TestPki, coordinator: Coordinator, path: string, body: unknown): Promise<Answer> {
  const text = JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = https.request(
      {
        host: "127.0.0.1",
        port: coordinator.addresses[0].port,
        servername: "localhost",
        ca: [pki.ca.cert],
        method: "POST",
        path,
        agent: false,
        headers: { Authorization: `Bearer ${TOKEN}`, "Content-Type": "application/json", "Content-Length": Buffer.byteLength(text) },
      },
      (res) => {
        let data = "";
        res.setEncoding("utf8");
        res.on("data", (c: string) => (data += c));
        res.on("end", () => {
          const parsed = JSON.parse(data) as { error?: { code: string; message: string } };
          resolve({ status: res.statusCode ?? 0, code: parsed.error?.code ?? "OK", message: parsed.error?.message ?? "" });
        });
      },
    );
    req.on("error", reject);
    req.end(text);
  });
}

/** The three requests that make the coordinator connect back. */
const connectBackRequests = (reply: { host: string; port: number }): [string, unknown][] => [
  ["/v1/probe", { probe: uuidv4(), reply }],
  ["/v1/ready", { ready: uuidv4(), reply }],
  ["/v1/sessions", { session: uuidv4(), target: { host: "127.0.0.1", port: 9 }, reply }],
];

/** A TCP server standing for some service on the coordinator's host; `behave` decides what it does with a connection. */
async function service(behave: (socket: net.Socket) => void = () => {}): Promise<{ port: number; connections: () => number; close(): void }> {
  let connections = 0;
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    connections++;
    sockets.add(socket);
    socket.on("error", () => {});
    socket.on("close", () => sockets.delete(socket));
    behave(socket);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    port: (server.address() as AddressInfo).port,
    connections: () => connections,
    close() {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

test("a caller seen as loopback cannot make the coordinator connect back to its own ports, on any of the three requests", async () => {
  const pki = await testPki();
  const victim = await service();
  // The default: no allow_connect_back. A short connect_timeout keeps a coordinator without the rule quick to show it dials.
  const coordinator = await startTestCoordinator(pki, { allow_connect_back: [], connect_timeout: 500, handshake_timeout: 500 });
  const logs = captureLogs("coordinator");
  try {
    for (const [path, body] of connectBackRequests({ host: "127.0.0.1", port: victim.port })) {
      const a = await post(pki, coordinator, path, body);
      assert.equal(a.status, 403, `${path}: ${JSON.stringify(a)}`);
      assert.equal(a.code, "FORBIDDEN", path);
      assert.match(a.message, /127\.0\.0\.1 is a loopback address \(127\.0\.0\.0\/8\); only \[coordinator\] allow_connect_back can permit it/, path);
      assert.doesNotMatch(a.message, /allow_targets/, path);
    }
    assert.equal(victim.connections(), 0, "the coordinator never dialled its own port");
    assert.ok(logs.lines.some((l) => new RegExp(`connect-back to 127\\.0\\.0\\.1:${victim.port} for 127\\.0\\.0\\.1 refused`).test(l)), logs.lines.join("\n"));
  } finally {
    logs.restore();
    victim.close();
    await coordinator.close();
  }
});

test('with connect_back = "any", private, link-local, mapped and own addresses are refused before anything is dialled', async () => {
  const pki = await testPki();
  const coordinator = await startTestCoordinator(pki, { connect_back: "any", allow_connect_back: [], own_addresses: ["203.0.113.5"], connect_timeout: 500, handshake_timeout: 500 });
  try {
    for (const [host, why] of [
      ["10.1.2.3", /a private address \(10\.0\.0\.0\/8\)/],
      ["169.254.169.254", /the cloud metadata service address/],
      ["::1", /a loopback address \(::1\/128\)/],
      ["::ffff:7f00:1", /127\.0\.0\.1\)? is a loopback address/], // unmapped before the check (address.ts unmapIPv4)
      ["fd00::1", /a unique-local address/],
      ["203.0.113.5", /an address of the coordinator itself/],
    ] as const) {
      const a = await post(pki, coordinator, "/v1/probe", { probe: uuidv4(), reply: { host, port: 22 } });
      assert.equal(a.status, 403, `${host}: ${JSON.stringify(a)}`);
      assert.match(a.message, why, host);
      assert.match(a.message, /allow_connect_back/, host);
    }
  } finally {
    await coordinator.close();
  }
});

test("where allow_connect_back permits it, a closed, a silent, a speaking and a TLS-refusing port all get the same answer; the log keeps the detail", async () => {
  const pki = await testPki();
  const silent = await service();
  const speaksFirst = await service((s) => s.write("SSH-2.0-OpenSSH_9.6\r\n"));
  // A TLS client offering only TLS 1.1: the coordinator's side of the handshake fails.
  const refusesTls = await service((s) => tls.connect({ socket: s, servername: "localhost", minVersion: "TLSv1", maxVersion: "TLSv1.1", ciphers: "DEFAULT@SECLEVEL=0" }).on("error", () => {}));
  const closed = await freePort();
  const coordinator = await startTestCoordinator(pki, { allow_connect_back: ["127.0.0.1"], connect_timeout: 400, handshake_timeout: 400 });
  const logs = captureLogs("coordinator");
  const logger = roleLogger("coordinator");
  logger.level = 4; // debug, where the detail is
  try {
    const answers = new Map<string, Answer>();
    for (const [name, port] of [["closed", closed], ["silent", silent.port], ["speaks first", speaksFirst.port], ["refuses TLS", refusesTls.port]] as const) {
      const a = await post(pki, coordinator, "/v1/probe", { probe: uuidv4(), reply: { host: "127.0.0.1", port } });
      answers.set(name, { ...a, message: a.message.replace(`:${port}`, ":PORT") });
    }
    const distinct = new Set([...answers.values()].map((a) => JSON.stringify(a)));
    assert.equal(distinct.size, 1, `the answers tell the ports apart:\n${[...answers].map(([k, v]) => `${k}: ${JSON.stringify(v)}`).join("\n")}`);
    const one = answers.get("closed") as Answer;
    assert.equal(one.status, 502);
    assert.equal(one.code, "CONNECT_BACK_FAILED");
    assert.match(one.message, /127\.0\.0\.1:PORT: no natproxy local proxy completed a TLS handshake there/);
    const detail = logs.lines.filter((l) => l.startsWith("connect-back to 127.0.0.1:")).join("\n");
    for (const want of [new RegExp(`:${closed} failed: ECONNREFUSED`), new RegExp(`:${silent.port} failed: TLS handshake timed out`), new RegExp(`:${speaksFirst.port} failed: TLS handshake failed`), new RegExp(`:${refusesTls.port} failed: TLS handshake failed`)])
      assert.match(detail, want);
  } finally {
    logs.restore();
    silent.close();
    speaksFirst.close();
    refusesTls.close();
    await coordinator.close();
  }
});

test("a local proxy on an address allow_connect_back names still works over connect-back", async () => {
  const stack = await startStack({ local: { tunnel: "connect-back" } });
  const web = await service((s) => s.end("HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"));
  try {
    const c = await connectThrough(stack.proxyPort, `127.0.0.1:${web.port}`);
    assert.equal(c.status, 200);
    c.socket.destroy();
  } finally {
    web.close();
    await stack.close();
  }
});

test("[coordinator] own_addresses: a public address no interface shows (a cloud NAT's) is refused as a target", async () => {
  const stack = await startStack({ coordinator: { own_addresses: ["203.0.113.5"] }, local: { optimistic_connect: false } });
  try {
    const c = await connectThrough(stack.proxyPort, "203.0.113.5:443");
    assert.equal(c.status, 403);
    assert.equal(c.headers["x-natproxy-error"], "FORBIDDEN");
    assert.match(c.body, /203\.0\.113\.5 is an address of the coordinator itself/);
  } finally {
    await stack.close();
  }
});
