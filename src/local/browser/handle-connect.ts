import type { IncomingMessage } from "node:http";
import type { Duplex } from "node:stream";
import { parseHostPort, type HostPort } from "../../address.ts";
import { NatproxyError } from "../../errors.ts";
import { logSession } from "../../request-log.ts";
import { PROXY_AUTH_CHALLENGE } from "./proxy-auth.ts";
import { clientOf, type HandlerContext } from "./context.ts";
import { writeRawError } from "./respond.ts";
import { spliceOptimistic, spliceThroughTunnel } from "./splice.ts";

const CONNECT_OK = "HTTP/1.1 200 Connection Established\r\n\r\n";

/** CONNECT host:port — HTTPS and anything else the browser tunnels. */
export function makeConnectHandler(ctx: HandlerContext) {
  return (req: IncomingMessage, socket: Duplex, head: Buffer): void => {
    const client = clientOf(req);
    ctx.sockets.add(socket);
    socket.on("error", () => {});
    let target: HostPort;
    try {
      target = parseHostPort(req.url ?? "");
      if (target.port === 0) throw new Error("port 0");
    } catch {
      refuse(new NatproxyError("BAD_REQUEST", `CONNECT needs host:port, got "${req.url}"`));
      return;
    }
    if (!ctx.authorize(req)) {
      refuse(new NatproxyError("PROXY_AUTH_REQUIRED"), { "Proxy-Authenticate": PROXY_AUTH_CHALLENGE });
      return;
    }
    // A CONNECT that max_pending would refuse gets its 429 the normal way.
    const t = ctx.tunnels;
    if (ctx.optimisticConnect() && t.opening.count < t.maxPending) {
      socket.write(CONNECT_OK);
      spliceOptimistic(ctx, socket, target, client, head);
      return;
    }
    spliceThroughTunnel(ctx, socket, target, client, (t) => {
      socket.write(CONNECT_OK);
      // Bytes the browser sent right after its CONNECT head (often the TLS
      // ClientHello) go first, before piping takes over.
      if (head.length) t.socket.write(head);
      return head.length;
    });

    function refuse(e: NatproxyError, headers?: Record<string, string>): void {
      logSession(ctx.log, ctx.tunnels.metrics, { session: "-", client, target: req.url ?? "?", outcome: e.code, up: 0, down: 0, ms: 0 });
      writeRawError(socket, e, headers);
    }
  };
}
