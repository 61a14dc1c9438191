import { isErrorCode } from "./errors.ts";

// One line per session on both sides, key=value so it greps and parses:
// session, client, target, path, outcome, bytes each way, duration.
export interface SessionRecord {
  session: string;
  client: string;
  target: string;
  /** How the client asked, when not HTTP CONNECT (e.g. "socks5"). */
  kind?: string;
  /** How the tunnel reached the local proxy (e.g. "connect-back"). */
  path?: string;
  outcome: string;
  /** Bytes from the client towards the target. */
  up: number;
  /** Bytes from the target towards the client. */
  down: number;
  ms: number;
  detail?: string;
}

export function formatSession(r: SessionRecord): string {
  const parts = [
    `session=${r.session}`,
    `client=${r.client}`,
    `target=${r.target}`,
    ...(r.kind ? [`kind=${r.kind}`] : []),
    ...(r.path ? [`path=${r.path}`] : []),
    `outcome=${r.outcome}`,
    `up=${r.up}`,
    `down=${r.down}`,
    `ms=${r.ms}`,
  ];
  if (r.detail) parts.push(`detail=${JSON.stringify(r.detail)}`);
  return parts.join(" ");
}

/** A role's metrics, fed the same record as the log line (src/coordinator/metrics.ts, src/local/metrics.ts). */
export interface SessionObserver {
  session(r: SessionRecord): void;
}

/** Writes the session's log line and counts it, so the log and the metrics never disagree. */
export function logSession(log: { info(message: string): void }, metrics: SessionObserver | undefined, r: SessionRecord): void {
  log.info(formatSession(r));
  metrics?.session(r);
}

/**
 * Whether the record is of a tunnel that was bridged (its outcome says how it
 * ended: ok, idle-timeout, closed-by-…-error) rather than one that never
 * opened (an error code).
 */
export function wasBridged(r: SessionRecord): boolean {
  return !isErrorCode(r.outcome) && r.outcome !== "ERROR";
}
