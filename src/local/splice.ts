import type { Duplex } from "node:stream";
import { formatHostPort, type HostPort } from "../address.ts";
import { bridge, bridgeOutcome } from "../bridge.ts";
import { formatSession } from "../request-log.ts";
import type { HandlerContext } from "./context.ts";
import { toProxyError, writeRawError } from "./respond.ts";
import { openTunnel, type Tunnel } from "./tunnels.ts";

/**
 * Opens a tunnel for a browser socket that has left HTTP (CONNECT, Upgrade),
 * lets the caller write what must go first, then pipes both ways and writes
 * the session log line. A failure is answered on the socket with its status.
 */
export function spliceThroughTunnel(ctx: HandlerContext, socket: Duplex, target: HostPort, client: string, first: (t: Tunnel) => number): void {
  const name = formatHostPort(target.host, target.port);
  const started = performance.now();
  const gone = new AbortController();
  const onGone = () => gone.abort();
  socket.once("close", onGone);
  const log = (session: string, outcome: string, up: number, down: number, detail?: string, path = ctx.tunnels.paths.current()) =>
    ctx.log.info(formatSession({ session, client, target: name, path, outcome, up, down, ms: Math.round(performance.now() - started), detail }));
  openTunnel(ctx.tunnels, target, gone.signal).then(
    (t) => {
      socket.off("close", onGone);
      if (socket.destroyed) {
        t.socket.destroy();
        log(t.session, "browser-gone", 0, 0, undefined, t.path);
        return;
      }
      const preUp = first(t);
      void bridge(socket, t.socket, ctx.bridgeTimeouts).then((s) => {
        log(t.session, bridgeOutcome(s, "browser", "tunnel"), s.aToB + preUp, s.bToA, s.error?.err.message, t.path);
      });
    },
    (err: unknown) => {
      socket.off("close", onGone);
      const e = toProxyError(err);
      log("-", e.code, 0, 0, e.message);
      writeRawError(socket, e);
    },
  );
}
