// The connect-back path on the coordinator, all of it: the connection to the
// local proxy's public address P' with this side as the TLS server
// (connectBack), and the three reasons to open one: a session (openSession,
// the specification's workflow), a ready connect-back that waits for an Open
// (openReady), and the local proxy's start-up probe (answerProbe).
import net from "node:net";
import tls from "node:tls";
import type { ConsolaInstance } from "consola";
import { bridge, bridgeOutcome } from "../bridge.ts";
import { formatHostPort, type HostPort } from "../address.ts";
import { NatproxyError } from "../errors.ts";
import { logSession } from "../request-log.ts";
import type { SocketRegistry } from "../sockets.ts";
import type { TargetPolicy } from "./target-policy.ts";
import type { SessionLimits } from "./limits.ts";
import { encodeResult, encodeSession } from "../protocol/wire.ts";
import { dialTarget } from "./dial.ts";
import { both } from "../hedge.ts";
import { roleLogger } from "../log.ts";
import type { CoordinatorMetrics } from "./metrics.ts";

const backLog = roleLogger("coordinator");

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
  /** Aborted by the coordinator's close(): a probe or ready connect-back still being dialled stops at once. */
  shutdown: AbortSignal;
  metrics?: CoordinatorMetrics;
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
    logSession(ctx.log, ctx.metrics, { session: req.session, client: req.client, target, path: "connect-back", outcome, up, down, ms: Math.round(performance.now() - started), detail });
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
  let legs: [tls.TLSSocket, net.Socket];
  try {
    legs = await both(
      {
        attempt: (signal) =>
          dialBack(ctx, req.reply, signal).then((back) => {
            ctx.sockets.add(back);
            back.write(encodeSession(req.session));
            return back;
          }),
        // A connect-back that is up hears why its target failed.
        release: (back, err) => {
          const e = err as NatproxyError;
          back.end(encodeResult({ code: e.code, message: e.message }));
          // The local proxy closes on reading it; one that does not is not waited for.
          back.setTimeout(ctx.finTimeout, () => back.destroy());
        },
      },
      { attempt: (signal) => dialTarget(req.target, ctx.connectTimeout, ctx.policy, signal), release: (target) => target.destroy() },
      ctx.shutdown,
    );
  } catch (err) {
    const e = err as NatproxyError;
    release();
    record(e.code ?? "ERROR", 0, 0, e.message);
    throw e;
  }
  const [back, targetSocket] = legs;
  ctx.sockets.add(targetSocket);
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
    back = await dialBack(ctx, req.reply, ctx.shutdown);
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
  /** Index of the token that authenticated the request (the probe counts among its waiting connections). */
  token: number;
  probe: string;
  reply: HostPort;
  client: string;
}

/**
 * The local proxy's start-up reachability check: one connect-back carrying
 * the probe id and nothing else. Resolves once the id went out over TLS; the
 * local proxy then knows whether a connect-back gets through its NAT.
 * `release` gives back the probe's place among the waiting connections, once
 * the dial failed or the connection is gone.
 */
export async function answerProbe(req: ProbeRequest, ctx: SessionContext, release: () => void): Promise<{ ms: number }> {
  const started = performance.now();
  const reply = formatHostPort(req.reply.host, req.reply.port);
  let back: tls.TLSSocket;
  try {
    back = await dialBack(ctx, req.reply, ctx.shutdown);
  } catch (err) {
    const e = err as NatproxyError;
    ctx.log.info(`probe ${req.probe} from ${req.client}: connect-back to ${reply} failed: ${e.message}`);
    release();
    throw e;
  }
  ctx.sockets.add(back);
  back.once("close", release);
  back.end(encodeSession(req.probe));
  // The local proxy closes its side once it has read the id; a peer that never
  // does is not waited for beyond the fin timeout.
  back.setTimeout(ctx.finTimeout, () => back.destroy());
  back.on("close", () => back.setTimeout(0));
  const ms = Math.round(performance.now() - started);
  ctx.log.info(`probe ${req.probe} from ${req.client}: connect-back to ${reply} works (${ms} ms)`);
  return { ms };
}

/** connectBack with this coordinator's settings, its time (TCP + TLS) counted in the metrics. */
function dialBack(ctx: SessionContext, reply: HostPort, signal: AbortSignal): Promise<tls.TLSSocket> {
  const started = performance.now();
  return connectBack(reply, ctx.secureContext, ctx.connectTimeout, ctx.handshakeTimeout, signal).then((back) => {
    ctx.metrics?.connectedBack(performance.now() - started);
    return back;
  });
}

/**
 * Opens the connect-back to the local proxy's public address and runs TLS on
 * it with this side as the server, so the local proxy verifies the same
 * certificate it trusts on the HTTPS API. Nothing is sent before the local
 * proxy's ClientHello arrives: a service that is not a natproxy never receives
 * a byte from us.
 *
 * Every failure is the same error with the same words, whether the port was
 * closed, silent, spoke first or failed the handshake: the caller's answer
 * must not make a port scanner of the API. The coordinator's log keeps the
 * detail.
 */
export function connectBack(reply: HostPort, secureContext: tls.SecureContext, connectTimeout: number, handshakeTimeout: number, signal: AbortSignal): Promise<tls.TLSSocket> {
  const name = formatHostPort(reply.host, reply.port);
  return new Promise((resolve, reject) => {
    const raw = net.connect({ host: reply.host, port: reply.port, noDelay: true, allowHalfOpen: true });
    let secure: tls.TLSSocket | undefined;
    let over = false;
    const failed = (detail: string, cause?: unknown) => {
      if (over) return;
      backLog.debug(`connect-back to ${name} failed: ${detail}`);
      fail(new NatproxyError("CONNECT_BACK_FAILED", `${name}: no natproxy local proxy completed a TLS handshake there`, { cause: new Error(detail, { cause }) }));
    };
    let timer = setTimeout(() => failed(`TCP connect timed out after ${connectTimeout} ms`), connectTimeout);
    const fail = (err: NatproxyError) => {
      over = true;
      clearTimeout(timer);
      signal.removeEventListener("abort", onAbort);
      raw.destroy();
      secure?.destroy();
      reject(err);
    };
    const onAbort = () => fail(signal.reason as NatproxyError);
    signal.addEventListener("abort", onAbort, { once: true });
    const onRawError = (err: NodeJS.ErrnoException) => failed(err.code ?? err.message, err);
    raw.on("error", onRawError);
    raw.once("connect", () => {
      clearTimeout(timer);
      timer = setTimeout(() => failed(`TLS handshake timed out after ${handshakeTimeout} ms`), handshakeTimeout);
      const s = new tls.TLSSocket(raw, { isServer: true, secureContext, requestCert: false });
      secure = s;
      const onTlsError = (err: NodeJS.ErrnoException) => failed(`TLS handshake failed (${err.code ?? err.message})`, err);
      s.on("error", onTlsError);
      s.once("secure", () => {
        clearTimeout(timer);
        signal.removeEventListener("abort", onAbort);
        s.off("error", onTlsError);
        raw.off("error", onRawError);
        // The bridge installs its own handlers; until then a late error must not crash us.
        s.on("error", () => {});
        raw.on("error", () => {});
        resolve(s);
      });
    });
  });
}
