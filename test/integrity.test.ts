import assert from "node:assert/strict";
import { createCipheriv, createHash } from "node:crypto";
import { once } from "node:events";
import net, { type AddressInfo } from "node:net";
import { after, before, describe, test } from "node:test";
import { connectThrough } from "../scripts/lib/proxy-client.ts";
import { startStack, type Stack } from "../scripts/lib/stack.ts";
import { startHttpTarget, type Target } from "../scripts/lib/targets.ts";
import { waitUntil } from "./helpers/wait.ts";

// Integrity under load: 200 tunnels at once, each moving 8 MiB both ways at
// the same time, every byte checked by SHA-256 at both ends, while other
// tunnels are opened and aborted around them.

const TUNNELS = 200;
const SIZE = 8 * 1024 * 1024;
const ABORTERS = 60;
const CHUNK = 64 * 1024;

/** SIZE deterministic bytes for stream `id`, made chunk by chunk (AES-CTR keystream). */
function* stream(id: string, direction: "up" | "down"): Generator<Buffer> {
  const key = createHash("sha256").update(`${direction}:${id}`).digest().subarray(0, 16);
  const cipher = createCipheriv("aes-128-ctr", key, Buffer.alloc(16));
  const zeros = Buffer.alloc(CHUNK);
  for (let sent = 0; sent < SIZE; sent += CHUNK) yield cipher.update(zeros.subarray(0, Math.min(CHUNK, SIZE - sent)));
}

function digestOf(id: string, direction: "up" | "down"): string {
  const h = createHash("sha256");
  for (const chunk of stream(id, direction)) h.update(chunk);
  return h.digest("hex");
}

/** Writes a generator with backpressure. */
async function pump(socket: net.Socket, chunks: Generator<Buffer>): Promise<void> {
  for (const chunk of chunks) {
    if (!socket.write(chunk)) await Promise.race([once(socket, "drain"), once(socket, "close")]);
    if (socket.destroyed) return;
  }
}

/**
 * The target: reads "<id>\n", then at the same time sends the id's "down"
 * stream and hashes SIZE bytes of upload; then sends the upload's hash (64
 * hex characters) and closes.
 */
async function startHashTarget(): Promise<{ port: number; close(): void }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((s) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
    s.on("error", () => {});
    let head = "";
    let id: string | undefined;
    let got = 0;
    const hash = createHash("sha256");
    let sending: Promise<void> | undefined;
    s.on("data", (c: Buffer) => {
      if (id === undefined) {
        head += c.toString("latin1");
        const nl = head.indexOf("\n");
        if (nl < 0) return;
        id = head.slice(0, nl);
        c = Buffer.from(head.slice(nl + 1), "latin1");
        sending = pump(s, stream(id, "down"));
      }
      got += c.length;
      hash.update(c);
      if (got >= SIZE) void sending?.then(() => s.end(hash.digest("hex")));
    });
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  return {
    port: (server.address() as AddressInfo).port,
    close() {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

for (const path of ["connect-back", "outbound"] as const) {
  describe(`integrity under load (${path} path)`, () => {
    let stack: Stack;
    let target: { port: number; close(): void };
    let web: Target;
    before(async () => {
      stack = await startStack({ local: { tunnel: path, connect_timeout: 20_000 } });
      target = await startHashTarget();
      web = await startHttpTarget();
    });
    after(async () => {
      await stack?.close();
      target?.close();
      await web?.close();
    });

    test(`${TUNNELS} tunnels x 8 MiB both ways, SHA-256 checked at both ends, with ${ABORTERS} tunnels aborted around them`, async () => {
      const t0 = performance.now();
      let aborted = 0;
      const aborters = Array.from({ length: ABORTERS }, async (_, k) => {
        const c = await connectThrough(stack.proxyPort, `127.0.0.1:${web.port}`);
        if (c.status !== 200) return;
        c.socket.on("error", () => {});
        c.socket.write("GET /bytes/100000000 HTTP/1.1\r\nHost: x\r\n\r\n");
        // Each one goes away at a different point: after 0 to ~2.5 MB.
        let got = 0;
        const limit = (k % 10) * 256 * 1024;
        await new Promise<void>((resolve) => {
          c.socket.on("data", (d: Buffer) => {
            got += d.length;
            if (got >= limit && !c.socket.destroyed) {
              c.socket.destroy();
              aborted++;
            }
          });
          c.socket.on("close", () => resolve());
        });
      });
      const results = await Promise.all(
        Array.from({ length: TUNNELS }, async (_, i) => {
          const id = `tunnel-${i}`;
          const c = await connectThrough(stack.proxyPort, `127.0.0.1:${target.port}`);
          if (c.status !== 200) return `${id}: CONNECT ${c.status} ${c.body}`;
          const down = createHash("sha256");
          let received = Buffer.alloc(0);
          let downBytes = 0;
          c.socket.on("data", (d: Buffer) => {
            // The first SIZE bytes are the download; the rest is the target's hash of the upload.
            const room = SIZE - downBytes;
            if (room > 0) {
              down.update(d.subarray(0, room));
              downBytes += Math.min(room, d.length);
              if (d.length > room) received = Buffer.concat([received, d.subarray(room)]);
            } else received = Buffer.concat([received, d]);
          });
          const closed = once(c.socket, "close");
          c.socket.write(`${id}\n`);
          await pump(c.socket, stream(id, "up"));
          await closed;
          if (downBytes !== SIZE) return `${id}: downloaded ${downBytes} of ${SIZE} bytes`;
          if (down.digest("hex") !== digestOf(id, "down")) return `${id}: download hash differs`;
          if (received.toString() !== digestOf(id, "up")) return `${id}: the target's upload hash differs (${received.toString().slice(0, 16)}…)`;
          return undefined;
        }),
      );
      await Promise.all(aborters);
      const failures = results.filter((r) => r !== undefined);
      const seconds = (performance.now() - t0) / 1000;
      console.log(`# ${path}: ${TUNNELS} x 8 MiB both ways in ${seconds.toFixed(1)} s (${((2 * TUNNELS * SIZE) / 1048576 / seconds).toFixed(0)} MiB/s), ${aborted} tunnels aborted meanwhile`);
      assert.deepEqual(failures, []);
      assert.ok(aborted >= ABORTERS / 2, `aborts happened during the run (${aborted})`);
      await waitUntil(() => stack.coordinator.activeSessions() === 0 && stack.local.openingTunnels() === 0 && stack.local.pendingSessions() === 0, 10_000, "every session ended");
    });
  });
}
