import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { once } from "node:events";
import https from "node:https";
import net from "node:net";
import { after, before, describe, test } from "node:test";
import tls from "node:tls";
import { decodeMessage, encodeOpen, resultOf } from "../src/protocol/wire.ts";
import { testPki, type TestPki } from "../scripts/lib/pki.ts";
import { startTestCoordinator, TOKEN } from "../scripts/lib/stack.ts";
import { startHttpTarget, type Target } from "../scripts/lib/targets.ts";

// What a token holder can keep waiting on the coordinator: probes and
// upgrades carrying part of an Open count among the waiting connections
// (max_sessions, max_sessions_per_token), and every partial message (PROXY
// header, HTTP head, Open) has a deadline from its start that trickling bytes
// does not move.

/** The limits of the attack run. */
const LIMIT = 10;
/** A deadline in these tests, and how late past it a connection may still be closed (timer scheduling; Node checks HTTP deadlines once a second). */
const DEADLINE = 1000;
const SLACK = 1250;
/** The trickle: one byte this often, far longer in all than DEADLINE. */
const TRICKLE_MS = 200;

let pki: TestPki;
let web: Target;
before(async () => {
  pki = await testPki();
  web = await startHttpTarget();
});
after(async () => web?.close());

const upgradeHead = `GET /v1/tunnel HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${TOKEN}\r\nConnection: Upgrade\r\nUpgrade: natproxy-tunnel/1\r\n\r\n`;

function secure(port: number, socket?: net.Socket): tls.TLSSocket {
  const s = tls.connect({ host: "127.0.0.1", port, socket, ca: [pki.ca.cert], servername: "localhost" });
  s.on("error", () => {});
  return s;
}

/** Sends `bytes` one at a time every TRICKLE_MS until they run out or the socket closes. */
function trickle(socket: net.Socket, bytes: Buffer): void {
  let i = 0;
  const timer = setInterval(() => {
    if (socket.destroyed || i >= bytes.length) clearInterval(timer);
    else socket.write(bytes.subarray(i, ++i));
  }, TRICKLE_MS);
  socket.once("close", () => clearInterval(timer));
}

/** Milliseconds from now until the peer closes `socket` (a FIN read, or a reset), or undefined if it has not within `ms`. */
function closedWithin(socket: net.Socket, ms: number): Promise<number | undefined> {
  const t0 = performance.now();
  socket.resume();
  return Promise.race([new Promise<number>((r) => socket.once("close", () => r(performance.now() - t0))), new Promise<undefined>((r) => setTimeout(r, ms))]);
}

/**
 * Collects what arrives (after `all`) until `done(all)` says it is enough, the
 * socket closes, or 5 s pass; then pauses the socket, so nothing that comes
 * later is lost before the next read.
 */
function readUntil(socket: net.Socket, done: (all: Buffer) => boolean, all: Buffer = Buffer.alloc(0)): Promise<Buffer> {
  return new Promise((resolve) => {
    const finish = () => {
      clearTimeout(timer);
      socket.off("data", onData);
      socket.off("close", finish);
      socket.pause();
      resolve(all);
    };
    const onData = (c: Buffer) => {
      all = Buffer.concat([all, c]);
      if (done(all)) finish();
    };
    const timer = setTimeout(finish, 5000);
    if (done(all)) return finish();
    socket.on("data", onData);
    socket.once("close", finish);
    socket.resume();
  });
}

