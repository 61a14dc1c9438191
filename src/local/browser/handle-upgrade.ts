import type { IncomingMessage } from "node:http";
import type { Duplex } from "node:stream";
import { NatproxyError } from "../../errors.ts";
import { clientOf, type HandlerContext } from "./context.ts";
import { PROXY_AUTH_CHALLENGE } from "./proxy-auth.ts";
import { toProxyError, writeRawError } from "./respond.ts";
import { targetOf } from "./target-url.ts";
import { spliceThroughTunnel } from "./splice.ts";

/**
 * Absolute-form requests with Upgrade (ws:// through a plain proxy): the head
 * is rewritten to origin form, the Upgrade/Connection pair kept, and from then
 * on the two sides are piped as raw bytes.
 */
export function makeUpgradeHandler(ctx: HandlerContext) {
  return (req: IncomingMessage, socket: Duplex, head: Buffer): void => {
    const client = clientOf(req);
    ctx.sockets.add(socket);
    socket.on("error", () => {});
    let parsed;
    try {
      parsed = targetOf(req.url);
    } catch (err) {
      writeRawError(socket, toProxyError(err));
      return;
    }
    if (!ctx.authorize(req)) {
      writeRawError(socket, new NatproxyError("PROXY_AUTH_REQUIRED"), { "Proxy-Authenticate": PROXY_AUTH_CHALLENGE });
      return;
    }
    // The Host is the URL's authority, whatever the browser's header said
    // (RFC 9112 §3.2.2). The rest goes as it came, framing included: the
    // bytes after the head (`head`) follow it unchanged.
    const lines = [`${req.method} ${parsed.path} HTTP/${req.httpVersion}`, `Host: ${parsed.hostHeader}`];
    for (let i = 0; i < req.rawHeaders.length; i += 2) {
      const n = req.rawHeaders[i].toLowerCase();
      if (n === "proxy-authorization" || n === "proxy-connection" || n === "host") continue;
      lines.push(`${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}`);
    }
    spliceThroughTunnel(ctx, socket, parsed.target, client, (t) => {
      const text = `${lines.join("\r\n")}\r\n\r\n`;
      t.socket.write(text);
      if (head.length) t.socket.write(head);
      return Buffer.byteLength(text) + head.length;
    });
  };
}
