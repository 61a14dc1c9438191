import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import net, { type AddressInfo } from "node:net";
import tls from "node:tls";
import { after, before, describe, test } from "node:test";
import type { Coordinator } from "../src/coordinator/index.ts";
import type { Local } from "../src/local/index.ts";
import { encodeSession } from "../src/protocol/wire.ts";
import { decodeMessage, encodeMessage, METHOD_BINDING } from "../src/stun.ts";
import { StunFramer } from "../src/stun-framer.ts";
import { connectThrough } from "../scripts/lib/proxy-client.ts";
import { captureLogs } from "./helpers/logs.ts";
import { testPki, type TestPki } from "../scripts/lib/pki.ts";
import { startLocalFor, startTestCoordinator } from "../scripts/lib/stack.ts";
import { startHttpTarget, type Target } from "../scripts/lib/targets.ts";
import { waitUntil } from "./helpers/wait.ts";

// The tunnel port P is open to the internet through P′, and every connection
// there costs the local proxy a TLS client handshake. Here the coordinator's
// connect-backs reach P through a relay that connects from an address of the
// test's choosing (any 127/8 address is loopback), the way a coordinator
// behind a balancer connects back from an address that is not the API's:
// the fake reporter tells the local proxy that P′ is the relay.

const CONNECT_TIMEOUT = 2000; // [local] handshake_timeout: accept to session id
const CAP = 8;
const COORD_SOURCE = "127.0.0.3";

/** A STUN reporter that maps every Binding request to `mapped`, and remembers the port the link came from (P). */
async function fakeReporter(mapped: () => { address: string; port: number }) {
  let linkPort = 0;
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    linkPort = socket.remotePort ?? 0;
    socket.on("error", () => {});
    socket.on("close", () => sockets.delete(socket));
    const framer = new StunFramer();
    socket.on("data", (chunk: Buffer) => {
      for (const frame of framer.push(chunk)) {
        const msg = decodeMessage(frame);
        if (msg.class !== "request") continue;
        const { address, port } = mapped();
        socket.write(encodeMessage({ method: METHOD_BINDING, class: "success", transactionId: msg.transactionId, attributes: [{ kind: "XOR-MAPPED-ADDRESS", address: { family: "IPv4", address, port } }] }, { fingerprint: true }));
      }
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return {
    port: (server.address() as AddressInfo).port,
    linkPort: () => linkPort,
    close: () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        server.close(() => r());
      }),
  };
}

/** P′: passes each connect-back on to P from `source`, once `hold` (if any) has resolved. */
async function startRelay(target: () => number) {
  const state = { source: COORD_SOURCE, hold: undefined as Promise<void> | undefined, held: 0 };
  const sockets = new Set<net.Socket>();
  const server = net.createServer(async (inbound) => {
    sockets.add(inbound);
    inbound.on("error", () => {});
    inbound.on("close", () => sockets.delete(inbound));
    inbound.pause();
    if (state.hold) {
      state.held++;
      await state.hold;
    }
    const outbound = net.connect({ host: "127.0.0.1", port: target(), localAddress: state.source });
    sockets.add(outbound);
    outbound.on("error", () => inbound.destroy());
    outbound.on("close", () => (sockets.delete(outbound), inbound.destroy()));
    inbound.on("close", () => outbound.destroy());
    inbound.pipe(outbound).pipe(inbound);
    inbound.resume();
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return {
    port: (server.address() as AddressInfo).port,
    state,
    close: () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        server.close(() => r());
      }),
  };
}

type Knock = "handshake" | "reset";

/** One TCP connection to P from `from`: did the local proxy start a TLS handshake (its ClientHello), or reset it? */
function knock(port: number, from: string): Promise<Knock> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host: "127.0.0.1", port, localAddress: from });
    const timer = setTimeout(() => (s.destroy(), reject(new Error(`no ClientHello and no close from ${from} within 3 s`))), 3000);
    s.on("error", () => {});
    s.once("data", (d: Buffer) => {
      clearTimeout(timer);
      s.destroy();
      assert.equal(d[0], 0x16, "a TLS handshake record");
      resolve("handshake");
    });
    s.once("close", () => {
      clearTimeout(timer);
      resolve("reset");
    });
  });
}

interface Flood {
  /** Connections the local proxy has not closed. */
  open(): number;
  /** Of those, how many got a ClientHello. */
  greeted(): number;
  /** Closes every connection; resolves once the local proxy holds no more sockets than before. */
  end(): Promise<void>;
}

/** `n` connections at once from `from`, that never answer; resolves once each has its ClientHello or is closed. */
async function flood(port: number, from: string, n: number, live: () => number): Promise<Flood> {
  const base = live();
  const sockets = await Promise.all(
    Array.from(
      { length: n },
      () =>
        new Promise<net.Socket>((resolve) => {
          const s = net.connect({ host: "127.0.0.1", port, localAddress: from });
          s.on("error", () => {});
          s.once("data", () => resolve(s));
          s.once("close", () => resolve(s));
        }),
    ),
  );
  const open = () => sockets.filter((s) => !s.destroyed);
  return {
    open: () => open().length,
    greeted: () => open().filter((s) => s.bytesRead > 0).length,
    async end() {
      for (const s of sockets) s.destroy();
      await waitUntil(() => live() <= base, 5000, "the flood's connections closed on the local side");
    },
  };
}

