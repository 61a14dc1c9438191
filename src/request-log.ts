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
