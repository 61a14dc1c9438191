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
 * on one browser connection each get their own. Because a pooled tunnel
 * serves whichever browser asks that host next, one that may be out of step
 * with its target (see retire()) is closed instead of pooled.
 */
export class PlainHttpAgent extends http.Agent {
  readonly #opts: TunnelOpenerOptions;
  readonly #log: ConsolaInstance;
  readonly #retired = new WeakSet<Duplex>();

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

  /** The tunnel under `req` is closed once the request is over, never pooled. */
  retire(req: http.ClientRequest): void {
    if (req.socket) this.#retired.add(req.socket);
    else req.once("socket", (s) => this.#retired.add(s));
  }

  // Node destroys a socket for which this returns false (documented, though
  // typed as void); it asks once the response has been read to its end.
  override keepSocketAlive(socket: Duplex): boolean {
    if (this.#retired.has(socket)) return false;
    return (super.keepSocketAlive(socket) as unknown) !== false;
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
