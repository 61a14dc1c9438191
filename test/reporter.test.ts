import { test } from "node:test";
import assert from "node:assert/strict";
import { EventEmitter } from "node:events";
import { connect, createServer, type Server, type Socket } from "node:net";
import { performance } from "node:perf_hooks";
import { NatproxyError } from "../src/errors.ts";
import { setLogLevel } from "../src/log.ts";
import { openReporterLink, type ReporterLink } from "../src/local/nat/reporter-link.ts";
import { startReporter } from "../src/reporter/index.ts";
import {
  decodeMessage,
  encodeMessage,
  getAttribute,
  METHOD_BINDING,
  newTransactionId,
  type DecodedStunMessage,
  type StunMessage,
} from "../src/stun.ts";
import { StunFramer } from "../src/stun-framer.ts";
import { SOFTWARE } from "../src/version.ts";
import { freePort } from "../scripts/lib/ports.ts";
import { within } from "./helpers/wait.ts";

setLogLevel("silent");

const INTERVAL = 50;
const BOUND = 3000; // ms any single wait may take before the test fails

// ---------------------------------------------------------------- helpers

function onceEvent<T extends unknown[]>(emitter: EventEmitter, event: string, what = event): Promise<T> {
  return within(
    new Promise<T>((resolve) => emitter.once(event, (...args: unknown[]) => resolve(args as T))),
    BOUND,
    what,
  );
}

function reporterConfig(host: string, overrides: { nat_keep_alive_interval?: number; handshake_timeout?: number } = {}) {
  return { listen: { host, port: 0 }, nat_keep_alive_interval: INTERVAL, handshake_timeout: 300, max_connections_per_ip: 64, ...overrides };
}

function request(attributes: StunMessage["attributes"] = []): StunMessage {
  return { method: METHOD_BINDING, class: "request", transactionId: newTransactionId(), attributes };
}

/** A raw STUN-over-TCP peer: what a test sends and receives, message by message. */
class RawPeer extends EventEmitter {
  readonly socket: Socket;
  readonly received: DecodedStunMessage[] = [];
  readonly closed: Promise<void>;
  #framer = new StunFramer();
  #queue: DecodedStunMessage[] = [];

  constructor(host: string, port: number) {
    super();
    this.socket = connect({ host, port });
    this.socket.on("error", () => {});
    this.closed = new Promise((resolve) => this.socket.once("close", () => resolve()));
    this.socket.on("data", (chunk: Buffer) => {
      for (const frame of this.#framer.push(chunk)) {
        const msg = decodeMessage(frame);
        this.received.push(msg);
        this.#queue.push(msg);
        this.emit("message", msg);
      }
    });
  }

  static async open(host: string, port: number): Promise<RawPeer> {
    const peer = new RawPeer(host, port);
    await onceEvent(peer.socket, "connect");
    return peer;
  }

  send(msg: StunMessage): StunMessage {
    this.socket.write(encodeMessage(msg, { fingerprint: true }));
    return msg;
  }

  /** The next message not yet taken, waiting for it if need be. */
  async next(what = "a message"): Promise<DecodedStunMessage> {
    const queued = this.#queue.shift();
    if (queued) return queued;
    await onceEvent(this, "message", what);
    return this.#queue.shift() as DecodedStunMessage;
  }

  waitClosed(what: string): Promise<void> {
    return within(this.closed, BOUND, what);
  }
}

type Reply = (msg: StunMessage) => void;

