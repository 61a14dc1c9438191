import type { AcmeConfig } from "../config.ts";

// An ACME failure said the way an operator can act on it: which part failed
// (DNS? the port? the CA unreachable or untrusted? the cache?), what the CA
// or the network said, and what to change.

/** The CA's verdict on one name's challenge (RFC 8555 §8; type without the urn:ietf:params:acme:error: prefix). */
export interface ChallengeProblem {
  domain: string;
  type: string;
  detail: string;
}

export interface FailureContext {
  /** The step that was running: "setup", "account key", "account", "order", "challenge", "finalize", "cache". */
  stage: string;
  problems: ChallengeProblem[];
  acme: Pick<AcmeConfig, "directory" | "challenge" | "order_timeout" | "request_timeout">;
  cacheFile: string;
  timedOut: boolean;
}

const UNRESOLVED = new Set(["ENOTFOUND", "EAI_AGAIN", "EAI_FAIL", "EAI_NODATA"]);
const UNREACHABLE = new Set(["ECONNREFUSED", "ECONNRESET", "EHOSTUNREACH", "ENETUNREACH", "ETIMEDOUT", "EPIPE", "ERR_SOCKET_CONNECTION_TIMEOUT"]);
const UNTRUSTED = new Set([
  "UNABLE_TO_VERIFY_LEAF_SIGNATURE",
  "UNABLE_TO_GET_ISSUER_CERT_LOCALLY",
  "SELF_SIGNED_CERT_IN_CHAIN",
  "DEPTH_ZERO_SELF_SIGNED_CERT",
  "CERT_HAS_EXPIRED",
  "CERT_NOT_YET_VALID",
  "ERR_TLS_CERT_ALTNAME_INVALID",
]);

export function explainAcmeError(err: unknown, ctx: FailureContext): Error {
  const e = err as NodeJS.ErrnoException;
  const message = (e?.message ?? String(err)).replace(/\s+/g, " ").trim();
  const host = hostOf(ctx.acme.directory);
  const port = ctx.acme.challenge === "tls-alpn-01" ? 443 : 80;
  let text: string;
  if (ctx.timedOut) {
    text = `no certificate within order_timeout (${ctx.acme.order_timeout} ms; still at the ${ctx.stage} step): the CA is slow or a challenge stayed pending`;
  } else if (ctx.problems.length > 0) {
    text = ctx.problems.map((p) => challengeHint(p, ctx.acme.challenge, port)).join("; ");
  } else if (ctx.stage === "cache") {
    text = `cache: cannot write ${ctx.cacheFile} (${e?.code ?? message}); make acme.cache writable for the user natproxy runs as, and check that the disk is not full`;
  } else if (ctx.stage === "account key") {
    text = `cache: ${message}`;
  } else if (ctx.stage === "setup") {
    text = message;
  } else if (e?.code && UNRESOLVED.has(e.code)) {
    text = `CA unreachable: ${host} does not resolve here (${e.code}); check this host's DNS resolver and acme.directory`;
  } else if (e?.code === "ECONNABORTED" || /^timeout of \d+ms exceeded/.test(message)) {
    text = `CA unreachable: ${host} did not answer within acme.request_timeout (${ctx.acme.request_timeout} ms); check that this host may open outgoing HTTPS connections to it (firewall; HTTPS_PROXY is honoured)`;
  } else if (e?.code && UNREACHABLE.has(e.code)) {
    text = `CA unreachable: cannot connect to ${host} (${e.code}); check that this host may open outgoing HTTPS connections to it (firewall; HTTPS_PROXY is honoured) and acme.directory`;
  } else if (e?.code && UNTRUSTED.has(e.code)) {
    text = `CA not trusted: the certificate of ${host} did not verify (${e.code}); for a private or test CA set acme.ca to its CA bundle`;
  } else if (/rate.?limit|too many/i.test(message)) {
    text = `rate limit: the CA refuses more orders for now (${message}); natproxy retries on its backoff; test against the CA's staging directory`;
  } else {
    text = `the CA refused the ${ctx.stage} step: ${message}`;
  }
  return new Error(text, { cause: err });
}

// CAs type the same failure differently (a refused port is "connection" at
// Let's Encrypt and "unauthorized" at pebble, a name that does not resolve
// "dns" or "unauthorized"); the detail says which it was.
const NO_NAME = /could not resolve|NXDOMAIN|SERVFAIL|no valid (?:A|AAAA|IP)|DNS problem|no such host/i;
const NO_CONNECTION = /fail(?:ed)? to connect|connection refused|timeout during connect|timed? ?out|no route to host|network is unreachable/i;

function kindOf(p: ChallengeProblem): string {
  if (p.type === "dns" || NO_NAME.test(p.detail)) return "dns";
  if (NO_CONNECTION.test(p.detail)) return "connection";
  return p.type;
}

function challengeHint(p: ChallengeProblem, challenge: string, port: number): string {
  const said = `(the CA said: ${p.detail})`;
  switch (kindOf(p)) {
    case "dns":
      return `DNS: the CA cannot resolve ${p.domain} ${said}; give ${p.domain} A/AAAA records that point at this coordinator's public address`;
    case "connection":
      return (
        `port: the CA could not connect to ${p.domain} on TCP port ${port} ${said}; let TCP ${port} in from anywhere through the firewall and make it reach ` +
        (challenge === "tls-alpn-01" ? 'this coordinator\'s HTTPS port (listen = "*:443", or forward 443 to it)' : 'the challenge listener (acme.http_listen = "*:80", or forward 80 to it)')
      );
    case "unauthorized":
    case "tls":
    case "incorrectResponse":
      return (
        `wrong answer: the CA reached ${p.domain}:${port} but not this coordinator's challenge ${said}; check that its DNS records name only this host ` +
        `and that nothing in front of it (a proxy that ends TLS, another web server on port ${port}) answers instead`
      );
    case "caa":
      return `CAA: a CAA record of ${p.domain} does not allow this CA ${said}; add the CA to it or remove it`;
    case "rateLimited":
      return `rate limit: the CA refuses more validations of ${p.domain} for now ${said}; natproxy retries on its backoff`;
    case "rejectedIdentifier":
      return `the CA will not issue for ${p.domain} ${said}`;
    case "unsupported":
      return p.detail;
    default:
      return `${p.domain}: the ${challenge} challenge failed ${said}`;
  }
}

function hostOf(url: string): string {
  try {
    return new URL(url).host;
  } catch {
    return url;
  }
}
