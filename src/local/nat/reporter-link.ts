import { EventEmitter } from "node:events";
import { connect, isIP, type Socket } from "node:net";
import { formatHostPort, unmapIPv4, type HostPort } from "../../address.ts";
import { NatproxyError } from "../../errors.ts";
import { roleLogger } from "../../log.ts";
import {
  decodeMessage,
  describeMessage,
  encodeMessage,
  getAttribute,
  mappedAddressOf,
  METHOD_BINDING,
  newTransactionId,
  type DecodedStunMessage,
  type StunMessage,
} from "../../stun.ts";
import { StunFramer } from "../../stun-framer.ts";
import { SOFTWARE } from "../../version.ts";

// The local proxy's side of the reporter connection. Connecting FROM the port
// the tunnel service will listen on is what creates the NAT mapping the
// coordinator later connects back through (docs/NAT.md, "One port for an outbound connection and a listener": connect first,
// then listen on the same port). The connection is then kept busy in both
// directions: the reporter's indications are answered, and when the reporter
// is a plain STUN server that never speaks first (coturn), our own Binding
// requests keep the mapping alive and show whether it moved.

const tagged = roleLogger("reporter-link");
function log(): typeof tagged {
  return tagged;
}

/** Missed keepalive rounds after which the reporter counts as gone. */
export const SILENT_INTERVALS = 3;
// Requests in flight at once; more means the reporter stopped answering and
// the per-request timeout is about to close the link anyway.
const MAX_PENDING = 4;

export interface ReporterLinkOptions {
  reporter: HostPort;
  /** P, the local port to connect from; 0 lets the system pick. */
  localPort: number;
  keepAliveInterval: number;
  /** For the connect plus the first answer, and for each later Binding request. */
  timeout: number;
}

export interface ReporterLinkEvents {
  /** Every valid STUN message from the reporter: proof that the path is alive. */
  packet: [message: DecodedStunMessage];
  /** A later Binding response reported a different public address. */
  "mapping-changed": [current: HostPort, previous: HostPort];
  /** Once; `reason` is undefined after close() and an Error when the link failed. */
  close: [reason: Error | undefined];
}

type State = "connecting" | "open" | "closed";

export function openReporterLink(opts: ReporterLinkOptions): Promise<ReporterLink> {
  return ReporterLink.open(opts);
}

export class ReporterLink extends EventEmitter<ReporterLinkEvents> {
  readonly #opts: ReporterLinkOptions;
  readonly #where: string;
  readonly #socket: Socket;
  readonly #framer = new StunFramer();
  /** Requests awaiting an answer; the first has no timer of its own (the start timer covers it). */
  readonly #pending = new Map<string, NodeJS.Timeout | undefined>();
  #state: State = "connecting";
  #connected = false;
  #localPort = 0;
  #localAddress = "";
  #publicAddress: HostPort = { host: "", port: 0 };
  #remoteSoftware: string | undefined;
  #firstRequest = "";
  #startTimer: NodeJS.Timeout | undefined;
  #sendIdleTimer: NodeJS.Timeout | undefined;
  #receiveIdleTimer: NodeJS.Timeout | undefined;
  #settle: { resolve: (link: ReporterLink) => void; reject: (err: Error) => void } | undefined;

  /** Use openReporterLink(); the instance is only useful once it has resolved. */
  static open(opts: ReporterLinkOptions): Promise<ReporterLink> {
    return new Promise<ReporterLink>((resolve, reject) => {
      let link: ReporterLink;
      try {
        link = new ReporterLink(opts);
      } catch (err) {
        // net.connect throws synchronously on an impossible host or port.
        const where = formatHostPort(opts.reporter.host, opts.reporter.port);
        reject(new NatproxyError("REPORTER_UNREACHABLE", `${where}: ${(err as Error).message}`, { cause: err }));
        return;
      }
      link.#settle = { resolve, reject };
    });
  }

