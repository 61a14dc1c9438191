import { X509Certificate } from "node:crypto";
import { isIP } from "node:net";
import tls, { type TLSSocket } from "node:tls";
import { NatproxyError } from "../errors.ts";
import { readBoundedFile } from "../files.ts";
import { formatFingerprint, normalizeFingerprint } from "./certs.ts";

/** How the local proxy decides whether it is talking to its own coordinator. */
export interface Trust {
  hostname: string;
  allowSelfSigned: boolean;
  /** Normalised pin, or "" for none. */
  pin: string;
  /** Extra CAs added to the system's trusted ones. */
  ca?: string[];
  /**
   * Built once: handing `ca` to every tls.connect would build a new OpenSSL
   * context (and parse every root certificate) per connection, costing CPU
   * and close to a megabyte of native memory each until the GC gets to it.
   */
  context: tls.SecureContext;
}

export function makeTrust(opts: { hostname: string; allow_self_signed: boolean; fingerprint: string; ca: string }): Trust {
  let ca: string[] | undefined;
  if (opts.ca !== "") ca = [...tls.rootCertificates, readCaBundle(opts.ca)];
  const context = tls.createSecureContext({ ca, minVersion: "TLSv1.2" });
  return { hostname: opts.hostname, allowSelfSigned: opts.allow_self_signed, pin: normalizeFingerprint(opts.fingerprint), ca, context };
}

function readCaBundle(path: string): string {
  try {
    return readBoundedFile(path);
  } catch (err) {
    throw new Error(`${path}: cannot read the CA bundle (${(err as Error).message})`, { cause: err });
  }
}

export function describeTrust(t: Trust): string {
  if (t.pin) return "the pinned certificate fingerprint";
  if (t.allowSelfSigned) return "any certificate (allow_self_signed = true and no fingerprint: open to a man in the middle)";
  return t.ca ? "the system's trusted CAs plus the configured CA bundle" : "the system's trusted CAs";
}

/**
 * Handshake options for every TLS connection to the coordinator: the HTTPS API
 * and the connect-back alike, so both are held to the same certificate.
 * Verification itself happens in `verifyPeer` once the handshake is done,
 * which lets the error say which check failed and what the server presented.
 */
export function tlsClientOptions(t: Trust): tls.ConnectionOptions {
  return {
    // OpenSSL still computes `authorized`; we refuse in verifyPeer before any
    // application byte is written or read.
    rejectUnauthorized: false,
    // Used only for the identity check; SNI must not carry an IP literal.
    host: t.hostname,
    servername: isIP(t.hostname) ? undefined : t.hostname,
    secureContext: t.context,
    checkServerIdentity,
  };
}

/**
 * Node 22.23's tls.checkServerIdentity never matches an IPv6 literal against
 * the certificate's IP addresses (it runs the host through domainToASCII,
 * which returns "" for it; nodejs/node#64032), so a coordinator reached as
 * https://[2001:db8::20]:8443 would always be refused. OpenSSL's own IP check
 * decides for IPv6 literals; everything else keeps Node's rules.
 */
export function checkServerIdentity(host: string, cert: tls.PeerCertificate): Error | undefined {
  if (isIP(host) !== 6) return tls.checkServerIdentity(host, cert);
  if (cert.raw && new X509Certificate(cert.raw).checkIP(host)) return undefined;
  return Object.assign(new Error(`IP: ${host} is not in the cert's list: ${cert.subjectaltname ?? ""}`), { code: "ERR_TLS_CERT_ALTNAME_INVALID", reason: "IP mismatch", host, cert });
}

// OpenSSL's codes, said the way a user can act on them.
const VERIFY_ERRORS: Record<string, string> = {
  DEPTH_ZERO_SELF_SIGNED_CERT: "the certificate is self-signed",
  SELF_SIGNED_CERT_IN_CHAIN: "the certificate chain ends in a CA that is not trusted",
  UNABLE_TO_VERIFY_LEAF_SIGNATURE: "the certificate is signed by a CA that is not trusted",
  UNABLE_TO_GET_ISSUER_CERT_LOCALLY: "the certificate is signed by a CA that is not trusted",
  CERT_HAS_EXPIRED: "the certificate has expired",
  CERT_NOT_YET_VALID: "the certificate is not valid yet",
  ERR_TLS_CERT_ALTNAME_INVALID: "the certificate is not issued for this host name",
};

/** Undefined when the peer is acceptable; otherwise the reason, as an error. */
export function verifyPeer(socket: TLSSocket, t: Trust): NatproxyError | undefined {
  const raw = socket.getPeerX509Certificate();
  if (!raw) return new NatproxyError("CERT_UNTRUSTED", "the coordinator presented no certificate");
  const presented = formatFingerprint(raw);
  if (t.pin) {
    if (normalizeFingerprint(presented) === t.pin) return undefined;
    return new NatproxyError("CERT_PIN_MISMATCH", `it presented ${presented}`);
  }
  if (socket.authorized) return undefined;
  if (t.allowSelfSigned) return undefined;
  const code = String(socket.authorizationError);
  const why = VERIFY_ERRORS[code] ? `${VERIFY_ERRORS[code]} [${code}]` : code;
  return new NatproxyError(
    "CERT_UNTRUSTED",
    `${why} (certificate ${raw.subject.replace(/\n/g, ", ")}, ${presented}); ` +
      `if this is your coordinator, set [local] fingerprint = "${presented}" or ca = "<its CA file>"`,
  );
}

/** Maps a failed TLS handshake to an error that says what went wrong. */
export function handshakeError(err: NodeJS.ErrnoException, where: string): NatproxyError {
  if (err instanceof NatproxyError) return err;
  if (err.code === "ECONNREFUSED" || err.code === "ENOTFOUND" || err.code === "EHOSTUNREACH" || err.code === "ETIMEDOUT" || err.code === "EAI_AGAIN")
    return new NatproxyError("COORDINATOR_UNREACHABLE", `${where}: ${err.code}`, { cause: err });
  return new NatproxyError("COORDINATOR_UNREACHABLE", `${where}: TLS handshake failed (${err.code ?? err.message})`, { cause: err });
}
