import { createHash } from "node:crypto";
import http from "node:http";
import type { Socket } from "node:net";
import tls from "node:tls";

export interface Fetched {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
  sha256: string;
}

function collect(res: http.IncomingMessage): Promise<Fetched> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    const hash = createHash("sha256");
    res.on("data", (c: Buffer) => {
      hash.update(c);
      if (chunks.length < 64) chunks.push(c);
    });
    res.on("error", reject);
    res.on("end", () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks), sha256: hash.digest("hex") }));
  });
}

/** A plain-HTTP request in absolute form through the proxy. */
export function proxiedRequest(
  proxyPort: number,
  url: string,
  opts: { method?: string; body?: Buffer | Buffer[]; headers?: Record<string, string>; agent?: http.Agent } = {},
): Promise<Fetched & { reusedSocket: boolean }> {
  return new Promise((resolve, reject) => {
    const u = new URL(url);
    const req = http.request({ host: "127.0.0.1", port: proxyPort, method: opts.method ?? "GET", path: url, headers: { Host: u.host, ...opts.headers }, agent: opts.agent ?? false });
    req.on("error", reject);
    req.on("response", (res) => collect(res).then((f) => resolve({ ...f, reusedSocket: req.reusedSocket }), reject));
    if (Array.isArray(opts.body)) {
      for (const b of opts.body) req.write(b);
      req.end();
    } else req.end(opts.body);
  });
}

/** CONNECT through the proxy; resolves with the status and (on 200) the raw tunnel socket. */
export function connectThrough(proxyPort: number, authority: string, headers: Record<string, string> = {}): Promise<{ status: number; socket: Socket; body: string; headers: http.IncomingHttpHeaders }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: "127.0.0.1", port: proxyPort, method: "CONNECT", path: authority, headers: { Host: authority, ...headers }, agent: false });
    req.on("error", reject);
    req.on("connect", (res, socket, head: Buffer) => {
      if (res.statusCode === 200) {
        if (head.length) socket.unshift(head);
        resolve({ status: 200, socket, body: "", headers: res.headers });
        return;
      }
      // Node hands non-2xx CONNECT answers here too, with the body still on the socket.
      const chunks: Buffer[] = [head];
      socket.on("data", (c: Buffer) => chunks.push(c));
      socket.on("error", () => {});
      socket.on("close", () => resolve({ status: res.statusCode ?? 0, socket, body: Buffer.concat(chunks).toString(), headers: res.headers }));
    });
    req.end();
  });
}

/** HTTPS GET through a CONNECT tunnel, verifying the target against `ca`. */
export async function httpsThrough(proxyPort: number, host: string, port: number, path: string, ca: string): Promise<Fetched> {
  const tunnel = await connectThrough(proxyPort, `${host}:${port}`);
  if (tunnel.status !== 200) return { status: tunnel.status, headers: tunnel.headers, body: Buffer.from(tunnel.body), sha256: "" };
  return new Promise((resolve, reject) => {
    const req = http.request({
      host,
      port,
      path,
      method: "GET",
      // No agent: the request then uses exactly this connection.
      createConnection: () => tls.connect({ socket: tunnel.socket, servername: host === "127.0.0.1" ? undefined : host, host, ca }),
    });
    req.on("error", reject);
    req.on("response", (res) => collect(res).then(resolve, reject));
    req.end();
  });
}
