import assert from "node:assert/strict";
import { existsSync, readdirSync, rmSync } from "node:fs";
import type { AddressInfo } from "node:net";
import net from "node:net";
import tls from "node:tls";
import { after, before, test } from "node:test";
import { getAttribute, MAGIC_COOKIE, messageType, METHOD_BINDING, decodeMessage as decodeStun } from "../../src/stun.ts";
import { StunFramer } from "../../src/stun-framer.ts";
import { testPki } from "../../scripts/lib/pki.ts";
import { freePort } from "../../scripts/lib/ports.ts";
import { httpsThrough, proxiedRequest } from "../../scripts/lib/proxy-client.ts";
import { startStack, TOKEN, type Stack } from "../../scripts/lib/stack.ts";
import { startHttpsTarget, startHttpTarget, type Target } from "../../scripts/lib/targets.ts";
import { waitUntil } from "../helpers/wait.ts";
import { CASES, ONLY, SEED, talk } from "./harness.ts";

// The stack under fuzz: all three roles in this process with small timeouts,
// the targets they may reach, a canary they must never reach, and the checks
// that every role survived and gave back what it held. Each fuzz file starts
// its own (useFuzzStack) and ends with afterFuzzTests().

// Small timeouts so that a hang shows within the test's time.
export const T = {
  localConnect: 1500, // [local] connect_timeout: making one tunnel (connect-back and its Result)
  localHandshake: 1500, // [local] handshake_timeout: browser head deadline, tunnel-port hold
  coordHandshake: 1000, // [coordinator] handshake_timeout: TLS handshakes; also caps the header timeout
  coordRequest: 1500, // [coordinator] request_timeout
  coordKeepAlive: 1000, // [coordinator] keep_alive_timeout: idle API connections
  coordOpen: 1000, // [coordinator] open_timeout: an upgraded tunnel's wait for Open
  reporterHandshake: 1000, // [reporter] handshake_timeout
};

function fdCount(): number {
  return existsSync("/proc/self/fd") ? readdirSync("/proc/self/fd").length : 0;
}

export let stack: Stack;
export let web: Target;
export let secure: Target;
export let refused: number;
export let coordPort: number;
export let reporterPort: number;
export let tunnelPort: number;
export let tunnelSince: Date;
export let clientHello: Buffer;
/** A server that the coordinator's target policy must never let anyone reach. */
export let canary: { port: number; connections: () => number; close(): Promise<void> };
const warnings: string[] = [];
const onWarning = (w: Error) => warnings.push(`${w.name}: ${w.message}`);
export const processErrors: string[] = [];
const describeError = (err: unknown) => (err as Error)?.stack?.split("\n").slice(0, 3).join(" |") ?? String(err);
const onRejection = (err: unknown) => processErrors.push(`unhandled rejection: ${describeError(err)}`);
const onException = (err: unknown) => processErrors.push(`uncaught exception: ${describeError(err)}`);

/** Fails with the distinct errors among `errors`, if any. */
export function assertNoProcessErrors(errors: string[], what: string): void {
  const distinct = [...new Set(errors)];
  assert.equal(errors.length, 0, `${what}: ${errors.length} unhandled rejection(s) / uncaught exception(s) in a role:\n${distinct.slice(0, 3).join("\n")}`);
}
export let baseline: Counts;

/** Every IPv4 address except 127.0.0.1, as CIDRs, plus all of IPv6: the fuzz stack may dial 127.0.0.1 only. */
function everythingBut127001(): string[] {
  const ip = ((127 << 24) | 1) >>> 0;
  const out: string[] = [];
  for (let len = 1; len <= 32; len++) {
    const v = ((ip ^ (1 << (32 - len))) & (~0 << (32 - len))) >>> 0;
    out.push(`${v >>> 24}.${(v >>> 16) & 255}.${(v >>> 8) & 255}.${v & 255}/${len}`);
  }
  return [...out, "::/0"];
}

async function startCanary() {
  let connections = 0;
  const servers: net.Server[] = [];
  const sockets = new Set<net.Socket>();
  const track = (s: net.Socket) => {
    connections++;
    sockets.add(s);
    s.on("error", () => {});
    s.on("close", () => sockets.delete(s));
  };
  const v4 = net.createServer(track);
  await new Promise<void>((r) => v4.listen(0, "127.0.0.1", r));
  servers.push(v4);
  const port = (v4.address() as AddressInfo).port;
  // The same port on ::1 where the machine has IPv6, so "[::1]:port" is watched too.
  const v6 = net.createServer(track);
  await new Promise<void>((r) => {
    v6.once("error", () => r());
    v6.listen(port, "::1", () => {
      servers.push(v6);
      r();
    });
  });
  return {
    port,
    connections: () => connections,
    close: async () => {
      for (const s of sockets) s.destroy();
      await Promise.all(servers.map((s) => new Promise<void>((r) => s.close(() => r()))));
    },
  };
}

