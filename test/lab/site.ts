// The web site a browser loads through natproxy in the NAT lab, shaped like
// YouTube + Gmail: an HTML page with many subresources from two host names,
// a large media file streamed in Range requests, a WebSocket that echoes,
// and a report the page posts back. Run in the lab's `web` namespace:
//
//   node test/lab/site.ts --cert key+cert.pem [--https-port 443] [--http-port 80]
//                         [--media-mib 50] [--max-seconds 300]
//
// One certificate covers both names (www.lab.test, media.lab.test); HTTPS and
// plain HTTP serve the same routes. Everything the test needs goes to stdout
// as JSON lines: {"event":"ready",...}, one {"event":"request",...} per
// request (host, method, path, Range header, status, bytes), one
// {"event":"ws",...} per WebSocket, {"event":"page-log",...} for the page's
// progress messages and {"event":"report","report":{...}} per report.
// The WebSocket server (RFC 6455) is implemented here, minimally: no
// extensions, no subprotocols, messages up to 16 MiB.
import { createCipheriv, createHash } from "node:crypto";
import { readFileSync, realpathSync } from "node:fs";
import http from "node:http";
import https from "node:https";
import type { Duplex } from "node:stream";
import { fileURLToPath } from "node:url";

export const WWW = "www.lab.test";
export const MEDIA = "media.lab.test";
export const SITE_HOSTS = [WWW, MEDIA] as const;
export const MEDIA_PATH = "/video.bin";
export const DEFAULT_MEDIA_SIZE = 50 * 1024 * 1024;
/** The page fetches the media file in Range requests of this size. */
export const CHUNK_SIZE = 4 * 1024 * 1024;
/** Parallel Range requests in flight, like a media player's buffer-ahead. */
export const MEDIA_PARALLEL = 3;
export const WS_MESSAGES = 100;
const WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const WS_MAX_MESSAGE = 16 * 1024 * 1024;

export interface Subresource {
  kind: "script" | "style" | "image";
  host: string;
  path: string;
  url: string;
  /** About this many bytes of body, so some span many TLS records. */
  size: number;
}

/** Every subresource the page pulls in: 13 per host, 26 in all. */
export function subresourceList(): Subresource[] {
  const out: Subresource[] = [];
  for (const host of SITE_HOSTS) {
    const add = (kind: Subresource["kind"], path: string, size: number): void => {
      out.push({ kind, host, path, url: `https://${host}${path}`, size });
    };
    for (let n = 0; n < 4; n++) add("script", `/static/js/app-${n}.js`, 8_000 + n * 40_000);
    for (let n = 0; n < 3; n++) add("style", `/static/css/theme-${n}.css`, 3_000 + n * 20_000);
    for (let n = 0; n < 6; n++) add("image", `/static/img/thumb-${n}.svg`, 1_000 + n * 30_000);
  }
  return out;
}

/** A CSS/DOM-safe id for a subresource. */
const probeId = (r: { host: string; path: string }): string => `p-${r.host}${r.path}`.replace(/[^a-zA-Z0-9-]/g, "-");

/** Deterministic pseudo-random media content (AES-128-CTR of zeros). */
export function mediaBytes(size: number): Buffer {
  const cipher = createCipheriv("aes-128-ctr", Buffer.alloc(16, 0x4e), Buffer.alloc(16, 0));
  return Buffer.concat([cipher.update(Buffer.alloc(size)), cipher.final()]);
}

export function sha256Hex(data: Uint8Array): string {
  return createHash("sha256").update(data).digest("hex");
}

/** Whole copies of `line` (never a cut comment), about `size` bytes. */
function filler(size: number, line: string): string {
  const unit = line.endsWith("\n") ? line : `${line}\n`;
  return unit.repeat(Math.max(0, Math.round(size / unit.length)));
}

function subresourceBody(r: Subresource): { type: string; body: string } {
  const id = probeId(r);
  if (r.kind === "script") {
    const head = `(window.__ran = window.__ran || []).push(${JSON.stringify(r.url)});\n`;
    return { type: "text/javascript; charset=utf-8", body: head + filler(r.size - head.length, `// padding for ${r.url} 0123456789abcdef`) };
  }
  if (r.kind === "style") {
    const head = `#${id} { width: 7px; height: 1px; }\n`;
    return { type: "text/css; charset=utf-8", body: head + filler(r.size - head.length, `/* padding for ${r.url} 0123456789abcdef */`) };
  }
  const head = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 16 16"><rect width="16" height="16" fill="#3a7"/>`;
  const tail = `</svg>\n`;
  return { type: "image/svg+xml", body: head + filler(Math.max(0, r.size - head.length - tail.length), `<!-- ${r.url} -->`) + tail };
}

