// Who may hold a connection to the coordinator's HTTPS port before showing a
// token. Every connection counts against its source address from the moment
// it is accepted (behind a load balancer: once its PROXY header named the
// caller) until its first request with a valid token, or until it closes; a
// source already holding the limit has new connections reset at once, before
// any TLS. What one address can take is then bounded whatever it sends, and
// a token holder elsewhere still finds descriptors free.
import { readdirSync, readFileSync } from "node:fs";
import { isIPv6, type Socket } from "node:net";
import type tls from "node:tls";
import type { ConsolaInstance } from "consola";
import type { HostPort } from "../address.ts";

/** How many sources' refusals are remembered as logged, so a flood from many addresses logs each once without growing memory. */
const NAMED_SOURCES = 1024;
/** Share of the descriptor limit in use that is logged, and the share it must fall back below before it is logged again. */
const WARN_AT = 0.8;
const REARM_AT = 0.6;
/** Descriptors are counted every limit/32 accepted connections: reading /proc/self/fd costs one entry per descriptor, so this is a constant cost per connection. */
const CHECKS_PER_LIMIT = 32;

export class Admission {
  readonly #max: number;
  readonly #log: ConsolaInstance;
  /** Connections not yet authenticated, per source (an IPv4 address, or an IPv6 /64). */
  readonly #bySource = new Map<string, number>();
  /** How each of them is let go, by its four-tuple (which its TLS socket reports too). */
  readonly #pending = new Map<string, () => void>();
  /** Sources whose refusal has been logged, oldest first. */
  readonly #named = new Set<string>();

  constructor(maxPerSource: number, log: ConsolaInstance) {
    this.#max = maxPerSource;
    this.#log = log;
  }

  /** Counts a connection just accepted from `caller`; false (and the connection reset) when its source already holds the limit. */
  admit(socket: Socket, caller: HostPort): boolean {
    const source = sourceOf(caller.host);
    const held = this.#bySource.get(source) ?? 0;
    if (held >= this.#max) {
      this.#refused(source);
      // A reset leaves no TIME_WAIT behind, and no TLS state is made.
      socket.resetAndDestroy();
      return false;
    }
    this.#bySource.set(source, held + 1);
    const key = connectionKey(socket);
    let done = false;
    const release = () => {
      if (done) return;
      done = true;
      socket.off("close", release);
      this.#pending.delete(key);
      const left = (this.#bySource.get(source) ?? 1) - 1;
      if (left === 0) this.#bySource.delete(source);
      else this.#bySource.set(source, left);
    };
    this.#pending.set(key, release);
    socket.once("close", release);
    return true;
  }

  /** The connection (or the TLS socket over it) carried a valid token: it no longer counts. */
  authenticated(socket: Socket): void {
    this.#pending.get(connectionKey(socket))?.();
  }

  /** Connections accepted that have not yet carried a valid token. */
  get pending(): number {
    return this.#pending.size;
  }

  /** For a log line: how many connections wait unauthenticated, and the source holding the most. */
  describe(): string {
    let top: [string, number] | undefined;
    for (const entry of this.#bySource) if (!top || entry[1] > top[1]) top = entry;
    const most = top ? `, the most (${top[1]}) from ${top[0]}` : "";
    return `${this.#pending.size} connection(s) not yet authenticated${most}`;
  }

  #refused(source: string): void {
    if (this.#named.has(source)) return;
    this.#named.add(source);
    if (this.#named.size > NAMED_SOURCES) this.#named.delete(this.#named.values().next().value as string);
    this.#log.warn(
      `${source} holds ${this.#max} connections that have not authenticated yet ([coordinator] max_unauthenticated_per_ip); ` +
        "more from it are reset on arrival until some authenticate or close (logged once per address)",
    );
  }
}

/**
 * Puts `admit` in front of the TLS handshake: the one 'connection' listener
 * a TLS server's constructor adds (the one that starts TLS) runs only for
 * connections it lets in. Call it before requireProxyHeader, which then runs
 * it once a connection's header is read.
 */
export function gateTls(server: tls.Server, admit: (socket: Socket) => boolean): void {
  const listeners = server.listeners("connection");
  if (listeners.length !== 1) throw new Error(`gateTls: expected the TLS server's own 'connection' listener alone, found ${listeners.length}`);
  const startTls = listeners[0] as (socket: Socket) => void;
  server.removeListener("connection", startTls);
  server.on("connection", function admitted(socket: Socket) {
    if (admit(socket)) startTls.call(server, socket);
  });
}

/**
 * Logs when the process nears its descriptor limit (the soft RLIMIT_NOFILE,
 * read from /proc/self/limits): at the limit accept() fails and nobody, a
 * token holder included, gets an answer. Logged once on the way up, and again
 * only after the count fell back below REARM_AT of the limit. Where /proc is
 * missing nothing is watched.
 */
export class DescriptorWatch {
  readonly #limit: number | undefined;
  readonly #every: number;
  readonly #log: ConsolaInstance;
  readonly #context: () => string;
  #accepted = 0;
  #high = false;

  constructor(log: ConsolaInstance, context: () => string) {
    this.#log = log;
    this.#context = context;
    this.#limit = softDescriptorLimit();
    this.#every = this.#limit === undefined ? Infinity : Math.max(1, Math.ceil(this.#limit / CHECKS_PER_LIMIT));
  }

  /** Called for every accepted connection. */
  accepted(): void {
    if (this.#limit === undefined || ++this.#accepted < this.#every) return;
    this.#accepted = 0;
    const open = openDescriptors();
    if (open === undefined) return;
    if (!this.#high && open >= this.#limit * WARN_AT) {
      this.#high = true;
      this.#log.warn(
        `${open} of ${this.#limit} file descriptors in use (the soft limit, ulimit -n): at the limit new connections fail, a token holder's too; ${this.#context()}`,
      );
    } else if (this.#high && open < this.#limit * REARM_AT) {
      this.#high = false;
      this.#log.info(`${open} of ${this.#limit} file descriptors in use again`);
    }
  }
}

function softDescriptorLimit(): number | undefined {
  try {
    const m = /^Max open files\s+(\d+)/m.exec(readFileSync("/proc/self/limits", "utf8"));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

function openDescriptors(): number | undefined {
  try {
    // Less the one the listing itself holds open.
    return readdirSync("/proc/self/fd").length - 1;
  } catch {
    return undefined;
  }
}

/** IPv4 callers count by address; IPv6 ones by /64, the block one subscriber is usually given whole. */
export function sourceOf(host: string): string {
  if (!isIPv6(host)) return host;
  const [front, back] = host.split("::");
  const head = front ? front.split(":") : [];
  const tail = back ? back.split(":") : [];
  // A trailing dotted IPv4 part stands for two groups.
  const tailGroups = tail.reduce((n, g) => n + (g.includes(".") ? 2 : 1), 0);
  const groups = [...head, ...new Array<string>(Math.max(0, 8 - head.length - tailGroups)).fill("0"), ...tail];
  return `${groups
    .slice(0, 4)
    .map((g) => parseInt(g, 16).toString(16))
    .join(":")}::/64`;
}

function connectionKey(socket: Socket): string {
  return `${socket.remoteAddress}|${socket.remotePort}|${socket.localAddress}|${socket.localPort}`;
}
