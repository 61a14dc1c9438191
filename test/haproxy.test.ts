import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { once } from "node:events";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import https from "node:https";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import tls from "node:tls";
import { after, before, describe, test } from "node:test";
import { Command, IPv4Address, IPv4ProxyAddress, IPv6Address, IPv6ProxyAddress, TransportProtocol, V2ProxyProtocol } from "proxy-protocol-js";
import type { Coordinator } from "../src/coordinator/index.ts";
import type { Local } from "../src/local/index.ts";
import { parseProxyHeader, readProxyHeader } from "../src/coordinator/proxy-header.ts";
import { resolveConfig } from "../src/config.ts";
import { startReporter, type ReporterHandle } from "../src/reporter/index.ts";
import { httpsThrough, proxiedRequest } from "../scripts/lib/proxy-client.ts";
import { captureLogs } from "./helpers/logs.ts";
import { testPki, type TestPki } from "../scripts/lib/pki.ts";
import { startLocalFor, startTestCoordinator, TOKEN } from "../scripts/lib/stack.ts";
import { expectedSha256, startHttpsTarget, startHttpTarget, type Target } from "../scripts/lib/targets.ts";
import { freePort } from "../scripts/lib/ports.ts";
import { waitUntil, within } from "./helpers/wait.ts";
import { findProgram } from "./helpers/programs.ts";

// Several coordinators behind one TCP load balancer, sharing nothing: a real
// HAProxy in TCP mode (TLS passes through it) in front of two in-process
// coordinators, each told the caller's address by a PROXY v2 header. The
// parser comes first; it needs no HAProxy.

const v2 = (address: IPv4ProxyAddress | IPv6ProxyAddress, command = Command.PROXY, transport = TransportProtocol.STREAM) =>
  Buffer.from(new V2ProxyProtocol(command, transport, address).build());
const v4 = (a: number[], port: number) => new IPv4ProxyAddress(IPv4Address.createFrom(a), port, IPv4Address.createFrom([203, 0, 113, 1]), 8443);

