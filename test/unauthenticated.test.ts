import assert from "node:assert/strict";
import { once } from "node:events";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import https from "node:https";
import net from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { before, describe, test } from "node:test";
import tls from "node:tls";
import { startProc, type Proc } from "../scripts/lib/proc.ts";
import { sourceOf } from "../src/coordinator/admission.ts";
import { testPki, type TestPki } from "../scripts/lib/pki.ts";
import { startTestCoordinator, TOKEN } from "../scripts/lib/stack.ts";

// What one source address can hold on the coordinator's HTTPS port without a
// token: an unauthenticated answer ends its connection, the connections not
// yet authenticated are capped per source address (the PROXY header's caller
// behind a balancer), and a token holder coming from another address is
// served meanwhile. The flood runs against the packaged binary as its own
// process under a small descriptor limit; the rest in-process.

const BINARY = resolve(import.meta.dirname, "..", "dist", "natproxy");
const missing = !existsSync(BINARY);
if (missing && process.env.CI) throw new Error(`${BINARY} is missing: npm test builds it first (node scripts/build.ts)`);
const skip = missing ? `${BINARY} not built; run npm run build` : false;

/** The descriptor limit the attack run used. */
const FD_LIMIT = 600;
/** `[coordinator] max_unauthenticated_per_ip` as the attack run is measured with (the default, 1024, leaves room for several local proxies behind one NAT). */
const CAP = 256;
/** Half of the flood stops after TCP; the other half completes TLS and keeps asking without a token. */
const FLOOD = 2000;
/** Descriptors a coordinator may hold beyond its idle count and the cap: the token holder's connection, a socket being refused. */
const SLACK = 8;
const ATTACKER = "127.0.0.1";
const HOLDER = "127.0.0.2";

function rssMb(pid: number): number {
  return Math.round(Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1] ?? 0) / 1024);
}

function fdCount(pid: number): number {
  return readdirSync(`/proc/${pid}/fd`).length;
}

/** Starts the binary's coordinator under `ulimit -n limit`; resolves with its port and process, and how to stop it. */
async function coordinator(pki: TestPki, limit: number, toml = ""): Promise<{ proc: Proc; port: number; pid: number; stop(): Promise<void> }> {
  const dir = mkdtempSync(join(tmpdir(), "natproxy-unauth-"));
  const cfg = join(dir, "coordinator.toml");
  writeFileSync(cfg, `[coordinator]\n${toml.includes("max_unauthenticated_per_ip") ? "" : `max_unauthenticated_per_ip = ${CAP}\n`}${toml}`);
  const proc = startProc("bash", ["-c", `ulimit -n ${limit} && exec "$0" "$@"`, BINARY, "coordinator", "-c", cfg, "--listen", "127.0.0.1:0", "--cert", pki.combinedFile, "--token", TOKEN], {
    PATH: "/usr/bin:/bin",
    HOME: dir,
  });
  const stop = async () => {
    await proc.stop();
    rmSync(dir, { recursive: true, force: true });
  };
  const m = await proc.waitFor(/HTTPS API listening on 127\.0\.0\.1:(\d+)/, 15_000).catch(async (err: Error) => {
    await stop();
    throw err;
  });
  return { proc, port: Number(m[1]), pid: proc.child.pid as number, stop };
}

/** GET /v1/hello with the token from `localAddress`; its status and how long it took, or status 0 if no answer came within `ms`. */
function tokenHolder(port: number, pki: TestPki, ms: number): Promise<{ status: number; ms: number }> {
  const t0 = performance.now();
  return new Promise((resolve) => {
    const req = https.get(
      { host: "127.0.0.1", port, path: "/v1/hello", localAddress: HOLDER, ca: [pki.ca.cert], servername: "localhost", agent: false, headers: { Authorization: `Bearer ${TOKEN}` }, timeout: ms },
      (res) => {
        res.resume();
        res.on("end", () => resolve({ status: res.statusCode ?? 0, ms: performance.now() - t0 }));
      },
    );
    req.on("timeout", () => req.destroy(new Error("timeout")));
    req.on("error", () => resolve({ status: 0, ms: performance.now() - t0 }));
  });
}

