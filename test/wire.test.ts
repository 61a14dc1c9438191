import assert from "node:assert/strict";
import { PassThrough } from "node:stream";
import { test } from "node:test";
import { v4 as uuidv4 } from "uuid";
import { HEADER_SIZE, MessageType, decodeMessage, encodeMessage, encodeSession, isSessionId, readMessage, sessionIdOf, WireError } from "../src/protocol/wire.ts";

test("a session message round-trips and is 24 bytes", () => {
  const id = uuidv4();
  const buf = encodeSession(id);
  assert.equal(buf.length, HEADER_SIZE + 16);
  assert.equal(buf.subarray(0, 4).toString("latin1"), "NATP");
  const d = decodeMessage(buf);
  assert.ok(d);
  assert.equal(sessionIdOf(d.message), id);
  assert.equal(d.rest.length, 0);
});

test("partial input waits; bytes after the message are handed back", () => {
  const id = uuidv4();
  const buf = Buffer.concat([encodeSession(id), Buffer.from("HTTP/1.1 200 OK\r\n")]);
  for (let i = 0; i < HEADER_SIZE + 16; i++) assert.equal(decodeMessage(buf.subarray(0, i)), undefined, `prefix of ${i}`);
  const d = decodeMessage(buf);
  assert.equal(d?.rest.toString(), "HTTP/1.1 200 OK\r\n");
});

test("refusals: wrong magic (at the first wrong byte), version, type, oversize", () => {
  assert.throws(() => decodeMessage(Buffer.from("GET / HTTP/1.1\r\n")), /does not speak natproxy/);
  assert.throws(() => decodeMessage(Buffer.from("NX")), WireError);
  const v2 = encodeSession(uuidv4());
  v2[4] = 2;
  assert.throws(() => decodeMessage(v2), /unsupported wire version 2/);
  const t9 = encodeSession(uuidv4());
  t9[5] = 9;
  assert.throws(() => decodeMessage(t9), /unknown message type 9/);
  const big = encodeMessage(MessageType.Session, Buffer.alloc(4));
  big.writeUInt16BE(60000, 6);
  assert.throws(() => decodeMessage(big), /exceeds/);
  assert.throws(() => encodeMessage(MessageType.Session, Buffer.alloc(2000)), /exceeds/);
  assert.throws(() => sessionIdOf({ type: MessageType.Session, payload: Buffer.alloc(3) }), /not a session message/);
});

test("only UUID v4 are session ids", () => {
  assert.equal(isSessionId(uuidv4()), true);
  assert.equal(isSessionId("00000000-0000-1000-8000-000000000000"), false);
  assert.equal(isSessionId("not-a-uuid"), false);
  assert.equal(isSessionId(42), false);
});

test("readMessage reads byte by byte and leaves the payload on the stream", async () => {
  const stream = new PassThrough();
  const id = uuidv4();
  const wire = Buffer.concat([encodeSession(id), Buffer.from("payload")]);
  const reading = readMessage(stream);
  for (const byte of wire) stream.write(Buffer.from([byte]));
  const msg = await reading;
  assert.equal(sessionIdOf(msg), id);
  // The rest was put back; the next consumer's 'data' listener starts the flow.
  const rest: Buffer[] = [];
  stream.on("data", (c: Buffer) => rest.push(c));
  stream.end();
  await new Promise((r) => stream.on("end", r));
  assert.equal(Buffer.concat(rest).toString(), "payload");
});

test("readMessage rejects on garbage and on an early close", async () => {
  const a = new PassThrough();
  const pa = readMessage(a);
  a.write("garbage!");
  await assert.rejects(pa, /bad magic/);
  const b = new PassThrough();
  const pb = readMessage(b);
  b.end(Buffer.from("NATP"));
  await assert.rejects(pb, /closed before its first message/);
});

test("open and result messages round-trip; refusals name what is wrong", async () => {
  const { encodeOpen, openOf, encodeResult, resultOf } = await import("../src/protocol/wire.ts");
  const id = uuidv4();
  for (const host of ["example.com", "203.0.113.30", "2001:db8::1", "ü.example"]) {
    const d = decodeMessage(encodeOpen({ session: id, target: { host, port: 443 } }));
    assert.ok(d);
    assert.deepEqual(openOf(d.message), { session: id, target: { host, port: 443 } });
  }
  assert.throws(() => encodeOpen({ session: id, target: { host: "", port: 1 } }), WireError);
  assert.throws(() => encodeOpen({ session: id, target: { host: "a".repeat(256), port: 1 } }), WireError);
  const ok = decodeMessage(encodeResult({ code: "OK", target_address: "203.0.113.30:443" }));
  assert.deepEqual(ok && resultOf(ok.message), { code: "OK", message: undefined, target_address: "203.0.113.30:443" });
  // A message too long for one frame is cut, not refused.
  const long = decodeMessage(encodeResult({ code: "TARGET_REFUSED", message: "x".repeat(5000) }));
  assert.equal(long && resultOf(long.message).code, "TARGET_REFUSED");
  assert.throws(() => resultOf({ type: MessageType.Result, payload: Buffer.from("not json") }), /not JSON/);
  assert.throws(() => resultOf({ type: MessageType.Result, payload: Buffer.from("{}") }), /no code/);
  assert.throws(() => openOf({ type: MessageType.Session, payload: Buffer.alloc(16) }), /not an open message/);
});
