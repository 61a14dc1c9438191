import { test } from "node:test";
import assert from "node:assert/strict";
import { bytesToIp, ipToBytes, unmapIPv4 } from "../src/address.ts";
import {
  ATTR,
  decodeMessage,
  encodeMessage,
  getAttribute,
  mappedAddressOf,
  messageType,
  METHOD_BINDING,
  newTransactionId,
  splitMessageType,
  StunError,
  verifyFingerprint,
  type StunAttribute,
  type StunClass,
  type StunMessage,
} from "../src/stun.ts";
import { StunFramer } from "../src/stun-framer.ts";

const hex = (text: string): Buffer => Buffer.from(text.replace(/\s+/g, ""), "hex");

// RFC 5769 test vectors (sections 2.1-2.3). Their padding bytes are 0x20 on
// purpose. Their MESSAGE-INTEGRITY (HMAC-SHA1 with the password
// "VOkJxbRl1RmTxUk/WvJxBt") is decoded but never checked: natproxy uses no
// STUN credentials.
const TID = hex("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae");
const SAMPLE_REQUEST = hex(`
  00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
  80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
  00 24 00 04 6e 00 01 ff
  80 29 00 08 93 2f f9 b1 51 26 3b 36
  00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
  00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
  80 28 00 04 e5 7a 3b cf`);
const SAMPLE_IPV4_RESPONSE = hex(`
  01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
  80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
  00 20 00 08 00 01 a1 47 e1 12 a6 43
  00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
  80 28 00 04 c0 7d 4c 96`);
const SAMPLE_IPV6_RESPONSE = hex(`
  01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
  80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
  00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
  00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
  80 28 00 04 c8 fb 0b 4c`);

/**
 * The attributes an encoder is given: FINGERPRINT is computed, not passed;
 * MESSAGE-INTEGRITY, which the encoder cannot compute, goes in as raw bytes.
 */
function inputAttributes(msg: StunMessage): StunAttribute[] {
  return msg.attributes.flatMap((a): StunAttribute[] => {
    if (a.kind === "FINGERPRINT") return [];
    return a.kind === "MESSAGE-INTEGRITY" ? [{ kind: "raw", type: ATTR.MESSAGE_INTEGRITY, value: a.value }] : [a];
  });
}

function throwsStun(fn: () => unknown, pattern: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof StunError, `expected a StunError, got ${String(err)}`);
    assert.equal(err.code, "REPORTER_PROTOCOL");
    assert.match(err.detail, pattern);
    return true;
  });
}

/** A header plus raw attribute bytes, with the length field set to match. */
function rawMessage(body: Buffer, type = 0x0001): Buffer {
  const header = Buffer.alloc(20);
  header.writeUInt16BE(type, 0);
  header.writeUInt16BE(body.length, 2);
  header.writeUInt32BE(0x2112a442, 4);
  TID.copy(header, 8);
  return Buffer.concat([header, body]);
}

test("RFC 5769 2.1 sample request: decoded, FINGERPRINT verified, re-encoded byte for byte", () => {
  const msg = decodeMessage(SAMPLE_REQUEST);
  assert.equal(msg.method, METHOD_BINDING);
  assert.equal(msg.class, "request");
  assert.deepEqual(msg.transactionId, TID);
  assert.deepEqual(msg.attributes, [
    { kind: "SOFTWARE", value: "STUN test client" },
    { kind: "raw", type: 0x0024, value: hex("6e 00 01 ff") },
    { kind: "raw", type: 0x8029, value: hex("93 2f f9 b1 51 26 3b 36") },
    { kind: "USERNAME", value: "evtj:h6vY" },
    { kind: "MESSAGE-INTEGRITY", value: hex("9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2") },
    { kind: "FINGERPRINT", value: 0xe57a3bcf },
  ]);
  assert.equal(verifyFingerprint(SAMPLE_REQUEST), true);

  const again = encodeMessage(
    { method: msg.method, class: msg.class, transactionId: msg.transactionId, attributes: inputAttributes(msg) },
    { fingerprint: true, padding: 0x20 },
  );
  assert.equal(again.toString("hex"), SAMPLE_REQUEST.toString("hex"));
});