/** An in-process stand-in for a reporter, so the link's side can be driven exactly. */
async function fakeReporter(onMessage: (msg: DecodedStunMessage, reply: Reply, socket: Socket) => void, host = "127.0.0.1") {
  const sockets = new Set<Socket>();
  const received: DecodedStunMessage[] = [];
  const events = new EventEmitter();
  const server: Server = createServer((socket) => {
    sockets.add(socket);
    socket.on("error", () => {});
    socket.on("close", () => {
      sockets.delete(socket);
      events.emit("socket-closed");
    });
    const framer = new StunFramer();
    const reply: Reply = (m) => {
      if (!socket.destroyed) socket.write(encodeMessage(m, { fingerprint: true }));
    };
    socket.on("data", (chunk: Buffer) => {
      for (const frame of framer.push(chunk)) {
        const msg = decodeMessage(frame);
        received.push(msg);
        onMessage(msg, reply, socket);
        events.emit("message", msg);
      }
    });
    events.emit("connection", socket);
  });
  await new Promise<void>((resolve) => server.listen(0, host, resolve));
  const port = (server.address() as { port: number }).port;
  return {
    port,
    sockets,
    received,
    events,
    async close(): Promise<void> {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

function successFor(req: StunMessage, address: string, port: number): StunMessage {
  const family = address.includes(":") ? ("IPv6" as const) : ("IPv4" as const);
  return {
    method: METHOD_BINDING,
    class: "success",
    transactionId: req.transactionId,
    attributes: [{ kind: "XOR-MAPPED-ADDRESS", address: { family, address, port } }],
  };
}

function linkOptions(port: number, host = "127.0.0.1", extra: Partial<{ localPort: number; keepAliveInterval: number; timeout: number }> = {}) {
  return { reporter: { host, port }, localPort: 0, keepAliveInterval: INTERVAL, timeout: 1000, ...extra };
}

async function rejectsWith(promise: Promise<unknown>, code: string, pattern: RegExp): Promise<void> {
  await assert.rejects(within(promise, BOUND, "the link to fail"), (err: unknown) => {
    assert.ok(err instanceof NatproxyError, `expected a NatproxyError, got ${String(err)}`);
    assert.equal(err.code, code);
    assert.match(err.message, pattern);
    return true;
  });
}

function countResources(): Map<string, number> {
  const counts = new Map<string, number>();
  for (const r of process.getActiveResourcesInfo()) counts.set(r, (counts.get(r) ?? 0) + 1);
  return counts;
}

/** Handles are released in libuv's close phase, a loop turn or so after destroy(). */
async function resourcesBackTo(baseline: Map<string, number>, kinds: string[]): Promise<void> {
  let extra: string[] = [];
  for (let turn = 0; turn < 1000; turn++) {
    const now = countResources();
    extra = kinds.filter((k) => (now.get(k) ?? 0) > (baseline.get(k) ?? 0)).map((k) => `${k}: ${now.get(k)} > ${baseline.get(k) ?? 0}`);
    if (extra.length === 0) return;
    await new Promise((resolve) => setImmediate(resolve));
  }
  assert.fail(`handles left behind: ${extra.join(", ")}`);
}

// ---------------------------------------------------------------- mapped address

for (const host of ["127.0.0.1", "::1"]) {
  test(`link over ${host}: the mapped address is the link's own local address and port`, { timeout: 10_000 }, async () => {
    const reporter = await startReporter(reporterConfig(host));
    try {
      assert.equal(reporter.addresses.length, 1);
      assert.equal(reporter.addresses[0].address, host);
      const link = await openReporterLink(linkOptions(reporter.addresses[0].port, host));
      try {
        assert.equal(link.localAddress, host);
        assert.ok(link.localPort > 0);
        assert.deepEqual(link.publicAddress, { host, port: link.localPort });
        assert.equal(link.remoteSoftware, SOFTWARE);
      } finally {
        link.close();
      }
    } finally {
      await reporter.close();
    }
  });
}

test('a "*" (dual-stack) reporter reports IPv4 peers as plain IPv4, not ::ffff:', { timeout: 10_000 }, async () => {
  const reporter = await startReporter(reporterConfig("*"));
  try {
    const port = reporter.addresses[0].port;
    const v4 = await openReporterLink(linkOptions(port, "127.0.0.1"));
    const v6 = await openReporterLink(linkOptions(port, "::1"));
    assert.deepEqual(v4.publicAddress, { host: "127.0.0.1", port: v4.localPort });
    assert.deepEqual(v6.publicAddress, { host: "::1", port: v6.localPort });
    v4.close();
    v6.close();
    // On the wire, not just after the link's own normalising: family 0x01, 4 bytes.
    const peer = await RawPeer.open("127.0.0.1", port);
    peer.send(request());
    const res = await peer.next();
    const expected = { family: "IPv4", address: "127.0.0.1", port: peer.socket.localPort };
    peer.socket.destroy();
    assert.deepEqual(getAttribute(res, "XOR-MAPPED-ADDRESS")?.address, expected);
    assert.deepEqual(getAttribute(res, "MAPPED-ADDRESS")?.address, expected);
  } finally {
    await reporter.close();
  }
});

// docs/NAT.md, "One port for an outbound connection and a listener".
test("a link from a chosen port P reports P, and P can then be listened on", { timeout: 10_000 }, async () => {
  const reporter = await startReporter(reporterConfig("127.0.0.1"));
  // Chosen before the link binds it, so freePort()'s race applies.
  const P = await freePort();
  const link = await openReporterLink(linkOptions(reporter.addresses[0].port, "127.0.0.1", { localPort: P }));
  const tunnel = createServer((s) => s.end("hello"));
  try {
    assert.equal(link.localPort, P);
    assert.deepEqual(link.publicAddress, { host: "127.0.0.1", port: P });
    await within(new Promise<void>((resolve, reject) => {
      tunnel.once("error", reject);
      tunnel.listen(P, resolve);
    }), BOUND, "listen on P");
    const c = connect({ host: "127.0.0.1", port: P });
    c.on("error", () => {});
    const [data] = await onceEvent<[Buffer]>(c, "data", "the tunnel listener to answer");
    assert.equal(data.toString(), "hello");
    c.destroy();
    // The link is unaffected: keepalives still flow.
    await onceEvent(link, "packet", "a keepalive after listening");
    assert.equal(link.closed, false);
  } finally {
    link.close();
    await new Promise<void>((resolve) => tunnel.close(() => resolve()));
    await reporter.close();
  }
});

test("a link from any port (localPort 0) leaves that port free to listen on as well", { timeout: 10_000 }, async () => {
  const reporter = await startReporter(reporterConfig("127.0.0.1"));
  const link = await openReporterLink(linkOptions(reporter.addresses[0].port));
  const tunnel = createServer();
  try {
    await within(new Promise<void>((resolve, reject) => {
      tunnel.once("error", reject);
      tunnel.listen(link.localPort, resolve);
    }), BOUND, "listen on the link's port");
    assert.equal((tunnel.address() as { port: number }).port, link.localPort);
  } finally {
    link.close();
    await new Promise<void>((resolve) => tunnel.close(() => resolve()));
    await reporter.close();
  }
});

test("reporter answers several Binding requests on one connection, pipelined or not", { timeout: 10_000 }, async () => {
  const reporter = await startReporter(reporterConfig("127.0.0.1", { nat_keep_alive_interval: 60_000 }));
  const peer = await RawPeer.open("127.0.0.1", reporter.addresses[0].port);
  try {
    const expected = { family: "IPv4", address: "127.0.0.1", port: peer.socket.localPort };
    const first = peer.send(request());
    // Two more in a single write.
    const a = request([{ kind: "SOFTWARE", value: "test" }]);
    const b = request([{ kind: "raw", type: 0x8029, value: Buffer.alloc(8) }]); // comprehension-optional: ignored
    peer.socket.write(Buffer.concat([encodeMessage(a), encodeMessage(b, { fingerprint: true })]));
    for (const req of [first, a, b]) {
      const res = await peer.next("a Binding response");
      assert.equal(res.class, "success");
      assert.equal(res.method, METHOD_BINDING);
      assert.deepEqual(res.transactionId, req.transactionId);
      assert.deepEqual(getAttribute(res, "XOR-MAPPED-ADDRESS")?.address, expected);
      assert.deepEqual(getAttribute(res, "MAPPED-ADDRESS")?.address, expected);
      assert.equal(getAttribute(res, "SOFTWARE")?.value, SOFTWARE);
      assert.equal(res.attributes.at(-1)?.kind, "FINGERPRINT");
    }
  } finally {
    peer.socket.destroy();
    await reporter.close();
  }
});

test("reporter answers other methods with 400 and unknown mandatory attributes with 420", { timeout: 10_000 }, async () => {
  const reporter = await startReporter(reporterConfig("127.0.0.1"));
  const peer = await RawPeer.open("127.0.0.1", reporter.addresses[0].port);
  try {
    const other = peer.send({ method: 0x003, class: "request", transactionId: newTransactionId(), attributes: [] });
    const r1 = await peer.next();
    assert.equal(r1.class, "error");
    assert.equal(r1.method, 0x003);
    assert.deepEqual(r1.transactionId, other.transactionId);
    assert.equal(getAttribute(r1, "ERROR-CODE")?.code, 400);

    const unknown = peer.send(request([{ kind: "raw", type: 0x0024, value: Buffer.from([1, 2, 3, 4]) }]));
    const r2 = await peer.next();
    assert.equal(r2.class, "error");
    assert.deepEqual(r2.transactionId, unknown.transactionId);
    assert.equal(getAttribute(r2, "ERROR-CODE")?.code, 420);
    assert.deepEqual(getAttribute(r2, "UNKNOWN-ATTRIBUTES")?.types, [0x0024]);
  } finally {
    peer.socket.destroy();
    await reporter.close();
  }
});

// ---------------------------------------------------------------- keepalive

test("reporter keepalives reach the link and its answers keep the connection open", { timeout: 10_000 }, async () => {
  const reporter = await startReporter(reporterConfig("127.0.0.1"));
  // The link's own interval is long, so only its answers can keep the reporter from closing it.
  const link = await openReporterLink(linkOptions(reporter.addresses[0].port, "127.0.0.1", { keepAliveInterval: 60_000 }));
  try {
    const started = performance.now();
    let indications = 0;
    await within(
      new Promise<void>((resolve) => {
        link.on("packet", function countIndications(msg: DecodedStunMessage) {
          if (msg.class === "indication" && msg.method === METHOD_BINDING && ++indications === 8) resolve();
        });
      }),
      BOUND,
      "8 keepalive indications",
    );
    // 8 intervals is well past the 3 after which the reporter drops a silent peer.
    assert.ok(performance.now() - started >= 7 * INTERVAL, "indications come once per interval, not faster");
    assert.equal(link.closed, false);
  } finally {
    link.close();
    await reporter.close();
  }
});

test("the link answers each reporter indication with an indication echoing its transaction id", { timeout: 10_000 }, async () => {
  const fake = await fakeReporter((msg, reply) => {
    if (msg.class === "request") reply(successFor(msg, "192.0.2.1", 4000));
  });
  const link = await openReporterLink(linkOptions(fake.port, "127.0.0.1", { keepAliveInterval: 60_000 }));
  try {
    const [socket] = fake.sockets;
    for (let i = 0; i < 3; i++) {
      const tid = newTransactionId();
      socket.write(encodeMessage({ method: METHOD_BINDING, class: "indication", transactionId: tid, attributes: [] }, { fingerprint: true }));
      const [answer] = await onceEvent<[DecodedStunMessage]>(fake.events, "message", "the echo");
      assert.equal(answer.class, "indication");
      assert.equal(answer.method, METHOD_BINDING);
      assert.deepEqual(answer.transactionId, tid);
    }
    assert.deepEqual(link.publicAddress, { host: "192.0.2.1", port: 4000 });
  } finally {
    link.close();
    await fake.close();
  }
});

test("reporter closes a peer that stops answering after 3 intervals", { timeout: 10_000 }, async () => {
  const reporter = await startReporter(reporterConfig("127.0.0.1"));
  const peer = await RawPeer.open("127.0.0.1", reporter.addresses[0].port);
  try {
    const sent = performance.now();
    peer.send(request());
    assert.equal((await peer.next()).class, "success");
    await peer.waitClosed("the reporter to drop a silent peer");
    const elapsed = performance.now() - sent;
    assert.ok(elapsed >= 3 * INTERVAL, `closed after ${elapsed.toFixed(0)} ms, before 3 intervals`);
    const indications = peer.received.filter((m) => m.class === "indication");
    assert.ok(indications.length >= 2, `got ${indications.length} keepalives before the close`);
  } finally {
    peer.socket.destroy();
    await reporter.close();
  }
});

test("reporter keeps a raw peer that answers with indications or requests", { timeout: 10_000 }, async () => {
  const reporter = await startReporter(reporterConfig("127.0.0.1"));
  const peer = await RawPeer.open("127.0.0.1", reporter.addresses[0].port);
  try {
    peer.send(request());
    let n = 0;
    while (n < 8) {
      const msg = await peer.next("a keepalive");
      if (msg.class !== "indication") continue;
      n++;
      // Alternate the two kinds of answer the reporter must count as life.
      if (n % 2) peer.send({ method: METHOD_BINDING, class: "indication", transactionId: msg.transactionId, attributes: [] });
      else peer.send(request());
    }
    assert.equal(peer.socket.destroyed, false);
    assert.equal(peer.socket.readyState, "open");
  } finally {
    peer.socket.destroy();
    await reporter.close();
  }
});

test("a link keeps itself alive with Binding requests against a server that never sends keepalives", { timeout: 10_000 }, async () => {
  const fake = await fakeReporter((msg, reply) => {
    if (msg.class === "request") reply(successFor(msg, "198.51.100.2", 40001));
  });
  // timeout < the test's length, so a request timer left running after its answer would show.
  const link = await openReporterLink(linkOptions(fake.port, "127.0.0.1", { timeout: 3 * INTERVAL }));
  let closeReason: unknown = "not closed";
  link.on("close", function recordClose(reason) {
    closeReason = reason;
  });
  try {
    const started = performance.now();
    await within(
      new Promise<void>((resolve) => {
        fake.events.on("message", function countRequests() {
          if (fake.received.filter((m) => m.class === "request").length >= 12) resolve();
        });
      }),
      BOUND,
      "12 Binding requests from the link",
    );
    assert.ok(performance.now() - started >= 10 * INTERVAL, "at most one request per interval");
    assert.equal(link.closed, false);
    assert.equal(closeReason, "not closed");
  } finally {
    link.close();
    await fake.close();
  }
});

test("a link whose reporter goes silent closes itself with a reason", { timeout: 10_000 }, async () => {
  let answered = 0;
  const fake = await fakeReporter((msg, reply) => {
    if (msg.class === "request" && answered++ === 0) reply(successFor(msg, "192.0.2.9", 9));
  });
  const link = await openReporterLink(linkOptions(fake.port, "127.0.0.1", { timeout: 5000 }));
  try {
    const started = performance.now();
    const [reason] = await onceEvent<[Error | undefined]>(link, "close", "the link to give up");
    assert.ok(reason instanceof NatproxyError);
    assert.equal(reason.code, "REPORTER_UNREACHABLE");
    assert.match(reason.message, /nothing from 127\.0\.0\.1:\d+ for 150 ms/);
    assert.ok(performance.now() - started >= 2 * INTERVAL);
    assert.equal(link.closed, true);
    await within(new Promise<void>((resolve) => (fake.sockets.size === 0 ? resolve() : fake.events.once("socket-closed", resolve))), BOUND, "the socket to go");
  } finally {
    link.close();
    await fake.close();
  }
});

test("a link whose keepalive request goes unanswered within `timeout` closes itself", { timeout: 10_000 }, async () => {
  let first = true;
  const fake = await fakeReporter((msg, reply) => {
    if (msg.class !== "request") return;
    if (first) reply(successFor(msg, "192.0.2.9", 9));
    else reply({ method: METHOD_BINDING, class: "indication", transactionId: newTransactionId(), attributes: [] }); // life, but no answer
    first = false;
  });
  // `timeout` also bounds the link's start (connect and first answer), which
  // 30 ms did not always cover on a busy machine. With 150 ms the keepalive
  // sent after 100 ms still times out before the 300 ms silence limit.
  let link: ReporterLink | undefined;
  try {
    link = await openReporterLink(linkOptions(fake.port, "127.0.0.1", { keepAliveInterval: 100, timeout: 150 }));
    const [reason] = await onceEvent<[Error | undefined]>(link, "close");
    assert.ok(reason instanceof NatproxyError);
    assert.match(reason.message, /did not answer a Binding request within 150 ms/);
  } finally {
    link?.close();
    await fake.close();
  }
});

test("a link reports a moved public address with mapping-changed", { timeout: 10_000 }, async () => {
  let n = 0;
  const fake = await fakeReporter((msg, reply) => {
    if (msg.class === "request") reply(successFor(msg, "203.0.113.5", n++ === 0 ? 40001 : 51234));
  });
  const link = await openReporterLink(linkOptions(fake.port));
  try {
    assert.deepEqual(link.publicAddress, { host: "203.0.113.5", port: 40001 });
    const [current, previous] = await onceEvent<[unknown, unknown]>(link, "mapping-changed");
    assert.deepEqual(current, { host: "203.0.113.5", port: 51234 });
    assert.deepEqual(previous, { host: "203.0.113.5", port: 40001 });
    assert.deepEqual(link.publicAddress, { host: "203.0.113.5", port: 51234 });
  } finally {
    link.close();
    await fake.close();
  }
});

// ---------------------------------------------------------------- link failures

test("link: a refused connection is REPORTER_UNREACHABLE", { timeout: 10_000 }, async () => {
  const port = await freePort();
  await rejectsWith(openReporterLink(linkOptions(port)), "REPORTER_UNREACHABLE", /ECONNREFUSED/);
});

test("link: a local port already listened on is REPORTER_UNREACHABLE naming the port", { timeout: 10_000 }, async () => {
  const reporter = await startReporter(reporterConfig("127.0.0.1"));
  const busy = createServer();
  await new Promise<void>((resolve) => busy.listen(0, resolve));
  const P = (busy.address() as { port: number }).port;
  try {
    await rejectsWith(openReporterLink(linkOptions(reporter.addresses[0].port, "127.0.0.1", { localPort: P })), "REPORTER_UNREACHABLE", new RegExp(`local port ${P} \\(EADDRINUSE\\)`));
  } finally {
    await new Promise<void>((resolve) => busy.close(() => resolve()));
    await reporter.close();
  }
});

const badReporters: [string, string, RegExp, (msg: DecodedStunMessage, reply: Reply, socket: Socket) => void][] = [
  ["never answers", "REPORTER_UNREACHABLE", /connected but got no Binding answer within 200 ms/, () => {}],
  ["speaks HTTP", "REPORTER_PROTOCOL", /top two bits/, (_m, _r, s) => void s.write("HTTP/1.1 400 Bad Request\r\n\r\n")],
  [
    "answers with an error response",
    "REPORTER_PROTOCOL",
    /answered the Binding request with 401 Unauthorized/,
    (m, r) => r({ method: METHOD_BINDING, class: "error", transactionId: m.transactionId, attributes: [{ kind: "ERROR-CODE", code: 401, reason: "Unauthorized" }] }),
  ],
  [
    "answers without an address",
    "REPORTER_PROTOCOL",
    /without XOR-MAPPED-ADDRESS or MAPPED-ADDRESS/,
    (m, r) => r({ method: METHOD_BINDING, class: "success", transactionId: m.transactionId, attributes: [] }),
  ],
  ["closes the connection", "REPORTER_UNREACHABLE", /closed the connection|lost/, (_m, _r, s) => void s.end()],
];

for (const [name, code, pattern, behaviour] of badReporters) {
  test(`link: a reporter that ${name} is refused and the socket destroyed`, { timeout: 10_000 }, async () => {
    const fake = await fakeReporter(behaviour);
    try {
      const closed = onceEvent(fake.events, "socket-closed", "the link to drop its socket");
      await rejectsWith(openReporterLink(linkOptions(fake.port, "127.0.0.1", { timeout: 200 })), code, pattern);
      await closed;
    } finally {
      await fake.close();
    }
  });
}

test("link: a response to something it never asked is ignored", { timeout: 10_000 }, async () => {
  const fake = await fakeReporter((msg, reply) => {
    if (msg.class !== "request") return;
    reply(successFor({ ...msg, transactionId: newTransactionId() }, "192.0.2.66", 66));
    reply(successFor(msg, "192.0.2.1", 1));
  });
  const link = await openReporterLink(linkOptions(fake.port));
  assert.deepEqual(link.publicAddress, { host: "192.0.2.1", port: 1 });
  link.close();
  await fake.close();
});

// ---------------------------------------------------------------- bad peers

test("reporter drops garbage, slowloris and oversize peers, and still serves a good client", { timeout: 10_000 }, async () => {
  // A long handshake timeout: garbage must be dropped for what it is, not for being slow.
  const reporter = await startReporter(reporterConfig("127.0.0.1", { handshake_timeout: 60_000 }));
  const port = reporter.addresses[0].port;
  const bad = async (what: string, bytes: Buffer) => {
    const peer = await RawPeer.open("127.0.0.1", port);
    peer.socket.write(bytes);
    await peer.waitClosed(`the reporter to drop a peer that ${what}`);
  };
  try {
    await bad("speaks HTTP", Buffer.from("GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    await bad("sends a TLS ClientHello", Buffer.from("160301020001", "hex"));
    await bad("has the wrong magic cookie", Buffer.from("000100000000000000000000000000000000000000", "hex"));
    await bad("announces a 65532-byte message", Buffer.from("0001fffc2112a442", "hex"));
    const bad_fp = encodeMessage(request(), { fingerprint: true });
    bad_fp[bad_fp.length - 1] ^= 0xff;
    await bad("sends a bad FINGERPRINT", bad_fp);

    // Bound first, then broken: the warn path.
    const peer = await RawPeer.open("127.0.0.1", port);
    peer.send(request());
    assert.equal((await peer.next()).class, "success");
    peer.socket.write(Buffer.from("\xff\xff\xff\xff", "latin1"));
    await peer.waitClosed("the reporter to drop a peer that turned bad");

    const good = await openReporterLink(linkOptions(port));
    assert.deepEqual(good.publicAddress, { host: "127.0.0.1", port: good.localPort });
    good.close();
  } finally {
    await reporter.close();
  }
});

test("reporter closes connections that send no Binding request within handshake_timeout", { timeout: 10_000 }, async () => {
  const reporter = await startReporter(reporterConfig("127.0.0.1", { handshake_timeout: 200 }));
  const port = reporter.addresses[0].port;
  try {
    const started = performance.now();
    const silent = await Promise.all(Array.from({ length: 10 }, () => RawPeer.open("127.0.0.1", port)));
    const partial = await RawPeer.open("127.0.0.1", port);
    partial.socket.write(encodeMessage(request()).subarray(0, 19)); // one byte short of a header
    const onlyIndication = await RawPeer.open("127.0.0.1", port);
    onlyIndication.send({ method: METHOD_BINDING, class: "indication", transactionId: newTransactionId(), attributes: [] });

    // While those hang, a good client is served at once.
    const good = await openReporterLink(linkOptions(port));
    assert.equal(good.publicAddress.port, good.localPort);

    await Promise.all([...silent, partial, onlyIndication].map((p) => p.waitClosed("a slowloris peer to be dropped")));
    assert.ok(performance.now() - started >= 200, "dropped by the handshake timer, not earlier");
    assert.equal(good.closed, false, "the good client stays");
    good.close();
  } finally {
    await reporter.close();
  }
});

// ---------------------------------------------------------------- shutdown

test("close() ends every connection, stops listening, and leaves no handles or timers", { timeout: 10_000 }, async () => {
  const baseline = countResources();
  const reporter = await startReporter(reporterConfig("127.0.0.1", { handshake_timeout: 60_000 }));
  const port = reporter.addresses[0].port;
  const link: ReporterLink = await openReporterLink(linkOptions(port, "127.0.0.1", { keepAliveInterval: 60_000 }));
  const handshaking = await RawPeer.open("127.0.0.1", port);
  const bound = await RawPeer.open("127.0.0.1", port);
  try {
    bound.send(request());
    await bound.next();

    const linkClosed = onceEvent<[Error | undefined]>(link, "close", "the link to see the reporter go");
    await within(reporter.close(), BOUND, "reporter.close()");
    await within(reporter.close(), BOUND, "a second reporter.close()");
    const [reason] = await linkClosed;
    assert.ok(reason instanceof NatproxyError && reason.code === "REPORTER_UNREACHABLE");
    await handshaking.waitClosed("the handshaking peer to be closed");
    await bound.waitClosed("the bound peer to be closed");

    const refused = connect({ host: "127.0.0.1", port });
    const [err] = await onceEvent<[NodeJS.ErrnoException]>(refused, "error", "a refused connect");
    assert.equal(err.code, "ECONNREFUSED");
    refused.destroy();
    link.close(); // idempotent
    await resourcesBackTo(baseline, ["TCPServerWrap", "TCPSocketWrap", "Timeout"]);
  } finally {
    // Should close() be broken, closing our ends lets the reporter's side go
    // too, so a failure here does not keep the test process alive.
    link.close();
    handshaking.socket.destroy();
    bound.socket.destroy();
  }
});

test("startReporter rejects with a clear error when the port is taken", { timeout: 10_000 }, async () => {
  const first = await startReporter(reporterConfig("127.0.0.1"));
  try {
    await assert.rejects(
      startReporter({ ...reporterConfig("127.0.0.1"), listen: { host: "127.0.0.1", port: first.addresses[0].port } }),
      (err: unknown) => err instanceof Error && /reporter cannot listen on 127\.0\.0\.1:\d+: EADDRINUSE/.test(err.message),
    );
  } finally {
    await first.close();
  }
});
