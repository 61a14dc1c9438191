import http from "node:http";
import type { AddressInfo } from "node:net";
import type { ConsolaInstance } from "consola";
import { collectDefaultMetrics, Registry } from "prom-client";
import { formatHostPort, type HostPort } from "./address.ts";
import { closeServer, deadlineCheckInterval, listen } from "./listen.ts";

// The Prometheus side both roles share: a registry of their own (never
// prom-client's global one, so a local proxy and a coordinator in one process,
// as in the tests, each report only themselves) and the plain-HTTP listener
// that serves it on its own address, away from the ports peers use.

const METRICS_PATH = "/metrics";

export class MetricsEndpoint {
  readonly registry = new Registry();
  #server: http.Server | undefined;
  #closing: Promise<void> | undefined;

  constructor() {
    collectDefaultMetrics({ register: this.registry });
  }

  /**
   * Serves GET /metrics on `at` (port 0 picks a free port). `timeout` bounds
   * a request's head and any silence on a connection; every answer closes its
   * connection, so no keep-alive timer is left to a default.
   */
  async listen(at: HostPort, opts: { timeout: number; log: ConsolaInstance }): Promise<AddressInfo> {
    const server = http.createServer({
      headersTimeout: opts.timeout,
      requestTimeout: opts.timeout,
      connectionsCheckingInterval: deadlineCheckInterval(opts.timeout),
    });
    // A scraper that stops reading (or a peer that never finishes) is cut.
    server.setTimeout(opts.timeout, (socket) => socket.destroy());
    server.on("request", (req, res) => this.#answer(req, res, opts.log));
    server.on("clientError", (_err, socket) => socket.destroy());
    this.#server = server;
    const [address] = await listen(server, at);
    opts.log.info(`metrics on http://${formatHostPort(address.address, address.port)}${METRICS_PATH}`);
    return address;
  }

  #answer(req: http.IncomingMessage, res: http.ServerResponse, log: ConsolaInstance): void {
    req.resume();
    const path = (req.url ?? "").split("?")[0];
    if (path !== METRICS_PATH) return plain(res, 404, "not found: metrics are at /metrics\n");
    if (req.method !== "GET" && req.method !== "HEAD") return plain(res, 405, "only GET\n", { Allow: "GET, HEAD" });
    this.registry.metrics().then(
      (text) => {
        res.writeHead(200, { "Content-Type": this.registry.contentType, "Content-Length": Buffer.byteLength(text), "Cache-Control": "no-store", Connection: "close" });
        res.end(text);
      },
      (err: Error) => {
        log.warn(`metrics could not be collected: ${err.message}`);
        plain(res, 500, "metrics could not be collected\n");
      },
    );
  }

  /** Stops the listener and every connection on it; idempotent. */
  close(): Promise<void> {
    const server = this.#server;
    if (!server) return Promise.resolve();
    this.#closing ??= (async () => {
      const closed = closeServer(server);
      server.closeAllConnections();
      await closed;
    })();
    return this.#closing;
  }
}

function plain(res: http.ServerResponse, status: number, body: string, headers: Record<string, string> = {}): void {
  res.writeHead(status, { "Content-Type": "text/plain; charset=utf-8", "Content-Length": Buffer.byteLength(body), Connection: "close", ...headers });
  res.end(body);
}
