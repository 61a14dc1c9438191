import assert from "node:assert/strict";
import net from "node:net";
import tls from "node:tls";
import { describe, test } from "node:test";
import { decodeMessage as decodeWire, encodeMessage as encodeWire, encodeOpen, encodeSession, MessageType, resultOf } from "../../src/protocol/wire.ts";
import { TOKEN } from "../../scripts/lib/stack.ts";
import { CASE_DEADLINE_MS, count, finDelay, mutate, runCases, SEED, show, split, statusLines, talk, type Rng } from "./harness.ts";
import { httpRequest } from "./http.ts";
import { afterFuzzTests, AUTH_RE, canary, clientHello, coordinatorTls, coordPort, counts, finishFuzz, refused, reporterPort, secure, stack, tunnelPort, upgradeHead, useFuzzStack, web } from "./stack.ts";

// Fuzzing of the coordinator's HTTPS port: raw TCP, inside TLS (the HTTP
// API), the Upgrade to /v1/tunnel, and the upgraded tunnel
// (test/fuzz/harness.ts: how, and the FUZZ_* knobs; tags "coordinator-raw",
// "coordinator-api", "coordinator-upgrade", "coordinator-tunnel").

useFuzzStack();

describe(`fuzz (seed ${SEED})`, () => {
  test("the coordinator's HTTPS port, raw TCP: garbage, cleartext HTTP, broken ClientHellos", async (t) => {
    const stats = new Map<string, number>();
    const start = counts();
    const r = await runCases("coordinator-raw", 5000, async (rng) => {
      const kind = rng.int(6);
      let payload: Buffer;
      if (kind === 0) payload = rng.bytes(rng.range(1, 3000));
      else if (kind === 1) payload = Buffer.from(`GET /v1/hello HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${TOKEN}\r\n\r\n`);
      else if (kind === 2) payload = Buffer.concat([Buffer.from([0x16, 0x03, rng.int(5), rng.int(256), rng.int(256)]), rng.bytes(rng.range(0, 600))]);
      else if (kind === 3) payload = Buffer.concat([Buffer.from([0x80, rng.int(256), 0x01, 0x03, 0x01]), rng.bytes(rng.range(0, 100))]); // SSLv2-style hello
      else if (kind === 4) payload = clientHello.subarray(0, rng.range(1, clientHello.length - 1));
      else payload = mutate(rng, clientHello);
      const x = await talk(net.connect(coordPort, "127.0.0.1"), "connect", split(rng, payload));
      if (!x.ready) return `could not connect (${x.error})`;
      if (x.hung) return `no close within ${CASE_DEADLINE_MS} ms; sent ${show(payload)}`;
      count(stats, x.data.length ? `tls-${x.data[0]}` : "closed");
      if (x.data.includes("HTTP/")) return `answered cleartext HTTP on the TLS port: ${show(x.data)}`;
      return undefined;
    }, 80); // a handshake cut short is dropped only at handshake_timeout: many at once
    await finishFuzz(t, "coordinator-raw", r, stats, start);
  });

  test("the coordinator's HTTPS port, inside TLS: garbage and hostile API requests", async (t) => {
    const stats = new Map<string, number>();
    const start = counts();
    const paths = (rng: Rng) => ["/v1/hello", "/v1/sessions", "/v1/sessions", "/v1/probe", "/v1/tunnel", "/", "/v1/hello?x=1", "/V1/HELLO", "//v1/hello", "/v1/hello/..", "*", `/${rng.printable(rng.range(0, 30))}`, `/v1/sessions${"/x".repeat(rng.int(3000))}`];
    const auths = [`Authorization: Bearer ${TOKEN}`, `Authorization: Bearer ${TOKEN}`, "Authorization: Bearer wrong-token-wrong-token", "Authorization: Bearer", `Authorization: Basic ${TOKEN}`, `Authorization: bearer ${TOKEN.toUpperCase()}`, `Authorization: Bearer ${TOKEN}x`, `Authorization: Bearer ${"A".repeat(9000)}`, ""];
    // Where a connect-back may be aimed (same-ip: any port of 127.0.0.1). Not
    // the canary: a connect-back is not a target, and may reach any port.
    const replies = () => [tunnelPort, tunnelPort, refused, coordPort, reporterPort, stack.proxyPort];
    const targets = () => [
      { host: "127.0.0.1", port: web.port },
      { host: "127.0.0.1", port: refused },
      { host: "127.0.0.1", port: canary.port },
      { host: "localhost", port: canary.port },
      { host: "::ffff:127.0.0.1", port: canary.port },
      { host: "10.1.2.3", port: 80 },
      { host: "bad host!", port: 80 },
      { host: "127.0.0.1", port: 0 },
    ];
    const jsonBody = (rng: Rng): string => {
      const pick = rng.int(8);
      if (pick === 0) return JSON.stringify({ session: rng.uuid(), target: rng.pick(targets()), reply: { host: "127.0.0.1", port: rng.pick(replies()) } });
      if (pick === 1) return JSON.stringify({ probe: rng.uuid(), reply: { host: rng.pick(["127.0.0.1", "::1", "203.0.113.9", "x"]), port: rng.pick(replies()) } });
      if (pick === 2) return JSON.stringify({ session: rng.pick(["", "nope", rng.uuid().toUpperCase(), 7, null]), target: rng.pick([null, [], "x", { host: 1, port: "2" }]), reply: rng.pick([{}, null, { host: "127.0.0.1", port: 1e9 }]) });
      if (pick === 3) return "[".repeat(rng.range(1, 20_000));
      if (pick === 4) return JSON.stringify({ session: rng.uuid(), target: rng.pick(targets()), reply: { host: "127.0.0.1", port: tunnelPort }, __proto__: { x: 1 }, constructor: { prototype: { polluted: true } } });
      if (pick === 5) return `{"a":"${"x".repeat(rng.range(16_000, 20_000))}"}`;
      if (pick === 6) return rng.bytes(rng.range(1, 200)).toString("latin1");
      return JSON.stringify(rng.printable(rng.range(0, 50)));
    };
    const r = await runCases("coordinator-api", 6000, async (rng) => {
      let payload: Buffer;
      const kind = rng.int(10);
      if (kind === 0) payload = rng.bytes(rng.range(1, 2000));
      else if (kind <= 3) {
        // A well-formed call, so that sessions, probes and connect-backs really run.
        const which = rng.int(3);
        const text =
          which === 0
            ? JSON.stringify({ session: rng.uuid(), target: rng.pick(targets()), reply: { host: "127.0.0.1", port: rng.pick(replies()) } })
            : which === 1
              ? JSON.stringify({ probe: rng.uuid(), reply: { host: "127.0.0.1", port: rng.pick(replies()) } })
              : "";
        const head = [
          `${which === 2 ? "GET" : "POST"} ${["/v1/sessions", "/v1/probe", "/v1/hello"][which]} HTTP/1.1`,
          "Host: localhost",
          rng.chance(0.85) ? `Authorization: Bearer ${TOKEN}` : "Authorization: Bearer wrong-token-wrong-token",
          "Content-Type: application/json",
          `Content-Length: ${Buffer.byteLength(text)}`,
        ];
        payload = Buffer.from(`${head.join("\r\n")}\r\n\r\n${text}`, "latin1");
      } else {
        const text = jsonBody(rng);
        const method = rng.chance(0.85) ? rng.pick(["GET", "POST", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"]) : rng.printable(rng.range(1, 8));
        const extra = [rng.pick(auths), rng.pick(["Content-Type: application/json", "Content-Type: text/plain", ""]), rng.chance(0.8) ? `Content-Length: ${Buffer.byteLength(text, "latin1")}` : rng.pick(["Transfer-Encoding: chunked", "Content-Length: 5", ""])].filter(Boolean);
        payload = Buffer.concat([httpRequest(rng, method, rng.pick(paths(rng)), extra, "localhost"), Buffer.from(text, "latin1")]);
        if (kind >= 8) payload = mutate(rng, payload);
      }
      const authorized = AUTH_RE.test(payload.toString("latin1"));
      const x = await talk(coordinatorTls(), "secureConnect", split(rng, payload), { finDelay: finDelay(rng) });
      if (!x.ready) return `TLS handshake failed (${x.error})`;
      if (x.hung) return `no close within ${CASE_DEADLINE_MS} ms after FIN; sent ${show(payload)}, got ${show(x.data)}`;
      if (x.data.length === 0) {
        count(stats, "closed");
        return undefined;
      }
      if (!x.data.subarray(0, 5).equals(Buffer.from("HTTP/"))) return `answered something that is not HTTP: ${show(x.data)}`;
      const statuses = statusLines(x.data);
      count(stats, `${authorized ? "auth" : "anon"}-${statuses[0] ?? "1xx"}`);
      if (statuses.includes(500)) return `answered 500: ${show(x.data, 400)} to ${show(payload, 400)}`;
      if (!authorized && statuses.some((s) => ![400, 401, 404, 408, 413, 431].includes(s)))
        return `a request without the token got ${statuses.join(",")} (only 400/401/404/408/413/431 may answer it): ${show(x.data, 300)} to ${show(payload, 300)}`;
      return undefined;
    });
    await finishFuzz(t, "coordinator-api", r, stats, start);
    assert.equal(canary.connections(), 0, "an API request made the coordinator dial a refused target");
  });

  test("the coordinator's Upgrade to /v1/tunnel: bad tokens, paths and protocols never get a 101", async (t) => {
    const stats = new Map<string, number>();
    const start = counts();
    const r = await runCases("coordinator-upgrade", 4000, async (rng) => {
      const path = rng.pick(["/v1/tunnel", "/v1/tunnel", "/v1/tunnel?x=1", "/v1/hello", "/", "/v1/tunnel/", "/V1/TUNNEL", `/${rng.printable(rng.range(0, 20))}`]);
      const auth = rng.pick([`Bearer ${TOKEN}`, `Bearer ${TOKEN}`, "", "Bearer wrong-token-wrong-token", `Basic ${TOKEN}`, `Bearer ${TOKEN} extra`, `Bearer ${TOKEN.slice(0, -1)}`]);
      const upgrade = rng.pick(["natproxy-tunnel/1", "natproxy-tunnel/1", "NATPROXY-TUNNEL/1", "websocket", "natproxy-tunnel/2", "", rng.printable(rng.range(1, 20))]);
      const connection = rng.pick(["Upgrade", "Upgrade", "keep-alive, Upgrade", "close", ""]);
      const lines = [`${rng.pick(["GET", "GET", "POST", "PUT"])} ${path} HTTP/1.1`, "Host: localhost"];
      if (connection) lines.push(`Connection: ${connection}`);
      if (upgrade) lines.push(`Upgrade: ${upgrade}`);
      if (auth) lines.push(`Authorization: ${auth}`);
      let payload: Buffer = Buffer.from(`${lines.join("\r\n")}\r\n\r\n`, "latin1");
      const after = rng.chance(0.5) ? encodeOpen({ session: rng.uuid(), target: { host: "127.0.0.1", port: rng.pick([web.port, canary.port]) } }) : rng.bytes(rng.range(0, 200));
      payload = Buffer.concat([payload, after]);
      if (rng.chance(0.2)) payload = mutate(rng, payload);
      const text = payload.toString("latin1");
      const headEnd = text.indexOf("\r\n\r\n");
      const head = headEnd < 0 ? text : text.slice(0, headEnd + 2);
      // What a 101 requires: the tunnel path, the right token, the right protocol.
      const mayUpgrade = /^[A-Z]+ \/v1\/tunnel(\?[^ ]*)? HTTP\/1\.1\r\n/.test(head) && AUTH_RE.test(head) && /\r\nupgrade: *natproxy-tunnel\/1[ \t]*\r\n/i.test(head) && /\r\nconnection:[^\r\n]*upgrade/i.test(head);
      const x = await talk(coordinatorTls(), "secureConnect", split(rng, payload), { finDelay: finDelay(rng) });
      if (!x.ready) return `TLS handshake failed (${x.error})`;
      if (x.hung) return `no close within ${CASE_DEADLINE_MS} ms after FIN; sent ${show(payload)}`;
      const statuses = statusLines(x.data.subarray(0, 4096));
      count(stats, x.data.length ? `${mayUpgrade ? "valid" : "invalid"}-${statuses[0]}` : "closed");
      if (statuses[0] === 101 && !mayUpgrade) return `upgraded a request that lacks the token, path or protocol: ${show(payload, 400)}`;
      if (statuses.includes(500)) return `answered 500: ${show(x.data, 300)}`;
      return undefined;
    });
    await finishFuzz(t, "coordinator-upgrade", r, stats, start);
    assert.equal(canary.connections(), 0, "an Upgrade made the coordinator dial a refused target");
  });

  test("the coordinator's upgraded tunnel: garbage, broken and hostile Open messages after a good Upgrade", async (t) => {
    const stats = new Map<string, number>();
    const start = counts();
    // The policy lets 127.0.0.1 be reached on these ports only (in any spelling of 127.0.0.1).
    const allowedPorts = new Set([web.port, secure.port]);
    const r = await runCases("coordinator-tunnel", 4000, async (rng) => {
      const hosts = ["127.0.0.1", "127.0.0.1", "localhost", "::1", "::ffff:127.0.0.1", "0x7f.1", "10.1.2.3", "169.254.169.254", "bad host!", "a\0b", "x".repeat(255), "é.example"];
      const port = rng.pick([web.port, secure.port, refused, canary.port, 0, 65535]);
      const host = rng.pick(hosts);
      const session = rng.uuid();
      let open: Buffer;
      const kind = rng.int(9);
      let what = `Open ${host}:${port}`;
      const payloadOf = (h: string, p: number) => {
        const hb = Buffer.from(h, "utf8");
        const b = Buffer.alloc(18 + hb.length);
        Buffer.from(session.replace(/-/g, ""), "hex").copy(b);
        b.writeUInt16BE(p, 16);
        hb.copy(b, 18);
        return b;
      };
      if (kind <= 2) open = encodeWire(MessageType.Open, payloadOf(host, port));
      else if (kind === 3) {
        // Header fields mutated: magic, version, type, length.
        open = encodeWire(MessageType.Open, payloadOf("127.0.0.1", web.port));
        const field = rng.int(4);
        if (field === 0) open[rng.int(4)] ^= 1 << rng.int(8);
        else if (field === 1) open[4] = rng.pick([0, 2, 255]);
        else if (field === 2) open[5] = rng.pick([0, MessageType.Session, MessageType.Result, 4, 255]);
        else open.writeUInt16BE(rng.pick([0, 1, 17, 18, 1025, 65535]), 6);
        what = `Open with header ${open.subarray(0, 8).toString("hex")}`;
      } else if (kind === 4) {
        open = rng.pick([encodeSession(session), encodeWire(MessageType.Result, Buffer.from('{"code":"OK"}')), encodeWire(MessageType.Open, Buffer.alloc(0))]);
        what = `message type ${open[5]}`;
      } else if (kind === 5) {
        open = encodeWire(MessageType.Open, payloadOf(host, port)).subarray(0, rng.range(1, 20));
        what = "a truncated Open";
      } else if (kind === 6) {
        open = rng.bytes(rng.range(1, 1500));
        what = "random bytes";
      } else if (kind === 7) {
        open = Buffer.concat([encodeWire(MessageType.Open, payloadOf("127.0.0.1", web.port)), rng.chance(0.5) ? Buffer.from("GET /after-open HTTP/1.1\r\nHost: x\r\n\r\n") : rng.bytes(rng.range(1, 300))]);
        what = "a good Open to the web target, then bytes";
      } else {
        open = Buffer.concat([encodeWire(MessageType.Open, payloadOf(host, port)), encodeWire(MessageType.Open, payloadOf("127.0.0.1", canary.port))]);
        what = `two Opens (${host}:${port}, then the canary)`;
      }
      const payload = Buffer.concat([Buffer.from(upgradeHead(), "latin1"), open]);
      const x = await talk(coordinatorTls(), "secureConnect", [Buffer.from(upgradeHead(), "latin1"), ...split(rng, open)], { finDelay: finDelay(rng) });
      if (!x.ready) return `TLS handshake failed (${x.error})`;
      if (x.hung) return `no close within ${CASE_DEADLINE_MS} ms after FIN; sent ${what}: ${show(payload)}`;
      const text = x.data.toString("latin1");
      if (!text.startsWith("HTTP/1.1 101 ")) return `a valid Upgrade was not answered 101: ${show(x.data)}`;
      const rest = x.data.subarray(text.indexOf("\r\n\r\n") + 4);
      if (rest.length === 0) {
        count(stats, "closed");
        return undefined;
      }
      let code: string;
      try {
        const d = decodeWire(rest);
        if (!d) return `sent a truncated message after the 101: ${show(rest)}`;
        code = resultOf(d.message).code;
      } catch (err) {
        return `sent something that is not a Result after the 101 (${(err as Error).message}): ${show(rest)}`;
      }
      count(stats, code);
      if (code === "INTERNAL") return `Result INTERNAL for ${what}: ${show(rest)}`;
      if (code === "OK" && !((kind <= 2 || kind === 8) ? allowedPorts.has(port) : kind === 7)) return `Result OK for a target the policy refuses (${what})`;
      return undefined;
    });
    await finishFuzz(t, "coordinator-tunnel", r, stats, start);
    assert.equal(canary.connections(), 0, "an Open made the coordinator dial a refused target");
  });

  test("the coordinator refuses a TLS 1.1 client", async () => {
    const x = await talk(tls.connect({ host: "127.0.0.1", port: coordPort, servername: "localhost", ca: stack.pki.ca.cert, minVersion: "TLSv1", maxVersion: "TLSv1.1", ciphers: "DEFAULT@SECLEVEL=0" }), "secureConnect", [Buffer.from("GET /v1/hello HTTP/1.1\r\n\r\n")]);
    assert.equal(x.ready, false, "a TLS 1.1 handshake succeeded");
    assert.equal(x.hung, false);
  });

  afterFuzzTests();
});