interface Attacker {
  socket: net.Socket;
  closed: boolean;
  /** Resolves once the connection is up (raw), has its first answer (TLS), or is gone. */
  settled: Promise<void>;
}

/**
 * One attacking connection from ATTACKER: `raw` ones connect and send
 * nothing; the others finish TLS, send a request without a token, and send
 * another one every 500 ms after each answer, the way a peer renews a
 * keep-alive connection for ever.
 */
function attack(port: number, raw: boolean): Attacker {
  const tcp = net.connect({ host: "127.0.0.1", port, localAddress: ATTACKER });
  tcp.on("error", () => {});
  const socket = raw ? tcp : tls.connect({ socket: tcp, rejectUnauthorized: false, servername: "localhost" });
  const a: Attacker = { socket, closed: false, settled: Promise.resolve() };
  socket.on("error", () => {});
  a.settled = new Promise<void>((settle) => {
    socket.once("close", () => {
      a.closed = true;
      settle();
    });
    if (raw) {
      socket.once("connect", () => settle());
      socket.resume();
      return;
    }
    const ask = () => {
      if (!socket.destroyed) socket.write(`GET /v1/hello HTTP/1.1\r\nHost: coordinator\r\n\r\n`);
    };
    socket.once("secureConnect", ask);
    socket.on("data", () => {
      settle();
      setTimeout(ask, 500).unref();
    });
  });
  return a;
}

