import assert from "node:assert/strict";
import net from "node:net";
import tls from "node:tls";
import { describe, test } from "node:test";
import { encodeOpen, encodeSession } from "../../src/protocol/wire.ts";
import { proxiedRequest } from "../../scripts/lib/proxy-client.ts";
import { TOKEN } from "../../scripts/lib/stack.ts";
import { waitUntil } from "../helpers/wait.ts";
import { assertReporterAnswers, baseline, clientHello, coordPort, reporterPort, settled, stack, stunHeader0, T, tunnelPort, upgradeHead, useFuzzStack, web } from "./stack.ts";

// Slowloris on every listening port of the three roles: connections that stop
// mid-request must each be closed within the timeout configured for that
// stage, while normal traffic still gets through (the stack: stack.ts).

/**
 * A slowloris connection must be closed by its configured timeout plus this:
 * room for timer scheduling and for a deadline checker that runs once a
 * second (Node's http servers check header/request deadlines on an interval).
 */
const SLOWLORIS_SLACK_MS = 1250;
const SLOWLORIS_N = 20;

useFuzzStack();

interface Slow {
  closedAfter: number | undefined;
  socket: net.Socket;
}

/** Opens `n` connections that each send `partial` (after `prefix`, if any) and then nothing. */
async function openSlow(n: number, open: () => net.Socket, readyEvent: "connect" | "secureConnect" | "secure", partial: () => Buffer | undefined): Promise<Slow[]> {
  const slow: Slow[] = [];
  await Promise.all(
    Array.from(
      { length: n },
      () =>
        new Promise<void>((resolve, reject) => {
          const socket = open();
          // The clock starts when the connection has stalled (its partial request sent).
          let t0 = performance.now();
          const entry: Slow = { closedAfter: undefined, socket };
          slow.push(entry);
          socket.on("error", () => {});
          socket.resume();
          socket.on("close", () => {
            entry.closedAfter = Math.round(performance.now() - t0);
            resolve();
          });
          socket.once(readyEvent, () => {
            const p = partial();
            if (p) socket.write(p);
            t0 = performance.now();
            resolve();
          });
          setTimeout(() => reject(new Error("slow connection not established in 3 s")), 3000).unref();
        }),
    ),
  );
  return slow;
}

/** Waits for every slow connection to be closed by the server; fails naming those that stay past `limit`. */
async function expectAllClosed(what: string, slow: Slow[], timeout: number): Promise<void> {
  const limit = timeout + SLOWLORIS_SLACK_MS;
  try {
    await waitUntil(() => slow.every((s) => s.closedAfter !== undefined), limit + 200, what);
  } catch {
    // judged below
  } finally {
    const open = slow.filter((s) => s.closedAfter === undefined).length;
    const times = slow.map((s) => s.closedAfter).filter((v): v is number => v !== undefined);
    for (const s of slow) s.socket.destroy();
    assert.equal(open, 0, `${what}: ${open} of ${slow.length} connections were still open ${limit} ms after they stalled (configured timeout ${timeout} ms)`);
    const late = times.filter((ms) => ms > limit);
    assert.equal(late.length, 0, `${what}: closed after ${late.join(", ")} ms, the limit is ${limit} ms (timeout ${timeout} ms + ${SLOWLORIS_SLACK_MS} ms)`);
  }
}

async function normalTrafficWorks(): Promise<void> {
  const get = await proxiedRequest(stack.proxyPort, `http://127.0.0.1:${web.port}/while-slowloris`, { headers: { Connection: "close" } });
  assert.equal(get.status, 200, "a normal proxied GET while slow connections are open");
}

