import assert from "node:assert/strict";
import net from "node:net";
import { describe, test } from "node:test";
import { CASE_DEADLINE_MS, count, finDelay, mutate, runCases, SEED, show, split, statusLines, talk, type Rng } from "./harness.ts";
import { httpRequest, METHODS } from "./http.ts";
import { afterFuzzTests, canary, counts, finishFuzz, refused, secure, stack, useFuzzStack, web } from "./stack.ts";

// Fuzzing of the local proxy's browser port (test/fuzz/harness.ts: how, and
// the FUZZ_* knobs; tag "browser").

useFuzzStack();

describe(`fuzz (seed ${SEED})`, () => {
  test("the local proxy's browser port: random bytes, malformed and hostile HTTP, CONNECT, pipelining", async (t) => {
    const stats = new Map<string, number>();
    const start = counts();
    const port = stack.proxyPort;
    const absTargets = (rng: Rng) => [
      `http://127.0.0.1:${web.port}/fuzz?q=${rng.int(1000)}`,
      `http://localhost:${web.port}/`,
      `http://127.0.0.1:${web.port}`,
      `http://[::1]:${web.port}/`,
      `http://127.0.0.1:${refused}/`,
      `http://127.0.0.1:${canary.port}/`,
      `http://localhost:${canary.port}/`,
      `http://0x7f.1:${canary.port}/`,
      `http://2130706433:${canary.port}/`,
      `http://[::ffff:127.0.0.1]:${canary.port}/`,
      `http://10.1.2.3/`,
      `http://169.254.169.254/latest/meta-data/`,
      `https://127.0.0.1:${secure.port}/`,
      `ftp://127.0.0.1/`,
      `http://user:pw@127.0.0.1:${web.port}/`,
      `http://127.0.0.1:0/`,
      `http://127.0.0.1:99999/`,
      `http://%zz/`,
      `http:///nohost`,
      `http://127.0.0.1:${web.port}/${"a".repeat(rng.int(9000))}`,
      "/",
      "*",
      "",
      `/${rng.printable(rng.range(0, 40))}`,
      rng.printable(rng.range(1, 40)),
    ];
    const connectTargets = [
      `127.0.0.1:${web.port}`,
      `127.0.0.1:${secure.port}`,
      `localhost:${secure.port}`,
      `127.0.0.1:${refused}`,
      `127.0.0.1:${canary.port}`,
      `[::1]:${canary.port}`,
      `0177.0.0.1:${canary.port}`,
      "10.1.2.3:443",
      "169.254.169.254:80",
      "no-port",
      "127.0.0.1:0",
      "127.0.0.1:65536",
      ":443",
      "[::1",
      "http://x/",
      "",
    ];
    const r = await runCases("browser", 6000, async (rng) => {
      let payload: Buffer;
      const kind = rng.int(11);
      if (kind === 10) payload = socksPayload(rng, rng.pick(connectTargets));
      else if (kind <= 1) payload = rng.bytes(rng.range(1, 2000));
      else if (kind <= 4) payload = httpRequest(rng, rng.chance(0.9) ? rng.pick(METHODS) : rng.printable(rng.range(1, 8)), rng.pick(absTargets(rng)));
      else if (kind <= 6) {
        const target = rng.pick(connectTargets);
        payload = Buffer.concat([httpRequest(rng, "CONNECT", target, [], target), rng.chance(0.6) ? rng.bytes(rng.range(1, 400)) : Buffer.from(`GET / HTTP/1.1\r\nHost: x\r\n\r\n`)]);
      } else if (kind <= 8) payload = mutate(rng, httpRequest(rng, rng.pick(METHODS), rng.pick(absTargets(rng))));
      else {
        // Pipelined requests, the later ones possibly broken.
        const parts: Buffer[] = [];
        for (let k = rng.range(2, 4); k > 0; k--) {
          const req = httpRequest(rng, rng.pick(METHODS), rng.pick(absTargets(rng)));
          parts.push(rng.chance(0.3) ? mutate(rng, req) : req);
        }
        payload = Buffer.concat(parts);
      }
      if (process.env.FUZZ_DEBUG) console.log("payload", JSON.stringify(payload.toString("latin1")));
      const x = await talk(net.connect(port, "127.0.0.1"), "connect", split(rng, payload), { finDelay: finDelay(rng) });
      if (!x.ready) return `could not connect (${x.error}): the listener is gone?`;
      if (x.hung) return `no close within ${CASE_DEADLINE_MS} ms after the request and FIN; sent ${show(payload)}, got ${show(x.data)}`;
      if (x.data.length === 0) {
        count(stats, "closed");
        return undefined;
      }
      if (payload[0] === 5) {
        // SOCKS5: a method choice, then at most a reply whose code says why.
        if (x.data[0] !== 5) return `answered a SOCKS5 greeting with something else: ${show(x.data)} to ${show(payload)}`;
        count(stats, `socks ${x.data.length >= 4 ? x.data[3] : "-"}`);
        return undefined;
      }
      const statuses = statusLines(x.data);
      if (!x.data.subarray(0, 5).equals(Buffer.from("HTTP/"))) return `answered something that is not HTTP: ${show(x.data)} to ${show(payload)}`;
      count(stats, String(statuses[0] ?? "1xx"));
      if (statuses.includes(500)) return `answered 500 (an internal error, not a reason): ${show(x.data, 400)} to ${show(payload, 400)}`;
      return undefined;
    });
    await finishFuzz(t, "browser", r, stats, start);
    assert.equal(canary.connections(), 0, "a browser request reached a target the policy refuses");
  });

  afterFuzzTests();
});

/** A SOCKS5 greeting and CONNECT-or-other request, sometimes mutated or cut short. */
function socksPayload(rng: Rng, target: string): Buffer {
  const m = /^\[?([^\]]*?)\]?:(\d+)$/.exec(target);
  const host = m?.[1] ?? target;
  const port = Math.min(Number(m?.[2] ?? 80), 65535);
  const addr = net.isIPv4(host) ? [1, ...host.split(".").map(Number)] : net.isIPv6(host) ? [4, ...Array(15).fill(0), 1] : [3, host.length, ...Buffer.from(host)];
  const req = Buffer.from([5, 1, 0, 5, rng.pick([1, 1, 1, 2, 3, 9]), 0, ...addr, port >> 8, port & 255]);
  const out = rng.chance(0.5) ? mutate(rng, req) : req;
  return rng.chance(0.2) ? out.subarray(0, rng.range(1, out.length)) : out;
}
