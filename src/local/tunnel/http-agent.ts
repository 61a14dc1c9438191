import http from "node:http";
import type { Duplex } from "node:stream";
import type { ConsolaInstance } from "consola";
import { formatHostPort, type HostPort } from "../../address.ts";
import type { NatproxyError } from "../../errors.ts";
import { logSession } from "../../request-log.ts";
import { openTunnel, type Tunnel, type TunnelOpenerOptions } from "./opener.ts";

/**
 * Pools tunnels per target for plain-HTTP requests: a browser's keep-alive
 * requests to the same host reuse one tunnel, and requests to different hosts
 * on one browser connection each get their own.
 */
export class PlainHttpAgent extends http.Agent {
  readonly #opts: TunnelOpenerOptions;
  readonly #log: ConsolaInstance;

  constructor(opts: TunnelOpenerOptions, log: ConsolaInstance, idleTimeout: number) {
    super({ keepAlive: true, timeout: idleTimeout, scheduling: "lifo" });
    this.#opts = opts;
    this.#log = log;
  }

  override createConnection(options: http.ClientRequestArgs, callback?: (err: Error | null, stream: Duplex) => void): Duplex | undefined {
    const target = { host: options.host ?? "localhost", port: Number(options.port ?? 80) };
    const client = (options as { natproxyClient?: string }).natproxyClient ?? "?";
    openTunnel(this.#opts, target).then(
      (t) => {
        this.#logOnClose(t, client, target);
        callback?.(null, t.socket);
      },
      (err: NatproxyError) => {
        logSession(this.#log, this.#opts.metrics, { session: "-", client, target: formatHostPort(target.host, target.port), path: this.#opts.paths.current(), outcome: err.code ?? "ERROR", up: 0, down: 0, ms: 0, detail: err.message });
        callback?.(err, undefined as unknown as Duplex);
      },
    );
    return undefined;
  }

  #logOnClose(t: Tunnel, client: string, target: HostPort): void {
    // TLS sockets count cleartext: what went to and came from the target,
    // plus the session header that opened the connect-back.
    t.socket.once("close", () => {
      logSession(this.#log, this.#opts.metrics, {
        session: t.session,
        client,
        target: formatHostPort(target.host, target.port),
        path: t.path,
        outcome: "ok",
        up: t.socket.bytesWritten - t.sentOverhead,
        down: Math.max(0, t.socket.bytesRead - t.overhead),
        ms: Math.round(performance.now() - t.started),
      });
    });
  }
}
