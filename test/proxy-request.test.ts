import assert from "node:assert/strict";
import { test } from "node:test";
import { parseHostPort } from "../src/address.ts";
import { endToEndHeaders } from "../src/local/browser/hop-by-hop.ts";
import { makeProxyAuth } from "../src/local/browser/proxy-auth.ts";
import { targetOf } from "../src/local/browser/target-url.ts";
import type { IncomingMessage } from "node:http";

test("absolute-form URLs give target, origin-form path and Host", () => {
  assert.deepEqual(targetOf("http://example.com/a/b?c=d"), { target: { host: "example.com", port: 80 }, path: "/a/b?c=d", hostHeader: "example.com" });
  assert.deepEqual(targetOf("http://[2001:db8::1]:8080/"), { target: { host: "2001:db8::1", port: 8080 }, path: "/", hostHeader: "[2001:db8::1]:8080" });
  assert.deepEqual(targetOf("http://EXAMPLE.com:80").target, { host: "example.com", port: 80 });
});

test("origin-form, https absolute-form, credentials and junk are refused with 400", () => {
  for (const [url, why] of [
    ["/", /set it as your browser's proxy/],
    ["https://example.com/", /https goes through CONNECT/],
    ["ftp://example.com/", /only http/],
    ["http://user:pw@example.com/", /credentials/],
    ["::::", /not an absolute URL/],
  ] as const) {
    assert.throws(() => targetOf(url), (e: Error & { status: number }) => e.status === 400 && why.test(e.message), url);
  }
});

test("hop-by-hop headers are dropped, including those named in Connection; the rest keep case and order", () => {
  const raw = ["Host", "a", "Connection", "keep-alive, X-Private", "Keep-Alive", "timeout=5", "X-Private", "1", "Proxy-Authorization", "Basic x", "Proxy-Connection", "keep-alive", "TE", "trailers", "Transfer-Encoding", "chunked", "Cookie", "a=1", "cookie", "b=2", "X-Mixed-Case", "v"];
  assert.deepEqual(endToEndHeaders(raw), ["Host", "a", "Cookie", "a=1", "cookie", "b=2", "X-Mixed-Case", "v"]);
  assert.deepEqual(endToEndHeaders(["Upgrade", "websocket", "Connection", "Upgrade"], ["upgrade", "connection"]), ["Upgrade", "websocket", "Connection", "Upgrade"]);
});

test("Connection never takes away the length or the Host", () => {
  const raw = ["Host", "a", "Content-Length", "5", "Connection", "content-length, Host, X-Private", "X-Private", "1"];
  assert.deepEqual(endToEndHeaders(raw), ["Host", "a", "Content-Length", "5"]);
});

test("CONNECT authorities parse for names, IPv4 and bracketed IPv6, and refuse the rest", () => {
  assert.deepEqual(parseHostPort("example.com:443"), { host: "example.com", port: 443 });
  assert.deepEqual(parseHostPort("[2001:db8::1]:443"), { host: "2001:db8::1", port: 443 });
  for (const bad of ["example.com", "2001:db8::1:443", "[2001:db8::1]", "host:99999", "host:-1", "[nothost]:1"]) {
    assert.throws(() => parseHostPort(bad), bad);
  }
});

test("proxy authentication: Basic with configured users; none configured lets everyone in", () => {
  const req = (h?: string) => ({ headers: h ? { "proxy-authorization": h } : {} }) as IncomingMessage;
  const open = makeProxyAuth([]);
  assert.equal(open(req()), true);
  const auth = makeProxyAuth(["alice:s3cret", "bob:pw:with:colons"]);
  const basic = (s: string) => `Basic ${Buffer.from(s).toString("base64")}`;
  assert.equal(auth(req(basic("alice:s3cret"))), true);
  assert.equal(auth(req(basic("bob:pw:with:colons"))), true);
  assert.equal(auth(req(basic("alice:wrong"))), false);
  assert.equal(auth(req()), false);
  assert.equal(auth(req("Bearer x")), false);
});
