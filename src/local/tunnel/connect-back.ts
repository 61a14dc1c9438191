import type net from "node:net";
import tls, { type TLSSocket } from "node:tls";
import type { ConsolaInstance } from "consola";
import { v4 as uuidv4 } from "uuid";
import { formatHostPort, type HostPort } from "../../address.ts";
import { NatproxyError } from "../../errors.ts";
import { HEADER_SIZE, readMessage, readResult, SESSION_MESSAGE_SIZE, sessionIdOf } from "../../protocol/wire.ts";
import type { SocketRegistry } from "../../sockets.ts";
import { tlsClientOptions, verifyPeer, type Trust } from "../../tls/trust.ts";
import type { CoordinatorClient } from "../coordinator/client.ts";
import type { NatMapping } from "../nat/mapping-service.ts";
import type { EarlyBytes } from "./early-bytes.ts";
import type { DialedConnection, ReadyDialer } from "./ready-pool.ts";

// The connect-back path on the local side, all of it: the request to the
// coordinator (ConnectBackDialer), the table of sessions waiting for their
// connect-back (SessionTable), the acceptor on the tunnel port P that matches
// an arriving connection to its session (acceptConnectBack), and the wait for
// the coordinator's Result that follows the session id (awaitResult).

export interface ConnectBackOptions {
  sessions: SessionTable;
  coordinator: CoordinatorClient;
  mapping: () => NatMapping | undefined;
  connectTimeout: number;
  sockets: SocketRegistry;
}

/**
 * Connect-backs, both ways the coordinator opens them: for one session (the
 * specification's workflow), or ahead of need, to wait in a ReadyPool for an
 * Open naming the target.
 */
export class ConnectBackDialer implements ReadyDialer {
  readonly #opts: ConnectBackOptions;

  constructor(opts: ConnectBackOptions) {
    this.#opts = opts;
  }

  /** A connect-back carrying a fresh id and nothing else; it waits for our Open. */
  async upgrade(): Promise<DialedConnection> {
    const socket = await this.#arrival((ready, reply, signal) => this.#opts.coordinator.ready({ ready, reply }, signal));
    return { socket, overhead: SESSION_MESSAGE_SIZE, sentOverhead: 0 };
  }

  /**
   * The specification's normal workflow for one session: a fresh id in the
   * table, the request to the coordinator, then wait for its connect-back
   * carrying that id. The first of "connect-back arrived", "the coordinator
   * answered with an error" and "connect_timeout passed" decides; once the
   * connect-back is here, its Result message says whether the target
   * answered, within what is left of connect_timeout: the browser waits for
   * one deadline, not one per step. Early bytes (an optimistic CONNECT) go as
   * soon as it is here: the coordinator reads nothing from it before the
   * target is connected.
   */
  async open(session: string, target: HostPort, signal?: AbortSignal, early?: EarlyBytes): Promise<DialedConnection> {
    const deadline = performance.now() + this.#opts.connectTimeout;
    const socket = await this.#arrival((id, reply, abort) => this.#opts.coordinator.openSession({ session: id, target, reply }, abort), session, signal);
    early?.attach(socket);
    try {
      const result = await awaitResult(socket, deadline, this.#opts.connectTimeout, target, signal);
      return { socket, overhead: SESSION_MESSAGE_SIZE + result.size, sentOverhead: 0 };
    } catch (err) {
      early?.detach(socket);
      throw err;
    }
  }

  /** Asks the coordinator for a connect-back carrying `id` and waits for it. */
  async #arrival(ask: (id: string, reply: HostPort, signal: AbortSignal) => Promise<void>, id = uuidv4(), signal?: AbortSignal): Promise<TLSSocket> {
    const { sessions, sockets, connectTimeout } = this.#opts;
    const state = this.#opts.mapping();
    if (!state) throw new NatproxyError("TUNNEL_NOT_READY");
    const arrival = sessions.expect(id, connectTimeout);
    const abort = new AbortController();
    const onCallerAbort = () => sessions.fail(id, new NatproxyError("CLIENT_GONE", "the browser went away"));
    signal?.addEventListener("abort", onCallerAbort, { once: true });
    // The API call is part of the same attempt: a coordinator that connected
    // back but never answers it does not hold the request (and its
    // connection) past the attempt's deadline.
    const cut = setTimeout(() => abort.abort(new NatproxyError("COORDINATOR_UNREACHABLE", `no answer to the API call within ${connectTimeout} ms`)), connectTimeout);
    ask(id, state.publicAddress, abort.signal)
      .catch((err: Error) => sessions.fail(id, err))
      .finally(() => clearTimeout(cut));
    try {
      const socket = sockets.add(await arrival);
      socket.on("error", () => {});
      return socket;
    } catch (err) {
      // Ends the API call if it is still waiting (timeout or browser gone).
      // On success it is left to finish: aborting it would cost the API's
      // keep-alive connection.
      abort.abort(err);
      throw err;
    } finally {
      signal?.removeEventListener("abort", onCallerAbort);
    }
  }
}

