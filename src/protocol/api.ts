// The HTTPS API between a local proxy and its coordinator (PROTOCOL.md §2-§4):
// the paths, the Upgrade token of the outbound path, and the JSON bodies.
// Both roles import this module, so a change to the contract is one change.

export const API = {
  hello: "/v1/hello",
  sessions: "/v1/sessions",
  probe: "/v1/probe",
  ready: "/v1/ready",
  /** Only as an HTTP Upgrade to TUNNEL_PROTOCOL (the outbound path). */
  tunnel: "/v1/tunnel",
} as const;

/** The Upgrade token of the outbound path (PROTOCOL.md §4). */
export const TUNNEL_PROTOCOL = "natproxy-tunnel/1";
