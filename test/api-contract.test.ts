import assert from "node:assert/strict";
import { once } from "node:events";
import https from "node:https";
import type { AddressInfo } from "node:net";
import tls from "node:tls";
import { after, before, describe, test } from "node:test";
import { v1 as uuidv1, v4 as uuidv4 } from "uuid";
import type { Coordinator } from "../src/coordinator/index.ts";
import { NatproxyError } from "../src/errors.ts";
import { makeCoordinatorClient } from "../src/local/coordinator/client.ts";
import { API } from "../src/protocol/api.ts";
import { decodeMessage, encodeOpen, MessageType, resultOf } from "../src/protocol/wire.ts";
import { makeTrust } from "../src/tls/trust.ts";
import { testPki, type TestPki } from "../scripts/lib/pki.ts";
import { startTestCoordinator, TOKEN } from "../scripts/lib/stack.ts";

// The HTTPS API's contract (src/protocol/api.ts) on both sides: the
// coordinator names every bad field of a request at once, and the local
// proxy's client turns an answer that breaks the contract into a clear
// COORDINATOR_REFUSED instead of passing it on.

let pki: TestPki;
before(async () => {
  pki = await testPki();
});

describe("the coordinator checks requests against the contract", () => {
  let coordinator: Coordinator;
  before(async () => {
    coordinator = await startTestCoordinator(pki);
  });
  after(async () => coordinator?.close());

  async function post(path: string, body: string): Promise<{ status: number; json: { error?: { code: string; message: string } } }> {
    const res = await new Promise<import("node:http").IncomingMessage>((resolve, reject) => {
      const req = https.request({ host: "127.0.0.1", port: coordinator.addresses[0].port, servername: "localhost", ca: pki.ca.cert, method: "POST", path, agent: false, headers: { Authorization: `Bearer ${TOKEN}`, "Content-Type": "application/json" } }, resolve);
      req.on("error", reject);
      req.end(body);
    });
    const chunks: Buffer[] = [];
    for await (const c of res) chunks.push(c as Buffer);
    return { status: res.statusCode ?? 0, json: JSON.parse(Buffer.concat(chunks).toString()) };
  }

  test("a session request with every field wrong: one 400 that names each field", async () => {
    const r = await post(API.sessions, JSON.stringify({ session: uuidv1(), target: { host: "bad host!", port: 0 }, reply: { host: "example.com", port: 70_000 } }));
    assert.equal(r.status, 400);
    assert.equal(r.json.error?.code, "BAD_REQUEST");
    assert.equal(
      r.json.error?.message,
      "bad request: session: expected a UUID v4; target.host: expected a host name or IP address; target.port: expected 1-65535; reply.host: expected an IP address; reply.port: expected 1-65535",
    );
  });

  test("missing or mistyped parts are named too; a body that is no object says so", async () => {
    const missing = await post(API.sessions, JSON.stringify({ target: { host: 7, port: "80" } }));
    assert.equal(missing.json.error?.message, "bad request: session: expected a UUID v4; target.host: expected a host name or IP address; target.port: expected 1-65535; reply: expected an object { host, port }");
    const array = await post(API.probe, "[]");
    assert.equal(array.status, 400);
    assert.equal(array.json.error?.message, "bad request: body: expected a JSON object");
    const ready = await post(API.ready, JSON.stringify({ ready: "nope", reply: { host: "127.0.0.1", port: 1.5 } }));
    assert.equal(ready.json.error?.message, "bad request: ready: expected a UUID v4; reply.port: expected 1-65535");
  });

  test("a well-formed request with fields the contract does not know is not refused for them", async () => {
    // Past validation, same-ip is the next rule: this reply is not where the request came from.
    const r = await post(API.probe, JSON.stringify({ probe: uuidv4(), reply: { host: "203.0.113.9", port: 40_000 }, added_later: { x: 1 } }));
    assert.equal(r.status, 403);
    assert.equal(r.json.error?.code, "FORBIDDEN");
  });

  test("an Open naming a bad session and target: a BAD_REQUEST Result that names each field", async () => {
    const socket = tls.connect({ host: "127.0.0.1", port: coordinator.addresses[0].port, servername: "localhost", ca: pki.ca.cert });
    await once(socket, "secureConnect");
    const head = `GET ${API.tunnel} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${TOKEN}\r\nConnection: Upgrade\r\nUpgrade: natproxy-tunnel/1\r\n\r\n`;
    socket.end(Buffer.concat([Buffer.from(head), encodeOpen({ session: uuidv1(), target: { host: "bad host!", port: 0 } })]));
    const chunks: Buffer[] = [];
    socket.on("data", (c: Buffer) => chunks.push(c));
    await once(socket, "close");
    const text = Buffer.concat(chunks);
    assert.match(text.toString("latin1"), /^HTTP\/1\.1 101 /);
    const d = decodeMessage(text.subarray(text.indexOf("\r\n\r\n") + 4));
    assert.ok(d && d.message.type === MessageType.Result, "a Result after the 101");
    const result = resultOf(d.message);
    assert.equal(result.code, "BAD_REQUEST");
    assert.equal(result.message, "bad request: session: expected a UUID v4; target.host: expected a host name or IP address; target.port: expected 1-65535");
  });
});