/**
 * The coordinator's word on the target, which follows the session id on a
 * connect-back; due by `deadline` (a performance.now() time), the end of the
 * attempt's `budget` ms.
 */
async function awaitResult(socket: TLSSocket, deadline: number, budget: number, target: HostPort, signal?: AbortSignal): Promise<{ size: number }> {
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    socket.destroy();
  }, Math.max(0, deadline - performance.now()));
  const onAbort = () => socket.destroy();
  signal?.addEventListener("abort", onAbort, { once: true });
  try {
    const { msg } = await readResult(socket);
    return { size: HEADER_SIZE + msg.payload.length };
  } catch (err) {
    socket.destroy();
    if (timedOut) throw new NatproxyError("TARGET_TIMEOUT", `${formatHostPort(target.host, target.port)}: the coordinator had no answer from it within ${budget} ms`);
    if (err instanceof NatproxyError) throw err;
    if (signal?.aborted) throw new NatproxyError("CLIENT_GONE", "the browser went away");
    throw new NatproxyError("COORDINATOR_REFUSED", `connect-back: ${(err as Error).message}`);
  } finally {
    clearTimeout(timer);
    signal?.removeEventListener("abort", onAbort);
  }
}

/**
 * The tunnel port's acceptor: the coordinator connects back to P' and is the
 * TLS server on that connection, so we verify the same certificate we trust
 * on the HTTPS API; the first message names the session the connection is
 * for. Anything else (a scanner, a stale connect-back, a peer that says
 * nothing or trickles its bytes) is dropped `timeout` after accept.
 * `matched` hears of a connection that delivered its session.
 */
export function acceptConnectBack(
  raw: net.Socket,
  opts: { trust: Trust; sessions: SessionTable; sockets: SocketRegistry; timeout: number; log: ConsolaInstance; matched?: () => void },
): void {
  const { trust, sessions, sockets, log } = opts;
  sockets.add(raw);
  raw.on("error", () => {});
  const peer = formatHostPort(raw.remoteAddress ?? "?", raw.remotePort ?? 0);
  // The TLS socket takes allowHalfOpen from `raw` (the listener's option).
  const secure = tls.connect({ socket: raw, ...tlsClientOptions(trust) });
  sockets.add(secure);
  const drop = (why: string) => {
    log.debug(`tunnel port: dropped connection from ${peer}: ${why}`);
    secure.destroy();
    raw.destroy();
  };
  // An absolute deadline from accept to the session id, however the peer
  // paces its bytes: an idle timer would restart on each one.
  const deadline = setTimeout(() => drop(`no session id within ${opts.timeout} ms`), opts.timeout);
  raw.once("close", () => clearTimeout(deadline));
  secure.on("error", (err: NodeJS.ErrnoException) => drop(`TLS: ${err.code ?? err.message}`));
  secure.once("secureConnect", () => {
    const refused = verifyPeer(secure, trust);
    if (refused) {
      log.warn(`tunnel port: refused a connect-back from ${peer}: ${refused.message}`);
      drop(refused.code);
      return;
    }
    readMessage(secure)
      .then((msg) => {
        // Throws for any other message type or size: dropped below.
        const id = sessionIdOf(msg);
        if (!sessions.deliver(id, secure)) return drop(`unknown or expired session ${id}`);
        clearTimeout(deadline);
        opts.matched?.();
      })
      .catch((err: Error) => drop(err.message));
  });
}

interface Pending {
  resolve(socket: TLSSocket): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout;
}

/**
 * Sessions waiting for their connect-back: id -> the browser side's promise.
 * An entry leaves the table exactly once: delivered, failed, or timed out.
 */
export class SessionTable {
  readonly #pending = new Map<string, Pending>();

  /** Resolves with the connect-back socket for `id`, or rejects after `timeout` ms. */
  expect(id: string, timeout: number): Promise<TLSSocket> {
    if (this.#pending.has(id)) return Promise.reject(new NatproxyError("INTERNAL", `session ${id} exists`));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new NatproxyError("CONNECT_BACK_TIMEOUT", `session ${id}: nothing arrived within ${timeout} ms`));
      }, timeout);
      this.#pending.set(id, { resolve, reject, timer });
    });
  }

  /** Hands a connect-back to its waiting session; false if nobody waits for it. */
  deliver(id: string, socket: TLSSocket): boolean {
    const p = this.#pending.get(id);
    if (!p) return false;
    this.#pending.delete(id);
    clearTimeout(p.timer);
    p.resolve(socket);
    return true;
  }

  fail(id: string, err: Error): void {
    const p = this.#pending.get(id);
    if (!p) return;
    this.#pending.delete(id);
    clearTimeout(p.timer);
    p.reject(err);
  }

  failAll(err: Error): void {
    for (const id of [...this.#pending.keys()]) this.fail(id, err);
  }

  has(id: string): boolean {
    return this.#pending.has(id);
  }

  get size(): number {
    return this.#pending.size;
  }
}
