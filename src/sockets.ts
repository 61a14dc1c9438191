import type { Duplex } from "node:stream";

/**
 * Every live socket a role owns, so close() can end them all and tests can
 * check that nothing leaked.
 */
export class SocketRegistry {
  readonly #live = new Set<Duplex>();

  add<T extends Duplex>(socket: T): T {
    if (socket.destroyed) return socket;
    this.#live.add(socket);
    socket.once("close", () => this.#live.delete(socket));
    return socket;
  }

  get size(): number {
    return this.#live.size;
  }

  destroyAll(): void {
    for (const s of this.#live) s.destroy();
    this.#live.clear();
  }
}
