import { createServer, SocketAddress, type AddressInfo, type Socket } from "node:net";
import { formatHostPort, unmapIPv4 } from "../address.ts";
import type { ReporterConfig } from "../config.ts";
import { roleLogger } from "../log.ts";
import {
  describeMessage,
  decodeMessage,
  encodeMessage,
  isComprehensionRequired,
  METHOD_BINDING,
  newTransactionId,
  StunError,
  type DecodedStunMessage,
  type StunAddress,
  type StunAttribute,
} from "../stun.ts";
import { StunFramer } from "../stun-framer.ts";
import { SOFTWARE } from "../version.ts";

// The IP:port reporting service: standard STUN Binding over TCP (so coturn or
// any RFC 8489 client interoperates), plus the seed's keepalive: once a peer
// has asked for its address, the reporter keeps sending it Binding
// indications so the NAT mapping stays open, and stops (closes) when the peer
// no longer answers.

const tagged = roleLogger("reporter");
function log(): typeof tagged {
  return tagged;
}

/** Missed keepalive rounds after which a peer counts as gone. */
export const SILENT_INTERVALS = 3;
// Each connection costs a descriptor until its handshake timer fires, so a
// flood of idle connections is capped rather than left to exhaust them.
const MAX_CONNECTIONS = 10_000;

export interface ReporterHandle {
  addresses: AddressInfo[];
  close(): Promise<void>;
}

export async function startReporter(config: ReporterConfig): Promise<ReporterHandle> {
  const live = new Set<PeerConnection>();
  // Connections held per source; an entry lives only while its source holds
  // one, so a flood of addresses costs no more memory than its connections.
  const perSource = new Map<string, { count: number; warned: boolean }>();
  const server = createServer({ noDelay: true });
  server.maxConnections = MAX_CONNECTIONS;
  server.on("connection", function onConnection(socket: Socket) {
    // Without a per-source cap one address could hold every slot of
    // MAX_CONNECTIONS with peers that answer keepalives, and real local
    // proxies would be turned away.
    const source = socket.remoteAddress === undefined ? undefined : sourceOf(socket.remoteAddress);
    if (source !== undefined) {
      const held = perSource.get(source) ?? { count: 0, warned: false };
      if (held.count >= config.max_connections_per_ip) {
        if (!held.warned) {
          held.warned = true;
          log().warn(`${source} holds ${held.count} connections ([reporter] max_connections_per_ip); resetting its further ones until some close`);
        }
        socket.on("error", () => {});
        socket.resetAndDestroy();
        return;
      }
      held.count++;
      perSource.set(source, held);
      socket.once("close", function onSourceClose() {
        if (--held.count === 0) perSource.delete(source);
      });
    }
    const peer = new PeerConnection(socket, config, live);
    live.add(peer);
  });
  server.on("drop", function onDrop(data) {
    log().warn(`connection limit (${MAX_CONNECTIONS}) reached; dropped a connection from ${data?.remoteAddress ?? "?"}`);
  });

  const where = config.listen.host === "*" ? `*:${config.listen.port}` : formatHostPort(config.listen.host, config.listen.port);
  await new Promise<void>((resolve, reject) => {
    function onListenError(err: NodeJS.ErrnoException): void {
      server.off("listening", onListening);
      reject(Object.assign(new Error(`reporter cannot listen on ${where}: ${err.code ?? err.message}`, { cause: err }), { code: err.code }));
    }
    function onListening(): void {
      server.off("error", onListenError);
      resolve();
    }
    server.once("error", onListenError);
    server.once("listening", onListening);
    if (config.listen.host === "*") server.listen(config.listen.port);
    else server.listen(config.listen.port, config.listen.host);
  });
  // After startup a server error (e.g. EMFILE on accept) must not crash the process.
  server.on("error", function onServerError(err: Error) {
    log().warn(`listener error: ${err.message}`);
  });

  const bound = server.address() as AddressInfo;
  log().info(`listening on ${formatHostPort(bound.address, bound.port)} (STUN over TCP, keepalive every ${config.nat_keep_alive_interval} ms)`);

  let closing: Promise<void> | undefined;
  return {
    addresses: [bound],
    close(): Promise<void> {
      closing ??= new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const peer of live) peer.close("reporter shutting down");
        log().info("stopped");
      });
      return closing;
    },
  };
}

