import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { once } from "node:events";
import net from "node:net";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";
import { startLocalFor, startStack, type Stack } from "../scripts/lib/stack.ts";
import { expectedSha256, startHttpsTarget, startHttpTarget, type Target } from "../scripts/lib/targets.ts";
import type { Local } from "../src/local/index.ts";
import { captureLogs } from "./helpers/logs.ts";
import { waitUntil } from "./helpers/wait.ts";

// SOCKS5 on the HTTP proxy's port, driven by curl (--socks5-hostname, so
// names are resolved at the coordinator) and by raw sockets for what curl
// never sends.

const run = promisify(execFile);

async function curl(args: string[]): Promise<{ code: number; out: string; body: Buffer; err: string }> {
  try {
    const r = await run("curl", ["-sS", "--max-time", "20", ...args], { encoding: "buffer", maxBuffer: 64 << 20 });
    return { code: 0, out: r.stdout.toString("utf8"), body: r.stdout, err: r.stderr.toString() };
  } catch (e) {
    const x = e as { code: number; stdout: Buffer; stderr: Buffer };
    return { code: x.code, out: x.stdout.toString(), body: x.stdout, err: x.stderr.toString() };
  }
}

/** Waits for the session line: it is written once both directions have closed, which may be after curl exits. */
const sessionLine = (logs: ReturnType<typeof captureLogs>, ...parts: string[]) =>
  waitUntil(() => logs.sessions().some((l) => parts.every((p) => l.includes(p))), 5000, `a session line with ${parts.join(" ")}`);

/** Sends `bytes` on a raw connection, then collects everything until the proxy closes. */
async function raw(port: number, bytes: Buffer[]): Promise<Buffer> {
  const s = net.connect(port, "127.0.0.1");
  s.on("error", () => {});
  await once(s, "connect");
  for (const b of bytes) s.write(b);
  const got: Buffer[] = [];
  s.on("data", (c: Buffer) => got.push(c));
  await once(s, "close");
  return Buffer.concat(got);
}

