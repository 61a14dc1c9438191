// The engine both tunnel paths share on the coordinator: a connection that is
// ready for a tunnel (an upgraded outbound connection, or a ready
// connect-back) waits for its Open, the target is dialled, the Result goes
// back, and the two are bridged until either side ends.
import type { Socket } from "node:net";
import type { Duplex } from "node:stream";
import type { ConsolaInstance } from "consola";
import { formatHostPort } from "../address.ts";
import { bridge, bridgeOutcome } from "../bridge.ts";
import { NatproxyError } from "../errors.ts";
import type { CallerOf } from "./proxy-header.ts";
import { logSession } from "../request-log.ts";
import { closeWith, type SocketRegistry } from "../sockets.ts";
import type { TargetPolicy } from "./target-policy.ts";
import { encodeResult, openOf, readMessage, type OpenRequest } from "../protocol/wire.ts";
import { openSchema, parseWith } from "../protocol/api.ts";
import type { SessionLimits } from "./limits.ts";
import { dialTarget } from "./dial.ts";
import type { CoordinatorMetrics } from "./metrics.ts";

/** What the engine needs: shared by the outbound path's Upgrade handler and ready connect-backs. */
export interface EngineContext {
  checkToken(authorization: string | undefined): number | undefined;
  /** False for a token removed by a reload since this connection authenticated with it. */
  tokenValid(token: number): boolean;
  /** The caller's address: the TCP peer, or the one a PROXY header named. */
  callerOf: CallerOf;
  policy: TargetPolicy;
  limits: SessionLimits;
  /** Connections waiting for their Open, in all and per token. */
  readyLimits: SessionLimits;
  connectTimeout: number;
  /** How long a ready connection may wait for its whole Open message (an absolute deadline). */
  openTimeout: number;
  idleTimeout: number;
  finTimeout: number;
  sockets: SocketRegistry;
  /** Upgraded connections still waiting for their Open (a local proxy's ready pool). */
  waiting: Set<Duplex>;
  metrics?: CoordinatorMetrics;
  log: ConsolaInstance;
}

/**
 * A connection that is ready for a tunnel (upgraded, or a ready connect-back)
 * waits for its Open message, within openTimeout and holding no session slot
 * until it arrives; then the target is dialled and the connection bridged.
 */
export function awaitOpen(ctx: EngineContext, socket: Duplex, token: number, client: string, path: "outbound" | "connect-back", releaseReady: () => void): void {
  // From the moment the connection is ready, not from its last byte: an idle
  // timer would let a peer that trickles its Open a byte at a time renew it.
  const deadline = setTimeout(() => {
    ctx.log.debug(`${path} tunnel from ${client}: no whole Open message within ${ctx.openTimeout} ms`);
    socket.destroy();
  }, ctx.openTimeout);
  ctx.waiting.add(socket);
  const notWaiting = () => {
    clearTimeout(deadline);
    ctx.waiting.delete(socket);
    releaseReady();
  };
  socket.once("close", notWaiting);
  readMessage(socket).then(
    (msg) => {
      notWaiting();
      socket.off("close", notWaiting);
      let open: OpenRequest;
      try {
        open = parseWith(openSchema, openOf(msg), (problems) => new NatproxyError("BAD_REQUEST", problems));
      } catch (err) {
        return fail(err instanceof NatproxyError ? err : new NatproxyError("BAD_REQUEST", (err as Error).message));
      }
      // A ready connection outlives a reload; the token it was opened with may not.
      if (!ctx.tokenValid(token)) return fail(new NatproxyError("UNAUTHORIZED", "the token this connection was opened with is no longer accepted"));
      let release: () => void;
      try {
        release = ctx.limits.acquire(token);
      } catch (err) {
        ctx.log.warn(`${path} tunnel from ${client} refused: ${(err as Error).message}`);
        return fail(err as NatproxyError);
      }
      void serve(ctx, socket, open, client, path).finally(release);
    },
    (err: Error) => {
      ctx.log.debug(`${path} tunnel from ${client}: ${err.message}`);
      socket.destroy();
    },
  );

  function fail(e: NatproxyError): void {
    logSession(ctx.log, ctx.metrics, { session: "-", client, target: "?", path, outcome: e.code, up: 0, down: 0, ms: 0, detail: e.message });
    ctx.metrics?.refused(e.code);
    closeWith(socket, encodeResult({ code: e.code, message: e.message }));
  }
}

async function serve(ctx: EngineContext, socket: Duplex, open: OpenRequest, client: string, path: "outbound" | "connect-back"): Promise<void> {
  const started = performance.now();
  const target = formatHostPort(open.target.host, open.target.port);
  const gone = new AbortController();
  const onGone = () => gone.abort(new NatproxyError("CLIENT_GONE", "the local proxy went away"));
  socket.once("close", onGone);
  const record = (outcome: string, up: number, down: number, detail?: string) =>
    logSession(ctx.log, ctx.metrics, { session: open.session, client, target, path, outcome, up, down, ms: Math.round(performance.now() - started), detail });
  let targetSocket;
  try {
    targetSocket = await dialTarget(open.target, ctx.connectTimeout, ctx.policy, gone.signal);
  } catch (err) {
    const e = err instanceof NatproxyError ? err : new NatproxyError("INTERNAL", (err as Error).message);
    socket.off("close", onGone);
    record(e.code, 0, 0, e.message);
    ctx.metrics?.refused(e.code);
    closeWith(socket, encodeResult({ code: e.code, message: e.message }));
    return;
  }
  socket.off("close", onGone);
  ctx.sockets.add(targetSocket);
  (socket as Socket).setTimeout(0);
  socket.write(encodeResult({ code: "OK", target_address: formatHostPort(targetSocket.remoteAddress ?? "?", targetSocket.remotePort ?? 0) }));
  const stats = await bridge(socket, targetSocket, { idle: ctx.idleTimeout, fin: ctx.finTimeout });
  record(bridgeOutcome(stats, "local", "target"), stats.aToB, stats.bToA, stats.error?.err.message);
}