function pageHtml(list: Subresource[]): string {
  const tag = (r: Subresource): string => {
    const attrs = `data-sub="${r.kind}" data-host="${r.host}" onload="__ok(this)" onerror="__bad(this)"`;
    if (r.kind === "script") return `<script src="${r.url}" ${attrs}></script>`;
    if (r.kind === "style") return `<link rel="stylesheet" href="${r.url}" ${attrs}>`;
    return `<img src="${r.url}" alt="" ${attrs}>`;
  };
  return `<!doctype html>
<html><head><meta charset="utf-8"><title>natproxy lab site</title>
<script>
window.__sub = {};
function __ok(el) { window.__sub[el.src || el.href] = "load"; }
function __bad(el) { window.__sub[el.src || el.href] = "error"; }
</script>
${list.filter((r) => r.kind !== "image").map(tag).join("\n")}
<script src="/app.js" defer></script>
</head><body>
<h1>natproxy lab</h1>
${list.filter((r) => r.kind === "style").map((r) => `<div id="${probeId(r)}"></div>`).join("\n")}
${list.filter((r) => r.kind === "image").map(tag).join("\n")}
</body></html>
`;
}

/** The page's program: check the subresources, stream the media, echo over WebSocket, report. */
function appJs(list: Subresource[]): string {
  const conf = {
    list: list.map((r) => ({ kind: r.kind, host: r.host, url: r.url, probe: probeId(r) })),
    mediaUrl: `https://${MEDIA}${MEDIA_PATH}`,
    chunk: CHUNK_SIZE,
    parallel: MEDIA_PARALLEL,
    wsUrl: `wss://${WWW}/ws`,
    wsMessages: WS_MESSAGES,
  };
  return `"use strict";
const CONF = ${JSON.stringify(conf)};
const started = performance.now();
const errors = [];
function log(msg) {
  fetch("/log", { method: "POST", body: String(msg), keepalive: true }).catch(function () {});
}
function hex(buf) {
  return Array.from(new Uint8Array(buf), function (b) { return b.toString(16).padStart(2, "0"); }).join("");
}
function windowLoaded() {
  if (document.readyState === "complete") return Promise.resolve();
  return new Promise(function (r) { window.addEventListener("load", function () { r(); }, { once: true }); });
}

function checkSubresources() {
  const ran = window.__ran || [];
  const loaded = {};
  const failed = [];
  for (const r of CONF.list) {
    let ok = window.__sub[r.url] === "load";
    if (ok && r.kind === "script") ok = ran.indexOf(r.url) >= 0;
    if (ok && r.kind === "style") ok = getComputedStyle(document.getElementById(r.probe)).width === "7px";
    if (ok && r.kind === "image") {
      const img = Array.from(document.images).find(function (i) { return i.src === r.url; });
      ok = !!img && img.complete && img.naturalWidth > 0;
    }
    if (ok) loaded[r.host] = (loaded[r.host] || 0) + 1;
    else failed.push(r.url + " (" + (window.__sub[r.url] || "no event") + ")");
  }
  return { expected: CONF.list.length, loaded: loaded, failed: failed };
}

async function getRange(start, end) {
  const res = await fetch(CONF.mediaUrl, { headers: { Range: "bytes=" + start + "-" + end }, cache: "no-store", mode: "cors" });
  if (res.status !== 206) throw new Error("range " + start + "-" + end + ": status " + res.status);
  const m = /^bytes (\\d+)-(\\d+)\\/(\\d+)$/.exec(res.headers.get("content-range") || "");
  if (!m) throw new Error("range " + start + "-" + end + ": Content-Range " + res.headers.get("content-range"));
  const body = new Uint8Array(await res.arrayBuffer());
  const total = Number(m[3]);
  if (Number(m[1]) !== start || Number(m[2]) !== Math.min(end, total - 1) || body.length !== Number(m[2]) - start + 1) {
    throw new Error("range " + start + "-" + end + ": got " + m[0] + " with " + body.length + " bytes");
  }
  return { total: total, body: body };
}

async function streamMedia() {
  const t0 = performance.now();
  const first = await getRange(0, CONF.chunk - 1);
  const total = first.total;
  const buf = new Uint8Array(total);
  buf.set(first.body, 0);
  let bytes = first.body.length;
  let requests = 1;
  const chunkHashes = [hex(await crypto.subtle.digest("SHA-256", first.body))];
  const starts = [];
  for (let s = CONF.chunk; s < total; s += CONF.chunk) starts.push(s);
  let next = 0;
  async function worker() {
    while (next < starts.length) {
      const k = next++;
      const s = starts[k];
      const part = await getRange(s, Math.min(s + CONF.chunk, total) - 1);
      buf.set(part.body, s);
      bytes += part.body.length;
      requests++;
      chunkHashes[k + 1] = hex(await crypto.subtle.digest("SHA-256", part.body));
      log("media " + bytes + "/" + total);
    }
  }
  const workers = [];
  for (let w = 0; w < CONF.parallel; w++) workers.push(worker());
  await Promise.all(workers);
  const sha256 = hex(await crypto.subtle.digest("SHA-256", buf));
  return { total: total, bytes: bytes, requests: requests, sha256: sha256, chunkHashes: chunkHashes, ms: Math.round(performance.now() - t0) };
}

function wsMessage(i) {
  const sizes = [0, 100, 300, 70000, 5];
  if (i % 10 === 9) {
    const b = new Uint8Array(i % 20 === 9 ? 1000 : 130000);
    for (let k = 0; k < b.length; k++) b[k] = (k * 31 + i) & 255;
    return b.buffer;
  }
  return "echo " + i + " " + "\\u00e9x".repeat(sizes[i % 5] / 2);
}
function sameMessage(a, b) {
  if (typeof a === "string" || typeof b === "string") return a === b;
  const x = new Uint8Array(a), y = new Uint8Array(b);
  if (x.length !== y.length) return false;
  for (let k = 0; k < x.length; k++) if (x[k] !== y[k]) return false;
  return true;
}

function echoOverWebSocket() {
  return new Promise(function (resolve) {
    const t0 = performance.now();
    const r = { opened: false, sent: 0, echoes: 0, mismatches: 0, openAfterAll: false, closedEarly: false, close: null, ms: 0 };
    const sent = [];
    const ws = new WebSocket(CONF.wsUrl);
    ws.binaryType = "arraybuffer";
    const timer = setTimeout(function () { r.error = "timeout"; finish(); }, 30000);
    function finish() { clearTimeout(timer); r.ms = Math.round(performance.now() - t0); resolve(r); }
    ws.onopen = function () {
      r.opened = true;
      for (let i = 0; i < CONF.wsMessages; i++) { const m = wsMessage(i); sent.push(m); ws.send(m); r.sent++; }
    };
    ws.onmessage = function (ev) {
      if (sameMessage(sent[r.echoes + r.mismatches], ev.data)) r.echoes++; else r.mismatches++;
      if (r.echoes + r.mismatches === CONF.wsMessages) {
        r.openAfterAll = ws.readyState === WebSocket.OPEN;
        ws.close(1000, "done");
      }
    };
    ws.onerror = function () { r.error = "error event"; };
    ws.onclose = function (ev) {
      r.close = { code: ev.code, reason: ev.reason, wasClean: ev.wasClean };
      if (r.echoes + r.mismatches < CONF.wsMessages) r.closedEarly = true;
      finish();
    };
  });
}

async function main() {
  const report = { userAgent: navigator.userAgent, page: location.href, errors: errors };
  const guard = setTimeout(function () { errors.push("page timeout"); send(report); }, 100000);
  try {
    await windowLoaded();
    report.subresources = checkSubresources();
    log("subresources " + JSON.stringify(report.subresources.loaded));
    try { report.media = await streamMedia(); } catch (e) { errors.push("media: " + e); }
    log("media done");
    try { report.ws = await echoOverWebSocket(); } catch (e) { errors.push("ws: " + e); }
  } catch (e) {
    errors.push(String(e && e.stack || e));
  }
  clearTimeout(guard);
  report.ms = Math.round(performance.now() - started);
  await send(report);
}
let sentReport = false;
async function send(report) {
  if (sentReport) return;
  sentReport = true;
  await fetch("/report", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(report) });
  document.title = "done";
}
main();
`;
}