// One port at a time, so that each measures its own server's timers and not
// an event loop busy with the others' handshakes.
describe("slowloris: connections that stall mid-request are closed within their timeout", () => {
  test(`the browser port: ${SLOWLORIS_N} partial request heads, closed within handshake_timeout (${T.localHandshake} ms)`, async () => {
    const slow = await openSlow(SLOWLORIS_N, () => net.connect(stack.proxyPort, "127.0.0.1"), "connect", () => Buffer.from(`GET http://127.0.0.1:${web.port}/slow HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: `));
    try {
      await normalTrafficWorks();
    } finally {
      await expectAllClosed("browser port", slow, T.localHandshake);
    }
  });

  test(`the coordinator, TLS handshake: ${SLOWLORIS_N} partial ClientHellos, closed within handshake_timeout (${T.coordHandshake} ms)`, async () => {
    const slow = await openSlow(SLOWLORIS_N, () => net.connect(coordPort, "127.0.0.1"), "connect", () => clientHello.subarray(0, 40));
    try {
      await normalTrafficWorks();
    } finally {
      await expectAllClosed("coordinator TLS handshake", slow, T.coordHandshake);
    }
  });

  test(`the coordinator, HTTP inside TLS: ${SLOWLORIS_N} partial API request heads, closed within the header timeout (${Math.min(T.coordHandshake, T.coordRequest)} ms)`, async () => {
    const slow = await openSlow(SLOWLORIS_N, () => tls.connect({ host: "127.0.0.1", port: coordPort, servername: "localhost", ca: stack.pki.ca.cert }), "secureConnect", () =>
      Buffer.from(`POST /v1/sessions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${TOKEN}\r\n`),
    );
    try {
      await normalTrafficWorks();
    } finally {
      await expectAllClosed("coordinator HTTP head", slow, Math.min(T.coordHandshake, T.coordRequest));
    }
  });

  test(`the coordinator, HTTP body: ${SLOWLORIS_N} partial API request bodies, closed within request_timeout (${T.coordRequest} ms)`, async () => {
    const slow = await openSlow(SLOWLORIS_N, () => tls.connect({ host: "127.0.0.1", port: coordPort, servername: "localhost", ca: stack.pki.ca.cert }), "secureConnect", () =>
      Buffer.from(`POST /v1/sessions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{"session":`),
    );
    try {
      await normalTrafficWorks();
    } finally {
      await expectAllClosed("coordinator HTTP body", slow, T.coordRequest);
    }
  });

  test(`the coordinator, upgraded tunnel: ${SLOWLORIS_N} partial Open messages, closed within open_timeout (${T.coordOpen} ms)`, async () => {
    const slow = await openSlow(SLOWLORIS_N, () => tls.connect({ host: "127.0.0.1", port: coordPort, servername: "localhost", ca: stack.pki.ca.cert }), "secureConnect", () =>
      Buffer.concat([Buffer.from(upgradeHead(), "latin1"), encodeOpen({ session: "6f1c1a52-4c1e-4d6a-9a51-2f0c1e7d9b10", target: { host: "127.0.0.1", port: 80 } }).subarray(0, 6)]),
    );
    try {
      await normalTrafficWorks();
    } finally {
      await expectAllClosed("coordinator upgraded tunnel", slow, T.coordOpen);
    }
  });

  test(`the tunnel port: ${SLOWLORIS_N} raw peers that stall mid-record and ${SLOWLORIS_N} trusted TLS peers that stall mid-message, closed within handshake_timeout (${T.localHandshake} ms)`, async () => {
    const raw = await openSlow(SLOWLORIS_N, () => net.connect(tunnelPort, "127.0.0.1"), "connect", () => Buffer.from([0x16, 0x03, 0x03]));
    const trusted = await openSlow(
      SLOWLORIS_N,
      () => new tls.TLSSocket(net.connect(tunnelPort, "127.0.0.1"), { isServer: true, secureContext: tls.createSecureContext({ key: stack.pki.server.key, cert: stack.pki.server.cert }) }),
      "secure",
      () => encodeSession("6f1c1a52-4c1e-4d6a-9a51-2f0c1e7d9b10").subarray(0, 4),
    );
    try {
      await normalTrafficWorks();
    } finally {
      await expectAllClosed("tunnel port, raw", raw, T.localHandshake);
      await expectAllClosed("tunnel port, trusted TLS", trusted, T.localHandshake);
    }
  });

  test(`the reporter: ${SLOWLORIS_N} partial STUN headers, closed within handshake_timeout (${T.reporterHandshake} ms)`, async () => {
    const slow = await openSlow(SLOWLORIS_N, () => net.connect(reporterPort, "127.0.0.1"), "connect", () => stunHeader0(Buffer.from("slowloris-01")).subarray(0, 10));
    try {
      await assertReporterAnswers();
    } finally {
      await expectAllClosed("reporter", slow, T.reporterHandshake);
    }
  });
});

describe("after the slowloris", () => {
  test("sockets, sessions and descriptors return to the baseline", async () => {
    assert.equal(await settled(baseline), undefined, "the baseline taken before the fuzzing");
  });
});