describe("the local proxy's client checks answers against the contract", () => {
  let answer: (method: string, path: string) => { status: number; body: string; type?: string };
  const calls: string[] = [];
  let server: https.Server;
  let client: ReturnType<typeof makeCoordinatorClient>;
  before(async () => {
    server = https.createServer({ key: pki.server.key, cert: pki.server.cert }, (req, res) => {
      req.resume();
      calls.push(`${req.method} ${req.url}`);
      const a = answer(req.method ?? "", req.url ?? "");
      res.writeHead(a.status, { "Content-Type": a.type ?? "application/json" }).end(a.body);
    });
    server.listen(0, "127.0.0.1");
    await once(server, "listening");
    const url = new URL(`https://localhost:${(server.address() as AddressInfo).port}`);
    client = makeCoordinatorClient({ url, token: TOKEN, trust: makeTrust({ hostname: "localhost", allow_self_signed: false, fingerprint: "", ca: pki.caFile }), idleTimeout: 1000 });
  });
  after(() => {
    client?.close();
    server?.closeAllConnections();
    server?.close();
  });

  const refused = async (p: Promise<unknown>, message: RegExp) => {
    const err = await p.then(
      () => assert.fail("resolved"),
      (e: unknown) => e,
    );
    assert.ok(err instanceof NatproxyError, String(err));
    assert.equal(err.code, "COORDINATOR_REFUSED");
    assert.match(err.message, message);
  };
  const signal = () => AbortSignal.timeout(5000);
  const reply = { host: "127.0.0.1", port: 40_000 };

  test("a hello answer with wrong or missing fields is refused, naming them", async () => {
    answer = () => ({ status: 200, body: JSON.stringify({ software: "natproxy", version: 7 }) });
    await refused(client.hello(5000), /^coordinator refused the request: GET \/v1\/hello: malformed answer \(version: .*; client: .*; connect_back: .*\)$/);
    answer = () => ({ status: 200, body: JSON.stringify({ software: "natproxy", version: "9.9.9", client: { host: "198.51.100.2", port: 4 }, connect_back: "any", more: true }) });
    assert.deepEqual(await client.hello(5000), { software: "natproxy", version: "9.9.9", client: { host: "198.51.100.2", port: 4 }, connect_back: "any" });
  });

  test("a 200 that is not the contract's JSON is refused for every call", async () => {
    answer = () => ({ status: 200, body: "ok", type: "text/plain" });
    await refused(client.openSession({ session: uuidv4(), target: { host: "example.com", port: 443 }, reply }, signal()), /POST \/v1\/sessions: malformed answer \(body: /);
    answer = () => ({ status: 200, body: JSON.stringify({ probe: "x", outcome: "connected", ms: -1 }) });
    await refused(client.probe({ probe: uuidv4(), reply }, signal()), /POST \/v1\/probe: malformed answer \(probe: expected a UUID v4; ms: /);
    const id = uuidv4();
    answer = () => ({ status: 200, body: JSON.stringify({ ready: id, outcome: "connected", ms: 12 }) });
    await client.ready({ ready: id, reply }, signal());
  });

  test("an error answer keeps its code when it follows the contract, and is COORDINATOR_REFUSED when not", async () => {
    answer = () => ({ status: 403, body: JSON.stringify({ error: { code: "FORBIDDEN", message: "forbidden: not you" } }) });
    const forbidden = await client.ready({ ready: uuidv4(), reply }, signal()).catch((e: NatproxyError) => e);
    assert.ok(forbidden instanceof NatproxyError);
    assert.equal(forbidden.code, "FORBIDDEN");
    assert.equal(forbidden.message, "forbidden: not you");
    answer = () => ({ status: 502, body: JSON.stringify({ error: "nope" }) });
    await refused(client.probe({ probe: uuidv4(), reply }, signal()), /^coordinator refused the request: 502: HTTP 502$/);
  });

  test("every call goes to its path from API", () => {
    assert.deepEqual(new Set(calls), new Set([`GET ${API.hello}`, `POST ${API.sessions}`, `POST ${API.probe}`, `POST ${API.ready}`]));
  });
});
