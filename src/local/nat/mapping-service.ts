import { lookup } from "node:dns/promises";
import { EventEmitter } from "node:events";
import net from "node:net";
import type { ConsolaInstance } from "consola";
import { formatHostPort, type HostPort } from "../../address.ts";
import type { LocalConfig } from "../../config.ts";
import { NatproxyError } from "../../errors.ts";
import { listen, stopListening } from "../../listen.ts";
import { openReporterLink, type ReporterLink } from "./reporter-link.ts";

export interface NatMapping {
  /** P: the local port the reporter saw us from, and the one we listen on. */
  localPort: number;
  /** P': what the NAT maps P to, as the reporter saw it. */
  publicAddress: HostPort;
  /** The address the reporter link left this machine from (equal to P's host when there is no NAT). */
  localAddress: string;
  /** The reporter's address, as dialled. */
  reporter: HostPort;
  since: Date;
}

interface Events {
  ready: [NatMapping];
  down: [Error];
  /** Something arrived from the reporter (a keepalive or an answer). */
  packet: [];
}

/**
 * The start-up workflow and the tunnel creation service: learn P' from the
 * reporter through P, then listen on P for the coordinator's connect-backs.
 * When the reporter link dies, the mapping changes, or nothing arrives for
 * `tunnel_idle_timeout`, it closes the listener (never the live tunnels) and
 * runs the workflow again, with jittered backoff while the reporter fails.
 */
export class MappingService extends EventEmitter<Events> {
  readonly #config: LocalConfig;
  readonly #accept: (socket: net.Socket) => void;
  readonly #log: ConsolaInstance;
  #state: NatMapping | undefined;
  #link: ReporterLink | undefined;
  #server: net.Server | undefined;
  #port: number;
  #lastPacket = 0;
  #idleTimer: NodeJS.Timeout | undefined;
  #retryTimer: NodeJS.Timeout | undefined;
  #closed = false;
  #restarting = false;
  #failures = 0;
  #lastError: Error | undefined;
  #wake: (() => void) | undefined;

  /** `accept`: what to do with each connection that arrives on P (the connect-back acceptor). */
  constructor(opts: { config: LocalConfig; accept: (socket: net.Socket) => void; log: ConsolaInstance }) {
    super();
    this.#config = opts.config;
    this.#accept = opts.accept;
    this.#log = opts.log;
    this.#port = opts.config.tunnel_port;
  }

  get state(): NatMapping | undefined {
    return this.#state;
  }

  get lastError(): Error | undefined {
    return this.#lastError;
  }

