import { Counter, Gauge, Histogram } from "prom-client";
import { MetricsEndpoint } from "../metrics.ts";
import { wasBridged, type SessionObserver, type SessionRecord } from "../request-log.ts";

// What a coordinator reports on [coordinator] metrics_listen. Counters move
// where the request log is written (one session line, one count) and where an
// error answer goes out; gauges are read at scrape time from the counts the
// coordinator keeps anyway (src/coordinator/limits.ts), so nothing here can
// drift from what the limits enforce.

/** Live counts the gauges read when Prometheus scrapes. */
export interface CoordinatorGauges {
  /** Tunnels holding a session slot, both paths. */
  tunnels(): number;
  /** Ready connections (upgraded, or connect-backs opened ahead of need) waiting for their Open. */
  readyWaiting(): number;
  /** max_sessions as now configured (it changes on reload). */
  maxSessions(): number;
}

const DURATION_BUCKETS = [0.05, 0.25, 1, 5, 15, 60, 300, 900, 3600];
// TCP + TLS through a NAT: from loopback (a few ms) to a far, slow path.
const CONNECT_BACK_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

export class CoordinatorMetrics implements SessionObserver {
  readonly endpoint = new MetricsEndpoint();
  readonly #sessions: Counter<"path" | "outcome">;
  readonly #bytes: Counter<"path" | "direction">;
  readonly #duration: Histogram<"path">;
  readonly #connectBack: Histogram;
  readonly #refused: Counter<"code">;

  constructor(read: CoordinatorGauges) {
    const registers = [this.endpoint.registry];
    this.#sessions = new Counter({
      name: "natproxy_coordinator_sessions_total",
      help: "Sessions ended or refused, one per request-log line, by tunnel path and outcome (ok, idle-timeout, closed-by-…-error, or an error code)",
      labelNames: ["path", "outcome"],
      registers,
    });
    this.#bytes = new Counter({
      name: "natproxy_coordinator_tunnel_bytes_total",
      help: "Bytes carried by tunnels, counted when each tunnel closes; up = local proxy to target, down = target to local proxy",
      labelNames: ["path", "direction"],
      registers,
    });
    this.#duration = new Histogram({ name: "natproxy_coordinator_tunnel_duration_seconds", help: "How long bridged tunnels lasted", labelNames: ["path"], buckets: DURATION_BUCKETS, registers });
    this.#connectBack = new Histogram({
      name: "natproxy_coordinator_connect_back_seconds",
      help: "Connect-backs that succeeded (sessions, ready connections, probes): TCP connect and TLS handshake to the local proxy's public address P'",
      buckets: CONNECT_BACK_BUCKETS,
      registers,
    });
    this.#refused = new Counter({
      name: "natproxy_coordinator_refused_total",
      help: "Requests answered with an error (API calls, tunnel Upgrades, Open messages), by error code",
      labelNames: ["code"],
      registers,
    });
    // Series that exist from the start, so that rate() and increase() see the
    // first sessions instead of taking their first sample as the baseline.
    for (const path of ["connect-back", "outbound"]) {
      this.#sessions.inc({ path, outcome: "ok" }, 0);
      for (const direction of ["up", "down"]) this.#bytes.inc({ path, direction }, 0);
    }
    this.#gauge("natproxy_coordinator_tunnels_open", "Tunnels holding a session slot, both paths", read.tunnels);
    this.#gauge("natproxy_coordinator_tunnels_max", "[coordinator] max_sessions in force", read.maxSessions);
    this.#gauge("natproxy_coordinator_ready_connections", "Ready connections (upgraded, or connect-backs opened ahead of need) waiting for an Open", read.readyWaiting);
  }

  session(r: SessionRecord): void {
    const path = r.path ?? "none";
    this.#sessions.inc({ path, outcome: r.outcome });
    if (r.up > 0) this.#bytes.inc({ path, direction: "up" }, r.up);
    if (r.down > 0) this.#bytes.inc({ path, direction: "down" }, r.down);
    if (wasBridged(r)) this.#duration.observe({ path }, r.ms / 1000);
  }

  connectedBack(ms: number): void {
    this.#connectBack.observe(ms / 1000);
  }

  refused(code: string): void {
    this.#refused.inc({ code });
  }

  /**
   * The hook for a count of connections that have not authenticated yet (a
   * per-source cap on them): registers natproxy_coordinator_unauthenticated_connections,
   * read at scrape time. Call it once, where that count lives.
   */
  watchUnauthenticated(read: () => number): void {
    this.#gauge("natproxy_coordinator_unauthenticated_connections", "Connections held that have not presented a valid token yet", read);
  }

  #gauge(name: string, help: string, read: () => number): void {
    new Gauge({
      name,
      help,
      registers: [this.endpoint.registry],
      collect() {
        this.set(read());
      },
    });
  }
}