/** The first flight of a real TLS client, to mutate and to cut short. */
async function captureClientHello(): Promise<Buffer> {
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const got = new Promise<Buffer>((resolve) => server.once("connection", (s) => s.once("data", (d: Buffer) => (resolve(d), s.destroy()))));
  const c = tls.connect({ host: "127.0.0.1", port: (server.address() as AddressInfo).port, servername: "localhost" });
  c.on("error", () => {});
  const hello = await got;
  c.destroy();
  server.close();
  return hello;
}

/** Starts the stack before the file's tests and closes it after them. */
export function useFuzzStack(): void {
  before(async () => {
    process.on("warning", onWarning);
    // The test runner reports these too, but against whichever test happens to
    // be running; counting them lets each fuzz test claim its own.
    process.on("unhandledRejection", onRejection);
    process.on("uncaughtExceptionMonitor", onException);
    web = await startHttpTarget();
    refused = await freePort();
    canary = await startCanary();
    secure = await startHttpsTarget(await testPki());
    stack = await startStack({
      local: { tunnel: "connect-back", connect_timeout: T.localConnect, handshake_timeout: T.localHandshake, fin_timeout: 500, pool_idle_timeout: 300 },
      coordinator: {
        handshake_timeout: T.coordHandshake,
        request_timeout: T.coordRequest,
        keep_alive_timeout: T.coordKeepAlive,
        open_timeout: T.coordOpen,
        connect_timeout: 1000,
        fin_timeout: 500,
        // Only the test's own targets; the canary and every other address are refused.
        allow_targets: [`127.0.0.1:${web.port}`, `127.0.0.1:${secure.port}`, `127.0.0.1:${refused}`],
        deny_targets: everythingBut127001(),
      },
      reporter: { handshake_timeout: T.reporterHandshake },
    });
    coordPort = stack.coordinator.addresses[0].port;
    reporterPort = stack.reporter.addresses[0].port;
    const state = stack.local.mapping();
    assert.ok(state, "the tunnel service is up");
    tunnelPort = state.localPort;
    tunnelSince = state.since;
    clientHello = await captureClientHello();
    // Quiescent state: the start-up API calls and the probe are done.
    await waitUntil(() => stack.local.liveSockets() === 0 && stack.coordinator.liveSockets() <= 1, 5000, "quiescent start");
    baseline = counts();
  });

  after(async () => {
    process.off("warning", onWarning);
    process.off("unhandledRejection", onRejection);
    process.off("uncaughtExceptionMonitor", onException);
    await stack?.close();
    await web?.close();
    await secure?.close();
    await canary?.close();
    if (stack) rmSync(stack.pki.dir, { recursive: true, force: true });
  });
}

export interface Counts {
  local: number;
  coordinator: number;
  pending: number;
  fds: number;
  /** Unhandled rejections and uncaught exceptions so far (a role's bug, whatever the test saw). */
  errors: number;
}

export function counts(): Counts {
  return { local: stack.local.liveSockets(), coordinator: stack.coordinator.liveSockets(), pending: stack.local.pendingSessions(), fds: fdCount(), errors: processErrors.length };
}

/** Waits (bounded) until the roles hold no more sockets than at `start` (the coordinator may keep one idle API connection). */
export async function settled(start: Counts, ms = 4000): Promise<string | undefined> {
  const ok = (n: Counts) => n.local <= start.local && n.coordinator <= start.coordinator + 1 && n.pending === 0 && n.fds <= start.fds + 4;
  try {
    await waitUntil(() => ok(counts()), ms);
    return undefined;
  } catch {
    return `not back to ${JSON.stringify(start)} within ${ms} ms (coordinator +1, fds +4 allowed): now ${JSON.stringify(counts())}`;
  }
}

