// Every failure that crosses a module boundary carries a stable `code` from
// this one table: a NatproxyError, or one of the codec errors (WireError,
// ProxyHeaderError, ConfigError) that keep their own class because callers
// tell them apart from a peer's answer. The HTTP status is what the browser
// (or the API client) is answered with.
export const ERRORS = {
  CONFIG_INVALID: { status: 500, text: "invalid configuration" },
  BAD_REQUEST: { status: 400, text: "bad request" },
  METHOD_NOT_ALLOWED: { status: 405, text: "method not allowed" },
  EXPECTATION_FAILED: { status: 417, text: "expectation failed" },
  PROXY_AUTH_REQUIRED: { status: 407, text: "proxy authentication required" },
  UNAUTHORIZED: { status: 401, text: "missing or invalid token" },
  FORBIDDEN: { status: 403, text: "forbidden" },
  NOT_FOUND: { status: 404, text: "not found" },
  PAYLOAD_TOO_LARGE: { status: 413, text: "request too large" },
  TOO_MANY: { status: 429, text: "too many sessions" },
  DNS_FAILED: { status: 502, text: "target host name could not be resolved" },
  TARGET_REFUSED: { status: 502, text: "target refused the connection" },
  TARGET_UNREACHABLE: { status: 502, text: "target unreachable" },
  TARGET_RESET: { status: 502, text: "target reset the connection" },
  TARGET_TIMEOUT: { status: 504, text: "target did not answer in time" },
  /** A response head from the target that is not valid HTTP, or that cannot be passed on as it is. */
  TARGET_BAD_RESPONSE: { status: 502, text: "the target's answer is not valid HTTP" },
  CONNECT_BACK_FAILED: { status: 502, text: "coordinator could not connect back to the local proxy" },
  CONNECT_BACK_TIMEOUT: { status: 504, text: "no connect-back from the coordinator in time" },
  COORDINATOR_UNREACHABLE: { status: 502, text: "coordinator unreachable" },
  COORDINATOR_REFUSED: { status: 502, text: "coordinator refused the request" },
  CERT_UNTRUSTED: { status: 502, text: "coordinator certificate not trusted" },
  CERT_PIN_MISMATCH: { status: 502, text: "coordinator certificate does not match the pinned fingerprint" },
  TUNNEL_NOT_READY: { status: 503, text: "tunnel service not ready (no public address from the reporter yet)" },
  REPORTER_UNREACHABLE: { status: 503, text: "reporter unreachable" },
  REPORTER_PROTOCOL: { status: 502, text: "reporter spoke something that is not STUN" },
  SHUTTING_DOWN: { status: 503, text: "shutting down" },
  /** The peer that asked (a browser, a local proxy) closed its connection; nobody is left to answer. */
  CLIENT_GONE: { status: 400, text: "the client went away" },
  /** An attempt stopped because another attempt for the same connection won (a hedge). */
  CANCELLED: { status: 503, text: "attempt cancelled" },
  /** A natproxy wire message that cannot be decoded (WireError). */
  WIRE_PROTOCOL: { status: 502, text: "natproxy wire protocol violated" },
  /** A connection behind a load balancer without a valid PROXY protocol header (ProxyHeaderError). */
  PROXY_HEADER: { status: 400, text: "bad PROXY protocol header" },
  INTERNAL: { status: 500, text: "internal error" },
} as const;

export type ErrorCode = keyof typeof ERRORS;

export class NatproxyError extends Error {
  readonly code: ErrorCode;
  readonly status: number;
  constructor(code: ErrorCode, detail?: string, options?: { cause?: unknown }) {
    super(detail ? `${ERRORS[code].text}: ${detail}` : ERRORS[code].text, options);
    this.name = "NatproxyError";
    this.code = code;
    this.status = ERRORS[code].status;
  }
}

export function isErrorCode(value: unknown): value is ErrorCode {
  return typeof value === "string" && Object.hasOwn(ERRORS, value);
}

// Maps socket errno values from dialling a target to distinct outcomes, so the
// browser sees 502 for "refused" and 504 for "timed out", not one generic error.
export function targetError(err: NodeJS.ErrnoException, target: string): NatproxyError {
  switch (err.code) {
    case "ETARGETFORBIDDEN":
      return new NatproxyError("FORBIDDEN", err.message, { cause: err });
    case "ENOTFOUND":
    case "EAI_AGAIN":
    case "EAI_NODATA":
    case "EAI_FAIL":
      return new NatproxyError("DNS_FAILED", `${target} (${err.code})`, { cause: err });
    case "ECONNREFUSED":
      return new NatproxyError("TARGET_REFUSED", target, { cause: err });
    case "ECONNRESET":
    case "EPIPE":
      return new NatproxyError("TARGET_RESET", target, { cause: err });
    case "ETIMEDOUT":
      return new NatproxyError("TARGET_TIMEOUT", target, { cause: err });
    default:
      return new NatproxyError("TARGET_UNREACHABLE", `${target} (${err.code ?? err.message})`, { cause: err });
  }
}
