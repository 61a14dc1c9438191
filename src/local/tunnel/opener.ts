import type { TLSSocket } from "node:tls";
import { v4 as uuidv4 } from "uuid";
import type { HostPort } from "../../address.ts";
import { NatproxyError } from "../../errors.ts";
import type { SocketRegistry } from "../../sockets.ts";
import type { EarlyBytes } from "./early-bytes.ts";
import { isConnectBackFailure, type PathChooser, type DataPath } from "./path.ts";
import type { ReadyDialer } from "./ready-pool.ts";

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
  outbound: Pick<ReadyDialer, "open">;
  /** The connect-back path: the pool of ready connect-backs, or a plain ConnectBackDialer. */
  connectBack: Pick<ReadyDialer, "open">;
  paths: PathChooser;
  /** With `auto`: how long a connect-back may take before the outbound path is tried beside it. */
  connectBackGrace: () => number;
  /** Tunnels being opened right now, and how many may be at once. */
  opening: { count: number };
  maxPending: number;
  sockets: SocketRegistry;
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
    if (opts.paths.current() !== "connect-back") return await openOn("outbound", opts, target, started, signal, early);
    if (opts.paths.mode !== "auto") return await openOn("connect-back", opts, target, started, signal, early);
    return await openHedged(opts, target, started, signal, early);
  } finally {
    opts.opening.count--;
  }
}

/** One session's tunnel on one path: a ready connection from that path's pool, or one made for it. */
async function openOn(path: DataPath, opts: TunnelOpenerOptions, target: HostPort, started: number, signal?: AbortSignal, early?: EarlyBytes): Promise<Tunnel> {
  const session = uuidv4();
  const t = await (path === "outbound" ? opts.outbound : opts.connectBack).open(session, target, signal, early);
  opts.sockets.add(t.socket);
  return { socket: t.socket, session, started, path, overhead: t.overhead, sentOverhead: t.sentOverhead };
}

function openHedged(opts: TunnelOpenerOptions, target: HostPort, started: number, signal?: AbortSignal, early?: EarlyBytes): Promise<Tunnel> {
  return new Promise((resolve, reject) => {
    const cancelBack = new AbortController();
    const cancelOut = new AbortController();
    const either = (c: AbortController) => (signal ? AbortSignal.any([signal, c.signal]) : c.signal);
    let settled = false;
    let backError: NatproxyError | undefined;
    let outError: unknown;
    let outState: "idle" | "running" | "failed" = "idle";
    const grace = opts.connectBackGrace();
    const settle = (err: unknown, t?: Tunnel) => {
      if (settled) {
        t?.socket.destroy();
        return;
      }
      settled = true;
      clearTimeout(timer);
      cancelBack.abort(new NatproxyError("CANCELLED", "another path won"));
      cancelOut.abort(new NatproxyError("CANCELLED", "another path won"));
      if (t) resolve(t);
      else reject(err);
    };
    const startOutbound = () => {
      if (settled || outState !== "idle") return;
      outState = "running";
      openOn("outbound", opts, target, started, either(cancelOut), early).then(
        (t) => {
          // Outbound first while the connect-back still has not come: from
          // here on connect-back is suspect; the next probe decides again.
          if (!backError && !settled) opts.paths.connectBackFailed(new NatproxyError("CONNECT_BACK_TIMEOUT", `none within ${grace} ms, while the outbound path answered`));
          settle(undefined, t);
        },
        (err: unknown) => {
          outState = "failed";
          outError = err;
          // A connect-back that failed for its own reasons has already
          // settled with its error; one that failed as a path leaves ours.
          if (backError) settle(err);
        },
      );
    };
    const timer = setTimeout(startOutbound, grace);
    openOn("connect-back", opts, target, started, either(cancelBack), early).then(
      (t) => settle(undefined, t),
      (err: NatproxyError) => {
        backError = err;
        if (settled) return;
        if (signal?.aborted) return settle(err);
        // The target itself failed (refused, unknown, forbidden): another
        // path would meet the same answer, so it is the browser's answer.
        if (!isConnectBackFailure(err)) return settle(err);
        opts.paths.connectBackFailed(err);
        if (outState === "failed") return settle(outError);
        startOutbound();
      },
    );
  });
}