describe("the tunnel port", () => {
  let pki: TestPki;
  let reporter: Awaited<ReturnType<typeof fakeReporter>>;
  let relay: Awaited<ReturnType<typeof startRelay>>;
  let coordinator: Coordinator;
  let local: Local;
  let web: Target;
  let P: number;
  const logs = captureLogs("local");

  before(async () => {
    pki = await testPki();
    web = await startHttpTarget();
    relay = await startRelay(() => reporter.linkPort());
    reporter = await fakeReporter(() => ({ address: "127.0.0.1", port: relay.port }));
    coordinator = await startTestCoordinator(pki);
    local = await startLocalFor(coordinator.addresses[0].port, reporter.port, pki, { tunnel: "connect-back", handshake_timeout: CONNECT_TIMEOUT, max_tunnel_handshakes: CAP, pool_size: 0 });
    P = local.mapping()!.localPort;
  });
  after(async () => {
    logs.restore();
    await local?.close();
    await coordinator?.close();
    await relay?.close();
    await reporter?.close();
    await web?.close();
  });

  const idle = () => waitUntil(() => local.pendingSessions() === 0, 5000, "no connect-back expected");
  const live = () => local.liveSockets();
  /** A CONNECT tunnel of its own (plain HTTP could reuse a pooled one): one connect-back. */
  const tunnelThrough = async () => {
    const t = await connectThrough(local.proxyAddress.port, `127.0.0.1:${web.port}`);
    t.socket.destroy();
    return t.status;
  };

  test("the probe's connect-back teaches the coordinator's address; while none is expected, other addresses are reset at accept", async () => {
    assert.equal(local.reachability()?.probe.ok, true, "the probe came in through the relay");
    assert.ok(logs.lines.some((l) => l.includes(`a verified connect-back came from ${COORD_SOURCE}`)), logs.lines.join("\n"));
    await idle();
    assert.equal(await knock(P, "127.0.0.4"), "reset", "a stranger gets no ClientHello");
    // The API's address (127.0.0.1) is not where connect-backs come from.
    assert.equal(await knock(P, "127.0.0.1"), "reset");
    assert.equal(await knock(P, COORD_SOURCE), "handshake", "the coordinator's address still gets a handshake");
    assert.equal(await tunnelThrough(), 200);
  });

  test("a coordinator not seen before gets in while its connect-back is expected, and is known from then on", async () => {
    relay.state.source = "127.0.0.5";
    try {
      assert.equal(await tunnelThrough(), 200);
      await idle();
      assert.equal(await knock(P, "127.0.0.5"), "handshake");
      assert.equal(await knock(P, COORD_SOURCE), "handshake", "the first one is still known");
      assert.equal(await knock(P, "127.0.0.6"), "reset");
    } finally {
      relay.state.source = COORD_SOURCE;
    }
  });

  test(`while a connect-back is expected: at most max_tunnel_handshakes (${CAP}) strangers wait at once, logged once, and the coordinator still gets in`, async () => {
    let release!: () => void;
    relay.state.hold = new Promise<void>((r) => (release = r));
    const before = relay.state.held;
    const warned = () => logs.lines.filter((l) => l.includes("addresses other than the coordinator's are waiting")).length;
    let strangers: Flood | undefined;
    try {
      const tunnel = tunnelThrough();
      await waitUntil(() => relay.state.held > before && local.pendingSessions() > 0, 5000, "a connect-back held at the relay");
      strangers = await flood(P, "127.0.0.7", CAP + 20, live);
      await waitUntil(() => strangers!.open() === CAP, 5000, `${CAP} strangers left waiting (now ${strangers.open()})`);
      assert.equal(strangers.greeted(), CAP);
      assert.equal(warned(), 1, "logged once");
      relay.state.hold = undefined;
      release();
      assert.equal(await tunnel, 200, "the coordinator's connect-back does not compete with the strangers");
      await strangers.end();
      // No connect-back is expected any more: strangers are reset at accept.
      strangers = await flood(P, "127.0.0.8", CAP + 1, live);
      assert.equal(strangers.greeted(), 0);
      assert.equal(warned(), 1);
    } finally {
      relay.state.hold = undefined;
      release();
      await strangers?.end();
    }
  });

  test(`a flood from the coordinator's own address: at most ${CAP} wait at once, the oldest make room, and a connect-back still gets in`, async () => {
    await idle();
    const f = await flood(P, COORD_SOURCE, CAP + 20, live);
    try {
      await waitUntil(() => f.open() === CAP, 5000, `${CAP} left waiting (now ${f.open()})`);
      assert.equal(f.greeted(), CAP);
      assert.equal(await tunnelThrough(), 200, "the connect-back took the place of the flood's oldest connection");
      await waitUntil(() => f.open() === CAP - 1, 5000, `the connect-back's place came from the flood (${f.open()} left)`);
    } finally {
      await f.end();
    }
  });

  test(`a trusted peer that trickles its session id is dropped handshake_timeout (${CONNECT_TIMEOUT} ms) after accept, not after its last byte`, async () => {
    await idle();
    const started = performance.now();
    const raw = net.connect({ host: "127.0.0.1", port: P, localAddress: COORD_SOURCE });
    const peer = new tls.TLSSocket(raw, { isServer: true, secureContext: tls.createSecureContext({ key: pki.server.key, cert: pki.server.cert }) });
    peer.on("error", () => {});
    const message = encodeSession(randomUUID());
    let sent = 0;
    let ticker: NodeJS.Timeout | undefined;
    peer.once("secure", () => {
      // One byte per 200 ms: the whole message would take 4.8 s.
      ticker = setInterval(() => {
        if (sent < message.length && !peer.destroyed) peer.write(message.subarray(sent, ++sent));
      }, 200);
    });
    await new Promise<void>((r) => raw.once("close", () => r()));
    clearInterval(ticker);
    const ms = performance.now() - started;
    assert.ok(sent > 2 && sent < message.length, `${sent} bytes trickled`);
    assert.ok(ms >= CONNECT_TIMEOUT - 50 && ms < CONNECT_TIMEOUT + 500, `closed ${ms.toFixed(0)} ms after connect`);
  });
});
