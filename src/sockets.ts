import { STATUS_CODES, type Agent } from "node:http";
import type { Duplex } from "node:stream";

/**
 * Every live socket a role owns, so close() can end them all and tests can
 * check that nothing leaked.
 */
export class SocketRegistry {
  readonly #live = new Set<Duplex>();
  readonly #emptyWaiters = new Set<() => void>();

  add<T extends Duplex>(socket: T): T {
    if (socket.destroyed) return socket;
    this.#live.add(socket);
    socket.once("close", () => {
      this.#live.delete(socket);
      if (this.#live.size === 0) for (const w of this.#emptyWaiters) w();
    });
    return socket;
  }

  /** Resolves once no socket is left, or after `ms`, whichever comes first; true if empty. */
  whenEmpty(ms: number): Promise<boolean> {
    if (this.#live.size === 0) return Promise.resolve(true);
    return new Promise((resolve) => {
      const done = (empty: boolean) => {
        clearTimeout(timer);
        this.#emptyWaiters.delete(onEmpty);
        resolve(empty);
      };
      const onEmpty = () => done(true);
      const timer = setTimeout(() => done(false), ms);
      this.#emptyWaiters.add(onEmpty);
    });
  }

  get size(): number {
    return this.#live.size;
  }

  destroyAll(): void {
    for (const s of this.#live) s.destroy();
    this.#live.clear();
  }
}

/**
 * Writes a last answer and closes, whatever the peer does. Used where nothing
 * reads the socket any more (a refused CONNECT or Upgrade): a peer that keeps
 * sending, and never closes its side, must not hold it half-open forever.
 * The rest of its input is discarded.
 */
export function closeWith(socket: Duplex, last: Buffer | string): void {
  socket.resume();
  socket.write(last);
  const s = socket as Duplex & { destroySoon?: () => void };
  if (typeof s.destroySoon === "function") s.destroySoon();
  else socket.end(() => socket.destroy());
}

/** Closes a keep-alive agent's idle connections, leaving those in use alone. */
export function destroyIdleSockets(agent: Agent): void {
  for (const list of Object.values(agent.freeSockets)) for (const socket of list ?? []) socket.destroy();
}

/**
 * Answers a socket that has left HTTP (a refused CONNECT or Upgrade) with a
 * whole response, Content-Length and Connection: close included, and closes it.
 */
export function closeWithResponse(socket: Duplex, status: number, headers: Record<string, string>, body: string): void {
  const all = { ...headers, "Content-Length": String(Buffer.byteLength(body)), Connection: "close" };
  const head = `HTTP/1.1 ${status} ${STATUS_CODES[status] ?? "Error"}\r\n${Object.entries(all)
    .map(([k, v]) => `${k}: ${v}\r\n`)
    .join("")}\r\n`;
  closeWith(socket, head + body);
}