export async function finishFuzz(t: { diagnostic(msg: string): void }, tag: string, r: { ran: number; failures: string[]; ms: number }, stats: Map<string, number>, start: Counts): Promise<void> {
  t.diagnostic(`${tag}: ${r.ran} cases in ${r.ms} ms, seed ${SEED}; answers ${[...stats].sort().map(([k, v]) => `${k}:${v}`).join(" ")}`);
  const leak = await settled(start);
  if (!ONLY) assert.ok(r.ran >= Math.min(CASES, 50), `${tag}: only ${r.ran} cases ran within the time budget`);
  assert.equal(r.failures.length, 0, `seed ${SEED}: ${r.failures.length} ${tag} case(s) misbehaved (replay one with FUZZ_SEED=${SEED} FUZZ_ONLY=<tag>#<i>):\n${r.failures.slice(0, 8).join("\n")}`);
  assertNoProcessErrors(processErrors.slice(start.errors), `the ${tag} cases`);
  assert.equal(leak, undefined, `after the ${tag} cases, sockets ${leak}`);
}

export const coordinatorTls = () => tls.connect({ host: "127.0.0.1", port: coordPort, servername: "localhost", ca: stack.pki.ca.cert });
export const AUTH_RE = new RegExp(`\\nauthorization: *bearer +${TOKEN}[ \\t]*\\r?\\n`, "i");
export const upgradeHead = (extra = `Authorization: Bearer ${TOKEN}\r\n`) => `GET /v1/tunnel HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: natproxy-tunnel/1\r\n${extra}\r\n`;

/** The two checks that end every fuzz file: every role still serves, and gave back what it held. */
export function afterFuzzTests(): void {
  test("after the fuzzing every role is alive and still serving", async () => {
    const get = await proxiedRequest(stack.proxyPort, `http://127.0.0.1:${web.port}/after-fuzz`, { headers: { Connection: "close" } });
    assert.equal(get.status, 200, "a proxied HTTP GET");
    assert.equal(JSON.parse(get.body.toString()).url, "/after-fuzz");
    const https = await httpsThrough(stack.proxyPort, "localhost", secure.port, "/after-fuzz-tls", stack.pki.ca.cert);
    assert.equal(https.status, 200, "an HTTPS GET through CONNECT");
    assert.equal(JSON.parse(https.body.toString()).url, "/after-fuzz-tls");
    await assertReporterAnswers();
    const hello = await talk(coordinatorTls(), "secureConnect", [Buffer.from(`GET /v1/hello HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${TOKEN}\r\nConnection: close\r\n\r\n`)]);
    assert.match(hello.data.toString(), /^HTTP\/1\.1 200 [\s\S]*"software":"natproxy"/, "the coordinator's API answers");
    const state = stack.local.mapping();
    assert.ok(state, "the tunnel service is still up");
    assert.equal(state.localPort, tunnelPort);
    assert.equal(state.since, tunnelSince, "the tunnel service did not restart during the fuzzing");
    assert.equal(stack.local.path(), "connect-back");
    assert.equal(canary.connections(), 0, "nothing reached the canary");
    assert.deepEqual(warnings, [], "process warnings (e.g. MaxListenersExceeded: a listener leak)");
    assertNoProcessErrors(processErrors, "during the fuzzing");
  });

  test("after the fuzzing, sockets, sessions and descriptors return to the baseline", async () => {
    assert.equal(await settled(baseline), undefined, "the baseline taken before the fuzzing");
  });
}

export async function assertReporterAnswers(): Promise<void> {
  const tid = Buffer.from("fuzz-check-1");
  const socket = net.connect(reporterPort, "127.0.0.1");
  let localPort = 0;
  const x = await new Promise<Buffer>((resolve, reject) => {
    const framer = new StunFramer();
    const timer = setTimeout(() => reject(new Error("the reporter did not answer a Binding request within 3 s")), 3000);
    socket.on("error", reject);
    socket.once("connect", () => {
      localPort = socket.localPort ?? 0;
      socket.write(stunHeader0(tid));
    });
    socket.on("data", (c: Buffer) => {
      const frames = framer.push(c);
      if (frames.length) {
        clearTimeout(timer);
        resolve(frames[0]);
      }
    });
  }).finally(() => socket.destroy());
  const msg = decodeStun(x);
  assert.equal(msg.class, "success");
  assert.ok(msg.transactionId.equals(tid));
  assert.equal(getAttribute(msg, "XOR-MAPPED-ADDRESS")?.address.port, localPort);
}

export function stunHeader0(tid: Buffer): Buffer {
  const h = Buffer.alloc(20);
  h.writeUInt16BE(messageType(METHOD_BINDING, "request"), 0);
  h.writeUInt32BE(MAGIC_COOKIE, 4);
  tid.copy(h, 8);
  return h;
}
