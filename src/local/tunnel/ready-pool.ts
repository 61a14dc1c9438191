import type tls from "node:tls";
import type { HostPort } from "../../address.ts";
import { NatproxyError } from "../../errors.ts";
import { encodeOpen, readResult } from "../../protocol/wire.ts";
import { hedge } from "../../hedge.ts";
import type { EarlyBytes } from "./early-bytes.ts";

/** A connection a dialer made, on either path, with the bytes its set-up cost (for the session's byte counts). */
export interface DialedConnection {
  socket: tls.TLSSocket;
  /** Cleartext bytes read before the first target byte (101 head and Result). */
  overhead: number;
  /** Cleartext bytes written before the first byte for the target (request head and Open). */
  sentOverhead: number;
  targetAddress?: string;
}

/** How a pool gets its connections: outbound (OutboundDialer) or connect-back (ConnectBackDialer). */
export interface ReadyDialer {
  /** A connection that waits for an Open message. */
  upgrade(): Promise<DialedConnection>;
  /** A tunnel for one session, made from scratch (the pool's fallback). */
  open(session: string, target: HostPort, signal?: AbortSignal, early?: EarlyBytes): Promise<DialedConnection>;
}

interface Ready {
  socket: tls.TLSSocket;
  born: number;
  /** Cleartext bytes of the Upgrade exchange (or the connect-back's id), for the session's byte counts. */
  headSent: number;
  headRead: number;
  timer: NodeJS.Timeout;
  onClose: () => void;
}

export interface PoolOptions {
  /** Upgraded connections kept ready; 0 turns the pool off. */
  size: number;
  /** A ready connection older than this is closed (the coordinator drops idle ones too). */
  maxAge: number;
  /** A pooled connection whose Result is this late gets a fresh dial beside it. */
  grace: number;
  /** A connection that could not be made ready (for connect-backs: a sign the path stopped working). */
  onFillError?: (err: unknown) => void;
}

/**
 * A few tunnel connections kept ready, waiting for an Open: outbound ones
 * already TLS'd, authenticated and upgraded, or connect-backs the coordinator
 * opened ahead of need. A browser connection then costs one round trip
 * (Open -> Result) instead of TCP + TLS + Upgrade, or instead of an API call,
 * the coordinator's TCP connect and a TLS handshake through the NAT. Filled
 * on demand: an idle proxy holds nothing for long. A pooled connection may have died silently (a NAT that
 * forgot it): if its Result is late, a fresh dial runs beside it (or in its
 * place, when the caller allows one attempt) and the first tunnel up wins.
 */
export class ReadyPool {
  readonly #dialer: ReadyDialer;
  readonly #opts: PoolOptions;
  readonly #ready: Ready[] = [];
  #filling = 0;
  #closed = false;
  /** Tunnels served from the pool (for tests and diagnostics). */
  hits = 0;

  constructor(dialer: ReadyDialer, opts: PoolOptions) {
    this.#dialer = dialer;
    this.#opts = opts;
  }

  get size(): number {
    return this.#ready.length;
  }

  /**
   * A tunnel for one session. `attempts` is how many connection attempts it
   * may have in flight at once (see the tunnel opener): with 2, a fresh dial
   * runs beside a pooled connection whose Result is late; with 1, it takes
   * that connection's place.
   */
  async open(session: string, target: HostPort, signal?: AbortSignal, early?: EarlyBytes, attempts: 1 | 2 = 2): Promise<DialedConnection> {
    const ready = this.#take();
    this.#fill();
    if (!ready) return this.#dialer.open(session, target, signal, early);
    return hedge({
      primary: (s) => this.#ask(ready, session, target, s, early),
      secondary: (s) => this.#dialer.open(session, target, s, early),
      delay: this.#opts.grace,
      attempts,
      // The target's own answer (refused, forbidden...) is the answer; a
      // dead pooled connection is not: dial afresh at once.
      fixable: (err) => !(err instanceof NatproxyError),
      // The fresh dial is the ground truth: if it cannot reach the
      // coordinator, a pooled connection that has not answered by now will
      // not either.
      secondaryFinal: true,
      discard: (t) => {
        early?.detach(t.socket);
        t.socket.destroy();
      },
      signal,
    });
  }

  /**
   * Sends the Open on a ready connection and waits for its Result. The
   * winner stays attached to `early` until the caller stops it, so no browser
   * byte can fall between the Result and the bridge.
   */
  #ask(ready: Ready, session: string, target: HostPort, signal: AbortSignal, early?: EarlyBytes): Promise<DialedConnection> {
    return new Promise((resolve, reject) => {
      const fail = (err: unknown) => {
        signal.removeEventListener("abort", onAbort);
        early?.detach(ready.socket);
        ready.socket.destroy();
        reject(err);
      };
      const onAbort = () => fail(signal.reason instanceof NatproxyError ? signal.reason : new NatproxyError("CLIENT_GONE", "the browser went away"));
      if (signal.aborted) return onAbort();
      signal.addEventListener("abort", onAbort, { once: true });
      const open = encodeOpen({ session, target });
      ready.socket.write(open);
      early?.attach(ready.socket);
      readResult(ready.socket).then(({ msg }) => {
        signal.removeEventListener("abort", onAbort);
        this.hits++;
        resolve({ socket: ready.socket, overhead: ready.headRead + 8 + msg.payload.length, sentOverhead: ready.headSent + open.length });
      }, fail);
    });
  }

  /** Closes every ready connection (the network changed, or shutting down). */
  flush(): void {
    for (const r of this.#ready.splice(0)) {
      clearTimeout(r.timer);
      r.socket.destroy();
    }
  }

  close(): void {
    this.#closed = true;
    this.flush();
  }

  #take(): Ready | undefined {
    while (this.#ready.length) {
      const r = this.#ready.pop() as Ready;
      clearTimeout(r.timer);
      r.socket.off("close", r.onClose);
      r.socket.off("end", r.onClose);
      // Back to paused mode: the Result is read with read(), then piped.
      r.socket.pause();
      if (!r.socket.destroyed && !r.socket.readableEnded && performance.now() - r.born < this.#opts.maxAge) return r;
      r.socket.destroy();
    }
    return undefined;
  }

  #fill(): void {
    while (!this.#closed && this.#ready.length + this.#filling < this.#opts.size) {
      this.#filling++;
      this.#dialer.upgrade().then(
        (t) => {
          this.#filling--;
          if (this.#closed) {
            t.socket.destroy();
            return;
          }
          const r: Ready = {
            socket: t.socket,
            born: performance.now(),
            headSent: t.sentOverhead,
            headRead: t.overhead,
            timer: setTimeout(() => this.#drop(r), this.#opts.maxAge),
            onClose: () => this.#drop(r),
          };
          // Flowing while it waits, so that the coordinator closing it (a FIN,
          // with half-open sockets) is seen at once and not only when taken.
          t.socket.once("close", r.onClose);
          t.socket.once("end", r.onClose);
          t.socket.resume();
          this.#ready.push(r);
        },
        // A failed fill is not retried here: the next browser connection
        // dials afresh anyway, and tries to fill again.
        (err: unknown) => {
          this.#filling--;
          if (!this.#closed) this.#opts.onFillError?.(err);
        },
      );
    }
  }

  #drop(r: Ready): void {
    clearTimeout(r.timer);
    const k = this.#ready.indexOf(r);
    if (k >= 0) this.#ready.splice(k, 1);
    r.socket.destroy();
  }
}
