import { Counter, Gauge, Histogram } from "prom-client";
import { MetricsEndpoint } from "../metrics.ts";
import type { SessionObserver, SessionRecord } from "../request-log.ts";
import type { Tunnel } from "./tunnel/opener.ts";
import type { DataPath } from "./tunnel/path.ts";

// What a local proxy reports on [local] metrics_listen. Sessions are counted
// where the request log is written, tunnels where src/local/tunnel/opener.ts
// hands one out; the path, the reporter link and the pools are read at
// scrape time from the parts that keep them.

/** Live state the gauges read when Prometheus scrapes. */
export interface LocalGauges {
  path(): DataPath;
  /** Whether the tunnel service has P' from the reporter; absent when no reporter link is kept (tunnel = "outbound"). */
  reporterUp?: () => boolean;
  readyConnections(path: DataPath): number;
  /** Browser connections waiting for a tunnel (what max_pending bounds). */
  opening(): number;
}

const PATHS: readonly DataPath[] = ["connect-back", "outbound"];
// From a ready connection on loopback (under a millisecond) to connect_timeout.
const OPEN_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

export class LocalMetrics implements SessionObserver {
  readonly endpoint = new MetricsEndpoint();
  readonly #sessions: Counter<"path" | "outcome">;
  readonly #bytes: Counter<"path" | "direction">;
  readonly #open: Histogram<"path">;
  readonly #live: Gauge<"path">;

  constructor(read: LocalGauges) {
    const registers = [this.endpoint.registry];
    this.#sessions = new Counter({
      name: "natproxy_local_sessions_total",
      help: "Browser sessions ended or refused, one per request-log line, by tunnel path (none: refused before one was chosen) and outcome (ok, browser-gone, idle-timeout, closed-by-…-error, or an error code)",
      labelNames: ["path", "outcome"],
      registers,
    });
    this.#bytes = new Counter({
      name: "natproxy_local_tunnel_bytes_total",
      help: "Bytes carried by tunnels, counted when each session ends; up = browser to target, down = target to browser",
      labelNames: ["path", "direction"],
      registers,
    });
    this.#open = new Histogram({
      name: "natproxy_local_tunnel_open_seconds",
      help: "From a browser connection asking for a tunnel to the tunnel being up (the coordinator's Result included), by the path that carried it",
      labelNames: ["path"],
      buckets: OPEN_BUCKETS,
      registers,
    });
    this.#live = new Gauge({ name: "natproxy_local_tunnels_open", help: "Tunnels open (to browsers, and pooled plain-HTTP ones), by path", labelNames: ["path"], registers });
    // Series that exist from the start, so that rate() and increase() see the
    // first sessions instead of taking their first sample as the baseline.
    for (const path of PATHS) {
      this.#sessions.inc({ path, outcome: "ok" }, 0);
      for (const direction of ["up", "down"]) this.#bytes.inc({ path, direction }, 0);
      this.#live.set({ path }, 0);
    }
    new Gauge({
      name: "natproxy_local_path",
      help: "The tunnel path the next browser connection takes: 1 for it, 0 for the other",
      labelNames: ["path"],
      registers,
      collect() {
        const now = read.path();
        for (const path of PATHS) this.set({ path }, path === now ? 1 : 0);
      },
    });
    new Gauge({
      name: "natproxy_local_ready_connections",
      help: "Connections kept ready for the next browser connection (pool_size), by path",
      labelNames: ["path"],
      registers,
      collect() {
        for (const path of PATHS) this.set({ path }, read.readyConnections(path));
      },
    });
    new Gauge({
      name: "natproxy_local_pending_tunnels",
      help: "Browser connections waiting for their tunnel ([local] max_pending bounds them)",
      registers,
      collect() {
        this.set(read.opening());
      },
    });
    const up = read.reporterUp;
    if (up) {
      new Gauge({
        name: "natproxy_local_reporter_up",
        help: "1 while the tunnel service has its public address P' from the reporter, 0 while it is down or retrying",
        registers,
        collect() {
          this.set(up() ? 1 : 0);
        },
      });
    }
  }

  session(r: SessionRecord): void {
    const path = r.path ?? "none";
    this.#sessions.inc({ path, outcome: r.outcome });
    if (r.up > 0) this.#bytes.inc({ path, direction: "up" }, r.up);
    if (r.down > 0) this.#bytes.inc({ path, direction: "down" }, r.down);
  }

  tunnelOpened(t: Tunnel): void {
    this.#open.observe({ path: t.path }, (performance.now() - t.started) / 1000);
    if (t.socket.closed) return;
    this.#live.inc({ path: t.path });
    t.socket.once("close", () => this.#live.dec({ path: t.path }));
  }
}