describe("the coordinator's HTTPS port, flooded without a token (packaged binary)", { skip }, () => {
  let pki: TestPki;
  before(async () => {
    pki = await testPki();
  });

  test(`${FLOOD} connections from one address: the coordinator holds at most ${CAP}, and a token holder from another address is served within a second`, async () => {
    const c = await coordinator(pki, FD_LIMIT);
    const flood: Attacker[] = [];
    try {
      const idle = fdCount(c.pid);
      const idleRss = rssMb(c.pid);
      let peak = idle;
      const sampler = setInterval(() => (peak = Math.max(peak, fdCount(c.pid))), 20);
      try {
        for (let i = 0; i < FLOOD; i++) flood.push(attack(c.port, i % 2 === 0));
        const all = Promise.all(flood.map((a) => a.settled));
        const bounded = new Promise((r) => setTimeout(r, 15_000).unref());
        await Promise.race([all, bounded]);
        const holder = await tokenHolder(c.port, pki, 5000);
        peak = Math.max(peak, fdCount(c.pid));
        // As the attacker sees it; some it thinks open may not be accepted yet
        // (a full accept queue drops the handshake's last ACK): the
        // coordinator's descriptors are what counts.
        const held = flood.filter((a) => !a.closed).length;
        console.log(`flood of ${FLOOD}: ${held} open as the attacker sees them; coordinator descriptors ${idle} idle, ${peak} at the peak; RSS ${idleRss} -> ${rssMb(c.pid)} MB; token holder: ${holder.status || "no answer"} after ${Math.round(holder.ms)} ms`);
        assert.equal(holder.status, 200, `the token holder got ${holder.status === 0 ? "no answer" : holder.status} in ${Math.round(holder.ms)} ms; the coordinator holds ${fdCount(c.pid)} descriptors`);
        assert.ok(holder.ms < 1000, `the token holder's answer took ${Math.round(holder.ms)} ms`);
        assert.ok(peak <= idle + CAP + SLACK, `the coordinator held ${peak} descriptors at the peak (${idle} idle, cap ${CAP})`);
        assert.ok(peak >= idle + CAP / 2, `the flood reached the coordinator (${peak} descriptors at the peak, ${idle} idle)`);
      } finally {
        clearInterval(sampler);
      }
      // The cap is named once for the address, not once per refused connection.
      const lines = c.proc.output().split("\n").filter((l) => l.includes("max_unauthenticated_per_ip"));
      assert.equal(lines.length, 1, c.proc.output());
      assert.match(lines[0] ?? "", new RegExp(`${ATTACKER.replaceAll(".", "\\.")}.*${CAP}`));
    } finally {
      for (const a of flood) a.socket.destroy();
      await c.stop();
    }
  });

  test("every answer to a request without a valid token closes its connection: the API, an unmet Expect, an Upgrade", async () => {
    const c = await coordinator(pki, FD_LIMIT);
    try {
      const heads = [
        "GET /v1/hello HTTP/1.1\r\nHost: c\r\n\r\n",
        "POST /v1/sessions HTTP/1.1\r\nHost: c\r\nAuthorization: Bearer wrong-token-0123456789\r\nContent-Length: 2\r\n\r\n{}",
        "GET /nowhere HTTP/1.1\r\nHost: c\r\n\r\n",
        "POST /v1/probe HTTP/1.1\r\nHost: c\r\nExpect: something-else\r\nContent-Length: 2\r\n\r\n",
        "GET /v1/tunnel HTTP/1.1\r\nHost: c\r\nConnection: Upgrade\r\nUpgrade: natproxy-tunnel/1\r\n\r\n",
        "GET /elsewhere HTTP/1.1\r\nHost: c\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
      ];
      const problems: string[] = [];
      for (const head of heads) {
        const s = tls.connect({ host: "127.0.0.1", port: c.port, ca: [pki.ca.cert], servername: "localhost" });
        s.on("error", () => {});
        await once(s, "secureConnect");
        s.write(head);
        const chunks: Buffer[] = [];
        s.on("data", (d: Buffer) => chunks.push(d));
        // The coordinator's own close, well before any idle timer: the peer never closes.
        const closed = await Promise.race([once(s, "end").then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 3000))]);
        const answer = Buffer.concat(chunks).toString("latin1");
        s.destroy();
        const what = head.split("\r\n").slice(0, 4).join(" | ");
        if (!/^HTTP\/1\.1 401 /.test(answer)) problems.push(`${what}: answered ${answer.split("\r\n")[0]}`);
        else if (!/\r\nconnection: close\r\n/i.test(answer) || !closed) problems.push(`${what}: the connection stayed open after its 401 (${/\r\nconnection: [^\r]*/i.exec(answer)?.[0].trim()})`);
      }
      assert.deepEqual(problems, []);
    } finally {
      await c.stop();
    }
  });

  test("close to the descriptor limit, the coordinator says so in its log", async () => {
    // A cap above the limit, so the flood takes the descriptors.
    const c = await coordinator(pki, 100, "max_unauthenticated_per_ip = 10000\n");
    const flood: net.Socket[] = [];
    try {
      for (let i = 0; i < 150; i++) {
        const s = net.connect({ host: "127.0.0.1", port: c.port });
        s.on("error", () => {});
        flood.push(s);
      }
      await c.proc.waitFor(/file descriptors in use/, 5000);
      const line = c.proc.output().split("\n").find((l) => l.includes("file descriptors in use")) ?? "";
      assert.match(line, /of 100 /);
    } finally {
      for (const s of flood) s.destroy();
      await c.stop();
    }
  });
});