// ---------------------------------------------------------------- server

const emit = (o: object): void => {
  process.stdout.write(JSON.stringify(o) + "\n");
};

interface SiteOptions {
  cert: string;
  httpsPort: number;
  httpPort: number;
  mediaSize: number;
}

type Range = { start: number; end: number } | "unsatisfiable" | undefined;

/** A single `bytes=` range (what media players send); anything else is ignored as RFC 9110 allows. */
export function parseRange(header: string | undefined, size: number): Range {
  if (!header) return undefined;
  const m = /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  if (!m || (m[1] === "" && m[2] === "")) return undefined;
  if (m[1] === "") {
    const n = Number(m[2]);
    if (n === 0) return "unsatisfiable";
    return { start: Math.max(0, size - n), end: size - 1 };
  }
  const start = Number(m[1]);
  const end = m[2] === "" ? size - 1 : Math.min(Number(m[2]), size - 1);
  if (start >= size || end < start) return "unsatisfiable";
  return { start, end };
}

function readBody(req: http.IncomingMessage, limit: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    let n = 0;
    req.on("data", (d: Buffer) => {
      n += d.length;
      if (n > limit) {
        reject(new Error("body too large"));
        req.destroy();
      } else parts.push(d);
    });
    req.on("end", () => resolve(Buffer.concat(parts).toString("utf8")));
    req.on("error", reject);
  });
}