for (const [name, vector, address] of [
  ["2.2 IPv4", SAMPLE_IPV4_RESPONSE, { family: "IPv4", address: "192.0.2.1", port: 32853 }],
  ["2.3 IPv6", SAMPLE_IPV6_RESPONSE, { family: "IPv6", address: "2001:db8:1234:5678:11:2233:4455:6677", port: 32853 }],
] as const) {
  test(`RFC 5769 ${name} response: XOR-MAPPED-ADDRESS and fingerprint, byte for byte`, () => {
    const msg = decodeMessage(vector);
    assert.equal(msg.method, METHOD_BINDING);
    assert.equal(msg.class, "success");
    assert.deepEqual(msg.transactionId, TID);
    assert.deepEqual(getAttribute(msg, "SOFTWARE"), { kind: "SOFTWARE", value: "test vector" });
    assert.deepEqual(getAttribute(msg, "XOR-MAPPED-ADDRESS")?.address, address);
    assert.deepEqual(mappedAddressOf(msg), address);
    assert.equal(verifyFingerprint(vector), true);

    const again = encodeMessage(
      { method: METHOD_BINDING, class: "success", transactionId: TID, attributes: inputAttributes(msg) },
      { fingerprint: true, padding: 0x20 },
    );
    assert.equal(again.toString("hex"), vector.toString("hex"));
  });
}

test("RFC 5769: a changed byte is caught by FINGERPRINT; without FINGERPRINT it decodes as changed", () => {
  const tampered = Buffer.from(SAMPLE_REQUEST);
  tampered[65] ^= 0x01; // inside USERNAME (its value starts at byte 64)
  assert.equal(verifyFingerprint(tampered), false);
  throwsStun(() => decodeMessage(tampered), /FINGERPRINT mismatch/);

  // Without FINGERPRINT: drop its 8 bytes and shorten the length field.
  const bare = Buffer.from(SAMPLE_REQUEST.subarray(0, SAMPLE_REQUEST.length - 8));
  bare.writeUInt16BE(bare.length - 20, 2);
  assert.equal(verifyFingerprint(bare), false);
  bare[65] ^= 0x01;
  const changed = decodeMessage(bare);
  assert.equal(getAttribute(changed, "USERNAME")?.value, "ewtj:h6vY");
});

test("message type: method and class bits are interleaved as RFC 8489 §5 draws them", () => {
  const cases: [StunClass, number][] = [
    ["request", 0x0001],
    ["indication", 0x0011],
    ["success", 0x0101],
    ["error", 0x0111],
  ];
  for (const [cls, type] of cases) {
    assert.equal(messageType(METHOD_BINDING, cls), type);
    assert.deepEqual(splitMessageType(type), { method: METHOD_BINDING, class: cls });
  }
  for (const method of [0x000, 0x001, 0x00f, 0x010, 0x07f, 0x080, 0xabc, 0xfff]) {
    for (const [cls] of cases) assert.deepEqual(splitMessageType(messageType(method, cls)), { method, class: cls });
  }
  assert.equal(messageType(0xfff, "error") & 0xc000, 0, "the top two bits stay zero");
  assert.throws(() => messageType(0x1000, "request"), RangeError);
});

