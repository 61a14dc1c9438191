import type { ServerResponse } from "node:http";
import type { Duplex } from "node:stream";
import { NatproxyError } from "../../errors.ts";
import { closeWithResponse } from "../../sockets.ts";

// What the browser sees when a session fails: a real status, and the reason
// in the body, so "why does this page not load" has an answer on screen.

export function toProxyError(err: unknown): NatproxyError {
  if (err instanceof NatproxyError) return err;
  const e = err as NodeJS.ErrnoException;
  return new NatproxyError("INTERNAL", e?.code ?? e?.message ?? String(err));
}

export function errorBody(e: NatproxyError): string {
  return `natproxy: ${e.message} [${e.code}]\n`;
}

/** For a raw socket (CONNECT, upgrade): status line, headers, body, close. */
export function writeRawError(socket: Duplex, e: NatproxyError, extraHeaders: Record<string, string> = {}): void {
  if (socket.destroyed || !socket.writable) {
    socket.destroy();
    return;
  }
  closeWithResponse(socket, e.status, { "Content-Type": "text/plain; charset=utf-8", "X-Natproxy-Error": e.code, ...extraHeaders }, errorBody(e));
}

export function sendError(res: ServerResponse, e: NatproxyError, extraHeaders: Record<string, string> = {}): void {
  if (res.headersSent) {
    // Part of a response went out already: cutting the connection is the only
    // honest signal left.
    res.destroy();
    return;
  }
  const body = errorBody(e);
  res.writeHead(e.status, {
    "Content-Type": "text/plain; charset=utf-8",
    "Content-Length": Buffer.byteLength(body),
    "X-Natproxy-Error": e.code,
    ...extraHeaders,
  });
  res.end(body);
}
