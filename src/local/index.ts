import http from "node:http";
import type { AddressInfo } from "node:net";
import type { LocalConfig } from "../config.ts";
import { formatHostPort } from "../address.ts";
import { NatproxyError } from "../errors.ts";
import { closeServer, deadlineCheckInterval, listen } from "../listen.ts";
import { roleLogger } from "../log.ts";
import { closeWith, destroyIdleSockets } from "../sockets.ts";
import { describeTrust } from "../tls/trust.ts";
import type { HandlerContext } from "./browser/context.ts";
import { makeConnectHandler } from "./browser/handle-connect.ts";
import { makeRequestHandler } from "./browser/handle-request.ts";
import { makeUpgradeHandler } from "./browser/handle-upgrade.ts";
import { makeProxyAuth } from "./browser/proxy-auth.ts";
import { dispatchSocks, makeSocksHandler } from "./browser/socks5.ts";
import { ConnectBackDialer } from "./tunnel/connect-back.ts";
import { ReadyPool } from "./tunnel/ready-pool.ts";
import { PathChooser, describeReachability, isConnectBackFailure, probeConnectBack, resolveHost, type Reachability, type DataPath } from "./tunnel/path.ts";
import { MappingService, type NatMapping } from "./nat/mapping-service.ts";
import { PlainHttpAgent } from "./tunnel/http-agent.ts";
import { localParts, mappingServiceFor } from "./parts.ts";
import type { LocalMetrics } from "./metrics.ts";

export interface Local {
  /** The browser-facing HTTP proxy. */
  proxyAddress: AddressInfo;
  /** P and P' once the start-up workflow succeeded; undefined while it retries. */
  mapping(): NatMapping | undefined;
  /** The path the next browser connection takes. */
  path(): DataPath;
  /** What the last probe found; undefined before the tunnel service first came up. */
  reachability(): Reachability | undefined;
  /** Sessions waiting for their connect-back (for tests and leak checks). */
  pendingSessions(): number;
  /** Browser connections waiting for a tunnel, on either path. */
  openingTunnels(): number;
  /** The outbound path's pool of ready connections. */
  outboundPool: ReadyPool;
  /** The connect-back path's pool of connect-backs opened ahead of need. */
  connectBackPool: ReadyPool;
  liveSockets(): number;
  mappingService: MappingService;
  /** The metrics listener ([local] metrics_listen), if configured. */
  metricsAddress?: AddressInfo;
  /**
   * Stops accepting at once; with `graceMs`, live tunnels may finish for up
   * to that long before everything is cut.
   */
  close(opts?: { graceMs?: number }): Promise<void>;
}