test("round trip: every attribute kind, both address families, fingerprint", () => {
  const transactionId = newTransactionId();
  assert.equal(transactionId.length, 12);
  const attributes: StunAttribute[] = [
    { kind: "XOR-MAPPED-ADDRESS", address: { family: "IPv4", address: "203.0.113.7", port: 40001 } },
    { kind: "XOR-MAPPED-ADDRESS", address: { family: "IPv6", address: "2001:db8::51:2", port: 1 } },
    { kind: "MAPPED-ADDRESS", address: { family: "IPv4", address: "198.51.100.2", port: 65535 } },
    { kind: "MAPPED-ADDRESS", address: { family: "IPv6", address: "::ffff:192.0.2.1", port: 0 } },
    { kind: "SOFTWARE", value: "natproxy/1.0 – ünïcode" },
    { kind: "USERNAME", value: "user:name" },
    { kind: "ERROR-CODE", code: 420, reason: "Unknown Attribute" },
    { kind: "UNKNOWN-ATTRIBUTES", types: [0x0024, 0x7fff, 0x0002] },
    { kind: "raw", type: 0x8029, value: Buffer.from([1, 2, 3]) },
    { kind: "raw", type: 0x0024, value: Buffer.alloc(0) },
  ];
  const msg: StunMessage = { method: 0x123, class: "error", transactionId, attributes };
  const bytes = encodeMessage(msg, { fingerprint: true });
  assert.equal(bytes.length % 4, 0);
  assert.equal(bytes.readUInt16BE(2), bytes.length - 20);
  const back = decodeMessage(bytes);
  assert.equal(back.method, 0x123);
  assert.equal(back.class, "error");
  assert.deepEqual(back.transactionId, transactionId);
  assert.deepEqual(inputAttributes(back), attributes);
  assert.deepEqual(back.attributes.slice(-1).map((a) => a.kind), ["FINGERPRINT"]);
  assert.equal(verifyFingerprint(bytes), true);

  // No attributes, no checks: the smallest message.
  const bare = encodeMessage({ method: METHOD_BINDING, class: "request", transactionId, attributes: [] });
  assert.equal(bare.length, 20);
  assert.deepEqual(decodeMessage(bare).attributes, []);
  assert.equal(verifyFingerprint(bare), false);
});

test("XOR-MAPPED-ADDRESS bytes match RFC 5769 when encoded from scratch", () => {
  const bytes = encodeMessage({
    method: METHOD_BINDING,
    class: "success",
    transactionId: TID,
    attributes: [{ kind: "XOR-MAPPED-ADDRESS", address: { family: "IPv4", address: "192.0.2.1", port: 32853 } }],
  });
  assert.equal(bytes.subarray(20).toString("hex"), "002000080001a147e112a643");
  const v6 = encodeMessage({
    method: METHOD_BINDING,
    class: "success",
    transactionId: TID,
    attributes: [{ kind: "XOR-MAPPED-ADDRESS", address: { family: "IPv6", address: "2001:db8:1234:5678:11:2233:4455:6677", port: 32853 } }],
  });
  assert.equal(v6.subarray(20).toString("hex"), "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9");
});

test("attributes after MESSAGE-INTEGRITY other than FINGERPRINT are ignored (RFC 8489 §14.5)", () => {
  const integrity = Buffer.concat([hex("00 08 00 14"), Buffer.alloc(20, 0xab)]);
  const extra = hex("80 22 00 04 65 76 69 6c"); // SOFTWARE "evil"
  const msg = decodeMessage(rawMessage(Buffer.concat([integrity, extra])));
  assert.deepEqual(msg.attributes, [{ kind: "MESSAGE-INTEGRITY", value: Buffer.alloc(20, 0xab) }]);
});