  /**
   * Runs the workflow until it succeeds or the configured retries are used up;
   * true when the tunnel service is up. It keeps retrying slowly afterwards.
   */
  async start(): Promise<boolean> {
    for (let attempt = 0; attempt <= this.#config.reporter_retries && !this.#closed; attempt++) {
      if (await this.#attempt()) return true;
      if (attempt < this.#config.reporter_retries) await this.#wait(this.#backoff(attempt));
    }
    if (!this.#closed) {
      this.#log.error(
        `reporter ${formatHostPort(this.#config.reporterAddress.host, this.#config.reporterAddress.port)} failed ${this.#config.reporter_retries + 1} times ` +
          `(${this.#lastError?.message}); ${this.#config.tunnel === "auto" ? "browsers take the outbound path" : "browsers get 503"} until it answers; retrying every ${this.#config.retry_max_delay} ms`,
      );
      this.#scheduleRetry(this.#config.retry_max_delay);
    }
    return false;
  }

  async close(): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#idleTimer);
    clearTimeout(this.#retryTimer);
    this.#wake?.();
    this.#link?.close();
    this.#link = undefined;
    this.#state = undefined;
    if (this.#server) await stopListening(this.#server);
    this.#server = undefined;
  }

  async #attempt(): Promise<boolean> {
    let link: ReporterLink | undefined;
    try {
      const reporter = await this.#resolveReporter();
      link = await openReporterLink({
        reporter,
        localPort: this.#port,
        keepAliveInterval: this.#config.nat_keep_alive_interval,
        timeout: this.#config.reporter_timeout,
      });
      if (this.#closed) {
        link.close();
        return false;
      }
      // Connect from P first, then listen on P: the reverse order fails with
      // EADDRINUSE on Linux (docs/NAT.md, "One port for an outbound connection and a listener").
      const server = net.createServer({ noDelay: true, pauseOnConnect: false, allowHalfOpen: true });
      server.on("connection", (socket) => this.#onConnection(socket));
      server.on("error", (err) => this.#log.warn(`tunnel service: ${err.message}`));
      await listen(server, { host: "*", port: link.localPort });
      this.#server = server;
      this.#link = link;
      this.#port = link.localPort;
      this.#failures = 0;
      this.#lastError = undefined;
      const state: NatMapping = { localPort: link.localPort, publicAddress: link.publicAddress, localAddress: link.localAddress, reporter, since: new Date() };
      this.#state = state;
      link.on("packet", () => {
        this.#touch();
        this.emit("packet");
      });
      link.on("mapping-changed", (addr: HostPort) => this.#restart(`the NAT now maps us to ${formatHostPort(addr.host, addr.port)}`));
      link.on("close", (reason?: Error) => this.#restart(`reporter link closed${reason ? ` (${reason.message})` : ""}`));
      this.#touch();
      this.#armIdle();
      const pub = formatHostPort(state.publicAddress.host, state.publicAddress.port);
      this.#log.info(
        `tunnel service listening on port ${state.localPort}; public address ${pub}` +
          (state.publicAddress.port !== state.localPort ? ` (the NAT maps port ${state.localPort} to ${state.publicAddress.port})` : ""),
      );
      this.emit("ready", state);
      return true;
    } catch (err) {
      link?.close();
      const e = err as NodeJS.ErrnoException;
      // P was taken (another program, or a lingering socket): pick a fresh one
      // next time unless the user asked for this port explicitly.
      if (e.code === "EADDRINUSE" && this.#config.tunnel_port === 0) this.#port = 0;
      this.#lastError = e;
      this.#failures++;
      this.#log.warn(`start-up workflow failed (attempt ${this.#failures}): ${e.message}`);
      return false;
    }
  }

  // Resolved here, once per attempt, so the link binds P on an address of
  // the right family and a DNS failure reads as one.
  async #resolveReporter(): Promise<HostPort> {
    const { host, port } = this.#config.reporterAddress;
    if (net.isIP(host)) return { host, port };
    try {
      const { address } = await lookup(host);
      return { host: address, port };
    } catch (err) {
      throw new NatproxyError("REPORTER_UNREACHABLE", `${host}: cannot resolve (${(err as NodeJS.ErrnoException).code})`, { cause: err });
    }
  }

  #onConnection(raw: net.Socket): void {
    // Any connection to P counts as a packet for the idle timer: the NAT
    // mapping carried it in.
    this.#touch();
    this.#accept(raw);
  }

  #touch(): void {
    this.#lastPacket = Date.now();
  }

  // One timer per idle period rather than one reset per packet: it re-arms
  // for the remaining time whenever something arrived meanwhile.
  #armIdle(): void {
    clearTimeout(this.#idleTimer);
    const due = this.#lastPacket + this.#config.tunnel_idle_timeout - Date.now();
    this.#idleTimer = setTimeout(() => {
      if (Date.now() - this.#lastPacket >= this.#config.tunnel_idle_timeout) {
        this.#restart(`nothing received for ${this.#config.tunnel_idle_timeout} ms`);
      } else this.#armIdle();
    }, Math.max(due, 1));
  }

  #restart(why: string): void {
    if (this.#closed || this.#restarting) return;
    this.#restarting = true;
    this.#log.warn(`tunnel service restarting: ${why}`);
    const err = new NatproxyError("TUNNEL_NOT_READY", why);
    this.#state = undefined;
    this.emit("down", err);
    clearTimeout(this.#idleTimer);
    const link = this.#link;
    this.#link = undefined;
    link?.removeAllListeners();
    link?.close();
    const server = this.#server;
    this.#server = undefined;
    // Only the listener closes; connections it accepted live on.
    void (server ? stopListening(server) : Promise.resolve()).then(async () => {
      this.#restarting = false;
      if (this.#closed) return;
      if (!(await this.#attempt())) this.#scheduleRetry(this.#backoff(this.#failures - 1));
    });
  }

  #scheduleRetry(delay: number): void {
    if (this.#closed) return;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = setTimeout(async () => {
      if (this.#closed || this.#state) return;
      if (!(await this.#attempt())) {
        const slow = this.#failures > this.#config.reporter_retries;
        if (slow) this.#log.warn(`reporter still unreachable (${this.#lastError?.message}); next try in ${this.#config.retry_max_delay} ms`);
        this.#scheduleRetry(slow ? this.#config.retry_max_delay : this.#backoff(this.#failures - 1));
      }
    }, delay);
  }

  /** Exponential from retry_delay up to retry_max_delay, with jitter so many proxies do not retry in step. */
  #backoff(attempt: number): number {
    const base = Math.min(this.#config.retry_max_delay, this.#config.retry_delay * 2 ** Math.max(0, attempt));
    return Math.round(base / 2 + (Math.random() * base) / 2);
  }

  #wait(ms: number): Promise<void> {
    return new Promise((resolve) => {
      this.#wake = resolve;
      this.#retryTimer = setTimeout(resolve, ms);
    });
  }
}
