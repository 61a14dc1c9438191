import type { ConsolaInstance } from "consola";
import type { LocalConfig } from "../config.ts";
import { SocketRegistry } from "../sockets.ts";
import { makeTrust, type Trust } from "../tls/trust.ts";
import { makeCoordinatorClient, type CoordinatorClient } from "./coordinator/client.ts";
import { OutboundDialer } from "./tunnel/outbound.ts";
import { acceptConnectBack, SessionTable } from "./tunnel/connect-back.ts";
import { TunnelPortGate } from "./tunnel/tunnel-port-gate.ts";
import { MappingService } from "./nat/mapping-service.ts";

export interface LocalParts {
  /** The coordinator's host as the URL names it, without IPv6 brackets. */
  hostname: string;
  trust: Trust;
  coordinator: CoordinatorClient;
  dialer: OutboundDialer;
  sessions: SessionTable;
  sockets: SocketRegistry;
}

/**
 * The pieces that reach the coordinator, built one way for the proxy and for
 * `--check`, so that a green check means the proxy's own code works from here.
 */
export function localParts(config: LocalConfig): LocalParts {
  const hostname = config.coordinatorUrl.hostname.replace(/^\[|\]$/g, "");
  const trust = makeTrust({ hostname, allow_self_signed: config.allow_self_signed, fingerprint: config.fingerprint, ca: config.ca });
  return {
    hostname,
    trust,
    coordinator: makeCoordinatorClient({ url: config.coordinatorUrl, token: config.token, trust, idleTimeout: config.pool_idle_timeout }),
    dialer: new OutboundDialer({ url: config.coordinatorUrl, token: config.token, trust, timeout: config.connect_timeout }),
    sessions: new SessionTable(),
    sockets: new SocketRegistry(),
  };
}

/** The start-up workflow, with the connect-back acceptor behind its gate on the tunnel port. */
export function mappingServiceFor(config: LocalConfig, parts: LocalParts, log: ConsolaInstance): MappingService {
  const { trust, sessions, sockets } = parts;
  const gate = new TunnelPortGate({ max: config.max_tunnel_handshakes, expecting: () => sessions.size > 0, log });
  const accept = (socket: import("node:net").Socket) => {
    const place = gate.admit(socket);
    if (place) acceptConnectBack(socket, { trust, sessions, sockets, timeout: config.handshake_timeout, log, matched: place.matched });
  };
  return new MappingService({ config, accept, log });
}
