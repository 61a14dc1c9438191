import { createHash, randomBytes } from "node:crypto";
import http from "node:http";
import https from "node:https";
import type { AddressInfo } from "node:net";
import net from "node:net";
import { Readable } from "node:stream";
import type { TestPki } from "./pki.ts";

/**
 * The web sites the tests browse: /echo reports method, URL, Host and a
 * SHA-256 of the body; /bytes/N streams N deterministic pseudo-random bytes
 * (the same N always gives the same bytes, so the client can check a hash).
 */
export function targetHandler(req: http.IncomingMessage, res: http.ServerResponse): void {
  const url = new URL(req.url ?? "/", "http://x");
  if (url.pathname.startsWith("/bytes/")) {
    const n = Number(url.pathname.slice(7));
    res.writeHead(200, { "Content-Type": "application/octet-stream", "Content-Length": n });
    deterministicStream(n).pipe(res);
    return;
  }
  const hash = createHash("sha256");
  let size = 0;
  req.on("data", (c: Buffer) => {
    size += c.length;
    hash.update(c);
  });
  req.on("end", () => {
    const body = JSON.stringify({ method: req.method, url: req.url, host: req.headers.host, size, sha256: hash.digest("hex"), headers: req.headers, chunked: req.headers["transfer-encoding"] === "chunked" });
    res.writeHead(200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body), "X-Target": "yes" });
    res.end(body);
  });
}

const BLOCK = randomBytes(64 * 1024);

export function deterministicStream(n: number): Readable {
  let sent = 0;
  return new Readable({
    read() {
      if (sent >= n) {
        this.push(null);
        return;
      }
      const len = Math.min(BLOCK.length, n - sent);
      sent += len;
      this.push(BLOCK.subarray(0, len));
    },
  });
}

export function expectedSha256(n: number): string {
  const h = createHash("sha256");
  for (let sent = 0; sent < n; sent += BLOCK.length) h.update(BLOCK.subarray(0, Math.min(BLOCK.length, n - sent)));
  return h.digest("hex");
}

export interface Target {
  port: number;
  close(): Promise<void>;
}

function track(server: net.Server): () => Promise<void> {
  const sockets = new Set<net.Socket>();
  server.on("connection", (s) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
  });
  return () =>
    new Promise((resolve) => {
      for (const s of sockets) s.destroy();
      server.close(() => resolve());
    });
}

export async function startHttpTarget(host = "127.0.0.1"): Promise<Target> {
  const server = http.createServer(targetHandler);
  const close = track(server);
  await new Promise<void>((r) => server.listen(0, host, r));
  return { port: (server.address() as AddressInfo).port, close };
}

export async function startHttpsTarget(pki: TestPki, host = "127.0.0.1"): Promise<Target> {
  const server = https.createServer({ key: pki.server.key, cert: pki.server.cert }, targetHandler);
  const close = track(server);
  await new Promise<void>((r) => server.listen(0, host, r));
  return { port: (server.address() as AddressInfo).port, close };
}