test("decoder refusals name what is wrong", () => {
  throwsStun(() => decodeMessage(Buffer.alloc(0)), /empty/);
  throwsStun(() => decodeMessage(SAMPLE_REQUEST.subarray(0, 12)), /shorter than the 20-byte header/);
  throwsStun(() => decodeMessage(Buffer.from("GET / HTTP/1.1\r\nHost: x\r\n\r\n")), /top two bits/);
  const badCookie = Buffer.from(SAMPLE_REQUEST);
  badCookie.writeUInt32BE(0xdeadbeef, 4);
  throwsStun(() => decodeMessage(badCookie), /magic cookie is 0xdeadbeef/);
  const oddLength = rawMessage(Buffer.alloc(8));
  oddLength.writeUInt16BE(6, 2);
  throwsStun(() => decodeMessage(oddLength), /not a multiple of 4/);
  throwsStun(() => decodeMessage(Buffer.concat([SAMPLE_REQUEST, Buffer.alloc(4)])), /length field says 88 bytes.*92 follow/);
  const short = Buffer.from(SAMPLE_REQUEST.subarray(0, 60));
  throwsStun(() => decodeMessage(short), /length field says 88 bytes.*40 follow/);

  throwsStun(() => decodeMessage(rawMessage(hex("80 22 00 08 61 62 63 64"))), /SOFTWARE at byte 20 claims 8 bytes, only 4 remain/);
  throwsStun(() => decodeMessage(rawMessage(hex("00 20 00 08 00 03 a1 47 e1 12 a6 43"))), /XOR-MAPPED-ADDRESS has address family 0x03/);
  throwsStun(() => decodeMessage(rawMessage(hex("00 20 00 14 00 01 a1 47" + "00".repeat(16)))), /XOR-MAPPED-ADDRESS for IPv4 must be 8 bytes, got 20/);
  throwsStun(() => decodeMessage(rawMessage(hex("00 01 00 08 00 02 a1 47 e1 12 a6 43"))), /MAPPED-ADDRESS for IPv6 must be 20 bytes, got 8/);
  throwsStun(() => decodeMessage(rawMessage(hex("00 01 00 02 00 01 00 00"))), /MAPPED-ADDRESS is 2 bytes, too short/);
  throwsStun(() => decodeMessage(rawMessage(hex("00 09 00 02 00 00 00 00"))), /ERROR-CODE must be at least 4 bytes/);
  throwsStun(() => decodeMessage(rawMessage(hex("00 09 00 04 00 00 07 00"))), /ERROR-CODE class 7 is not 3-6/);
  throwsStun(() => decodeMessage(rawMessage(hex("00 09 00 04 00 00 04 64"))), /ERROR-CODE number 100/);
  throwsStun(() => decodeMessage(rawMessage(hex("80 22 00 02 c3 28 00 00"))), /SOFTWARE is not valid UTF-8/);
  const longSoftware = Buffer.alloc(4 + 764, 0x61);
  longSoftware.writeUInt16BE(0x8022, 0);
  longSoftware.writeUInt16BE(764, 2);
  throwsStun(() => decodeMessage(rawMessage(longSoftware)), /SOFTWARE is 764 bytes, at most 763/);
  throwsStun(() => decodeMessage(rawMessage(hex("00 0a 00 03 00 01 02 00"))), /UNKNOWN-ATTRIBUTES length 3 is odd/);
  throwsStun(() => decodeMessage(rawMessage(hex("00 08 00 10" + "00".repeat(16)))), /MESSAGE-INTEGRITY must be 20 bytes, got 16/);
  throwsStun(() => decodeMessage(rawMessage(hex("80 28 00 08" + "00".repeat(8)))), /FINGERPRINT must be 4 bytes, got 8/);
  throwsStun(() => decodeMessage(rawMessage(hex("80 28 00 04 00 00 00 00 80 22 00 00"))), /FINGERPRINT at byte 20 is not the last attribute/);
  const wrongCrc = Buffer.from(SAMPLE_IPV4_RESPONSE);
  wrongCrc.writeUInt32BE(0, wrongCrc.length - 4);
  throwsStun(() => decodeMessage(wrongCrc), /FINGERPRINT mismatch: message says 0x00000000, content gives 0xc07d4c96/);
});