function makeHandler(media: Buffer, list: Subresource[]) {
  const statics = new Map(list.map((r) => [`${r.host}${r.path}`, subresourceBody(r)]));
  const html = pageHtml(list);
  const app = appJs(list);
  const allowedOrigins = new Set(SITE_HOSTS.flatMap((h) => [`https://${h}`, `http://${h}`]));

  return (scheme: "https" | "http") =>
    (req: http.IncomingMessage, res: http.ServerResponse): void => {
      const host = (req.headers.host ?? "").replace(/:\d+$/, "").toLowerCase();
      const path = (req.url ?? "/").split("?")[0] as string;
      const range = req.headers.range;
      let bytes = 0;
      res.on("finish", () => {
        emit({ event: "request", scheme, host, method: req.method, path, range: range ?? null, status: res.statusCode, bytes });
      });
      const send = (status: number, type: string, body: string | Buffer, headers: Record<string, string> = {}): void => {
        bytes = typeof body === "string" ? Buffer.byteLength(body) : body.length;
        res.writeHead(status, { "Content-Type": type, "Content-Length": String(bytes), "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", ...headers });
        res.end(req.method === "HEAD" ? undefined : body);
      };
      const origin = req.headers.origin;
      const cors: Record<string, string> =
        origin && allowedOrigins.has(origin)
          ? { "Access-Control-Allow-Origin": origin, Vary: "Origin", "Access-Control-Expose-Headers": "Content-Range, Content-Length, Accept-Ranges" }
          : {};

      if (!SITE_HOSTS.includes(host as (typeof SITE_HOSTS)[number])) return send(421, "text/plain", `no site ${host}\n`);
      if (req.method === "OPTIONS") {
        res.writeHead(204, { ...cors, "Access-Control-Allow-Methods": "GET, HEAD", "Access-Control-Allow-Headers": "Range", "Access-Control-Max-Age": "600" });
        res.end();
        return;
      }
      if (req.method === "POST" && host === WWW && (path === "/report" || path === "/log")) {
        readBody(req, 4 * 1024 * 1024).then(
          (body) => {
            if (path === "/log") emit({ event: "page-log", message: body.slice(0, 2000) });
            else {
              let report: unknown;
              try {
                report = JSON.parse(body);
              } catch {
                return send(400, "text/plain", "bad JSON\n");
              }
              emit({ event: "report", host, report });
            }
            res.writeHead(204);
            res.end();
          },
          (err: Error) => send(413, "text/plain", `${err.message}\n`),
        );
        return;
      }
      if (req.method !== "GET" && req.method !== "HEAD") return send(405, "text/plain", "method not allowed\n", { Allow: "GET, HEAD, OPTIONS" });
      if (host === WWW && path === "/") return send(200, "text/html; charset=utf-8", html);
      if (host === WWW && path === "/app.js") return send(200, "text/javascript; charset=utf-8", app);
      if (host === MEDIA && path === MEDIA_PATH) {
        const r = parseRange(range, media.length);
        const common = { ...cors, "Accept-Ranges": "bytes" };
        if (r === "unsatisfiable") return send(416, "text/plain", "range not satisfiable\n", { ...common, "Content-Range": `bytes */${media.length}` });
        if (!r) return send(200, "application/octet-stream", media, common);
        return send(206, "application/octet-stream", media.subarray(r.start, r.end + 1), { ...common, "Content-Range": `bytes ${r.start}-${r.end}/${media.length}` });
      }
      const s = statics.get(`${host}${path}`);
      if (s) return send(200, s.type, s.body);
      send(404, "text/plain", "not found\n");
    };
}

