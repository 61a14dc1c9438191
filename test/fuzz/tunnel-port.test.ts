import assert from "node:assert/strict";
import net from "node:net";
import tls from "node:tls";
import { before, describe, test } from "node:test";
import { encodeMessage as encodeWire, encodeOpen, encodeSession, MessageType } from "../../src/protocol/wire.ts";
import { generateCertificate, type KeyPair } from "../../src/tls/certs.ts";
import { testPki } from "../../scripts/lib/pki.ts";
import { CASE_DEADLINE_MS, count, mutate, runCases, SEED, show, split } from "./harness.ts";
import { afterFuzzTests, canary, counts, finishFuzz, stack, tunnelPort, useFuzzStack } from "./stack.ts";

// Fuzzing of the local proxy's tunnel port, the connect-back listener, where
// the local proxy is the TLS *client* (test/fuzz/harness.ts: how, and the
// FUZZ_* knobs; tag "tunnel").

useFuzzStack();

/** Certificates a foreign TLS server at the tunnel port may present. */
const certs: Record<string, KeyPair> = {};

before(async () => {
  // The stack's PKI (made once per process), whether or not the stack is up yet.
  const pki = await testPki();
  certs.selfSigned = await generateCertificate({ commonName: "localhost", dnsNames: ["localhost"], ipAddresses: ["127.0.0.1"], days: 2 });
  const otherCa = await generateCertificate({ commonName: "some other CA", isCa: true, days: 2 });
  certs.otherCa = await generateCertificate({ commonName: "localhost", dnsNames: ["localhost"], ipAddresses: ["127.0.0.1"], ca: { key: otherCa.key, cert: otherCa.cert }, days: 2 });
  certs.expired = await generateCertificate({
    commonName: "localhost",
    dnsNames: ["localhost"],
    ipAddresses: ["127.0.0.1"],
    ca: { key: pki.ca.key, cert: pki.ca.cert },
    notBefore: new Date(Date.now() - 10 * 86_400_000),
    notAfter: new Date(Date.now() - 86_400_000),
  });
  certs.wrongName = await generateCertificate({ commonName: "evil.example", dnsNames: ["evil.example"], ipAddresses: ["192.0.2.66"], ca: { key: pki.ca.key, cert: pki.ca.cert }, days: 2 });
});

describe(`fuzz (seed ${SEED})`, () => {
  /**
   * We dial the tunnel port like a coordinator would and then act as the TLS
   * server (or as something that is not TLS at all). Returns what the local
   * proxy sent: handshake records only, and never an application byte.
   */
  function tunnelPeer(chunks: Buffer[], tlsServer?: tls.SecureContextOptions): Promise<{ hung: boolean; secure: boolean; appBytes: number; raw: Buffer; error?: string; ms: number }> {
    return new Promise((resolve) => {
      const t0 = performance.now();
      const raw = net.connect(tunnelPort, "127.0.0.1");
      const got: Buffer[] = [];
      let appBytes = 0;
      let secure = false;
      let error: string | undefined;
      let done = false;
      const timer = setTimeout(() => finish(true), CASE_DEADLINE_MS);
      const finish = (hung: boolean) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        raw.destroy();
        resolve({ hung, secure, appBytes, raw: Buffer.concat(got), error, ms: Math.round(performance.now() - t0) });
      };
      raw.on("error", (e: NodeJS.ErrnoException) => (error ??= e.code));
      raw.on("close", () => finish(false));
      raw.once("connect", async () => {
        if (!tlsServer) {
          raw.on("data", (c: Buffer) => got.push(c));
          for (const c of chunks) {
            if (raw.destroyed) return;
            raw.write(c);
            await new Promise((r) => setImmediate(r));
          }
          if (!raw.destroyed) raw.end();
          return;
        }
        const s = new tls.TLSSocket(raw, { isServer: true, secureContext: tls.createSecureContext(tlsServer) });
        s.on("data", (c: Buffer) => (appBytes += c.length));
        s.on("error", (e: NodeJS.ErrnoException) => (error ??= e.code ?? e.message));
        s.on("close", () => finish(false));
        s.once("secure", async () => {
          secure = true;
          for (const c of chunks) {
            if (s.destroyed) return;
            s.write(c);
            await new Promise((r) => setImmediate(r));
          }
          if (!s.destroyed) s.end();
        });
      });
    });
  }

  /** TLS record content types in what the local proxy sent (it must be the handshake only). */
  function recordTypes(b: Buffer): number[] {
    const types: number[] = [];
    for (let at = 0; at + 5 <= b.length; at += 5 + b.readUInt16BE(at + 3)) types.push(b[at]);
    return types;
  }

  test("the local proxy's tunnel port: garbage peers, foreign TLS servers, garbage inside a trusted TLS connection", async (t) => {
    const stats = new Map<string, number>();
    const start = counts();
    const pki = stack.pki;
    const r = await runCases("tunnel", 5000, async (rng) => {
      const kind = rng.int(8);
      const session = rng.uuid();
      if (kind <= 1) {
        const payload = rng.pick([
          rng.bytes(rng.range(0, 1500)),
          Buffer.concat([Buffer.from([rng.pick([0x14, 0x15, 0x16, 0x17]), 0x03, rng.range(0, 4)]), rng.bytes(rng.range(0, 600))]),
          Buffer.from("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
          Buffer.from("SSH-2.0-OpenSSH_9.6\r\n"),
          encodeSession(session),
        ]);
        const x = await tunnelPeer(split(rng, payload));
        count(stats, "raw");
        if (x.hung) return `a raw peer was not dropped within ${CASE_DEADLINE_MS} ms: ${show(payload)}`;
        if (recordTypes(x.raw).some((ty) => ty === 0x17)) return `sent application data to a peer that never completed a handshake`;
        return undefined;
      }
      const which = rng.pick(["selfSigned", "otherCa", "expired", "wrongName", "tls11", "right", "right", "right"] as const);
      const context: tls.SecureContextOptions =
        which === "right"
          ? { key: pki.server.key, cert: pki.server.cert }
          : which === "tls11"
            ? { key: pki.server.key, cert: pki.server.cert, minVersion: "TLSv1", maxVersion: "TLSv1.1", ciphers: "DEFAULT@SECLEVEL=0" }
            : { key: certs[which].key, cert: certs[which].cert };
      const inside = rng.pick([
        encodeSession(session),
        Buffer.concat([encodeSession(session), rng.bytes(rng.range(1, 200))]),
        mutate(rng, encodeSession(session)),
        rng.bytes(rng.range(1, 1200)),
        encodeOpen({ session, target: { host: "127.0.0.1", port: canary.port } }),
        encodeWire(MessageType.Result, Buffer.from('{"code":"OK"}')),
        Buffer.from([0x4e, 0x41, 0x54, 0x50, 1, 1, 0xff, 0xff]),
        encodeSession(session).subarray(0, rng.range(1, 23)),
      ]);
      const x = await tunnelPeer(split(rng, inside), context);
      count(stats, `${which}-${x.secure ? "handshake" : "no-handshake"}`);
      if (x.hung) return `a ${which} TLS peer was not dropped within ${CASE_DEADLINE_MS} ms, sending ${show(inside)}`;
      if (x.appBytes > 0) return `the local proxy wrote ${x.appBytes} application bytes to a connect-back it never matched (${which})`;
      if (which === "tls11" && x.secure) return "completed a TLS 1.1 handshake (TLS 1.2 is the minimum)";
      return undefined;
    }, 40);
    await finishFuzz(t, "tunnel", r, stats, start);
    assert.equal(stack.local.pendingSessions(), 0);
  });

  afterFuzzTests();
});