describe("PROXY protocol headers", () => {
  test("v1 and v2 give the caller and leave the bytes after the header", () => {
    const tail = Buffer.from([0x16, 0x03, 0x01]);
    const one = parseProxyHeader(Buffer.concat([Buffer.from("PROXY TCP4 198.51.100.7 203.0.113.1 4242 8443\r\n"), tail]));
    assert.deepEqual(one?.value, { version: 1, caller: { host: "198.51.100.7", port: 4242 } });
    assert.deepEqual(one?.rest, tail);
    // Callers are compared as text, so every spelling comes out as Node's own.
    const six = parseProxyHeader(Buffer.from("PROXY TCP6 2001:DB8:0:0::1 2001:db8::2 4243 8443\r\n"));
    assert.deepEqual(six?.value.caller, { host: "2001:db8::1", port: 4243 });
    const mapped = parseProxyHeader(Buffer.from("PROXY TCP6 ::ffff:198.51.100.8 ::1 1 2\r\n"));
    assert.deepEqual(mapped?.value.caller, { host: "198.51.100.8", port: 1 });
    const two = parseProxyHeader(Buffer.concat([v2(v4([198, 51, 100, 9], 40000)), tail]));
    assert.deepEqual(two?.value, { version: 2, caller: { host: "198.51.100.9", port: 40000 } });
    assert.deepEqual(two?.rest, tail);
    const src6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x42];
    const two6 = parseProxyHeader(v2(new IPv6ProxyAddress(IPv6Address.createFrom(src6), 5000, IPv6Address.createFrom([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]), 8443)));
    assert.deepEqual(two6?.value.caller, { host: "2001:db8::42", port: 5000 });
  });

  test("v2 TLVs are skipped by the header's own length; LOCAL and UNKNOWN name no caller", () => {
    const header = v2(v4([198, 51, 100, 10], 1234));
    // PP2_TYPE_AUTHORITY "coord.example", as `proxy-v2-options authority` adds it.
    const tlv = Buffer.concat([Buffer.from([0x02, 0x00, 13]), Buffer.from("coord.example")]);
    const withTlv = Buffer.concat([header, tlv, Buffer.from("after")]);
    withTlv.writeUInt16BE(header.readUInt16BE(14) + tlv.length, 14);
    const parsed = parseProxyHeader(withTlv);
    assert.deepEqual(parsed?.value.caller, { host: "198.51.100.10", port: 1234 });
    assert.equal(parsed?.rest.toString(), "after");
    assert.deepEqual(parseProxyHeader(v2(v4([10, 0, 0, 1], 1), Command.LOCAL))?.value, { version: 2, caller: undefined });
    assert.deepEqual(parseProxyHeader(Buffer.from("PROXY UNKNOWN\r\n"))?.value, { version: 1, caller: undefined });
  });

  test("a header cut anywhere asks for more bytes", () => {
    for (const whole of [Buffer.from("PROXY TCP4 198.51.100.7 203.0.113.1 4242 8443\r\n"), v2(v4([198, 51, 100, 7], 4242))])
      for (let n = 1; n < whole.length; n++) assert.equal(parseProxyHeader(whole.subarray(0, n)), undefined, `${n} of ${whole.length} bytes`);
  });

  test("anything else is refused on its first bytes, with the reason", () => {
    const refused = (bytes: Buffer | string) => assert.throws(() => parseProxyHeader(Buffer.from(bytes)), (err: Error) => (assert.equal((err as { code?: string }).code, "PROXY_HEADER"), true));
    assert.throws(() => parseProxyHeader(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00])), /a TLS handshake without a PROXY protocol header/);
    refused("GET / HTTP/1.1\r\n");
    refused("PROXY TCP4 999.1.1.1 203.0.113.1 1 2\r\n");
    refused("PROXY TCP4 2001:db8::1 203.0.113.1 1 2\r\n");
    refused("PROXY TCP4 198.51.100.7 203.0.113.1 70000 2\r\n");
    refused(`PROXY TCP4 ${"1".repeat(120)}`);
    refused(v2(v4([198, 51, 100, 7], 1), Command.PROXY, TransportProtocol.DGRAM));
    const huge = v2(v4([198, 51, 100, 7], 1));
    huge.writeUInt16BE(60_000, 14);
    refused(huge);
    const badSignature = v2(v4([198, 51, 100, 7], 1));
    badSignature[5] = 0x00;
    refused(badSignature);
  });

  test("on a socket: the bytes after the header are read next, from the same stream", async () => {
    const server = net.createServer();
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    try {
      const accepted = once(server, "connection") as Promise<[net.Socket]>;
      const client = net.connect((server.address() as net.AddressInfo).port, "127.0.0.1");
      client.end(Buffer.concat([Buffer.from("PROXY TCP4 198.51.100.7 203.0.113.1 4242 8443\r\nhello"), Buffer.from(" world")]));
      const [socket] = await accepted;
      const header = await readProxyHeader(socket);
      assert.deepEqual(header.caller, { host: "198.51.100.7", port: 4242 });
      const chunks: Buffer[] = [];
      socket.on("data", (c: Buffer) => chunks.push(c));
      await once(socket, "end");
      assert.equal(Buffer.concat(chunks).toString(), "hello world");
      socket.destroy();
    } finally {
      server.close();
    }
  });
});

test("[coordinator] proxy_protocol: off by default, and only a boolean", () => {
  assert.equal(resolveConfig({}, "any").coordinator.proxy_protocol, false);
  assert.equal(resolveConfig({ coordinator: { proxy_protocol: true } }, "any").coordinator.proxy_protocol, true);
  assert.throws(() => resolveConfig({ coordinator: { proxy_protocol: "v2" } }, "any"), /coordinator\.proxy_protocol: expected boolean, got "v2"/);
});

