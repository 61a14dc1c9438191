// The benchmark's web site, run as its own process so that its CPU is never
// counted against a proxy: an HTTP and an HTTPS server on 127.0.0.1 (ports
// chosen by the kernel), both with keep-alive, serving
//   /bytes/N  N bytes of deterministic content (see patternByte), Content-Length set
//   /small    a 2-byte body
// It prints one JSON line {"http":P,"https":P} on stdout once both listen, and
// exits when its stdin closes (so it never outlives the bench) or on SIGTERM.
//
//   node scripts/bench/target.ts <cert.pem> <key.pem> [listen address, default 127.0.0.1]
import { readFileSync } from "node:fs";
import http from "node:http";
import https from "node:https";
import type { AddressInfo } from "node:net";
import { PATTERN } from "./pattern.ts";

const [certFile, keyFile, host = "127.0.0.1"] = process.argv.slice(2);
if (!certFile || !keyFile) {
  process.stderr.write("usage: target.ts <cert.pem> <key.pem>\n");
  process.exit(2);
}

const SMALL = Buffer.from("ok");
const MAX_BYTES = 4 * 1024 * 1024 * 1024;
// Largest slice handed to one write(): big enough to keep syscalls few, small
// enough to keep the server's buffered memory bounded.
const SLICE = 256 * 1024;

function handler(req: http.IncomingMessage, res: http.ServerResponse): void {
  const path = (req.url ?? "/").split("?")[0];
  req.resume();
  if (path === "/small") {
    res.writeHead(200, { "Content-Type": "text/plain", "Content-Length": SMALL.length });
    res.end(SMALL);
    return;
  }
  const m = /^\/bytes\/(\d+)$/.exec(path);
  if (!m || Number(m[1]) > MAX_BYTES) {
    res.writeHead(404, { "Content-Length": 0 });
    res.end();
    return;
  }
  const n = Number(m[1]);
  res.writeHead(200, { "Content-Type": "application/octet-stream", "Content-Length": n });
  let sent = 0;
  const pump = (): void => {
    while (sent < n) {
      // PATTERN's length is a multiple of SLICE, so offsets stay aligned and
      // byte i of every response is PATTERN[i % PATTERN.length].
      const off = sent % PATTERN.length;
      const len = Math.min(SLICE, n - sent, PATTERN.length - off);
      sent += len;
      if (!res.write(PATTERN.subarray(off, off + len))) {
        res.once("drain", pump);
        return;
      }
    }
    res.end();
  };
  res.on("close", () => res.removeAllListeners("drain"));
  pump();
}

const opts = { keepAlive: true, keepAliveTimeout: 120_000, headersTimeout: 60_000, requestTimeout: 0, noDelay: true };
const plain = http.createServer(opts, handler);
const secure = https.createServer({ ...opts, cert: readFileSync(certFile), key: readFileSync(keyFile) }, handler);
// Each server backlog is raised: the concurrency test opens 200 tunnels at once.
const listen = (s: http.Server): Promise<number> =>
  new Promise((resolve, reject) => {
    s.once("error", reject);
    s.listen({ host, port: 0, backlog: 1024 }, () => resolve((s.address() as AddressInfo).port));
  });

const [httpPort, httpsPort] = await Promise.all([listen(plain), listen(secure)]);
process.stdout.write(`${JSON.stringify({ http: httpPort, https: httpsPort })}\n`);

const stop = (): void => process.exit(0);
process.stdin.on("end", stop);
process.stdin.on("close", stop);
process.stdin.resume();
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
