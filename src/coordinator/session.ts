import type tls from "node:tls";
import type { ConsolaInstance } from "consola";
import { bridge } from "../bridge.ts";
import { formatHostPort, type HostPort } from "../address.ts";
import { NatproxyError } from "../errors.ts";
import { formatSession } from "../request-log.ts";
import type { SocketRegistry } from "../sockets.ts";
import type { TargetPolicy } from "../target-policy.ts";
import { encodeSession } from "../wire.ts";
import { connectBack, dialTarget } from "./dial.ts";

export interface SessionRequest {
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
  sockets: SocketRegistry;
  log: ConsolaInstance;
}

/**
 * Dials the target and the connect-back at the same time (neither waits for
 * the other), then sends the session id first on the connect-back and bridges
 * the two. Resolves once the bridge is up, with the target's address;
 * rejects with the failure the API answers with.
 */
export async function openSession(req: SessionRequest, ctx: SessionContext): Promise<{ targetAddress: string }> {
  const started = performance.now();
  const target = formatHostPort(req.target.host, req.target.port);
  // Whichever leg fails first cancels the other, so an error is reported as
  // soon as it is known rather than after the other leg's timeout.
  const cancel = new AbortController();
  let first: NatproxyError | undefined;
  const leg = <T>(p: Promise<T>) =>
    p.catch((err: NatproxyError) => {
      if (!first) {
        first = err;
        cancel.abort(err);
      }
      throw err;
    });
  const [t, b] = await Promise.allSettled([
    leg(dialTarget(req.target, ctx.connectTimeout, ctx.policy, cancel.signal)),
    leg(connectBack(req.reply, ctx.secureContext, ctx.connectTimeout, ctx.handshakeTimeout, cancel.signal)),
  ]);
  if (t.status === "rejected" || b.status === "rejected") {
    if (t.status === "fulfilled") t.value.destroy();
    if (b.status === "fulfilled") b.value.destroy();
    const err = first as NatproxyError;
    ctx.log.info(formatSession({ session: req.session, client: req.client, target, outcome: err.code ?? "ERROR", up: 0, down: 0, ms: Math.round(performance.now() - started), detail: err.message }));
    throw err;
  }
  const targetSocket = ctx.sockets.add(t.value);
  const back = ctx.sockets.add(b.value);
  back.write(encodeSession(req.session));
  const targetAddress = formatHostPort(targetSocket.remoteAddress ?? "?", targetSocket.remotePort ?? 0);
  void bridge(back, targetSocket, { idle: ctx.idleTimeout, fin: ctx.finTimeout }).then((stats) => {
    const outcome = stats.idle ? "idle-timeout" : stats.error ? `closed-by-${stats.error.side === "a" ? "local" : "target"}-error` : "ok";
    ctx.log.info(
      formatSession({
        session: req.session,
        client: req.client,
        target,
        outcome,
        up: stats.aToB,
        down: stats.bToA,
        ms: Math.round(performance.now() - started),
        detail: stats.error?.err.message,
      }),
    );
  });
  return { targetAddress };
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