test("the cap counts IPv4 callers by address and IPv6 callers by /64", () => {
  assert.equal(sourceOf("198.51.100.7"), "198.51.100.7");
  assert.equal(sourceOf("2001:db8:1:2::1"), "2001:db8:1:2::/64");
  assert.equal(sourceOf("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::/64");
  assert.equal(sourceOf("2001:db8::1"), "2001:db8:0:0::/64");
  assert.equal(sourceOf("::1"), "0:0:0:0::/64");
  assert.equal(sourceOf("::ffff:1.2.3.4"), "0:0:0:0::/64");
  assert.notEqual(sourceOf("2001:db8:1:3::1"), sourceOf("2001:db8:1:2::1"));
});

test("behind a load balancer (proxy_protocol = true) the cap counts the caller each PROXY header names", async () => {
  const pki = await testPki();
  const coordinator = await startTestCoordinator(pki, { proxy_protocol: true, max_unauthenticated_per_ip: 3 });
  const port = coordinator.addresses[0].port;
  const opened: net.Socket[] = [];
  /** A connection from the balancer (127.0.0.1) for `caller`, its header sent; resolves with the socket once the header is read. */
  const forward = async (caller: string): Promise<net.Socket> => {
    const s = net.connect(port, "127.0.0.1");
    s.on("error", () => {});
    opened.push(s);
    await once(s, "connect");
    s.write(`PROXY TCP4 ${caller} 127.0.0.1 40000 8443\r\n`);
    return s;
  };
  const reset = (s: net.Socket) => new Promise<boolean>((r) => {
    s.once("error", (e: NodeJS.ErrnoException) => r(e.code === "ECONNRESET"));
    s.once("close", () => r(false));
    setTimeout(() => r(false), 3000);
  });
  try {
    // Three through their TLS handshake (so surely counted), and no request yet.
    for (let i = 0; i < 3; i++) {
      const held = tls.connect({ socket: await forward("198.51.100.7"), ca: [pki.ca.cert], servername: "localhost" });
      held.on("error", () => {});
      opened.push(held);
      await once(held, "secureConnect");
    }
    // The fourth from the same caller is reset; the balancer's other callers are not.
    const fourth = await forward("198.51.100.7");
    assert.equal(await reset(fourth), true, "the fourth connection for 198.51.100.7 was reset");
    const other = await forward("198.51.100.8");
    const secure = tls.connect({ socket: other, ca: [pki.ca.cert], servername: "localhost" });
    secure.on("error", () => {});
    await once(secure, "secureConnect");
    secure.write(`GET /v1/hello HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${TOKEN}\r\nConnection: close\r\n\r\n`);
    const [first] = (await once(secure, "data")) as [Buffer];
    assert.match(first.toString("latin1"), /^HTTP\/1\.1 200 /);
  } finally {
    for (const s of opened) s.destroy();
    await coordinator.close();
  }
});

test("a connection stops counting once it carries a valid token: kept-alive API connections leave the cap free", async () => {
  const pki = await testPki();
  const coordinator = await startTestCoordinator(pki, { max_unauthenticated_per_ip: 2 });
  const port = coordinator.addresses[0].port;
  const opened: tls.TLSSocket[] = [];
  const handshake = async (): Promise<tls.TLSSocket | undefined> => {
    const s = tls.connect({ host: "127.0.0.1", port, ca: [pki.ca.cert], servername: "localhost" });
    s.on("error", () => {});
    opened.push(s);
    const up = await new Promise<boolean>((r) => {
      s.once("secureConnect", () => r(true));
      s.once("close", () => r(false));
    });
    return up ? s : undefined;
  };
  try {
    for (let i = 0; i < 2; i++) {
      const s = await handshake();
      assert.ok(s, "within the cap");
      s.write(`GET /v1/hello HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${TOKEN}\r\n\r\n`);
      const [answer] = (await once(s, "data")) as [Buffer];
      assert.match(answer.toString("latin1"), /^HTTP\/1\.1 200 [^]*\r\nConnection: keep-alive\r\n/);
    }
    // Both are still open, and count no more: two unauthenticated ones fit, a third does not.
    assert.ok(await handshake());
    assert.ok(await handshake());
    assert.equal(await handshake(), undefined, "the third unauthenticated connection was reset");
    assert.equal(opened.slice(0, 2).filter((s) => s.destroyed).length, 0);
  } finally {
    for (const s of opened) s.destroy();
    await coordinator.close();
  }
});