// ---------------------------------------------------------------- WebSocket (RFC 6455)

function wsFrame(opcode: number, payload: Buffer): Buffer {
  const n = payload.length;
  const head = n < 126 ? Buffer.alloc(2) : n < 65536 ? Buffer.alloc(4) : Buffer.alloc(10);
  head[0] = 0x80 | opcode;
  if (n < 126) head[1] = n;
  else if (n < 65536) {
    head[1] = 126;
    head.writeUInt16BE(n, 2);
  } else {
    head[1] = 127;
    head.writeBigUInt64BE(BigInt(n), 2);
  }
  return Buffer.concat([head, payload]);
}

function closePayload(code: number, reason = ""): Buffer {
  const b = Buffer.alloc(2 + Buffer.byteLength(reason));
  b.writeUInt16BE(code, 0);
  b.write(reason, 2);
  return b;
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

/** Upgrades a request to a WebSocket that echoes every message. */
function handleUpgrade(scheme: string, req: http.IncomingMessage, socket: Duplex, head: Buffer): void {
  const host = (req.headers.host ?? "").replace(/:\d+$/, "").toLowerCase();
  const path = (req.url ?? "").split("?")[0];
  const key = req.headers["sec-websocket-key"];
  const valid =
    req.method === "GET" &&
    path === "/ws" &&
    host === WWW &&
    (req.headers.upgrade ?? "").toLowerCase() === "websocket" &&
    /\bupgrade\b/i.test(req.headers.connection ?? "") &&
    req.headers["sec-websocket-version"] === "13" &&
    typeof key === "string" &&
    Buffer.from(key, "base64").length === 16;
  emit({ event: "request", scheme, host, method: req.method, path, range: null, status: valid ? 101 : 400, bytes: 0, upgrade: true });
  if (!valid) {
    socket.end("HTTP/1.1 400 Bad Request\r\nSec-WebSocket-Version: 13\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    return;
  }
  const accept = createHash("sha1").update(key + WS_GUID).digest("base64");
  socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`);

  const stats = { messages: 0, bytes: 0, pings: 0, closeCode: null as number | null, error: null as string | null };
  let buf: Buffer = head.length ? Buffer.from(head) : Buffer.alloc(0);
  let fragments: Buffer[] = [];
  let fragmentOpcode = 0;
  let fragmentBytes = 0;
  let closing = false;

  const fail = (code: number, why: string): void => {
    stats.error = why;
    if (!closing) {
      closing = true;
      socket.end(wsFrame(0x8, closePayload(code, why.slice(0, 100))));
    }
  };
  const onMessage = (opcode: number, payload: Buffer): void => {
    if (opcode === 0x1) {
      try {
        utf8.decode(payload);
      } catch {
        return fail(1007, "invalid UTF-8");
      }
    }
    stats.messages++;
    stats.bytes += payload.length;
    socket.write(wsFrame(opcode, payload));
  };
  const parse = (): void => {
    // Bounded by the buffered bytes: every pass consumes one whole frame.
    while (!closing && buf.length >= 2) {
      const b0 = buf[0] as number;
      const b1 = buf[1] as number;
      const fin = (b0 & 0x80) !== 0;
      const opcode = b0 & 0x0f;
      if (b0 & 0x70) return fail(1002, "reserved bits set");
      if (!(b1 & 0x80)) return fail(1002, "client frame not masked");
      let len = b1 & 0x7f;
      let off = 2;
      if (len === 126) {
        if (buf.length < 4) return;
        len = buf.readUInt16BE(2);
        off = 4;
      } else if (len === 127) {
        if (buf.length < 10) return;
        const big = buf.readBigUInt64BE(2);
        if (big > BigInt(WS_MAX_MESSAGE)) return fail(1009, "frame too large");
        len = Number(big);
        off = 10;
      }
      if (buf.length < off + 4 + len) return;
      const mask = buf.subarray(off, off + 4);
      const payload = Buffer.from(buf.subarray(off + 4, off + 4 + len));
      for (let k = 0; k < payload.length; k++) payload[k] = (payload[k] as number) ^ (mask[k & 3] as number);
      buf = buf.subarray(off + 4 + len);

      if (opcode >= 0x8) {
        if (!fin || len > 125) return fail(1002, "bad control frame");
        if (opcode === 0x8) {
          stats.closeCode = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
          closing = true;
          // Echo the close (status code only) and end our side.
          socket.end(wsFrame(0x8, payload.length >= 2 ? payload.subarray(0, 2) : Buffer.alloc(0)));
          return;
        }
        if (opcode === 0x9) {
          stats.pings++;
          socket.write(wsFrame(0xa, payload));
        } else if (opcode !== 0xa) return fail(1002, `unknown control opcode ${opcode}`);
        continue;
      }
      if (opcode === 0x0) {
        if (!fragmentOpcode) return fail(1002, "continuation without a message");
      } else if (opcode === 0x1 || opcode === 0x2) {
        if (fragmentOpcode) return fail(1002, "new message inside a fragmented one");
        fragmentOpcode = opcode;
      } else return fail(1002, `unknown opcode ${opcode}`);
      fragments.push(payload);
      fragmentBytes += payload.length;
      if (fragmentBytes > WS_MAX_MESSAGE) return fail(1009, "message too large");
      if (fin) {
        const whole = Buffer.concat(fragments);
        const op = fragmentOpcode;
        fragments = [];
        fragmentOpcode = 0;
        fragmentBytes = 0;
        onMessage(op, whole);
      }
    }
  };
  socket.on("data", (d: Buffer) => {
    buf = buf.length ? Buffer.concat([buf, d]) : d;
    parse();
  });
  socket.on("error", (err) => {
    stats.error = err.message;
  });
  socket.once("close", () => emit({ event: "ws", host, ...stats }));
  parse();
}

// ---------------------------------------------------------------- main

async function main(argv: string[]): Promise<void> {
  const opt = (name: string, dflt?: string): string | undefined => {
    const k = argv.indexOf(`--${name}`);
    return k >= 0 ? argv[k + 1] : dflt;
  };
  const opts: SiteOptions = {
    cert: opt("cert") ?? "",
    httpsPort: Number(opt("https-port", "443")),
    httpPort: Number(opt("http-port", "80")),
    mediaSize: Math.round(Number(opt("media-mib", "50")) * 1024 * 1024),
  };
  if (!opts.cert) throw new Error("--cert <key+cert PEM> is required");
  // Never outlive a test run, even if nobody kills us.
  setTimeout(() => process.exit(0), Number(opt("max-seconds", "300")) * 1000).unref();

  const pem = readFileSync(opts.cert, "utf8");
  const media = mediaBytes(opts.mediaSize);
  const handler = makeHandler(media, subresourceList());
  const secure = https.createServer({ key: pem, cert: pem }, handler("https"));
  const plain = http.createServer(handler("http"));
  secure.on("upgrade", (req, socket, head) => handleUpgrade("https", req, socket, head));
  plain.on("upgrade", (req, socket, head) => handleUpgrade("http", req, socket, head));
  secure.on("tlsClientError", (err: NodeJS.ErrnoException) => emit({ event: "tls-error", code: err.code ?? null, message: err.message }));
  for (const s of [secure, plain]) s.on("clientError", (_err, socket: Duplex) => socket.destroy());
  const listen = (s: http.Server, port: number): Promise<void> =>
    new Promise((resolve, reject) => {
      s.once("error", reject);
      s.listen({ port, host: "::", ipv6Only: false }, () => resolve());
    });
  await listen(secure, opts.httpsPort);
  await listen(plain, opts.httpPort);
  emit({ event: "ready", https: opts.httpsPort, http: opts.httpPort, hosts: SITE_HOSTS, mediaSize: media.length, mediaSha256: sha256Hex(media) });
  const stop = (): void => {
    secure.close();
    plain.close();
    secure.closeAllConnections();
    plain.closeAllConnections();
    process.exit(0);
  };
  process.once("SIGTERM", stop);
  process.once("SIGINT", stop);
}

const invoked = process.argv[1] ? realpathSync(process.argv[1]) : "";
if (invoked === realpathSync(fileURLToPath(import.meta.url))) {
  main(process.argv.slice(2)).catch((err: unknown) => {
    console.error(err instanceof Error ? err.stack : err);
    process.exit(1);
  });
}
