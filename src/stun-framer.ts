import { checkHeaderPrefix, HEADER_SIZE, MAX_MESSAGE_SIZE, StunError } from "./stun.ts";

/**
 * RFC 8489 §6.2.2: over TCP, messages follow each other with no other framing
 * than the header's length field. Feed it arbitrary chunks; it returns whole
 * messages and throws a StunError as soon as the bytes cannot be STUN or a
 * message would exceed `maxMessageSize`. After a throw it stays failed, since
 * the stream has no way to resynchronise.
 */
export class StunFramer {
  readonly maxMessageSize: number;
  #pending: Buffer = Buffer.alloc(0);
  #failed: StunError | undefined;

  constructor(maxMessageSize: number = MAX_MESSAGE_SIZE) {
    if (!Number.isInteger(maxMessageSize) || maxMessageSize < HEADER_SIZE) throw new RangeError(`maxMessageSize ${maxMessageSize} is below the header size`);
    this.maxMessageSize = maxMessageSize;
  }

  /** Bytes held while waiting for the rest of a message. */
  get buffered(): number {
    return this.#pending.length;
  }

  push(chunk: Buffer): Buffer[] {
    if (this.#failed) throw this.#failed;
    let buf = this.#pending.length === 0 ? chunk : Buffer.concat([this.#pending, chunk]);
    const out: Buffer[] = [];
    try {
      while (buf.length > 0) {
        checkHeaderPrefix(buf.subarray(0, HEADER_SIZE));
        if (buf.length < 4) break;
        const total = HEADER_SIZE + buf.readUInt16BE(2);
        if (total > this.maxMessageSize) throw new StunError(`message of ${total} bytes exceeds the limit of ${this.maxMessageSize}`);
        if (buf.length < total) break;
        out.push(Buffer.from(buf.subarray(0, total)));
        buf = buf.subarray(total);
      }
    } catch (err) {
      this.#pending = Buffer.alloc(0);
      this.#failed = err as StunError;
      throw err;
    }
    // Copy so a partial message does not pin a large chunk in memory.
    this.#pending = Buffer.from(buf);
    return out;
  }
}
