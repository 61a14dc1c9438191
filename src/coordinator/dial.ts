import net from "node:net";
import tls from "node:tls";
import { NatproxyError, targetError } from "../errors.ts";
import { formatHostPort, type HostPort } from "../address.ts";
import type { TargetPolicy } from "../target-policy.ts";

/**
 * Dials the target. The connect timer is cleared on both outcomes; the socket
 * handed back carries no listeners of ours except the error guard that keeps a
 * late error from crashing the process before the bridge takes over.
 */
export function dialTarget(target: HostPort, timeout: number, policy: TargetPolicy, signal: AbortSignal): Promise<net.Socket> {
  const name = formatHostPort(target.host, target.port);
  // Literal addresses in any spelling are judged here (net.connect never calls
  // lookup for them); names are judged on every address DNS returns, in the
  // lookup net.connect uses, so a rebinding name gains nothing.
  const allowed = policy.connectOptions(target.host, target.port);
  if (!allowed.allowed) return Promise.reject(new NatproxyError("FORBIDDEN", allowed.reason));
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: allowed.host, port: allowed.port, lookup: allowed.lookup, allowHalfOpen: true, noDelay: true });
    const timer = setTimeout(() => fail(Object.assign(new Error("connect timed out"), { code: "ETIMEDOUT" })), timeout);
    const fail = (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      signal.removeEventListener("abort", onAbort);
      socket.destroy();
      reject(err instanceof NatproxyError ? err : targetError(err, name));
    };
    const onAbort = () => fail(signal.reason as NatproxyError);
    signal.addEventListener("abort", onAbort, { once: true });
    socket.once("error", fail);
    socket.once("connect", () => {
      clearTimeout(timer);
      signal.removeEventListener("abort", onAbort);
      socket.off("error", fail);
      socket.on("error", () => {});
      resolve(socket);
    });
  });
}

/**
 * Opens the connect-back to the local proxy's public address and runs TLS on
 * it with this side as the server, so the local proxy verifies the same
 * certificate it trusts on the HTTPS API. Nothing is sent before the local
 * proxy's ClientHello arrives: a service that is not a natproxy never receives
 * a byte from us.
 */
export function connectBack(reply: HostPort, secureContext: tls.SecureContext, connectTimeout: number, handshakeTimeout: number, signal: AbortSignal): Promise<tls.TLSSocket> {
  const name = formatHostPort(reply.host, reply.port);
  return new Promise((resolve, reject) => {
    const raw = net.connect({ host: reply.host, port: reply.port, noDelay: true, allowHalfOpen: true });
    let secure: tls.TLSSocket | undefined;
    let timer = setTimeout(() => fail(new NatproxyError("CONNECT_BACK_TIMEOUT", `${name}: TCP connect timed out`)), connectTimeout);
    const fail = (err: NatproxyError) => {
      clearTimeout(timer);
      signal.removeEventListener("abort", onAbort);
      raw.destroy();
      secure?.destroy();
      reject(err);
    };
    const onAbort = () => fail(signal.reason as NatproxyError);
    signal.addEventListener("abort", onAbort, { once: true });
    const onRawError = (err: NodeJS.ErrnoException) => fail(new NatproxyError("CONNECT_BACK_FAILED", `${name}: ${err.code ?? err.message}`, { cause: err }));
    raw.on("error", onRawError);
    raw.once("connect", () => {
      clearTimeout(timer);
      timer = setTimeout(() => fail(new NatproxyError("CONNECT_BACK_TIMEOUT", `${name}: TLS handshake timed out`)), handshakeTimeout);
      const s = new tls.TLSSocket(raw, { isServer: true, secureContext, requestCert: false });
      secure = s;
      const onTlsError = (err: NodeJS.ErrnoException) =>
        fail(new NatproxyError("CONNECT_BACK_FAILED", `${name}: TLS handshake failed (${err.code ?? err.message})`, { cause: err }));
      s.on("error", onTlsError);
      s.once("secure", () => {
        clearTimeout(timer);
        signal.removeEventListener("abort", onAbort);
        s.off("error", onTlsError);
        raw.off("error", onRawError);
        // The bridge installs its own handlers; until then a late error must not crash us.
        s.on("error", () => {});
        raw.on("error", () => {});
        resolve(s);
      });
    });
  });
}
