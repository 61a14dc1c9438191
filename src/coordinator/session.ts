import type tls from "node:tls";
import type { ConsolaInstance } from "consola";
import { bridge, bridgeOutcome } from "../bridge.ts";
import { formatHostPort, type HostPort } from "../address.ts";
import { NatproxyError } from "../errors.ts";
import { formatSession } from "../request-log.ts";
import type { SocketRegistry } from "../sockets.ts";
import type { TargetPolicy } from "../target-policy.ts";
import type { SessionLimits } from "./limits.ts";
import { encodeResult, encodeSession } from "../wire.ts";
import { connectBack, dialTarget } from "./dial.ts";

export interface SessionRequest {
  /** Index of the token that authenticated the request (for per-token limits). */
  token: number;
  session: string;
  target: HostPort;
  reply: HostPort;
  client: string;
}

export interface SessionContext {
  secureContext: tls.SecureContext;
  connectTimeout: number;
  handshakeTimeout: number;
  idleTimeout: number;
  finTimeout: number;
  policy: TargetPolicy;
  limits: SessionLimits;
  sockets: SocketRegistry;
  log: ConsolaInstance;
}

/**
 * Dials the target and the connect-back at the same time (neither waits for
 * the other). The session id goes out on the connect-back the moment it is
 * up, so the local proxy learns at once that connect-back works from its
 * network, whatever the target does; a Result message then says whether the
 * target answered, and the bridge follows. Resolves once the bridge is up,
 * with the target's address; rejects with the failure the API answers with.
 */
export async function openSession(req: SessionRequest, ctx: SessionContext): Promise<{ targetAddress: string }> {
  const started = performance.now();
  const target = formatHostPort(req.target.host, req.target.port);
  const record = (outcome: string, up: number, down: number, detail?: string) =>
    ctx.log.info(formatSession({ session: req.session, client: req.client, target, path: "connect-back", outcome, up, down, ms: Math.round(performance.now() - started), detail }));
  let release: () => void;
  try {
    release = ctx.limits.acquire(req.token);
  } catch (err) {
    const e = err as NatproxyError;
    ctx.log.warn(`session ${req.session} from ${req.client} refused: ${e.message}`);
    record(e.code, 0, 0, e.message);
    throw e;
  }
  // A connect-back that fails cancels the target; a target that fails before
  // the connect-back is up cancels the connect-back. Either way the error is
  // reported as soon as it is known, not after the other leg's timeout.
  const cancelBack = new AbortController();
  const cancelTarget = new AbortController();
  let back: tls.TLSSocket | undefined;
  const targetLeg = dialTarget(req.target, ctx.connectTimeout, ctx.policy, cancelTarget.signal).catch((err: NatproxyError) => {
    if (!back) cancelBack.abort(err);
    throw err;
  });
  try {
    back = ctx.sockets.add(await connectBack(req.reply, ctx.secureContext, ctx.connectTimeout, ctx.handshakeTimeout, cancelBack.signal));
  } catch (err) {
    const e = err as NatproxyError;
    cancelTarget.abort(e);
    void targetLeg.then((s) => s.destroy(), () => {});
    release();
    record(e.code ?? "ERROR", 0, 0, e.message);
    throw e;
  }
  back.write(encodeSession(req.session));
  let targetSocket;
  try {
    targetSocket = ctx.sockets.add(await targetLeg);
  } catch (err) {
    const e = err as NatproxyError;
    back.end(encodeResult({ code: e.code, message: e.message }));
    // The local proxy closes on reading it; one that does not is not waited for.
    back.setTimeout(ctx.finTimeout, () => back.destroy());
    release();
    record(e.code ?? "ERROR", 0, 0, e.message);
    throw e;
  }
  const targetAddress = formatHostPort(targetSocket.remoteAddress ?? "?", targetSocket.remotePort ?? 0);
  back.write(encodeResult({ code: "OK", target_address: targetAddress }));
  void bridge(back, targetSocket, { idle: ctx.idleTimeout, fin: ctx.finTimeout }).then((stats) => {
    release();
    record(bridgeOutcome(stats, "local", "target"), stats.aToB, stats.bToA, stats.error?.err.message);
  });
  return { targetAddress };
}

export interface ReadyRequest {
  token: number;
  /** The id the local proxy will recognise the connection by. */
  ready: string;
  reply: HostPort;
  client: string;
}

/**
 * A connect-back opened ahead of need: it carries its id and then waits, like
 * a ready outbound connection, for an Open naming a target (`hold`). A
 * browser connection then costs the local proxy one message instead of an
 * API call, a TCP connect and a TLS handshake through its NAT.
 */
export async function openReady(req: ReadyRequest, ctx: SessionContext, hold: (socket: tls.TLSSocket) => void): Promise<{ ms: number }> {
  const started = performance.now();
  let back: tls.TLSSocket;
  try {
    back = await connectBack(req.reply, ctx.secureContext, ctx.connectTimeout, ctx.handshakeTimeout, new AbortController().signal);
  } catch (err) {
    const e = err as NatproxyError;
    ctx.log.debug(`ready connect-back ${req.ready} from ${req.client} failed: ${e.message}`);
    throw e;
  }
  ctx.sockets.add(back);
  back.write(encodeSession(req.ready));
  hold(back);
  return { ms: Math.round(performance.now() - started) };
}

export interface ProbeRequest {
  probe: string;
  reply: HostPort;
  client: string;
}

/**
 * The local proxy's start-up reachability check: one connect-back carrying
 * the probe id and nothing else. Resolves once the id went out over TLS; the
 * local proxy then knows whether a connect-back gets through its NAT.
 */
export async function probeConnectBack(req: ProbeRequest, ctx: SessionContext): Promise<{ ms: number }> {
  const started = performance.now();
  const reply = formatHostPort(req.reply.host, req.reply.port);
  let back: tls.TLSSocket;
  try {
    back = await connectBack(req.reply, ctx.secureContext, ctx.connectTimeout, ctx.handshakeTimeout, new AbortController().signal);
  } catch (err) {
    const e = err as NatproxyError;
    ctx.log.info(`probe ${req.probe} from ${req.client}: connect-back to ${reply} failed: ${e.message}`);
    throw e;
  }
  ctx.sockets.add(back);
  back.end(encodeSession(req.probe));
  // The local proxy closes its side once it has read the id; a peer that never
  // does is not waited for beyond the fin timeout.
  back.setTimeout(ctx.finTimeout, () => back.destroy());
  back.on("close", () => back.setTimeout(0));
  const ms = Math.round(performance.now() - started);
  ctx.log.info(`probe ${req.probe} from ${req.client}: connect-back to ${reply} works (${ms} ms)`);
  return { ms };
}