/**
 * What the per-source cap counts: an IPv4 address, or the /64 an IPv6 address
 * is in, since one IPv6 host or customer is usually given a whole /64.
 */
export function sourceOf(remoteAddress: string): string {
  const address = unmapIPv4(remoteAddress).split("%")[0];
  if (!address.includes(":")) return address;
  const [head, tail] = address.split("::");
  const groups = (part: string | undefined) => (part ? part.split(":").flatMap((g) => (g.includes(".") ? ["0", "0"] : [g])) : []);
  const h = groups(head);
  const t = groups(tail);
  const all = tail === undefined ? h : [...h, ...new Array<string>(8 - h.length - t.length).fill("0"), ...t];
  return `${new SocketAddress({ address: `${all.slice(0, 4).join(":")}::`, family: "ipv6" }).address}/64`;
}

type Phase = "handshake" | "bound" | "closed";

class PeerConnection {
  readonly #socket: Socket;
  readonly #config: ReporterConfig;
  readonly #live: Set<PeerConnection>;
  readonly #framer = new StunFramer();
  readonly #name: string;
  readonly #seen: StunAddress | undefined;
  #phase: Phase = "handshake";
  #handshakeTimer: NodeJS.Timeout | undefined;
  #idleTimer: NodeJS.Timeout | undefined;
  #keepAliveTimer: NodeJS.Timeout | undefined;

