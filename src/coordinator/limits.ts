import { NatproxyError } from "../errors.ts";

/**
 * Concurrent tunnels, in all and per token, over both paths. A slot is taken
 * before anything is dialled and given back exactly once, however the tunnel
 * ends, so one token (or one leaked credential) cannot take the whole box.
 * The same counting, with its own instance, bounds the ready connections
 * (upgraded, or connect-backs opened ahead of need) waiting for an Open.
 */
export class SessionLimits {
  #max: number;
  #perToken: number;
  readonly #what: string;
  readonly #byToken = new Map<number, number>();
  #total = 0;
  #started = 0;

  constructor(max: number, perToken: number, what = "tunnels") {
    this.#max = max;
    this.#perToken = perToken;
    this.#what = what;
  }

  /**
   * New limits for new slots (a configuration reload). Slots already given
   * out stay: a lower limit is reached as live tunnels end, none is cut.
   */
  setLimits(max: number, perToken: number): void {
    this.#max = max;
    this.#perToken = perToken;
  }

  get max(): number {
    return this.#max;
  }

  get active(): number {
    return this.#total;
  }

  /** Slots given out since start. */
  get started(): number {
    return this.#started;
  }

  /** A release function, or a TOO_MANY error that says which limit was hit. */
  acquire(token: number): () => void {
    const mine = this.#byToken.get(token) ?? 0;
    if (this.#total >= this.#max) throw new NatproxyError("TOO_MANY", `the coordinator carries its limit of ${this.#max} ${this.#what} ([coordinator] max_sessions)`);
    if (mine >= this.#perToken) throw new NatproxyError("TOO_MANY", `this token has its limit of ${this.#perToken} ${this.#what} open ([coordinator] max_sessions_per_token)`);
    this.#total++;
    this.#started++;
    this.#byToken.set(token, mine + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.#total--;
      const left = (this.#byToken.get(token) ?? 1) - 1;
      if (left === 0) this.#byToken.delete(token);
      else this.#byToken.set(token, left);
    };
  }
}
