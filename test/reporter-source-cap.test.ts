// The reporter's per-source cap ([reporter] max_connections_per_ip): one
// address that opens connection after connection (and answers keepalives, so
// they stay) must not be able to take every slot of the reporter and lock out
// the local proxies of everyone else.
import assert from "node:assert/strict";
import { connect, type Socket } from "node:net";
import { test } from "node:test";
import type { ReporterConfig } from "../src/config.ts";
import { setLogLevel } from "../src/log.ts";
import * as reporterModule from "../src/reporter/index.ts";
import { decodeMessage, encodeMessage, getAttribute, METHOD_BINDING, newTransactionId, type DecodedStunMessage } from "../src/stun.ts";
import { StunFramer } from "../src/stun-framer.ts";
import { captureLogs } from "./helpers/logs.ts";

setLogLevel("silent");

const CAP = 5;

/** What one connection got: the Binding answer, or a close with nothing received. */
type Outcome = { answered: DecodedStunMessage; socket: Socket } | { closed: true; received: number };

/** Connects from `localAddress`, sends one Binding request and reports what came first. */
function bindingFrom(localAddress: string, port: number): Promise<Outcome> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host: "127.0.0.1", port, localAddress });
    const framer = new StunFramer();
    let received = 0;
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no answer and no close from the reporter within 3 s (from ${localAddress})`));
    }, 3000);
    socket.on("error", () => {});
    socket.on("connect", () => socket.write(encodeMessage({ method: METHOD_BINDING, class: "request", transactionId: newTransactionId(), attributes: [] }, { fingerprint: true })));
    socket.on("data", (chunk: Buffer) => {
      received += chunk.length;
      const frames = framer.push(chunk);
      if (frames.length === 0) return;
      clearTimeout(timer);
      resolve({ answered: decodeMessage(frames[0]), socket });
    });
    socket.on("close", () => {
      clearTimeout(timer);
      resolve({ closed: true, received });
    });
  });
}

function answeredAddress(o: Outcome): string {
  assert.ok("answered" in o, "expected a Binding answer, got a closed connection");
  assert.equal(o.answered.class, "success");
  const mapped = getAttribute(o.answered, "XOR-MAPPED-ADDRESS");
  assert.ok(mapped);
  return mapped.address.address;
}

test("one address holds at most max_connections_per_ip connections; a peer from another address is still answered", { timeout: 20_000 }, async () => {
  const logs = captureLogs("reporter");
  // A plain object, not resolveConfig: on a reporter without the cap the
  // unknown key is simply ignored, and the attack below succeeds.
  const config = { listen: { host: "127.0.0.1", port: 0 }, nat_keep_alive_interval: 60_000, handshake_timeout: 60_000, max_connections_per_ip: CAP } as ReporterConfig;
  const reporter = await reporterModule.startReporter(config);
  const port = reporter.addresses[0].port;
  const held: Socket[] = [];
  try {
    // The attacker: CAP bound peers (they stay, as answering keepalives would keep them).
    for (let i = 0; i < CAP; i++) {
      const o = await bindingFrom("127.0.0.1", port);
      assert.equal(answeredAddress(o), "127.0.0.1");
      if ("answered" in o) held.push(o.socket);
    }
    // Everything past the cap is reset unanswered, and the reporter says so once.
    for (let i = 0; i < 3; i++) {
      const o = await bindingFrom("127.0.0.1", port);
      if ("answered" in o) held.push(o.socket);
      assert.ok("closed" in o && o.received === 0, `connection ${CAP + i + 1} from 127.0.0.1 was ${"answered" in o ? "answered" : `sent ${o.received} bytes`}`);
    }
    assert.equal(logs.lines.filter((l) => /127\.0\.0\.1 holds 5 connections \(\[reporter\] max_connections_per_ip\)/.test(l)).length, 1, logs.lines.join("\n"));

    // Someone else is served.
    const other = await bindingFrom("127.0.0.2", port);
    assert.equal(answeredAddress(other), "127.0.0.2");
    if ("answered" in other) other.socket.destroy();

    // A slot given back is a slot again. The reporter learns of the close a
    // moment after the peer does, so a few attempts may still be reset.
    held.shift()?.destroy();
    let again: Outcome | undefined;
    for (let attempt = 0; attempt < 50 && !(again && "answered" in again); attempt++) again = await bindingFrom("127.0.0.1", port);
    assert.ok(again);
    assert.equal(answeredAddress(again), "127.0.0.1");
    if ("answered" in again) held.push(again.socket);
  } finally {
    logs.restore();
    for (const s of held) s.destroy();
    await reporter.close();
  }
});

test("the cap counts an IPv4 address, or the /64 an IPv6 address is in", () => {
  const { sourceOf } = reporterModule;
  assert.equal(sourceOf("203.0.113.7"), "203.0.113.7");
  assert.equal(sourceOf("::ffff:203.0.113.7"), "203.0.113.7");
  assert.equal(sourceOf("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64");
  assert.equal(sourceOf("2001:db8:1:2::9"), "2001:db8:1:2::/64");
  assert.equal(sourceOf("2001:0db8:0001:0002:ffff::1"), "2001:db8:1:2::/64");
  assert.equal(sourceOf("2001:db8::1"), "2001:db8::/64");
  assert.equal(sourceOf("1::2:3:4:5:6"), "1:0:0:2::/64");
  assert.equal(sourceOf("fe80::1%eth0"), "fe80::/64");
  assert.equal(sourceOf("::1"), "::/64");
  assert.notEqual(sourceOf("2001:db8:1:2::1"), sourceOf("2001:db8:1:3::1"));
});