describe(`waiting connections count against max_sessions = max_sessions_per_token = ${LIMIT}`, () => {
  test("probes: connect-backs whose peer never closes hold at most the limit, the rest get 429 before any dial, and a closed one frees its place", async () => {
    const coordinator = await startTestCoordinator(pki, { max_sessions: LIMIT, max_sessions_per_token: LIMIT });
    // A tunnel port as an attacker runs it: it completes TLS on every connect-back and never closes.
    const backs: tls.TLSSocket[] = [];
    const tunnelPort = net.createServer((raw) => {
      raw.on("error", () => {});
      backs.push(secure(0, raw));
    });
    await new Promise<void>((r) => tunnelPort.listen(0, "127.0.0.1", r));
    const agent = new https.Agent({ keepAlive: true, maxSockets: 30, ca: [pki.ca.cert], servername: "localhost" });
    const probe = () =>
      new Promise<number>((resolve) => {
        const body = JSON.stringify({ probe: randomUUID(), reply: { host: "127.0.0.1", port: (tunnelPort.address() as net.AddressInfo).port } });
        const req = https.request(
          { host: "127.0.0.1", port: coordinator.addresses[0].port, method: "POST", path: "/v1/probe", agent, headers: { Authorization: `Bearer ${TOKEN}`, "Content-Type": "application/json" } },
          (res) => {
            res.resume();
            res.on("end", () => resolve(res.statusCode ?? 0));
          },
        );
        req.on("error", () => resolve(0));
        req.end(body);
      });
    try {
      const statuses = await Promise.all(Array.from({ length: 300 }, probe));
      const count = (s: number) => statuses.filter((x) => x === s).length;
      console.log(`300 probes: ${count(200)} answered 200, ${count(429)} 429; ${backs.length} connect-backs held`);
      assert.equal(count(200), LIMIT);
      assert.equal(count(429), 300 - LIMIT);
      assert.equal(backs.length, LIMIT, "no connect-back dialled past the limit");
      for (const b of backs) b.destroy();
      // The coordinator learns of the closes asynchronously: a few tries, bounded.
      let again = 0;
      for (let i = 0; i < 20 && again !== 200; i++) {
        again = await probe();
        if (again !== 200) await new Promise((r) => setTimeout(r, 100));
      }
      assert.equal(again, 200, "a probe is served once the held ones closed");
    } finally {
      for (const b of backs) b.destroy();
      agent.destroy();
      tunnelPort.close();
      await coordinator.close();
    }
  });

  test("upgrades carrying part of an Open: the limit gets 101, the rest 429; a whole Open in the head still goes straight to a session", async () => {
    const coordinator = await startTestCoordinator(pki, { max_sessions: LIMIT, max_sessions_per_token: LIMIT });
    const port = coordinator.addresses[0].port;
    const opened: tls.TLSSocket[] = [];
    const partial = encodeOpen({ session: randomUUID(), target: { host: "127.0.0.1", port: web.port } }).subarray(0, 1);
    const upgrade = async (after: Buffer): Promise<{ status: string; socket: tls.TLSSocket; answer: Buffer }> => {
      const s = secure(port);
      opened.push(s);
      await once(s, "secureConnect");
      s.write(Buffer.concat([Buffer.from(upgradeHead, "latin1"), after]));
      const answer = await readUntil(s, (all) => all.includes("\r\n\r\n"));
      return { status: answer.toString("latin1").split(" ")[1] ?? "none", socket: s, answer };
    };
    try {
      const statuses: string[] = [];
      // 200 in all, 20 at a time: bounded handshake work on a shared machine.
      for (let batch = 0; batch < 10; batch++) statuses.push(...(await Promise.all(Array.from({ length: 20 }, () => upgrade(partial)))).map((u) => u.status));
      const count = (s: string) => statuses.filter((x) => x === s).length;
      console.log(`200 upgrades with a 1-byte Open: ${count("101")} answered 101, ${count("429")} 429`);
      assert.equal(count("101"), LIMIT);
      assert.equal(count("429"), 200 - LIMIT);
      const whole = await upgrade(encodeOpen({ session: randomUUID(), target: { host: "127.0.0.1", port: web.port } }));
      assert.equal(whole.status, "101");
      const afterHead = (all: Buffer) => all.subarray(all.indexOf("\r\n\r\n") + 4);
      const rest = await readUntil(
        whole.socket,
        (all) => {
          try {
            return decodeMessage(afterHead(all)) !== undefined;
          } catch {
            return true;
          }
        },
        whole.answer,
      );
      const decoded = decodeMessage(afterHead(rest));
      assert.ok(decoded);
      assert.equal(resultOf(decoded.message).code, "OK");
    } finally {
      for (const s of opened) s.destroy();
      await coordinator.close();
    }
  });
});

describe(`partial messages have a deadline from their start (${DEADLINE} ms here), which a byte every ${TRICKLE_MS} ms does not move`, () => {
  test("the Open on an upgraded connection ([coordinator] open_timeout)", async () => {
    const coordinator = await startTestCoordinator(pki, { open_timeout: DEADLINE });
    try {
      const s = secure(coordinator.addresses[0].port);
      await once(s, "secureConnect");
      s.write(upgradeHead);
      const answer = await readUntil(s, (all) => all.includes("\r\n\r\n"));
      assert.match(answer.toString("latin1"), /^HTTP\/1\.1 101 /);
      trickle(s, encodeOpen({ session: randomUUID(), target: { host: "127.0.0.1", port: web.port } }));
      const ms = await closedWithin(s, DEADLINE + SLACK);
      s.destroy();
      assert.ok(ms !== undefined, `the upgraded connection trickling its Open was still open after ${DEADLINE + SLACK} ms`);
    } finally {
      await coordinator.close();
    }
  });

  test("the PROXY protocol header ([coordinator] handshake_timeout)", async () => {
    const coordinator = await startTestCoordinator(pki, { proxy_protocol: true, handshake_timeout: DEADLINE });
    try {
      const s = net.connect(coordinator.addresses[0].port, "127.0.0.1");
      s.on("error", () => {});
      await once(s, "connect");
      trickle(s, Buffer.from("PROXY TCP4 198.51.100.7 127.0.0.1 40000 8443\r\n", "latin1"));
      const ms = await closedWithin(s, DEADLINE + SLACK);
      s.destroy();
      assert.ok(ms !== undefined, `the connection trickling its PROXY header was still open after ${DEADLINE + SLACK} ms`);
    } finally {
      await coordinator.close();
    }
  });

  test("the HTTP request head ([coordinator] handshake_timeout caps the header timeout)", async () => {
    const coordinator = await startTestCoordinator(pki, { handshake_timeout: DEADLINE });
    try {
      const s = secure(coordinator.addresses[0].port);
      await once(s, "secureConnect");
      trickle(s, Buffer.from(`GET /v1/hello HTTP/1.1\r\nHost: localhost\r\nX-Padding: ${"p".repeat(60)}\r\n\r\n`, "latin1"));
      const ms = await closedWithin(s, DEADLINE + SLACK);
      s.destroy();
      assert.ok(ms !== undefined, `the connection trickling its request head was still open after ${DEADLINE + SLACK} ms`);
    } finally {
      await coordinator.close();
    }
  });
});