// --- HAProxy -----------------------------------------------------------------


const HAPROXY = findProgram("haproxy", "NATPROXY_HAPROXY");
const MISSING = "haproxy (Debian package haproxy) is not installed: apt-get install -y haproxy";
// CI installs it (.ci/run), so there a missing haproxy fails the test instead.
const SKIP = HAPROXY === undefined && !process.env.CI ? `${MISSING}; skipped outside CI` : false;

/** How often HAProxy checks each coordinator here; the README's example uses 2s. */
const CHECK_INTER = 100;
// The balancer's own source address towards the coordinators. On loopback
// every caller is 127.0.0.1 too, which would let the same-ip rule pass on the
// balancer's address; with another one it passes only on the PROXY header's.
const BALANCER_SOURCE = "127.0.0.2";

/** The README's haproxy.cfg, with loopback ports, a stats socket and a quicker check. */
function haproxyConfig(frontendPort: number, coordinatorPorts: number[], statsSocket: string): string {
  return `global
    stats socket ${statsSocket} mode 600 level admin

defaults
    mode tcp
    timeout connect 2s
    timeout check 2s
    timeout client 11m
    timeout server 11m
    timeout client-fin 30s
    timeout server-fin 30s
    retries 2
    option redispatch 1

frontend natproxy
    bind 127.0.0.1:${frontendPort}
    default_backend coordinators

backend coordinators
    balance roundrobin
    source ${BALANCER_SOURCE}
${coordinatorPorts.map((p, i) => `    server c${i + 1} 127.0.0.1:${p} send-proxy-v2 check inter ${CHECK_INTER} fall 2 rise 2`).join("\n")}
`;
}

interface Haproxy {
  port: number;
  /** Server name → status ("UP", "DOWN", …), from the stats socket. */
  servers(): Promise<Map<string, string>>;
  output(): string;
  stop(): Promise<void>;
}

function statsCommand(socketPath: string, command: string): Promise<string> {
  return within(
    new Promise((resolve, reject) => {
      const s = net.connect(socketPath);
      const chunks: Buffer[] = [];
      s.on("error", reject);
      s.on("data", (c: Buffer) => chunks.push(c));
      s.on("close", () => resolve(Buffer.concat(chunks).toString()));
      s.end(`${command}\n`);
    }),
    2000,
    `HAProxy's answer to "${command}"`,
  );
}