describe("SOCKS5 on the proxy port", () => {
  let stack: Stack;
  let web: Target;
  let web6: Target;
  let secure: Target;
  let logs: ReturnType<typeof captureLogs>;
  before(async () => {
    // Not optimistic, so a failed target is answered with its reply code (an
    // optimistic success is already out when the target fails: a reset, as for CONNECT).
    stack = await startStack({ local: { handshake_timeout: 800, optimistic_connect: false } });
    web = await startHttpTarget();
    web6 = await startHttpTarget("::1");
    secure = await startHttpsTarget(stack.pki);
    logs = captureLogs("local");
  });
  after(async () => {
    logs.restore();
    await Promise.all([web.close(), web6.close(), secure.close()]);
    await stack.close();
  });
  const proxy = () => ["--socks5-hostname", `127.0.0.1:${stack.proxyPort}`];

  test("HTTP to an IPv4 target, with a SHA-256-checked body", async () => {
    const r = await curl([...proxy(), `http://127.0.0.1:${web.port}/bytes/1000000`]);
    assert.equal(r.code, 0, r.err);
    assert.equal(createHash("sha256").update(r.body).digest("hex"), expectedSha256(1000000));
    await sessionLine(logs, `target=127.0.0.1:${web.port}`, "kind=socks5", "outcome=ok");
  });

  test("HTTPS to a name, resolved at the coordinator", async () => {
    const r = await curl([...proxy(), "--cacert", stack.pki.caFile, `https://localhost:${secure.port}/echo`]);
    assert.equal(r.code, 0, r.err);
    assert.equal(JSON.parse(r.out).url, "/echo");
    await sessionLine(logs, `target=localhost:${secure.port}`, "kind=socks5");
  });

  test("HTTP to an IPv6 target", async () => {
    const r = await curl([...proxy(), `http://[::1]:${web6.port}/six`]);
    assert.equal(r.code, 0, r.err);
    assert.equal(JSON.parse(r.out).url, "/six");
    await sessionLine(logs, `target=[::1]:${web6.port}`, "kind=socks5");
  });

  test("a refused target answers 0x05, a forbidden one 0x02", async () => {
    const closed = net.createServer();
    closed.listen(0, "127.0.0.1");
    await once(closed, "listening");
    const port = (closed.address() as net.AddressInfo).port;
    closed.close();
    const req = (a: number[], p: number) => Buffer.from([5, 1, 0, ...a, p >> 8, p & 255]);
    const refused = await raw(stack.proxyPort, [Buffer.from([5, 1, 0]), req([1, 127, 0, 0, 1], port)]);
    assert.deepEqual([...refused.subarray(0, 4)], [5, 0, 5, 5]);
    // 10.0.0.1 is outside the test coordinator's allow_targets: refused there, never dialled.
    const forbidden = await raw(stack.proxyPort, [Buffer.from([5, 1, 0]), req([1, 10, 0, 0, 1], 80)]);
    assert.deepEqual([...forbidden.subarray(0, 4)], [5, 0, 5, 2]);
  });

  test("BIND and UDP ASSOCIATE are refused with 0x07, an unknown address type with 0x08", async () => {
    for (const cmd of [2, 3]) {
      const got = await raw(stack.proxyPort, [Buffer.from([5, 1, 0, 5, cmd, 0, 1, 127, 0, 0, 1, 0, 80])]);
      assert.deepEqual([...got], [5, 0, 5, 7, 0, 1, 0, 0, 0, 0, 0, 0]);
    }
    const got = await raw(stack.proxyPort, [Buffer.from([5, 1, 0, 5, 1, 0, 9, 1, 2, 3, 4, 0, 80])]);
    assert.deepEqual([...got.subarray(0, 4)], [5, 0, 5, 8]);
  });

  test("garbage after 0x05 is closed at once, not left hanging", async () => {
    const started = performance.now();
    const got = await raw(stack.proxyPort, [Buffer.from([5, 0, 0xde, 0xad])]);
    assert.ok(performance.now() - started < 700, "closed before the handshake deadline");
    assert.equal(got.length, 0);
    const noAuth = await raw(stack.proxyPort, [Buffer.from([5, 1, 0x02])]);
    assert.deepEqual([...noAuth], [5, 0xff]);
  });

  test("a greeting that trickles in is closed at handshake_timeout", async () => {
    const s = net.connect(stack.proxyPort, "127.0.0.1");
    await once(s, "connect");
    const started = performance.now();
    s.write(Buffer.from([5]));
    // Each byte re-arms an idle timeout; the deadline must not move.
    const drip = setInterval(() => s.writable && s.write(Buffer.from([3])), 200);
    s.resume();
    await once(s, "close");
    clearInterval(drip);
    const ms = performance.now() - started;
    assert.ok(ms > 600 && ms < 2000, `closed after ${ms} ms`);
  });

  test("HTTP on the same port still works", async () => {
    const r = await curl(["--proxy", `http://127.0.0.1:${stack.proxyPort}`, `http://127.0.0.1:${web.port}/plain`]);
    assert.equal(r.code, 0, r.err);
    assert.equal(JSON.parse(r.out).url, "/plain");
  });
});

describe("SOCKS5 with [local] users", () => {
  let stack: Stack;
  let local: Local;
  let web: Target;
  before(async () => {
    stack = await startStack();
    local = await startLocalFor(stack.coordinator.addresses[0].port, stack.reporter.addresses[0].port, stack.pki, { users: ["ann:s3cret"] });
    web = await startHttpTarget();
  });
  after(async () => {
    await web.close();
    await local.close();
    await stack.close();
  });
  const proxy = () => ["--socks5-hostname", `127.0.0.1:${local.proxyAddress.port}`];

  test("the right password gets through", async () => {
    const r = await curl([...proxy(), "--proxy-user", "ann:s3cret", `http://127.0.0.1:${web.port}/auth`]);
    assert.equal(r.code, 0, r.err);
    assert.equal(JSON.parse(r.out).url, "/auth");
  });

  test("a wrong password, or none, is refused", async () => {
    const wrong = await curl([...proxy(), "--proxy-user", "ann:nope", `http://127.0.0.1:${web.port}/auth`]);
    assert.notEqual(wrong.code, 0);
    const none = await curl([...proxy(), `http://127.0.0.1:${web.port}/auth`]);
    assert.notEqual(none.code, 0);
    const got = await raw(local.proxyAddress.port, [Buffer.from([5, 1, 2, 1, 3, 97, 110, 110, 2, 110, 111])]);
    assert.deepEqual([...got], [5, 2, 1, 1]);
  });
});
