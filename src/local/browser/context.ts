import type { IncomingMessage } from "node:http";
import type { ConsolaInstance } from "consola";
import type { BridgeTimeouts } from "../../bridge.ts";
import type { SocketRegistry } from "../../sockets.ts";
import type { PlainHttpAgent } from "../tunnel/http-agent.ts";
import type { TunnelOpenerOptions } from "../tunnel/opener.ts";

/** What every browser-facing handler needs; built once by startLocal. */
export interface HandlerContext {
  authorize(req: IncomingMessage): boolean;
  tunnels: TunnelOpenerOptions;
  agent: PlainHttpAgent;
  sockets: SocketRegistry;
  log: ConsolaInstance;
  bridgeTimeouts: BridgeTimeouts;
  /**
   * [local] optimistic_connect, and a ready connection waiting on the current
   * path: that connection has proved token, certificate and path, so only
   * the target's own failure is left to be shown as a reset, not a status.
   */
  optimisticConnect(): boolean;
}

export function clientOf(req: IncomingMessage): string {
  const a = req.socket.remoteAddress ?? "?";
  return a.includes(":") ? `[${a}]:${req.socket.remotePort}` : `${a}:${req.socket.remotePort}`;
}
