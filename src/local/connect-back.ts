import type { TLSSocket } from "node:tls";
import { v4 as uuidv4 } from "uuid";
import { formatHostPort, type HostPort } from "../address.ts";
import { NatproxyError } from "../errors.ts";
import type { SocketRegistry } from "../sockets.ts";
import { HEADER_SIZE, SESSION_MESSAGE_SIZE } from "../wire.ts";
import type { CoordinatorClient } from "./coordinator-client.ts";
import type { EarlyBytes } from "./early-bytes.ts";
import { readResult, type OutboundTunnel } from "./outbound.ts";
import type { ReadyDialer } from "./ready-pool.ts";
import type { SessionTable } from "./sessions.ts";
import type { TunnelState } from "./tunnel-service.ts";

export interface ConnectBackOptions {
  sessions: SessionTable;
  coordinator: CoordinatorClient;
  tunnelState: () => TunnelState | undefined;
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
  async upgrade(): Promise<OutboundTunnel> {
    const socket = await this.#arrival((ready, reply, signal) => this.#opts.coordinator.ready({ ready, reply }, signal));
    return { socket, overhead: SESSION_MESSAGE_SIZE, sentOverhead: 0 };
  }

  /**
   * The specification's normal workflow for one session: a fresh id in the
   * table, the request to the coordinator, then wait for its connect-back
   * carrying that id. The first of "connect-back arrived", "the coordinator
   * answered with an error" and "connect_timeout passed" decides; once the
   * connect-back is here, its Result message says whether the target
   * answered. Early bytes (an optimistic CONNECT) go as soon as it is here:
   * the coordinator reads nothing from it before the target is connected.
   */
  async open(session: string, target: HostPort, signal?: AbortSignal, early?: EarlyBytes): Promise<OutboundTunnel> {
    const socket = await this.#arrival((id, reply, abort) => this.#opts.coordinator.openSession({ session: id, target, reply }, abort), session, signal);
    early?.attach(socket);
    try {
      const result = await awaitResult(socket, this.#opts.connectTimeout, target, signal);
      return { socket, overhead: SESSION_MESSAGE_SIZE + result.size, sentOverhead: 0 };
    } catch (err) {
      early?.detach(socket);
      throw err;
    }
  }

  /** Asks the coordinator for a connect-back carrying `id` and waits for it. */
  async #arrival(ask: (id: string, reply: HostPort, signal: AbortSignal) => Promise<void>, id = uuidv4(), signal?: AbortSignal): Promise<TLSSocket> {
    const { sessions, sockets, connectTimeout } = this.#opts;
    const state = this.#opts.tunnelState();
    if (!state) throw new NatproxyError("TUNNEL_NOT_READY");
    const arrival = sessions.expect(id, connectTimeout);
    const abort = new AbortController();
    const onCallerAbort = () => sessions.fail(id, new NatproxyError("BAD_REQUEST", "the browser went away"));
    signal?.addEventListener("abort", onCallerAbort, { once: true });
    ask(id, state.publicAddress, abort.signal).catch((err: Error) => sessions.fail(id, err));
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

/** The coordinator's word on the target, which follows the session id on a connect-back. */
async function awaitResult(socket: TLSSocket, timeout: number, target: HostPort, signal?: AbortSignal): Promise<{ size: number }> {
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    socket.destroy();
  }, timeout);
  const onAbort = () => socket.destroy();
  signal?.addEventListener("abort", onAbort, { once: true });
  try {
    const { msg } = await readResult(socket);
    return { size: HEADER_SIZE + msg.payload.length };
  } catch (err) {
    socket.destroy();
    if (timedOut) throw new NatproxyError("TARGET_TIMEOUT", `${formatHostPort(target.host, target.port)}: the coordinator had no answer from it within ${timeout} ms`);
    if (err instanceof NatproxyError) throw err;
    if (signal?.aborted) throw new NatproxyError("BAD_REQUEST", "the browser went away");
    throw new NatproxyError("COORDINATOR_REFUSED", `connect-back: ${(err as Error).message}`);
  } finally {
    clearTimeout(timer);
    signal?.removeEventListener("abort", onAbort);
  }
}
