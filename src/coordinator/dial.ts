import net from "node:net";
import { NatproxyError, targetError } from "../errors.ts";
import { formatHostPort, type HostPort } from "../address.ts";
import type { TargetPolicy } from "./target-policy.ts";

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
