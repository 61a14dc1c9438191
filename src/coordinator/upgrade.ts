import type { IncomingMessage } from "node:http";
import type { Socket } from "node:net";
import type { Duplex } from "node:stream";
import { formatHostPort } from "../address.ts";
import { NatproxyError } from "../errors.ts";
import { API, TUNNEL_PROTOCOL } from "../protocol/api.ts";
import { decodeMessage } from "../protocol/wire.ts";
import { closeWithResponse } from "../sockets.ts";
import { awaitOpen, type EngineContext } from "./open-engine.ts";
import { rejectedTokenLog } from "./rejected-tokens.ts";

/**
 * The outbound path: a local proxy whose NAT lets no connect-back in dials the
 * coordinator's HTTPS port itself, upgrades the connection, and names its
 * target in an Open message. From then on the connection is bridged to the
 * target exactly as a connect-back would be.
 */
export function upgradeHandler(ctx: EngineContext, authenticated: (socket: Socket) => void) {
  const rejected = rejectedTokenLog(ctx.log);
  return (req: IncomingMessage, socket: Duplex, head: Buffer): void => {
    ctx.sockets.add(socket);
    socket.on("error", () => {});
    const caller = ctx.callerOf(req.socket);
    const client = formatHostPort(caller.host, caller.port);
    const path = (req.url ?? "").split("?")[0];
    // As on the API: nothing but 401 for a peer without a valid token.
    const token = ctx.checkToken(req.headers.authorization);
    if (token === undefined) {
      rejected(caller.host, "outbound tunnel");
      refuse(ctx, socket, new NatproxyError("UNAUTHORIZED"), { "WWW-Authenticate": 'Bearer realm="natproxy"' });
      return;
    }
    authenticated(req.socket);
    if (path !== API.tunnel) {
      refuse(ctx, socket, new NatproxyError("NOT_FOUND", `${req.method} ${path}`));
      return;
    }
    if ((req.headers.upgrade ?? "").toLowerCase() !== TUNNEL_PROTOCOL) {
      refuse(ctx, socket, new NatproxyError("BAD_REQUEST", `expected Upgrade: ${TUNNEL_PROTOCOL}`));
      return;
    }
    // A connection kept ready (no Open yet, or only part of one) holds a
    // place among the waiting ones; one whose whole Open came in the same
    // flight goes straight to the session limits.
    let ready: () => void = () => {};
    try {
      if (!holdsMessage(head)) ready = ctx.readyLimits.acquire(token);
    } catch (err) {
      refuse(ctx, socket, err as NatproxyError);
      return;
    }
    socket.write(`HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: ${TUNNEL_PROTOCOL}\r\n\r\n`);
    if (head.length) socket.unshift(head);
    awaitOpen(ctx, socket, token, client, "outbound", ready);
  };
}

function holdsMessage(head: Buffer): boolean {
  try {
    return decodeMessage(head) !== undefined;
  } catch {
    // Not natproxy: the Open read refuses it at once.
    return false;
  }
}

function refuse(ctx: EngineContext, socket: Duplex, e: NatproxyError, headers: Record<string, string> = {}): void {
  ctx.metrics?.refused(e.code);
  closeWithResponse(socket, e.status, { "Content-Type": "application/json", ...headers }, JSON.stringify({ error: { code: e.code, message: e.message } }));
}