  private constructor(opts: ReporterLinkOptions) {
    super();
    this.#opts = opts;
    this.#where = formatHostPort(opts.reporter.host, opts.reporter.port);
    // Always bind explicitly, even for "any port": libuv sets SO_REUSEADDR
    // only on sockets it binds, and without it the later listen(P) on the
    // same port fails with EADDRINUSE. The wildcard follows the reporter's
    // address family; a host name binds nothing and is left to the caller to
    // resolve first.
    const family = isIP(opts.reporter.host);
    const wildcard = family === 6 ? "::" : family === 4 ? "0.0.0.0" : undefined;
    this.#socket = connect({
      host: opts.reporter.host,
      port: opts.reporter.port,
      ...(opts.localPort !== 0 ? { localPort: opts.localPort } : {}),
      ...(wildcard !== undefined ? { localAddress: wildcard } : {}),
    });
    this.#socket.on("connect", this.#onConnect);
    this.#socket.on("data", this.#onData);
    this.#socket.on("error", this.#onError);
    this.#socket.on("end", this.#onEnd);
    this.#socket.on("close", this.#onSocketClose);
    this.#startTimer = setTimeout(this.#onStartTimeout, opts.timeout);
  }

  /** P: the local port the connection really uses; the tunnel service listens on it. */
  get localPort(): number {
    return this.#localPort;
  }

  get localAddress(): string {
    return this.#localAddress;
  }

  /** P' as the reporter sees it; may differ from P behind a NAT. */
  get publicAddress(): HostPort {
    return { ...this.#publicAddress };
  }

  get remoteSoftware(): string | undefined {
    return this.#remoteSoftware;
  }

  get closed(): boolean {
    return this.#state === "closed";
  }

  close(): void {
    this.#shutdown(undefined);
  }

  readonly #onConnect = (): void => {
    this.#connected = true;
    this.#localPort = this.#socket.localPort ?? 0;
    this.#localAddress = unmapIPv4(this.#socket.localAddress ?? "");
    this.#socket.setNoDelay(true);
    this.#socket.setKeepAlive(true, this.#opts.keepAliveInterval);
    log().debug(`connected to ${this.#where} from ${formatHostPort(this.#localAddress, this.#localPort)}`);
    const tid = this.#sendRequest(true);
    if (tid !== undefined) this.#firstRequest = tid;
  };

  readonly #onStartTimeout = (): void => {
    const what = this.#connected ? "connected but got no Binding answer" : "could not connect";
    this.#shutdown(new NatproxyError("REPORTER_UNREACHABLE", `${this.#where}: ${what} within ${this.#opts.timeout} ms`));
  };

  readonly #onError = (err: NodeJS.ErrnoException): void => {
    let detail = `${this.#where}: ${err.code ?? err.message}`;
    if (err.code === "EADDRINUSE" || err.code === "EADDRNOTAVAIL")
      detail = `cannot connect to ${this.#where} from local port ${this.#opts.localPort} (${err.code})`;
    this.#shutdown(new NatproxyError("REPORTER_UNREACHABLE", detail, { cause: err }));
  };

  readonly #onEnd = (): void => {
    this.#shutdown(new NatproxyError("REPORTER_UNREACHABLE", `${this.#where} closed the connection`));
  };

  readonly #onSocketClose = (): void => {
    this.#shutdown(new NatproxyError("REPORTER_UNREACHABLE", `connection to ${this.#where} lost`));
  };

  readonly #onSendIdle = (): void => {
    // Nothing went out for a whole interval: a Binding request both refreshes
    // the NAT mapping and checks it, whatever kind of server is at the far end.
    if (this.#pending.size >= MAX_PENDING) this.#write({ method: METHOD_BINDING, class: "indication", transactionId: newTransactionId(), attributes: [] });
    else this.#sendRequest(false);
  };

  readonly #onReceiveIdle = (): void => {
    const ms = SILENT_INTERVALS * this.#opts.keepAliveInterval;
    this.#shutdown(new NatproxyError("REPORTER_UNREACHABLE", `nothing from ${this.#where} for ${ms} ms`));
  };

  readonly #onData = (chunk: Buffer): void => {
    if (this.#state === "closed") return;
    let frames: Buffer[];
    try {
      frames = this.#framer.push(chunk);
    } catch (err) {
      this.#shutdown(err as Error);
      return;
    }
    for (const frame of frames) {
      if (this.#socket.destroyed) return;
      let msg: DecodedStunMessage;
      try {
        msg = decodeMessage(frame);
      } catch (err) {
        this.#shutdown(err as Error);
        return;
      }
      this.#handle(msg);
    }
  };

  #handle(msg: DecodedStunMessage): void {
    this.#receiveIdleTimer?.refresh();
    if (msg.method === METHOD_BINDING && msg.class === "indication") {
      // Answered at once so the reporter, which closes silent peers, sees us alive.
      this.#write({ method: METHOD_BINDING, class: "indication", transactionId: msg.transactionId, attributes: [] });
    } else if (msg.class === "success" || msg.class === "error") {
      this.#handleResponse(msg);
    } else {
      log().trace(`ignored ${describeMessage(msg)} from ${this.#where}`);
    }
    if (this.#state !== "closed") this.emit("packet", msg);
  }

  #handleResponse(msg: DecodedStunMessage): void {
    const tid = msg.transactionId.toString("hex");
    if (!this.#pending.has(tid)) {
      log().debug(`${describeMessage(msg)} from ${this.#where} answers nothing we asked; ignored`);
      return;
    }
    clearTimeout(this.#pending.get(tid));
    this.#pending.delete(tid);
    if (msg.class === "error") {
      const ec = getAttribute(msg, "ERROR-CODE");
      const what = ec ? `${ec.code} ${ec.reason}` : "an error without ERROR-CODE";
      this.#shutdown(new NatproxyError("REPORTER_PROTOCOL", `${this.#where} answered the Binding request with ${what}`));
      return;
    }
    const mapped = mappedAddressOf(msg);
    if (mapped === undefined) {
      this.#shutdown(new NatproxyError("REPORTER_PROTOCOL", `${this.#where} answered without XOR-MAPPED-ADDRESS or MAPPED-ADDRESS`));
      return;
    }
    const current: HostPort = { host: unmapIPv4(mapped.address), port: mapped.port };
    if (tid === this.#firstRequest && this.#state === "connecting") {
      this.#publicAddress = current;
      this.#remoteSoftware = getAttribute(msg, "SOFTWARE")?.value;
      this.#becomeOpen();
      return;
    }
    const previous = this.#publicAddress;
    if (current.host !== previous.host || current.port !== previous.port) {
      this.#publicAddress = current;
      log().warn(`public address changed from ${formatHostPort(previous.host, previous.port)} to ${formatHostPort(current.host, current.port)}`);
      this.emit("mapping-changed", { ...current }, { ...previous });
    }
  }

  #becomeOpen(): void {
    this.#state = "open";
    clearTimeout(this.#startTimer);
    const interval = this.#opts.keepAliveInterval;
    this.#sendIdleTimer = setTimeout(this.#onSendIdle, interval);
    this.#receiveIdleTimer = setTimeout(this.#onReceiveIdle, SILENT_INTERVALS * interval);
    const pub = formatHostPort(this.#publicAddress.host, this.#publicAddress.port);
    log().info(`reporter ${this.#where} sees ${formatHostPort(this.#localAddress, this.#localPort)} as ${pub}`);
    const settle = this.#settle;
    this.#settle = undefined;
    settle?.resolve(this);
  }

  #sendRequest(first: boolean): string | undefined {
    const transactionId = newTransactionId();
    const tid = transactionId.toString("hex");
    const attributes: StunMessage["attributes"] = first ? [{ kind: "SOFTWARE", value: SOFTWARE }] : [];
    if (!this.#write({ method: METHOD_BINDING, class: "request", transactionId, attributes })) return undefined;
    this.#pending.set(tid, first ? undefined : setTimeout(this.#onRequestTimeout, this.#opts.timeout));
    return tid;
  }

  readonly #onRequestTimeout = (): void => {
    this.#shutdown(new NatproxyError("REPORTER_UNREACHABLE", `${this.#where} did not answer a Binding request within ${this.#opts.timeout} ms`));
  };

  #write(msg: StunMessage): boolean {
    if (this.#state === "closed" || this.#socket.destroyed) return false;
    this.#socket.write(encodeMessage(msg, { fingerprint: true }));
    this.#sendIdleTimer?.refresh();
    return true;
  }

  #shutdown(reason: Error | undefined): void {
    if (this.#state === "closed") return;
    const wasOpen = this.#state === "open";
    this.#state = "closed";
    clearTimeout(this.#startTimer);
    clearTimeout(this.#sendIdleTimer);
    clearTimeout(this.#receiveIdleTimer);
    for (const t of this.#pending.values()) clearTimeout(t);
    this.#pending.clear();
    // A reset, not a FIN: the 4-tuple P -> reporter is free again at once, so
    // the start-up workflow can reconnect from P. After a FIN the kernel keeps
    // it (FIN_WAIT, TIME_WAIT) for a minute or more, and every reconnect from P
    // fails with EADDRNOTAVAIL, longest of all when the path is dead.
    if (this.#connected && !this.#socket.destroyed) this.#socket.resetAndDestroy();
    else this.#socket.destroy();
    const settle = this.#settle;
    this.#settle = undefined;
    if (settle) {
      settle.reject(reason ?? new NatproxyError("REPORTER_UNREACHABLE", `${this.#where}: closed before it answered`));
      return;
    }
    if (wasOpen) {
      if (reason) log().warn(`link to ${this.#where} closed: ${reason.message}`);
      else log().debug(`link to ${this.#where} closed`);
      this.emit("close", reason);
    }
  }
}
