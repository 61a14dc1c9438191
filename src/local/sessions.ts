import type { TLSSocket } from "node:tls";
import { NatproxyError } from "../errors.ts";

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
