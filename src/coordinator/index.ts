import type { AddressInfo } from "node:net";
import https from "node:https";
import type { Duplex } from "node:stream";
import tls from "node:tls";
import { formatHostPort } from "../address.ts";
import type { CoordinatorConfig } from "../config.ts";
import { NatproxyError } from "../errors.ts";
import { roleLogger } from "../log.ts";
import { closeServer, deadlineCheckInterval, listen } from "../listen.ts";
import { directCaller, requireProxyHeader } from "./proxy-header.ts";
import { SocketRegistry } from "../sockets.ts";
import { createTargetPolicy } from "./target-policy.ts";
import type { KeyPair } from "../tls/certs.ts";
import { fixedSource, openCertificates } from "./certificates.ts";
import { apiHandler, sendJson, type ApiContext } from "./api.ts";
import { SessionLimits } from "./limits.ts";
import { awaitOpen, type EngineContext } from "./open-engine.ts";
import { upgradeHandler } from "./upgrade.ts";
import { answerProbe, openReady, openSession, type SessionContext } from "./connect-back.ts";
import { Admission, DescriptorWatch, gateTls } from "./admission.ts";
import type { CoordinatorMetrics } from "./metrics.ts";
import { reloadCoordinator, TokenTable } from "./reload.ts";

export interface Coordinator {
  addresses: AddressInfo[];
  /** The certificate it serves now, as "sha256:..." (what a local proxy pins); an ACME renewal changes it. */
  readonly fingerprint: string;
  /** Open sockets: API connections, targets and connect-backs (for leak checks). */
  liveSockets(): number;
  /** Tunnels holding a session slot (both paths). */
  activeSessions(): number;
  /** Tunnels given a session slot since start (both paths). */
  sessionsServed(): number;
  /** The metrics listener ([coordinator] metrics_listen), if configured. */
  metricsAddress?: AddressInfo;
  /** The Prometheus metrics, when metrics_listen is set. */
  metrics?: CoordinatorMetrics;
  /**
   * Applies a new configuration to new sessions (tokens, limits, target
   * rules, timers); returns the keys that differ but need a restart.
   */
  reload(config: CoordinatorConfig): string[];
  /** Stops accepting at once; with `graceMs`, live tunnels may finish for up to that long. */
  close(opts?: { graceMs?: number }): Promise<void>;
}