async function serverStates(socketPath: string): Promise<Map<string, string>> {
  const [head, ...rows] = (await statsCommand(socketPath, "show stat")).trim().split("\n");
  const cols = head.replace(/^# /, "").split(",");
  const [px, sv, st] = ["pxname", "svname", "status"].map((c) => cols.indexOf(c));
  const states = new Map<string, string>();
  for (const row of rows.map((r) => r.split(","))) if (row[px] === "coordinators" && row[sv] !== "BACKEND") states.set(row[sv], row[st]);
  return states;
}

/**
 * Runs haproxy in the foreground on a free loopback port and resolves once its
 * stats socket reports the frontend open. haproxy must be told its port, so it
 * comes from freePort(); should something take it meanwhile, haproxy exits at
 * once ("cannot bind") and another port is tried.
 */
async function startHaproxy(binary: string, coordinatorPorts: number[]): Promise<Haproxy> {
  const dir = mkdtempSync(join(tmpdir(), "natproxy-haproxy-"));
  const stats = join(dir, "admin.sock");
  let lastFailure = "";
  for (let attempt = 1; attempt <= 3; attempt++) {
    const port = await freePort();
    const cfg = join(dir, "haproxy.cfg");
    writeFileSync(cfg, haproxyConfig(port, coordinatorPorts, stats));
    const child: ChildProcess = spawn(binary, ["-f", cfg, "-db"], { stdio: ["ignore", "pipe", "pipe"] });
    let output = "";
    child.stdout?.on("data", (c: Buffer) => (output += c.toString()));
    child.stderr?.on("data", (c: Buffer) => (output += c.toString()));
    let exited = false;
    const exit = new Promise<void>((resolve) => {
      child.once("exit", () => ((exited = true), resolve()));
      // A binary that cannot be run never gets an 'exit'.
      child.once("error", (err) => ((output += `cannot run ${binary}: ${err.message}`), (exited = true), resolve()));
    });
    // If the test process dies some other way, haproxy must not outlive it.
    const killOnExit = () => child.kill("SIGKILL");
    process.once("exit", killOnExit);
    const stop = async () => {
      process.off("exit", killOnExit);
      if (!exited) {
        child.kill("SIGTERM");
        try {
          await within(exit, 3000, "haproxy to exit on SIGTERM");
        } catch {
          child.kill("SIGKILL");
          await within(exit, 3000, "haproxy to exit on SIGKILL");
        }
      }
    };
    const deadline = performance.now() + 10_000;
    let ready = false;
    while (!exited && !ready && performance.now() < deadline) {
      try {
        ready = /^natproxy,FRONTEND,.*,OPEN,/m.test(await statsCommand(stats, "show stat"));
      } catch {
        // Not listening on its stats socket yet.
      }
      if (!ready) await Promise.race([exit, new Promise((r) => setTimeout(r, 20))]);
    }
    if (ready) {
      return {
        port,
        servers: () => serverStates(stats),
        output: () => output,
        async stop() {
          await stop();
          rmSync(dir, { recursive: true, force: true });
        },
      };
    }
    await stop();
    lastFailure = exited ? `haproxy exited:\n${output}` : `haproxy did not open its frontend within 10 s:\n${output}`;
    if (!/cannot bind|Address already in use/i.test(output)) break;
  }
  rmSync(dir, { recursive: true, force: true });
  throw new Error(lastFailure);
}

/** GET /v1/hello through `port`, from `localAddress`: what the coordinator says the caller is. */
function hello(port: number, pki: TestPki, localAddress: string): Promise<{ client: { host: string; port: number }; localPort: number }> {
  return new Promise((resolve, reject) => {
    const req = https.get(
      { host: "127.0.0.1", port, localAddress, path: "/v1/hello", servername: "localhost", ca: pki.ca.cert, agent: false, headers: { Authorization: `Bearer ${TOKEN}` } },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () => {
          try {
            assert.equal(res.statusCode, 200);
            resolve({ client: JSON.parse(Buffer.concat(chunks).toString()).client, localPort: res.socket.localPort ?? 0 });
          } catch (err) {
            reject(err);
          }
        });
      },
    );
    req.on("error", reject);
  });
}

const REQUESTS = 40;

/**
 * REQUESTS browser requests at once through a local proxy: half HTTPS through
 * CONNECT (bodies checked by hash), half plain HTTP (the echo checked).
 * Resolves with how many came back right; fails on the first wrong one.
 */
async function browse(local: Local, web: Target, secure: Target, pki: TestPki, tag: string): Promise<number> {
  const proxy = local.proxyAddress.port;
  const results = await Promise.all(
    Array.from({ length: REQUESTS }, async (_, i) => {
      if (i % 2 === 0) {
        const size = 1000 + i * 997;
        const r = await httpsThrough(proxy, "localhost", secure.port, `/bytes/${size}`, pki.ca.cert);
        assert.equal(r.status, 200, `${tag} #${i}: HTTPS status`);
        assert.equal(r.sha256, expectedSha256(size), `${tag} #${i}: HTTPS body`);
      } else {
        const url = `http://127.0.0.1:${web.port}/${tag}/${i}`;
        const r = await proxiedRequest(proxy, url, { headers: { Connection: "close" } });
        assert.equal(r.status, 200, `${tag} #${i}: HTTP status ${r.status} ${r.body.toString().slice(0, 200)}`);
        assert.equal(JSON.parse(r.body.toString()).url, `/${tag}/${i}`, `${tag} #${i}: HTTP body`);
      }
      return true;
    }),
  );
  return results.filter(Boolean).length;
}

