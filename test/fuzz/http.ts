import type { Rng } from "./harness.ts";

// HTTP/1.x requests for the browser port and the coordinator's API, from
// well-formed to hostile.

const EOLS = ["\r\n", "\r\n", "\r\n", "\n", "\r"];

function headerPool(rng: Rng, ctx: { authority: string }): string[] {
  // Mostly well-formed headers, so that requests get past the parser and into
  // natproxy's own code; now and then one that a parser must refuse.
  const valid = [
    `Content-Length: ${rng.range(0, 64)}`,
    "Transfer-Encoding: chunked",
    "Expect: 100-continue",
    "Connection: close",
    "Connection: keep-alive",
    "Connection: Upgrade",
    "Upgrade: websocket",
    "Proxy-Connection: keep-alive",
    "Proxy-Authorization: Basic dXNlcjpwYXNz",
    `Proxy-Authorization: Basic ${Buffer.from(rng.printable(rng.range(0, 20))).toString("base64")}`,
    "Accept: */*",
    "User-Agent: natproxy-fuzz",
    `X-Fuzz: ${rng.printable(rng.range(0, 200))}`,
    `Cookie: ${rng.printable(rng.range(0, 100)).replace(/;/g, "")}`,
  ];
  const hostile = [
    "Host: ",
    `Host: ${rng.printable(rng.range(1, 40))}`,
    "Content-Length: -1",
    "Content-Length: 99999999999999999999",
    "Content-Length: 1, 2",
    "Transfer-Encoding: gzip, chunked",
    "Transfer-Encoding: identity",
    "Upgrade: h2c",
    "No-Colon-Here",
    "X-Nul: a\0b",
    " Folded: continuation",
    `X-Bin: ${rng.bytes(rng.range(1, 30)).toString("latin1")}`,
    `${rng.printable(rng.range(1, 20))}: ${rng.printable(rng.range(0, 20))}`,
  ];
  const out: string[] = [];
  if (rng.chance(0.85)) out.push(`Host: ${ctx.authority}`);
  for (let n = rng.range(0, 4); n > 0; n--) out.push(rng.pick(valid));
  if (rng.chance(0.2)) out.splice(rng.int(out.length + 1), 0, rng.pick(hostile));
  if (rng.chance(0.03)) out.push(`X-Huge: ${"a".repeat(70_000)}`); // beyond max_header_size
  if (rng.chance(0.02)) for (let i = 0; i < 3000; i++) out.push(`X-${i}: y`);
  return out;
}

function body(rng: Rng, chunked: boolean): Buffer {
  if (rng.chance(0.5)) return Buffer.alloc(0);
  if (!chunked) return rng.chance(0.5) ? rng.bytes(rng.range(1, 300)) : Buffer.from(rng.printable(rng.range(1, 100)));
  const parts: string[] = [];
  for (let k = rng.range(0, 3); k > 0; k--) {
    const data = rng.printable(rng.range(0, 40));
    parts.push(rng.chance(0.8) ? `${data.length.toString(16)}\r\n${data}\r\n` : `${rng.pick(["zz", "-1", "ffffffffffffffff", ""])}\r\n${data}\r\n`);
  }
  if (rng.chance(0.8)) parts.push("0\r\n\r\n");
  return Buffer.from(parts.join(""), "latin1");
}

export function httpRequest(rng: Rng, method: string, target: string, extra: string[] = [], authority = "127.0.0.1"): Buffer {
  const eol = rng.chance(0.9) ? "\r\n" : rng.pick(EOLS);
  const version = rng.chance(0.85) ? "HTTP/1.1" : rng.pick(["HTTP/1.0", "HTTP/0.9", "HTTP/2.0", "HTTP/1.1x", "", "HTTP/1.1 extra", "http/1.1"]);
  const headers = [...extra, ...headerPool(rng, { authority })];
  const chunked = headers.some((h) => /transfer-encoding:.*chunked/i.test(h));
  const head = `${method} ${target}${version ? ` ${version}` : ""}${eol}${headers.map((h) => h + eol).join("")}${rng.chance(0.92) ? eol : ""}`;
  return Buffer.concat([Buffer.from(head, "latin1"), body(rng, chunked)]);
}

export const METHODS = ["GET", "GET", "GET", "POST", "PUT", "HEAD", "OPTIONS", "DELETE", "PATCH", "TRACE", "get", "PRI", "M-SEARCH"];
