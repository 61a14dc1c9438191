import type { Socket } from "node:net";
import type { Duplex } from "node:stream";
import { formatHostPort, type HostPort } from "../../address.ts";
import { bridge, bridgeOutcome } from "../../bridge.ts";
import type { NatproxyError } from "../../errors.ts";
import { logSession } from "../../request-log.ts";
import type { HandlerContext } from "./context.ts";
import { EarlyBytes } from "../tunnel/early-bytes.ts";
import { toProxyError, writeRawError } from "./respond.ts";
import { openTunnel, type Tunnel } from "../tunnel/opener.ts";

// A TLS ClientHello is a few KiB at most; a browser then waits for the server.
const EARLY_LIMIT = 64 * 1024;

/**
 * Opens a tunnel for a browser socket that has left HTTP (CONNECT, Upgrade),
 * lets the caller write what must go first, then pipes both ways and writes
 * the session log line. A failure is answered on the socket with its status.
 */
export function spliceThroughTunnel(ctx: HandlerContext, socket: Duplex, target: HostPort, client: string, first: (t: Tunnel) => number, as?: SpliceAs): void {
  splice(ctx, socket, target, client, { first, ...as });
}

/** A client that is not speaking HTTP (SOCKS): its log marking, and how a failure is answered. */
export interface SpliceAs {
  kind?: string;
  fail?: (socket: Duplex, e: NatproxyError) => void;
}

/**
 * An optimistic CONNECT: the `200` has already gone to the browser, and what
 * it sends next (its ClientHello) rides with the Open instead of waiting for
 * the Result, which saves the browser one round trip to the coordinator. The
 * price: a target that cannot be reached can only be shown as a connection
 * reset, not as an error status; the request log still names the reason.
 */
export function spliceOptimistic(ctx: HandlerContext, socket: Duplex, target: HostPort, client: string, head: Buffer, as?: SpliceAs): void {
  splice(ctx, socket, target, client, { early: new EarlyBytes(socket, EARLY_LIMIT, head), ...as });
}

function splice(ctx: HandlerContext, socket: Duplex, target: HostPort, client: string, how: SpliceAs & { first?: (t: Tunnel) => number; early?: EarlyBytes }): void {
  const name = formatHostPort(target.host, target.port);
  const started = performance.now();
  const gone = new AbortController();
  const onGone = () => gone.abort();
  socket.once("close", onGone);
  const log = (session: string, outcome: string, up: number, down: number, detail?: string, path = ctx.tunnels.paths.current()) =>
    logSession(ctx.log, ctx.tunnels.metrics, { session, client, target: name, kind: how.kind, path, outcome, up, down, ms: Math.round(performance.now() - started), detail });
  const { early } = how;
  openTunnel(ctx.tunnels, target, gone.signal, early).then(
    (t) => {
      socket.off("close", onGone);
      early?.stop();
      if (socket.destroyed) {
        t.socket.destroy();
        log(t.session, "browser-gone", 0, 0, undefined, t.path);
        return;
      }
      const preUp = early ? early.size : (how.first?.(t) ?? 0);
      void bridge(socket, t.socket, ctx.bridgeTimeouts).then((s) => {
        log(t.session, bridgeOutcome(s, "browser", "tunnel"), s.aToB + preUp, s.bToA, s.error?.err.message, t.path);
      });
    },
    (err: unknown) => {
      socket.off("close", onGone);
      const e = toProxyError(err);
      log("-", e.code, 0, 0, e.message);
      if (!early) return (how.fail ?? writeRawError)(socket, e);
      early.stop();
      // The 200 is out: a reset is the one signal left that says "failed"
      // rather than "the server closed the connection".
      const s = socket as Partial<Socket> & Duplex;
      if (typeof s.resetAndDestroy === "function" && !socket.destroyed) s.resetAndDestroy();
      else socket.destroy();
    },
  );
}
