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
import { apiHandler, sendJson } from "./api.ts";
import { makeTokenCheck } from "./auth.ts";
import { SessionLimits } from "./limits.ts";
import { awaitOpen, type EngineContext } from "./open-engine.ts";
import { upgradeHandler } from "./upgrade.ts";
import { answerProbe, openReady, openSession } from "./connect-back.ts";

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
  const sessionCtx = {
    secureContext,
    connectTimeout: config.connect_timeout,
    handshakeTimeout: config.handshake_timeout,
    idleTimeout: config.session_idle_timeout,
    finTimeout: config.fin_timeout,
    policy: createTargetPolicy({ ...config.targetRules, ownAddresses: config.own_addresses }),
    limits: new SessionLimits(config.max_sessions, config.max_sessions_per_token),
    sockets,
    shutdown: shutdown.signal,
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
  // Behind a TCP load balancer the TCP peer is the balancer; the caller is
  // whoever its PROXY header names, for the same-ip rule and every log line.
  const callerOf = config.proxy_protocol ? requireProxyHeader(server, { timeout: config.handshake_timeout, log }) : directCaller;
  const checkToken = makeTokenCheck(config.tokens);
  const waiting = new Set<Duplex>();
  const engineCtx: EngineContext = {
    checkToken,
    callerOf,
    policy: sessionCtx.policy,
    limits: sessionCtx.limits,
    // As many ready connections may wait as tunnels may run: a token cannot
    // hold more descriptors idle than it could use.
    readyLimits: new SessionLimits(config.max_sessions, config.max_sessions_per_token, "ready connections waiting"),
    waiting,
    connectTimeout: config.connect_timeout,
    openTimeout: config.open_timeout,
    idleTimeout: config.session_idle_timeout,
    finTimeout: config.fin_timeout,
    sockets,
    log,
  };
  server.on(
    "request",
    apiHandler({
      checkToken,
      connectBackPolicy: config.connect_back,
      // Targets' default refusals for connect-backs too: a caller that appears
      // as loopback (a same-host passthrough) must not reach this host's ports.
      connectBackTargets: createTargetPolicy({ ...config.connectBackRules, ownAddresses: config.own_addresses }),
      callerOf,
      openSession: (req) => openSession(req, sessionCtx),
      probe: (req) => answerProbe(req, sessionCtx),
      ready: (req) => {
        const release = engineCtx.readyLimits.acquire(req.token);
        return openReady(req, sessionCtx, (back) => awaitOpen(engineCtx, back, req.token, req.client, "connect-back", release)).catch((err: unknown) => {
          release();
          throw err;
        });
      },
      log,
    }),
  );
  server.on("upgrade", upgradeHandler(engineCtx));
  // An Expect other than 100-continue: Node would answer 417 before anything
  // checked the token; an unauthenticated peer gets nothing but 401.
  server.on("checkExpectation", (req, res) => {
    req.resume();
    const anonymous = checkToken(req.headers.authorization) === undefined;
    if (anonymous) res.setHeader("WWW-Authenticate", 'Bearer realm="natproxy"');
    const e = anonymous ? new NatproxyError("UNAUTHORIZED") : new NatproxyError("EXPECTATION_FAILED", "only Expect: 100-continue is understood");
    sendJson(res, e.status, { error: { code: e.code, message: e.message } });
  });
  server.on("connection", (socket) => sockets.add(socket));
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
  const addresses = await listen(server, config.listen);
  await certs.start().catch(async (err: unknown) => {
    const closing = closeServer(server);
    sockets.destroyAll();
    await closing;
    throw err;
  });
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
    async close(opts = {}) {
      const closing = closeServer(server);
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
      await closing;
    },
  };
}
