import type { Duplex } from "node:stream";

export interface BridgeStats {
  /** Bytes that went from `a` to `b`. */
  aToB: number;
  bToA: number;
  durationMs: number;
  /** Which side failed first, and why; undefined on a clean close. */
  error?: { side: "a" | "b"; err: Error };
  /** True when the idle timeout closed the bridge. */
  idle: boolean;
}

export interface BridgeTimeouts {
  /** Both directions silent for this long closes both sides. */
  idle: number;
  /**
   * Once one side has closed, the other is ended and gets this long to finish
   * (like HAProxy's client-fin/server-fin): a peer that never answers our FIN
   * must not hold the socket until the idle timeout.
   */
  fin: number;
}

type Socketish = Duplex & { setTimeout?(ms: number): unknown };

/**
 * Pipes two sockets together, both ways, with backpressure (pipe pauses the
 * reader when the writer's buffer is full). An end on one side is passed on
 * as an end, so buffered bytes still drain; an error destroys both at once.
 */
export function bridge(a: Socketish, b: Socketish, timeouts: BridgeTimeouts): Promise<BridgeStats> {
  const started = performance.now();
  const stats: BridgeStats = { aToB: 0, bToA: 0, durationMs: 0, idle: false };
  return new Promise((resolve) => {
    let closed = 0;
    let oneClosed = false;
    const finish = () => {
      if (++closed < 2) return;
      stats.durationMs = Math.round(performance.now() - started);
      resolve(stats);
    };
    const wire = (from: Socketish, to: Socketish, side: "a" | "b") => {
      from.on("data", (chunk: Buffer) => {
        if (side === "a") stats.aToB += chunk.length;
        else stats.bToA += chunk.length;
      });
      from.on("error", (err: Error) => {
        stats.error ??= { side, err };
        to.destroy();
      });
      // A half-close is passed on by pipe(); from then on the other direction
      // gets `fin` ms to finish, as after a full close.
      from.on("end", () => {
        if (!oneClosed) {
          oneClosed = true;
          to.setTimeout?.(timeouts.fin);
        }
      });
      from.on("close", () => {
        // The partner is ended, not destroyed, so whatever it still has to
        // write is delivered; then it has `fin` ms to close its side.
        if (!oneClosed) {
          oneClosed = true;
          to.setTimeout?.(timeouts.fin);
        }
        if (!to.writableEnded) to.end();
        finish();
      });
      from.setTimeout?.(timeouts.idle);
      from.on("timeout", () => {
        if (!oneClosed) stats.idle = true;
        from.destroy();
        to.destroy();
      });
      from.pipe(to);
    };
    wire(a, b, "a");
    wire(b, a, "b");
    if (a.destroyed) b.destroy();
    if (b.destroyed) a.destroy();
  });
}

/** The request log's outcome for a bridge that ended: ok, idle-timeout, or closed-by-<side>-error. */
export function bridgeOutcome(stats: BridgeStats, a: string, b: string): string {
  if (stats.idle) return "idle-timeout";
  if (stats.error) return `closed-by-${stats.error.side === "a" ? a : b}-error`;
  return "ok";
}