test("encoder refuses what it must compute itself or cannot represent", () => {
  const base = { method: METHOD_BINDING, class: "request" as const, transactionId: TID };
  assert.throws(() => encodeMessage({ ...base, attributes: [{ kind: "FINGERPRINT", value: 1 }] }), /computed by encodeMessage/);
  assert.throws(() => encodeMessage({ ...base, attributes: [{ kind: "MESSAGE-INTEGRITY", value: Buffer.alloc(20) }] }), /cannot encode MESSAGE-INTEGRITY/);
  assert.throws(() => encodeMessage({ ...base, transactionId: Buffer.alloc(16), attributes: [] }), /12 bytes/);
  assert.throws(() => encodeMessage({ ...base, attributes: [{ kind: "ERROR-CODE", code: 700, reason: "" }] }), /300-699/);
  assert.throws(() => encodeMessage({ ...base, attributes: [{ kind: "SOFTWARE", value: "x".repeat(764) }] }), /at most 763/);
  assert.throws(
    () => encodeMessage({ ...base, attributes: [{ kind: "XOR-MAPPED-ADDRESS", address: { family: "IPv4", address: "::1", port: 1 } }] }),
    /not an IPv4 address/,
  );
  assert.throws(
    () => encodeMessage({ ...base, attributes: [{ kind: "MAPPED-ADDRESS", address: { family: "IPv4", address: "1.2.3.4", port: 65536 } }] }),
    /port 65536/,
  );
});

test("IP text and bytes: RFC 5952 output, embedded IPv4, refusals", () => {
  const cases: [string, string][] = [
    ["::", "::"],
    ["::1", "::1"],
    ["1::", "1::"],
    ["2001:DB8:0:0:1:0:0:1", "2001:db8::1:0:0:1"],
    ["2001:db8:0:1:1:1:1:1", "2001:db8:0:1:1:1:1:1"],
    ["fe80:0000::0001", "fe80::1"],
    ["::ffff:192.0.2.1", "::ffff:192.0.2.1"],
    ["64:ff9b::192.0.2.33", "64:ff9b::c000:221"],
    ["1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8"],
  ];
  for (const [input, canonical] of cases) {
    const b = ipToBytes(input);
    assert.equal(b.length, 16, input);
    assert.equal(bytesToIp(b), canonical, input);
  }
  assert.deepEqual([...ipToBytes("192.0.2.1")], [192, 0, 2, 1]);
  assert.equal(bytesToIp(Buffer.from([10, 0, 0, 255])), "10.0.0.255");
  assert.throws(() => ipToBytes("example.com"), /not an IP address/);
  assert.throws(() => ipToBytes("fe80::1%eth0"), /not an IP address/);
  assert.throws(() => bytesToIp(Buffer.alloc(5)), /4 or 16 bytes/);
  // "::a.b.c.d" is IPv4-compatible, not mapped; a leading "::" may stand for one group.
  assert.equal(ipToBytes("::192.0.2.1").toString("hex"), "000000000000000000000000c0000201");
  assert.equal(bytesToIp(ipToBytes("::192.0.2.1")), "::c000:201");
  assert.equal(ipToBytes("::2:3:4:5:6:7:8").toString("hex"), "00000002000300040005000600070008");
});

test("unmapIPv4: an IPv4-mapped address in any spelling becomes IPv4, anything else is left alone", () => {
  for (const a of ["::ffff:192.0.2.1", "::FFFF:192.0.2.1", "::ffff:c000:201", "0:0:0:0:0:ffff:c000:0201"]) assert.equal(unmapIPv4(a), "192.0.2.1", a);
  for (const a of ["192.0.2.1", "::192.0.2.1", "::ffff:0:c000:201", "2001:db8::1", "fe80::1%eth0", "::ffff:192.0.2.1%eth0", "::ffff:999.0.2.1", "example.com", ""])
    assert.equal(unmapIPv4(a), a, a);
});

// ---------------------------------------------------------------- framer

const STREAM = [SAMPLE_REQUEST, SAMPLE_IPV4_RESPONSE, SAMPLE_IPV6_RESPONSE];

test("framer: fed one byte at a time, yields each message exactly when its last byte arrives", () => {
  const framer = new StunFramer();
  const all = Buffer.concat(STREAM);
  const ends = new Set<number>();
  let at = 0;
  for (const m of STREAM) ends.add((at += m.length));
  const got: Buffer[] = [];
  for (let i = 0; i < all.length; i++) {
    const out = framer.push(all.subarray(i, i + 1));
    if (ends.has(i + 1)) assert.equal(out.length, 1, `a message ends at byte ${i + 1}`);
    else assert.equal(out.length, 0, `no message ends at byte ${i + 1}`);
    got.push(...out);
  }
  assert.deepEqual(got, STREAM);
  assert.equal(framer.buffered, 0);
});