describe("two coordinators behind HAProxy (mode tcp, send-proxy-v2), sharing nothing", { skip: SKIP }, () => {
  let pki: TestPki;
  let web: Target;
  let secure: Target;
  let reporter: ReporterHandle;
  const coordinators: Coordinator[] = [];
  let haproxy: Haproxy;
  const locals = new Map<"connect-back" | "outbound", Local>();
  let logs: ReturnType<typeof captureLogs>;

  before(async () => {
    if (HAPROXY === undefined) assert.fail(`${MISSING}. CI must have it to check coordinators behind a load balancer.`);
    logs = captureLogs("coordinator");
    pki = await testPki();
    web = await startHttpTarget();
    secure = await startHttpsTarget(pki);
    reporter = await startReporter(resolveConfig({ reporter: { listen: "127.0.0.1:0" } }, "reporter").reporter);
    for (let i = 0; i < 2; i++) coordinators.push(await startTestCoordinator(pki, { proxy_protocol: true, handshake_timeout: 2000, fin_timeout: 1000 }));
    haproxy = await startHaproxy(HAPROXY, coordinators.map((c) => c.addresses[0].port));
    for (const tunnel of ["connect-back", "outbound"] as const)
      locals.set(tunnel, await startLocalFor(haproxy.port, reporter.addresses[0].port, pki, { coordinator: `https://127.0.0.1:${haproxy.port}`, tunnel, fin_timeout: 1000, pool_idle_timeout: 300 }));
  });
  after(async () => {
    logs?.restore();
    for (const l of locals.values()) await l.close();
    await haproxy?.stop();
    for (const c of coordinators) await c.close();
    await reporter?.close();
    await web?.close();
    await secure?.close();
  });

  test("the coordinator sees the caller's address from the PROXY header, not the balancer's", async () => {
    // Two connections, so round robin gives one to each coordinator.
    for (const from of ["127.0.0.5", "127.0.0.6"]) {
      const { client, localPort } = await hello(haproxy.port, pki, from);
      assert.deepEqual(client, { host: from, port: localPort });
    }
  });

  for (const tunnel of ["connect-back", "outbound"] as const) {
    test(`${tunnel}: ${REQUESTS} requests through the balancer all succeed, and both coordinators carry them`, { timeout: 60_000 }, async () => {
      const local = locals.get(tunnel)!;
      assert.equal(local.path(), tunnel);
      const served = coordinators.map((c) => c.sessionsServed());
      const linesBefore = logs.sessions().length;
      const started = performance.now();
      assert.equal(await browse(local, web, secure, pki, tunnel), REQUESTS);
      const ms = performance.now() - started;
      const delta = coordinators.map((c, i) => c.sessionsServed() - served[i]);
      console.log(`# ${tunnel}: ${REQUESTS} requests in ${ms.toFixed(0)} ms; sessions per coordinator ${delta.join(" + ")}`);
      // Every CONNECT has a tunnel of its own; plain HTTP requests may share
      // one the local proxy keeps for the same target.
      const sessions = delta[0] + delta[1];
      assert.ok(sessions >= REQUESTS / 2 && sessions <= REQUESTS, `${sessions} sessions for ${REQUESTS} requests`);
      assert.ok(delta.every((d) => d > 0), `both coordinators served sessions: ${delta.join(" + ")}`);
      // The request log names the real caller (127.0.0.1, the local proxy),
      // never the balancer's own address; on connect-back that is also what
      // the same-ip rule let through. Shared tunnels log once idle (pool_idle_timeout).
      await waitUntil(() => logs.sessions().length - linesBefore >= sessions, 10_000, `${sessions} session lines`);
      const lines = logs.sessions().slice(linesBefore);
      assert.ok(lines.every((l) => l.includes(`path=${tunnel}`) && /client=127\.0\.0\.1:\d+ /.test(l) && /outcome=ok /.test(l)), lines.find((l) => !/outcome=ok /.test(l) || !/client=127\.0\.0\.1:/.test(l)));
      assert.ok(!logs.lines.some((l) => l.includes(BALANCER_SOURCE) || l.includes("FORBIDDEN")), logs.lines.find((l) => l.includes(BALANCER_SOURCE) || l.includes("FORBIDDEN")));
    });
  }

  test("a connection straight to a coordinator without a PROXY header is dropped before TLS; one with a header is served", async () => {
    const [c1] = coordinators;
    const port = c1.addresses[0].port;
    const direct = tls.connect({ host: "127.0.0.1", port, ca: [pki.ca.cert], servername: "localhost" });
    const outcome = await within(
      new Promise<string>((resolve) => {
        direct.once("secureConnect", () => resolve("handshake completed"));
        direct.once("error", (err: NodeJS.ErrnoException) => resolve(`error ${err.code}`));
        direct.once("close", () => resolve("closed"));
      }),
      5000,
      "the direct connection to end",
    );
    direct.destroy();
    assert.match(outcome, /^(error|closed)/);
    assert.ok(logs.lines.some((l) => l.includes("a TLS handshake without a PROXY protocol header")), "the drop is logged with its reason");
    // The coordinator is still up, and a hand-written v1 header works as well as HAProxy's v2.
    const raw = net.connect({ host: "127.0.0.1", port });
    await once(raw, "connect");
    raw.write("PROXY TCP4 198.51.100.7 203.0.113.1 4242 8443\r\n");
    const secureSocket = tls.connect({ socket: raw, ca: [pki.ca.cert], servername: "localhost" });
    await once(secureSocket, "secureConnect");
    secureSocket.end(`GET /v1/hello HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${TOKEN}\r\nConnection: close\r\n\r\n`);
    const chunks: Buffer[] = [];
    secureSocket.on("data", (c: Buffer) => chunks.push(c));
    await once(secureSocket, "close");
    const answer = Buffer.concat(chunks).toString();
    assert.match(answer, /^HTTP\/1\.1 200 /);
    assert.match(answer, /"client":\{"host":"198\.51\.100\.7","port":4242\}/);
  });

  test("with one coordinator stopped, the balancer's check takes it out and every new session goes to the other", { timeout: 60_000 }, async () => {
    const [c1, c2] = coordinators;
    assert.deepEqual([...(await haproxy.servers()).values()].map((s) => s.split(" ")[0]), ["UP", "UP"]);
    const stopped = performance.now();
    await c2.close();
    const deadline = performance.now() + 5000;
    while ((await haproxy.servers()).get("c2")?.startsWith("DOWN") !== true) {
      assert.ok(performance.now() < deadline, `HAProxy still has c2 as ${(await haproxy.servers()).get("c2")} 5 s after it stopped:\n${haproxy.output()}`);
      await new Promise((r) => setTimeout(r, 20));
    }
    const down = performance.now() - stopped;
    const before = [c1.sessionsServed(), c2.sessionsServed()];
    for (const [tunnel, local] of locals) assert.equal(await browse(local, web, secure, pki, `${tunnel}-failover`), REQUESTS, tunnel);
    console.log(`# failover: c2 marked DOWN ${down.toFixed(0)} ms after it stopped (check inter ${CHECK_INTER} ms, fall 2); ${c1.sessionsServed() - before[0]} sessions on c1`);
    assert.ok(c1.sessionsServed() - before[0] >= REQUESTS, "at least every CONNECT of both local proxies on c1");
    assert.equal(c2.sessionsServed(), before[1]);
    assert.equal((await haproxy.servers()).get("c1")?.split(" ")[0], "UP");
  });
});