export async function startLocal(config: LocalConfig): Promise<Local> {
  const log = roleLogger("local");
  const parts = localParts(config);
  const { hostname, trust, coordinator, dialer, sessions, sockets } = parts;
  const coordinatorHost = await resolveHost(hostname);
  if (config.allow_self_signed && !trust.pin) {
    log.warn("allow_self_signed = true without a fingerprint: any certificate is accepted, so anyone on the path can impersonate the coordinator. Pin it with [local] fingerprint.");
  }
  log.info(`coordinator ${config.coordinatorUrl.origin}, trusting ${describeTrust(trust)}`);
  const mappingService = mappingServiceFor(config, parts, log);

  const poolOptions = { size: config.pool_size, maxAge: config.pool_idle_timeout, grace: config.pool_hedge_delay };
  const outbound = new ReadyPool(dialer, poolOptions);
  const connectBack = new ReadyPool(new ConnectBackDialer({ sessions, coordinator, mapping: () => mappingService.state, connectTimeout: config.connect_timeout, sockets }), {
    ...poolOptions,
    // Ready connect-backs keep working through a NAT or firewall that has
    // stopped letting new ones in; a refill that fails is the first to know.
    onFillError: (err) => {
      if (isConnectBackFailure(err)) paths.connectBackFailed(err);
    },
  });
  const paths = new PathChooser(config.tunnel, config.coordinatorUrl.origin, log);

  const checking = coordinator.hello(config.hello_timeout).then(
    (info) => log.info(`coordinator answered: natproxy ${info.version}, sees us as ${formatHostPort(info.client.host, info.client.port)}, connect-back policy "${info.connect_back}"`),
    (err: NatproxyError) => log.error(`coordinator check failed: ${err.message}`),
  );
  // Every time the tunnel service comes up (at start, and after the NAT
  // mapping moved or the reporter came back) the connect-back is probed
  // again, so the path follows what the network allows now.
  let probing: Promise<void> | undefined;
  const probe = (state: NatMapping) => {
    probing = probeConnectBack(coordinator, sessions, state, config.probe_timeout).then((result) => {
      if (mappingService.state === state) paths.probed(describeReachability(state, result, coordinatorHost));
    });
    return probing;
  };
  mappingService.on("ready", probe);
  mappingService.on("down", (err) => {
    paths.tunnelDown(err.message);
    // Whatever broke the reporter link (a NAT that rebooted or forgot its
    // state, a new address) has broken pooled API connections too; they would
    // swallow the next requests until TCP gave up on them, minutes later.
    coordinator.dropIdleConnections();
    outbound.flush();
    // Ready connect-backs went to the old public address, through the old mapping.
    connectBack.flush();
  });
  // An auto proxy on the outbound path keeps asking whether connect-back
  // works again (a NAT or firewall that opened up, a coordinator briefly out
  // of reach): one API call and one connection per probe_interval.
  let reprobing = false;
  const reprobe = setInterval(() => {
    const state = mappingService.state;
    if (config.tunnel !== "auto" || paths.current() !== "outbound" || !state || reprobing) return;
    reprobing = true;
    void probe(state).finally(() => (reprobing = false));
  }, config.probe_interval);
  // Loaded only when asked for: a local proxy without metrics_listen pays nothing.
  const metrics: LocalMetrics | undefined = config.metrics_listen
    ? new (await import("./metrics.ts")).LocalMetrics({
        path: () => paths.current(),
        reporterUp: config.tunnel === "outbound" ? undefined : () => mappingService.state !== undefined,
        readyConnections: (path) => (path === "outbound" ? outbound : connectBack).size,
        opening: (): number => tunnels.opening.count,
      })
    : undefined;
  const tunnels = { outbound, connectBack, paths,
    // A connect-back takes a few round trips; the probe measured them.
    connectBackGrace: () => Math.max(config.connect_back_grace, 4 * (paths.reachability?.probe.ms ?? 0)),
    opening: { count: 0 },
    maxPending: config.max_pending,
    sockets,
    metrics,
  };
  const agent = new PlainHttpAgent(tunnels, log, config.pool_idle_timeout);
  const ctx: HandlerContext = { authorize: makeProxyAuth(config.users), tunnels, agent, sockets, log, bridgeTimeouts: { idle: config.session_idle_timeout, fin: config.fin_timeout }, optimisticConnect: () => config.optimistic_connect && (paths.current() === "outbound" ? outbound : connectBack).size > 0 };
  const server = http.createServer({
    maxHeaderSize: config.max_header_size,
    // A browser that opens a connection and sends no complete head is dropped.
    headersTimeout: config.handshake_timeout,
    connectionsCheckingInterval: deadlineCheckInterval(config.handshake_timeout),
    requestTimeout: 0,
    // An idle browser connection is an idle session; pooled tunnels behind it
    // close on their own after pool_idle_timeout.
    keepAliveTimeout: config.session_idle_timeout,
  });
  // SOCKS5 shares the port: its first byte (0x05) is never the start of an HTTP request.
  dispatchSocks(server, config.handshake_timeout, makeSocksHandler(ctx, { users: config.users, timeout: config.handshake_timeout }));
  server.on("request", makeRequestHandler(ctx));
  server.on("connect", makeConnectHandler(ctx));
  server.on("upgrade", makeUpgradeHandler(ctx));
  server.on("connection", (s) => sockets.add(s));
  server.on("clientError", (err: NodeJS.ErrnoException, socket) => {
    log.debug(`browser connection error: ${err.code ?? err.message}`);
    if (socket.writable && err.code === "HPE_HEADER_OVERFLOW") closeWith(socket, "HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n\r\n");
    else if (socket.writable) closeWith(socket, "HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n");
    else socket.destroy();
  });
  // What a failed start and close() both stop: first the work in progress
  // (timers, the reporter link, waiting sessions, ready connections), then,
  // once nothing is left to wait for, every connection.
  const stopWork = async () => {
    clearInterval(reprobe);
    outbound.close();
    connectBack.close();
    sessions.failAll(new NatproxyError("SHUTTING_DOWN"));
    await mappingService.close();
  };
  const release = () => {
    agent.destroy();
    coordinator.close();
    sockets.destroyAll();
    void metrics?.endpoint.close();
  };
  let proxyAddress: AddressInfo;
  let metricsAddress: AddressInfo | undefined;
  // Which listener a failure belongs to, so the message names its setting.
  let listening = "local.listen (--listen)";
  let listeningOn = config.listen;
  try {
    [proxyAddress] = await listen(server, config.listen);
    if (metrics && config.metrics_listen) {
      listening = "local.metrics_listen";
      listeningOn = config.metrics_listen;
      metricsAddress = await metrics.endpoint.listen(config.metrics_listen, { timeout: config.handshake_timeout, log });
    }
  } catch (err) {
    const stopped = closeServer(server);
    await stopWork();
    release();
    server.closeAllConnections();
    await stopped;
    const e = err as NodeJS.ErrnoException;
    if (e.code === "EADDRINUSE" || e.code === "EACCES")
      throw Object.assign(new Error(`${listening} ${formatHostPort(listeningOn.host, listeningOn.port)}: ${e.code === "EADDRINUSE" ? "the port is in use (another natproxy, or another proxy?)" : "not permitted"}`, { cause: err }), { code: e.code });
    throw err;
  }
  log.info(`HTTP proxy listening on ${formatHostPort(proxyAddress.address, proxyAddress.port)}${config.users.length ? ` (proxy authentication required, ${config.users.length} user(s))` : ""}, SOCKS5 on the same port`);
  // The browser port opens first, so a port in use is reported at once; a
  // browser that comes before the workflow has finished takes the outbound
  // path (auto) or waits for its tunnel up to connect_timeout.
  try {
    const starting = config.tunnel === "outbound" ? Promise.resolve(false) : mappingService.start();
    await Promise.all([starting, checking]);
    await probing;
    if (config.tunnel === "outbound") log.info(paths.describe());
    else if (!mappingService.state && config.tunnel === "auto") log.info(`tunnel path: outbound until the reporter answers (no public address yet)`);
  } catch (err) {
    const stopped = closeServer(server);
    await stopWork();
    release();
    server.closeAllConnections();
    await stopped;
    throw err;
  }

  let closing: Promise<void> | undefined;
  return {
    proxyAddress,
    mapping: () => mappingService.state,
    path: () => paths.current(),
    reachability: () => paths.reachability,
    pendingSessions: () => sessions.size,
    openingTunnels: () => tunnels.opening.count,
    outboundPool: outbound,
    connectBackPool: connectBack,
    liveSockets: () => sockets.size,
    mappingService,
    metricsAddress,
    close(opts = {}) {
      closing ??= (async () => {
        const stopped = closeServer(server);
        server.closeIdleConnections();
        await stopWork();
        // Idle pooled tunnels are not "live"; browsers mid-transfer are.
        destroyIdleSockets(agent);
        // Sockets destroyed just now (ready tunnels, idle browsers) leave the
        // set on their 'close' event, a few ms later: only what is still open
        // after that is live and worth a line.
        if (opts.graceMs && !(await sockets.whenEmpty(Math.min(opts.graceMs, 100)))) {
          log.info(`waiting up to ${opts.graceMs} ms for ${sockets.size} open connection(s) to finish`);
          if (!(await sockets.whenEmpty(opts.graceMs))) log.warn(`cutting ${sockets.size} connection(s) still open after ${opts.graceMs} ms`);
        }
        release();
        await Promise.all([stopped, metrics?.endpoint.close()]);
      })();
      return closing;
    },
  };
}
