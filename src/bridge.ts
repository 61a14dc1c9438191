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

/**
 * Pipes two sockets together, both ways, with backpressure (pipe pauses the
 * reader when the writer's buffer is full). An end on one side is passed on
 * as an end, so buffered bytes still drain; an error destroys both at once.
 * Either side idle for `idleTimeout` ms closes both.
 */
type Socketish = Duplex & { setTimeout?(ms: number): unknown };

export function bridge(a: Socketish, b: Socketish, idleTimeout: number): Promise<BridgeStats> {
  const started = performance.now();
  const stats: BridgeStats = { aToB: 0, bToA: 0, durationMs: 0, idle: false };
  return new Promise((resolve) => {
    let closed = 0;
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
      from.on("close", () => {
        // A peer that vanished without an end gets its partner ended, not
        // destroyed, so whatever the partner still has to write is delivered.
        if (!to.writableEnded) to.end();
        finish();
      });
      from.setTimeout?.(idleTimeout);
      from.on("timeout", () => {
        stats.idle = true;
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
