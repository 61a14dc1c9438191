import type { Duplex } from "node:stream";

/**
 * What a browser sends after an optimistic `200` and before its tunnel has the
 * coordinator's Result: usually just the TLS ClientHello. The bytes go to
 * every tunnel connection still in the race as they arrive (so the
 * ClientHello travels with the Open, not a round trip later), and are kept,
 * so a connection that joins the race late (a fresh dial beside a pooled
 * connection that died silently) gets them all from the start.
 */
export class EarlyBytes {
  readonly #source: Duplex;
  readonly #limit: number;
  readonly #chunks: Buffer[] = [];
  readonly #sinks = new Set<Duplex>();
  #size = 0;
  #stopped = false;

  /** Past `limit` bytes the browser is paused until the tunnel is up: what is kept for replay stays bounded. */
  constructor(source: Duplex, limit: number, head: Buffer) {
    this.#source = source;
    this.#limit = limit;
    if (head.length) this.#keep(head);
    source.on("data", this.#onData);
  }

  /** Bytes taken from the browser so far (they count as sent up). */
  get size(): number {
    return this.#size;
  }

  /** Sends `sink` everything kept so far, then what follows as it arrives. */
  attach(sink: Duplex): void {
    if (this.#stopped || sink.destroyed) return;
    for (const c of this.#chunks) sink.write(c);
    this.#sinks.add(sink);
  }

  detach(sink: Duplex): void {
    this.#sinks.delete(sink);
  }

  /**
   * Ends the collecting; the winning connection has had every byte, and the
   * browser socket is left paused for the bridge to pipe from here.
   */
  stop(): void {
    if (this.#stopped) return;
    this.#stopped = true;
    this.#source.off("data", this.#onData);
    this.#source.pause();
    this.#sinks.clear();
    this.#chunks.length = 0;
  }

  readonly #onData = (chunk: Buffer): void => {
    this.#keep(chunk);
    for (const s of this.#sinks) if (!s.destroyed) s.write(chunk);
  };

  #keep(chunk: Buffer): void {
    this.#chunks.push(chunk);
    this.#size += chunk.length;
    if (this.#size >= this.#limit) this.#source.pause();
  }
}