export async function startCoordinator(config: CoordinatorConfig, opts: { keyPair?: KeyPair } = {}): Promise<Coordinator> {
  const log = roleLogger("coordinator");
  const certs = opts.keyPair ? fixedSource(opts.keyPair) : await openCertificates(config, log);
  const keyPair = certs.current();
  if (keyPair.validTo.getTime() < Date.now()) log.warn(`the certificate expired on ${keyPair.validTo.toISOString()}; local proxies will refuse it`);
  const tlsOptions = (kp: KeyPair) => ({ key: kp.key, cert: kp.cert, minVersion: "TLSv1.2" as const });
  const secureContext = tls.createSecureContext(tlsOptions(keyPair));
  const sockets = new SocketRegistry();
  // close() aborts this: connect-backs still being dialled (for a session, a
  // probe or a ready connection) stop at once instead of running out their timers.
  const shutdown = new AbortController();
  // Loaded only when asked for: a coordinator without metrics_listen pays nothing.
  const metrics: CoordinatorMetrics | undefined = config.metrics_listen
    ? new (await import("./metrics.ts")).CoordinatorMetrics({
        tunnels: () => sessionCtx.limits.active,
        readyWaiting: () => engineCtx.readyLimits.active,
        maxSessions: () => sessionCtx.limits.max,
      })
    : undefined;
  const sessionCtx: SessionContext = {
    secureContext,
    connectTimeout: config.connect_timeout,
    handshakeTimeout: config.handshake_timeout,
    idleTimeout: config.session_idle_timeout,
    finTimeout: config.fin_timeout,
    policy: createTargetPolicy({ ...config.targetRules, ownAddresses: config.own_addresses }),
    limits: new SessionLimits(config.max_sessions, config.max_sessions_per_token),
    sockets,
    shutdown: shutdown.signal,
    metrics,
    log,
  };
  const headersTimeout = Math.min(config.request_timeout, config.handshake_timeout);
  const server = https.createServer({
    ...tlsOptions(keyPair),
    ...certs.serverOptions,
    // Tunnels pass a half-close on (a client that ends its side after the
    // request still gets the whole answer); plain HTTP handles it itself.
    allowHalfOpen: true,
    requestTimeout: config.request_timeout,
    headersTimeout,
    connectionsCheckingInterval: deadlineCheckInterval(headersTimeout),
    keepAliveTimeout: config.keep_alive_timeout,
    handshakeTimeout: config.handshake_timeout,
  });
  const admission = new Admission(config.max_unauthenticated_per_ip, log);
  const descriptors = new DescriptorWatch(log, () => admission.describe());
  metrics?.watchUnauthenticated(() => admission.pending);
  // Before requireProxyHeader, which takes over what this installs: behind a
  // balancer a connection is counted against the caller its header names.
  gateTls(server, (socket) => admission.admit(socket, callerOf(socket)));
  // Behind a TCP load balancer the TCP peer is the balancer; the caller is
  // whoever its PROXY header names, for the same-ip rule and every log line.
  const callerOf = config.proxy_protocol ? requireProxyHeader(server, { timeout: config.handshake_timeout, log }) : directCaller;
  const tokens = new TokenTable(config.tokens);
  const checkToken = (authorization: string | undefined) => tokens.check(authorization);
  const waiting = new Set<Duplex>();
  const engineCtx: EngineContext = {
    checkToken,
    tokenValid: (token) => tokens.isLive(token),
    callerOf,
    policy: sessionCtx.policy,
    limits: sessionCtx.limits,
    // As many connections may wait as tunnels may run: a token cannot hold
    // more descriptors idle than it could use. Waiting are ready connections
    // (no Open yet, or part of one) and probes (until the peer closes).
    readyLimits: new SessionLimits(config.max_sessions, config.max_sessions_per_token, "connections waiting (ready, probes, unfinished Opens)"),
    waiting,
    connectTimeout: config.connect_timeout,
    openTimeout: config.open_timeout,
    idleTimeout: config.session_idle_timeout,
    finTimeout: config.fin_timeout,
    sockets,
    metrics,
    log,
  };
  const apiCtx: ApiContext = {
    checkToken,
    connectBackPolicy: config.connect_back,
    // Targets' default refusals for connect-backs too: a caller that appears
    // as loopback (a same-host passthrough) must not reach this host's ports.
    connectBackTargets: createTargetPolicy({ ...config.connectBackRules, ownAddresses: config.own_addresses }),
    callerOf,
    openSession: (req) => openSession(req, sessionCtx),
    authenticated: (socket) => admission.authenticated(socket),
    probe: (req) => answerProbe(req, sessionCtx, engineCtx.readyLimits.acquire(req.token)),
    ready: (req) => {
      const release = engineCtx.readyLimits.acquire(req.token);
      return openReady(req, sessionCtx, (back) => awaitOpen(engineCtx, back, req.token, req.client, "connect-back", release)).catch((err: unknown) => {
        release();
        throw err;
      });
    },
    refused: (code) => metrics?.refused(code),
    log,
  };
  server.on("request", apiHandler(apiCtx));
  server.on("upgrade", upgradeHandler(engineCtx, (socket) => admission.authenticated(socket)));
  // An Expect other than 100-continue: Node would answer 417 before anything
  // checked the token; an unauthenticated peer gets nothing but 401, and its
  // connection closes with it (as on the API).
  server.on("checkExpectation", (req, res) => {
    req.resume();
    const anonymous = checkToken(req.headers.authorization) === undefined;
    if (anonymous) res.setHeader("WWW-Authenticate", 'Bearer realm="natproxy"').setHeader("Connection", "close");
    else admission.authenticated(req.socket);
    const e = anonymous ? new NatproxyError("UNAUTHORIZED") : new NatproxyError("EXPECTATION_FAILED", "only Expect: 100-continue is understood");
    metrics?.refused(e.code);
    sendJson(res, e.status, { error: { code: e.code, message: e.message } });
  });
  server.on("connection", (socket) => {
    sockets.add(socket);
    descriptors.accepted();
  });
  server.on("tlsClientError", (err: NodeJS.ErrnoException, socket) => {
    const caller = callerOf(socket);
    log.debug(`TLS handshake from ${formatHostPort(caller.host, caller.port)} failed: ${err.code ?? err.message}`);
    socket.destroy();
  });
  // A new certificate (ACME renewal) goes to new API connections and new
  // connect-backs; connections already up keep the one they agreed on.
  certs.onChange((kp) => {
    server.setSecureContext(tlsOptions(kp));
    sessionCtx.secureContext = tls.createSecureContext(tlsOptions(kp));
  });
  certs.attach(server);
  let addresses: AddressInfo[];
  let metricsAddress: AddressInfo | undefined;
  try {
    addresses = await listen(server, config.listen);
    if (metrics && config.metrics_listen) metricsAddress = await metrics.endpoint.listen(config.metrics_listen, { timeout: config.handshake_timeout, log });
    await certs.start();
  } catch (err) {
    const closed = closeServer(server);
    server.closeAllConnections();
    sockets.destroyAll();
    await metrics?.endpoint.close();
    await certs.close();
    await closed;
    throw err;
  }
  const served = certs.current();
  log.info(
    `HTTPS API listening on ${addresses.map((a) => `${a.address}:${a.port}`).join(", ")}; certificate ${served.subject}, ${served.fingerprint}` +
      (config.proxy_protocol ? "; every connection must start with a PROXY protocol header (proxy_protocol = true)" : ""),
  );
  return {
    addresses,
    get fingerprint() {
      return certs.current().fingerprint;
    },
    liveSockets: () => sockets.size,
    activeSessions: () => sessionCtx.limits.active,
    sessionsServed: () => sessionCtx.limits.started,
    metricsAddress,
    metrics,
    reload: (next) => reloadCoordinator({ started: config, tokens, session: sessionCtx, engine: engineCtx, api: apiCtx, server, log }, next),
    async close(opts = {}) {
      const closing = closeServer(server);
      const metricsClosed = metrics?.endpoint.close();
      server.closeIdleConnections();
      shutdown.abort(new NatproxyError("SHUTTING_DOWN"));
      await certs.close();
      // Ready connections that carry no tunnel yet are idle, not live.
      for (const s of waiting) s.destroy();
      if (opts.graceMs && sessionCtx.limits.active > 0) {
        log.info(`waiting up to ${opts.graceMs} ms for ${sessionCtx.limits.active} tunnel(s) to finish`);
        if (!(await sockets.whenEmpty(opts.graceMs))) log.warn(`cutting ${sockets.size} connection(s) still open after ${opts.graceMs} ms`);
      }
      sockets.destroyAll();
      await Promise.all([closing, metricsClosed]);
    },
  };
}