  constructor(socket: Socket, config: ReporterConfig, live: Set<PeerConnection>) {
    this.#socket = socket;
    this.#config = config;
    this.#live = live;
    const host = socket.remoteAddress === undefined ? undefined : unmapIPv4(socket.remoteAddress);
    const port = socket.remotePort;
    this.#name = host === undefined || port === undefined ? "(gone)" : formatHostPort(host, port);
    this.#seen = host === undefined || port === undefined ? undefined : { family: host.includes(":") ? "IPv6" : "IPv4", address: host, port };

    socket.on("error", this.#onError);
    socket.on("close", this.#onClose);
    socket.on("data", this.#onData);
    socket.on("drain", this.#onDrain);
    if (this.#seen === undefined) {
      // The peer reset before we could even read its address.
      this.close();
      return;
    }
    socket.setKeepAlive(true, config.nat_keep_alive_interval);
    this.#handshakeTimer = setTimeout(this.#onHandshakeTimeout, config.handshake_timeout);
    log().debug(`${this.#name} connected`);
  }

  close(reason?: string): void {
    if (this.#phase === "closed") return;
    this.#phase = "closed";
    clearTimeout(this.#handshakeTimer);
    clearTimeout(this.#idleTimer);
    clearInterval(this.#keepAliveTimer);
    this.#live.delete(this);
    if (reason) log().debug(`${this.#name} closed: ${reason}`);
    this.#socket.destroy();
  }

  readonly #onError = (err: NodeJS.ErrnoException): void => {
    log().debug(`${this.#name} socket error: ${err.code ?? err.message}`);
    this.close();
  };

  readonly #onClose = (): void => {
    if (this.#phase !== "closed") log().debug(`${this.#name} disconnected`);
    this.close();
  };

  readonly #onDrain = (): void => {
    if (this.#phase !== "closed") this.#socket.resume();
  };

  readonly #onHandshakeTimeout = (): void => {
    if (this.#phase !== "handshake") return;
    log().debug(`${this.#name} sent no Binding request within ${this.#config.handshake_timeout} ms; closing`);
    this.close();
  };

  readonly #onIdle = (): void => {
    log().info(`${this.#name} silent for ${SILENT_INTERVALS * this.#config.nat_keep_alive_interval} ms; no more keepalives, closing`);
    this.close();
  };

  readonly #onKeepAliveTick = (): void => {
    // An indication needs no answer by the standard; our own local proxy
    // answers it anyway, and any STUN from the peer renews the idle timer.
    this.#send({ method: METHOD_BINDING, class: "indication", transactionId: newTransactionId(), attributes: [] });
  };

  readonly #onData = (chunk: Buffer): void => {
    if (this.#phase === "closed") return;
    let frames: Buffer[];
    try {
      frames = this.#framer.push(chunk);
    } catch (err) {
      this.#refuse(err);
      return;
    }
    for (const frame of frames) {
      // An earlier message in the same chunk may have closed the connection.
      if (this.#socket.destroyed) return;
      let msg: DecodedStunMessage;
      try {
        msg = decodeMessage(frame);
      } catch (err) {
        this.#refuse(err);
        return;
      }
      this.#handle(msg);
    }
  };

  #refuse(err: unknown): void {
    const detail = err instanceof StunError ? err.detail : String(err);
    // Bytes that are not STUN at all are usually scanners: debug. A broken STUN peer is worth a warning.
    if (this.#phase === "handshake") log().debug(`${this.#name} is not speaking STUN (${detail}); closing`);
    else log().warn(`${this.#name} sent a bad STUN message (${detail}); closing`);
    this.close();
  }

  #handle(msg: DecodedStunMessage): void {
    if (this.#phase === "bound") this.#idleTimer?.refresh();
    if (msg.class !== "request") {
      log().trace(`${this.#name} ${describeMessage(msg)}`);
      return;
    }
    const unknown = msg.attributes.flatMap((a) => (a.kind === "raw" && isComprehensionRequired(a.type) ? [a.type] : []));
    if (msg.method !== METHOD_BINDING) {
      this.#sendError(msg, 400, `method 0x${msg.method.toString(16)} is not supported`);
      return;
    }
    if (unknown.length > 0) {
      this.#sendError(msg, 420, "Unknown Attribute", [{ kind: "UNKNOWN-ATTRIBUTES", types: unknown }]);
      return;
    }
    const seen = this.#seen as StunAddress;
    this.#send(
      {
        method: METHOD_BINDING,
        class: "success",
        transactionId: msg.transactionId,
        attributes: [
          { kind: "XOR-MAPPED-ADDRESS", address: seen },
          { kind: "MAPPED-ADDRESS", address: seen },
          { kind: "SOFTWARE", value: SOFTWARE },
        ],
      },
    );
    if (this.#phase === "handshake") {
      this.#phase = "bound";
      clearTimeout(this.#handshakeTimer);
      const interval = this.#config.nat_keep_alive_interval;
      this.#idleTimer = setTimeout(this.#onIdle, SILENT_INTERVALS * interval);
      this.#keepAliveTimer = setInterval(this.#onKeepAliveTick, interval);
      log().debug(`${this.#name} reported its public address; keeping the mapping alive every ${interval} ms`);
    }
  }

  #sendError(req: DecodedStunMessage, code: number, reason: string, extra: StunAttribute[] = []): void {
    log().debug(`${this.#name} ${describeMessage(req)}: answering ${code} ${reason}`);
    this.#send({
      method: req.method,
      class: "error",
      transactionId: req.transactionId,
      attributes: [{ kind: "ERROR-CODE", code, reason }, ...extra, { kind: "SOFTWARE", value: SOFTWARE }],
    });
  }

  #send(msg: Parameters<typeof encodeMessage>[0]): void {
    if (this.#phase === "closed" || this.#socket.destroyed) return;
    // A peer that sends requests without reading the answers must not grow our
    // write buffer: reading pauses until the socket drains, and the idle timer
    // then closes a peer that never does.
    const ok = this.#socket.write(encodeMessage(msg, { fingerprint: true }));
    if (!ok) this.#socket.pause();
  }
}
