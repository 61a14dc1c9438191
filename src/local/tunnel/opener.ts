import type { TLSSocket } from "node:tls";
import { v4 as uuidv4 } from "uuid";
import type { HostPort } from "../../address.ts";
import type { SessionObserver } from "../../request-log.ts";
import { NatproxyError } from "../../errors.ts";
import { hedge } from "../../hedge.ts";
import type { SocketRegistry } from "../../sockets.ts";
import type { EarlyBytes } from "./early-bytes.ts";
import { isConnectBackFailure, type PathChooser, type DataPath } from "./path.ts";
import type { ReadyPool } from "./ready-pool.ts";

export interface Tunnel {
  socket: TLSSocket;
  session: string;
  started: number;
  path: DataPath;
  /** Cleartext bytes read on the socket before the target's first byte. */
  overhead: number;
  /** Cleartext bytes written before the first byte for the target. */
  sentOverhead: number;
}

export interface TunnelOpenerOptions {
  /** The outbound path: the pool of ready connections, or a plain dialer. */
  outbound: Pick<ReadyPool, "open">;
  /** The connect-back path: the pool of ready connect-backs, or a plain ConnectBackDialer. */
  connectBack: Pick<ReadyPool, "open">;
  paths: PathChooser;
  /** With `auto`: how long a connect-back may take before the outbound path is tried beside it. */
  connectBackGrace: () => number;
  /** Tunnels being opened right now, and how many may be at once. */
  opening: { count: number };
  maxPending: number;
  sockets: SocketRegistry;
  /** The metrics ([local] metrics_listen): every session line, and every tunnel handed out. */
  metrics?: SessionObserver & { tunnelOpened(t: Tunnel): void };
}

/**
 * Opens one session's tunnel on the path the chooser names. With `auto`, a
 * connect-back that has not arrived within the grace period gets an outbound
 * attempt beside it, and the first tunnel up wins: a NAT that just forgot its
 * mapping costs the browser a moment, not a timeout. A connect-back that
 * fails, or loses that race, switches later sessions to outbound at once.
 */
export async function openTunnel(opts: TunnelOpenerOptions, target: HostPort, signal?: AbortSignal, early?: EarlyBytes): Promise<Tunnel> {
  // A flood of browser connections (or a stuck coordinator) must not pile up
  // sockets and session-table entries without bound.
  if (opts.opening.count >= opts.maxPending) {
    throw new NatproxyError("TOO_MANY", `${opts.maxPending} browser connections are already waiting for a tunnel ([local] max_pending)`);
  }
  opts.opening.count++;
  try {
    const started = performance.now();
    let t: Tunnel;
    if (opts.paths.current() !== "connect-back") t = await openOn("outbound", opts, target, started, signal, early);
    else if (opts.paths.mode !== "auto") t = await openOn("connect-back", opts, target, started, signal, early);
    else t = await openHedged(opts, target, started, signal, early);
    opts.metrics?.tunnelOpened(t);
    return t;
  } finally {
    opts.opening.count--;
  }
}

/** One session's tunnel on one path: a ready connection from that path's pool, or one made for it. */
async function openOn(path: DataPath, opts: TunnelOpenerOptions, target: HostPort, started: number, signal?: AbortSignal, early?: EarlyBytes, attempts?: 1 | 2): Promise<Tunnel> {
  const session = uuidv4();
  const t = await (path === "outbound" ? opts.outbound : opts.connectBack).open(session, target, signal, early, attempts);
  opts.sockets.add(t.socket);
  return { socket: t.socket, session, started, path, overhead: t.overhead, sentOverhead: t.sentOverhead };
}

/**
 * Connect-back first, outbound beside it after the grace period. Each path
 * gets one attempt in flight at a time (its pool does not hedge a pooled
 * connection beside a fresh dial, it swaps one for the other), so one
 * browser connection never has more than two attempts going at once. Two,
 * because every attempt is a whole session at the coordinator (a slot
 * against max_sessions and the token's share, a dial to the target, a NAT
 * mapping): a hedge multiplies that load exactly when the network is
 * failing, and for every browser connection at once. And two already buys
 * what a hedge is for: besides the attempt that is likely stuck, one that
 * does not share its fault (the other path); a third would go in by one of
 * the same two ways and meet whatever stopped it.
 */
function openHedged(opts: TunnelOpenerOptions, target: HostPort, started: number, signal?: AbortSignal, early?: EarlyBytes): Promise<Tunnel> {
  const grace = opts.connectBackGrace();
  let backFailed = false;
  return hedge({
    primary: (s) =>
      openOn("connect-back", opts, target, started, s, early, 1).catch((err: unknown) => {
        backFailed = true;
        // An aborted attempt (the race is over, the browser left) says
        // nothing about the path.
        if (!s.aborted && isConnectBackFailure(err)) opts.paths.connectBackFailed(err);
        throw err;
      }),
    secondary: (s) =>
      openOn("outbound", opts, target, started, s, early, 1).then((t) => {
        // Outbound first while the connect-back still has not come: from
        // here on connect-back is suspect; the next probe decides again.
        if (!backFailed && !s.aborted) opts.paths.connectBackFailed(new NatproxyError("CONNECT_BACK_TIMEOUT", `none within ${grace} ms, while the outbound path answered`));
        return t;
      }),
    delay: grace,
    // The target itself failed (refused, unknown, forbidden): another path
    // would meet the same answer, so it is the browser's answer. A
    // connect-back that failed as a path leaves the answer to outbound.
    fixable: isConnectBackFailure,
    discard: (t) => {
      early?.detach(t.socket);
      t.socket.destroy();
    },
    signal,
  });
}
