import type { AddressInfo, Server } from "node:net";
import type { HostPort } from "./address.ts";

/**
 * Listens and resolves with the bound addresses (port 0 gives a free one).
 * Host "*" listens on every address: Node picks :: (dual-stack) and falls
 * back to 0.0.0.0 where the machine has no IPv6.
 */
export function listen(server: Server, at: HostPort): Promise<AddressInfo[]> {
  return new Promise((resolve, reject) => {
    const onError = (err: Error) => reject(err);
    server.once("error", onError);
    const done = () => {
      server.off("error", onError);
      resolve([server.address() as AddressInfo]);
    };
    if (at.host === "*") server.listen(at.port, done);
    else server.listen(at.port, at.host, done);
  });
}

/**
 * Stops accepting and resolves at once, leaving accepted connections alone:
 * close()'s own callback waits for every connection to end, which a live
 * tunnel may never do.
 */
export function stopListening(server: Server): Promise<void> {
  if (server.listening) server.close(() => {});
  // The listening handle is released in this loop turn's close phase.
  return new Promise((resolve) => setImmediate(resolve));
}

/** Stops accepting and resolves once the server and all its connections are closed. */
export function closeServer(server: Server): Promise<void> {
  return new Promise((resolve) => {
    if (!server.listening) {
      resolve();
      return;
    }
    server.close(() => resolve());
  });
}

/**
 * How often an HTTP server checks its header and request deadlines. Node's
 * default of 30 s would let a slowloris peer hold a connection half a minute
 * past its deadline; this keeps the overshoot under a second.
 */
export function deadlineCheckInterval(timeout: number): number {
  return Math.min(1000, Math.ceil(timeout / 2));
}
