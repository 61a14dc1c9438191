import net from "node:net";
import tls from "node:tls";
import { NatproxyError, targetError } from "../errors.ts";
import { formatHostPort, type HostPort } from "../address.ts";

/**
 * Dials the target. The connect timer is cleared on both outcomes; the socket
 * handed back carries no listeners of ours except the error guard that keeps a
 * late error from crashing the process before the bridge takes over.
 */
export function dialTarget(target: HostPort, timeout: number): Promise<net.Socket> {
  const name = formatHostPort(target.host, target.port);
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: target.host, port: target.port, allowHalfOpen: false, noDelay: true });
    const timer = setTimeout(() => fail(Object.assign(new Error("connect timed out"), { code: "ETIMEDOUT" })), timeout);
    const fail = (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      socket.destroy();
      reject(targetError(err, name));
    };
    socket.once("error", fail);
    socket.once("connect", () => {
      clearTimeout(timer);
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
export function connectBack(reply: HostPort, secureContext: tls.SecureContext, connectTimeout: number, handshakeTimeout: number): Promise<tls.TLSSocket> {
  const name = formatHostPort(reply.host, reply.port);
  return new Promise((resolve, reject) => {
    const raw = net.connect({ host: reply.host, port: reply.port, noDelay: true });
    let secure: tls.TLSSocket | undefined;
    let timer = setTimeout(() => fail(new NatproxyError("CONNECT_BACK_TIMEOUT", `${name}: TCP connect timed out`)), connectTimeout);
    const fail = (err: NatproxyError) => {
      clearTimeout(timer);
      raw.destroy();
      secure?.destroy();
      reject(err);
    };
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