test("framer: several messages in one chunk, and every other chunk size", () => {
  const all = Buffer.concat(STREAM);
  const once = new StunFramer().push(all);
  assert.deepEqual(once, STREAM);
  for (let size = 2; size <= 41; size++) {
    const framer = new StunFramer();
    const got: Buffer[] = [];
    for (let i = 0; i < all.length; i += size) got.push(...framer.push(all.subarray(i, i + size)));
    assert.deepEqual(got, STREAM, `chunk size ${size}`);
    assert.equal(framer.buffered, 0);
  }
  // A trailing partial message stays buffered until completed.
  const framer = new StunFramer();
  assert.deepEqual(framer.push(Buffer.concat([SAMPLE_REQUEST, SAMPLE_IPV4_RESPONSE.subarray(0, 30)])), [SAMPLE_REQUEST]);
  assert.equal(framer.buffered, 30);
  assert.deepEqual(framer.push(SAMPLE_IPV4_RESPONSE.subarray(30)), [SAMPLE_IPV4_RESPONSE]);
});

test("framer: refuses garbage at the first byte that proves it, and stays failed", () => {
  const framer = new StunFramer();
  assert.throws(() => framer.push(Buffer.from("G")), (err: unknown) => err instanceof StunError && /top two bits/.test(err.detail));
  assert.throws(() => framer.push(SAMPLE_REQUEST), StunError, "no resynchronising after garbage");

  // Valid first byte, wrong cookie: refused when the 8th byte arrives, not before.
  const notStun = hex("00 01 00 00 de ad be ef 00 00 00 00 00 00 00 00 00 00 00 00");
  const f2 = new StunFramer();
  for (let i = 0; i < 7; i++) assert.deepEqual(f2.push(notStun.subarray(i, i + 1)), []);
  assert.throws(() => f2.push(notStun.subarray(7, 8)), (err: unknown) => err instanceof StunError && /magic cookie/.test(err.detail));

  // A good message followed by garbage in the same chunk: still refused.
  assert.throws(() => new StunFramer().push(Buffer.concat([SAMPLE_REQUEST, Buffer.from("\xff\xff")])), StunError);

  const f3 = new StunFramer();
  assert.deepEqual(f3.push(hex("00 01 00")), []);
  assert.throws(() => f3.push(hex("06")), (err: unknown) => err instanceof StunError && /not a multiple of 4/.test(err.detail));
});

test("framer: caps the message size from the length field alone", () => {
  const framer = new StunFramer();
  // Header claims 4000 bytes: refused after 4 bytes, nothing more is buffered.
  assert.throws(() => framer.push(hex("00 01 0f a0")), (err: unknown) => err instanceof StunError && /4020 bytes exceeds the limit of 2048/.test(err.detail));
  assert.equal(framer.buffered, 0);

  const small = new StunFramer(100);
  assert.equal(small.maxMessageSize, 100);
  const exact = rawMessage(Buffer.alloc(80));
  exact.writeUInt16BE(0x8022, 20);
  exact.writeUInt16BE(76, 22);
  assert.deepEqual(small.push(exact), [exact], "exactly the limit is fine");
  assert.throws(() => small.push(rawMessage(Buffer.alloc(84))), /104 bytes exceeds the limit of 100/);
  assert.throws(() => new StunFramer(19), RangeError);
});

test("framer output decodes: the transaction ids survive framing", () => {
  const msgs = Array.from({ length: 5 }, () =>
    encodeMessage({ method: METHOD_BINDING, class: "request", transactionId: newTransactionId(), attributes: [] }, { fingerprint: true }),
  );
  const out = new StunFramer().push(Buffer.concat(msgs));
  assert.equal(out.length, 5);
  out.forEach((frame, i) => assert.deepEqual(decodeMessage(frame).transactionId, msgs[i].subarray(8, 20)));
  assert.equal(ATTR.FINGERPRINT, 0x8028);
});
