import type net from "node:net";
import type { ConsolaInstance } from "consola";
import { unmapIPv4 } from "../../address.ts";

// Coordinators connect back from an address each (README, "Scaling"); a
// long-lived proxy keeps the most recent ones, not every one it ever saw.
const KNOWN_MAX = 64;

type Source = "coordinator" | "other";

/**
 * Who gets a TLS handshake on the tunnel port. P is reachable from the whole
 * internet through P′, and every connection there makes the local proxy a
 * TLS client until the session id arrives, so:
 *
 * - An address is the coordinator's once a connect-back from it passed the
 *   certificate check and named a session we were waiting for (the probe's,
 *   at start). Each coordinator behind a balancer connects back from an
 *   address of its own, none of them the API's: every verified connect-back
 *   teaches one.
 * - From any other address a connection is reset at accept unless a
 *   connect-back is expected right now (some session waits for one), which
 *   is also how a coordinator not seen before gets in the first time.
 * - At most `max` connections wait for their session id at once from the
 *   coordinator's addresses, and as many from all others, so a flood from
 *   elsewhere never takes the coordinator's places. A new connection past
 *   that takes the place of the one that has waited longest: a connect-back
 *   needs its places for a few round trips, a flood's connections hold them
 *   until their deadline, so it is theirs that go. Reaching a limit is
 *   logged once, and again only after the count has fallen below half.
 */
export class TunnelPortGate {
  readonly #max: number;
  readonly #expecting: () => boolean;
  readonly #log: ConsolaInstance;
  /** Insertion order is age, here and in #waiting: the first is the oldest. */
  readonly #known = new Map<string, true>();
  readonly #waiting: Record<Source, Set<net.Socket>> = { coordinator: new Set(), other: new Set() };
  readonly #full: Record<Source, boolean> = { coordinator: false, other: false };

  constructor(opts: { max: number; expecting: () => boolean; log: ConsolaInstance }) {
    this.#max = opts.max;
    this.#expecting = opts.expecting;
    this.#log = opts.log;
  }

  /**
   * Undefined: the connection was reset. Otherwise it holds a place until it
   * closes, is pushed out, or `matched()` says it delivered its session.
   */
  admit(raw: net.Socket): { matched(): void } | undefined {
    const address = unmapIPv4(raw.remoteAddress ?? "");
    const source: Source = this.#known.has(address) ? "coordinator" : "other";
    if (source === "other" && !this.#expecting()) {
      reset(raw);
      return undefined;
    }
    const waiting = this.#waiting[source];
    if (waiting.size >= this.#max) {
      if (!this.#full[source]) {
        this.#full[source] = true;
        const whose = source === "coordinator" ? "the coordinator's addresses" : "addresses other than the coordinator's";
        this.#log.warn(`tunnel port: ${this.#max} connections from ${whose} are waiting for their session id ([local] max_tunnel_handshakes); each new one now resets the one that has waited longest`);
      }
      const oldest = waiting.values().next().value as net.Socket;
      waiting.delete(oldest);
      reset(oldest);
    }
    waiting.add(raw);
    const release = () => {
      if (!waiting.delete(raw)) return;
      if (waiting.size < this.#max / 2) this.#full[source] = false;
    };
    raw.once("close", release);
    return {
      matched: () => {
        release();
        this.#learn(address);
      },
    };
  }

  #learn(address: string): void {
    if (!this.#known.delete(address)) this.#log.info(`tunnel port: a verified connect-back came from ${address}; it is taken as a coordinator's address`);
    this.#known.set(address, true);
    if (this.#known.size > KNOWN_MAX) this.#known.delete(this.#known.keys().next().value as string);
  }
}

// A reset, not a FIN: nothing lingers in TIME_WAIT on our side, and a
// coordinator turned away learns it at once.
function reset(raw: net.Socket): void {
  raw.on("error", () => {});
  try {
    raw.resetAndDestroy();
  } catch {
    // It refuses a handle that is not TCP; a plain close will do then.
    raw.destroy();
  }
}
