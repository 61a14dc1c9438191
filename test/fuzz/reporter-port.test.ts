import net from "node:net";
import { describe, test } from "node:test";
import { decodeMessage as decodeStun, getAttribute, MAGIC_COOKIE, messageType, METHOD_BINDING, type StunClass } from "../../src/stun.ts";
import { StunFramer } from "../../src/stun-framer.ts";
import { CASE_DEADLINE_MS, count, mutate, runCases, SEED, show, split, talk, type Rng } from "./harness.ts";
import { afterFuzzTests, counts, finishFuzz, reporterPort, useFuzzStack } from "./stack.ts";

// Fuzzing of the reporter, STUN over TCP (test/fuzz/harness.ts: how, and the
// FUZZ_* knobs; tag "reporter").

useFuzzStack();

describe(`fuzz (seed ${SEED})`, () => {
  function stunHeader(type: number, length: number, tid: Buffer, cookie = MAGIC_COOKIE): Buffer {
    const h = Buffer.alloc(20);
    h.writeUInt16BE(type & 0xffff, 0);
    h.writeUInt16BE(length & 0xffff, 2);
    h.writeUInt32BE(cookie >>> 0, 4);
    tid.copy(h, 8);
    return h;
  }

  function tlv(type: number, value: Buffer, declared = value.length): Buffer {
    const h = Buffer.alloc(4);
    h.writeUInt16BE(type, 0);
    h.writeUInt16BE(declared & 0xffff, 2);
    return Buffer.concat([h, value, Buffer.alloc((4 - (value.length % 4)) % 4)]);
  }

  function garbageAttributes(rng: Rng): Buffer {
    const out: Buffer[] = [];
    for (let k = rng.range(1, 6); k > 0; k--) {
      switch (rng.int(10)) {
        case 0:
          out.push(tlv(rng.int(0x10000), rng.bytes(rng.range(0, 40))));
          break;
        case 1:
          out.push(tlv(0x0020, Buffer.concat([Buffer.from([0, rng.int(4)]), rng.bytes(rng.range(0, 20))])));
          break;
        case 2:
          out.push(tlv(0x0008, rng.bytes(rng.pick([20, 20, 19, 32]))));
          break;
        case 3:
          out.push(tlv(0x8028, rng.bytes(rng.pick([4, 4, 8]))));
          break;
        case 4:
          out.push(tlv(0x8022, rng.chance(0.5) ? Buffer.from([0xc3, 0x28, 0xff]) : Buffer.alloc(800, 0x61)));
          break;
        case 5:
          out.push(tlv(0x0006, Buffer.alloc(rng.pick([10, 600]), 0x75)));
          break;
        case 6:
          out.push(tlv(0x0009, rng.bytes(rng.range(0, 12))));
          break;
        case 7:
          out.push(tlv(0x000a, rng.bytes(rng.pick([1, 3, 4]))));
          break;
        case 8:
          out.push(tlv(rng.range(0, 0x7fff), rng.bytes(rng.range(0, 8)))); // comprehension-required: 420
          break;
        default:
          out.push(tlv(rng.int(0x10000), rng.bytes(rng.range(0, 8)), rng.int(0x10000))); // lying length
      }
    }
    return Buffer.concat(out);
  }

  test("the reporter: random bytes, truncated and oversized STUN headers, valid headers with garbage attributes", async (t) => {
    const stats = new Map<string, number>();
    const start = counts();
    const r = await runCases("reporter", 3000, async (rng) => {
      const tids: Buffer[] = [];
      const message = (cls: StunClass = "request", method = METHOD_BINDING, attrs: Buffer = Buffer.alloc(0), length = attrs.length) => {
        const tid = rng.bytes(12);
        tids.push(tid);
        return Buffer.concat([stunHeader(messageType(method, cls), length, tid), attrs]);
      };
      let payload: Buffer;
      const kind = rng.int(9);
      if (kind === 0) payload = rng.bytes(rng.range(1, 1500));
      else if (kind === 1) payload = message().subarray(0, rng.range(1, 19)); // truncated header
      else if (kind === 2) payload = Buffer.concat([stunHeader(messageType(METHOD_BINDING, "request"), rng.pick([2032, 4096, 0xfffc, 0xffff]), rng.bytes(12)), rng.bytes(rng.range(0, 3000))]); // oversized
      else if (kind === 3) payload = Buffer.concat([stunHeader(messageType(METHOD_BINDING, "request"), rng.range(1, 3) * 1 + 4 * rng.int(4), rng.bytes(12)), rng.bytes(20)]); // length not a multiple of 4
      else if (kind === 4) payload = stunHeader(rng.int(0x10000) | 0xc000, 0, rng.bytes(12)); // top bits set
      else if (kind === 5) payload = stunHeader(messageType(METHOD_BINDING, "request"), 0, rng.bytes(12), rng.int(2 ** 32)); // wrong cookie
      else if (kind === 6) {
        const attrs = garbageAttributes(rng);
        payload = message("request", METHOD_BINDING, attrs, rng.chance(0.85) ? attrs.length : rng.int(0x800) & ~3);
      } else if (kind === 7) payload = message(rng.pick(["request", "indication", "success", "error"] as const), rng.int(0x1000), rng.chance(0.5) ? garbageAttributes(rng) : Buffer.alloc(0));
      else {
        const parts: Buffer[] = [message()];
        for (let k = rng.range(1, 3); k > 0; k--) parts.push(rng.chance(0.5) ? message() : mutate(rng, message()));
        payload = Buffer.concat(parts);
      }
      if (rng.chance(0.1) && kind !== 1) payload = mutate(rng, payload);
      const x = await talk(net.connect(reporterPort, "127.0.0.1"), "connect", split(rng, payload));
      if (!x.ready) return `could not connect (${x.error})`;
      if (x.hung) return `no close within ${CASE_DEADLINE_MS} ms after FIN: ${show(payload)}`;
      if (x.data.length === 0) {
        count(stats, "closed");
        return undefined;
      }
      let frames: Buffer[];
      try {
        frames = new StunFramer(65_555).push(x.data);
      } catch (err) {
        return `answered something that is not STUN (${(err as Error).message}): ${x.data.toString("hex").slice(0, 200)}`;
      }
      for (const f of frames) {
        let msg;
        try {
          msg = decodeStun(f);
        } catch (err) {
          return `answered an undecodable STUN message (${(err as Error).message})`;
        }
        count(stats, `${msg.class}`);
        if (msg.class === "success" || msg.class === "error") {
          if (!tids.some((tid) => tid.equals(msg.transactionId)) && !payload.includes(msg.transactionId)) return `answered a transaction id it was never sent`;
          if (!getAttribute(msg, "FINGERPRINT")) return "answered without FINGERPRINT";
        }
        if (msg.class === "success") {
          const mapped = getAttribute(msg, "XOR-MAPPED-ADDRESS");
          if (!mapped || mapped.address.port !== x.localPort) return `a success answer with the wrong mapped address: ${JSON.stringify(mapped)} (we are port ${x.localPort})`;
        }
      }
      return undefined;
    });
    await finishFuzz(t, "reporter", r, stats, start);
  });

  afterFuzzTests();
});
