import type { Duplex } from "node:stream";
import { NatproxyError, isErrorCode, type ErrorCode } from "../errors.ts";
import { parse as uuidParse, stringify as uuidStringify, validate as uuidValidate, version as uuidVersion } from "uuid";

// The one table of messages that travel inside a tunnel connection, before
// the payload. Every connection between the coordinator and the local proxy
// starts with exactly one of these, so the receiver knows what it is at once.
//
//   magic "NATP" (4) | version (1) | type (1) | payload length (2, big-endian) | payload
export const MAGIC = Buffer.from("NATP", "latin1");
export const WIRE_VERSION = 1;
export const HEADER_SIZE = 8;
export const MAX_PAYLOAD = 1024;
export const SESSION_MESSAGE_SIZE = HEADER_SIZE + 16;

export const MessageType = {
  /** Connect-back: payload is the 16-byte session id; target bytes follow. */
  Session: 1,
  /** Outbound tunnel, local -> coordinator: session id, target port, target host. */
  Open: 2,
  /** Outbound tunnel, coordinator -> local: the outcome of Open, as JSON. */
  Result: 3,
} as const;
export type MessageType = (typeof MessageType)[keyof typeof MessageType];

export interface WireMessage {
  type: MessageType;
  payload: Buffer;
}

export class WireError extends Error {
  readonly code: ErrorCode = "WIRE_PROTOCOL";
}

export function encodeMessage(type: MessageType, payload: Buffer): Buffer {
  if (payload.length > MAX_PAYLOAD) throw new WireError(`payload of ${payload.length} bytes exceeds ${MAX_PAYLOAD}`);
  const header = Buffer.alloc(HEADER_SIZE);
  MAGIC.copy(header, 0);
  header[4] = WIRE_VERSION;
  header[5] = type;
  header.writeUInt16BE(payload.length, 6);
  return Buffer.concat([header, payload]);
}

export function encodeSession(sessionId: string): Buffer {
  return encodeMessage(MessageType.Session, Buffer.from(uuidParse(sessionId)));
}

export interface OpenRequest {
  session: string;
  target: { host: string; port: number };
}

//   session id (16) | target port (2, big-endian) | target host (UTF-8, the rest)
export function encodeOpen(req: OpenRequest): Buffer {
  const host = Buffer.from(req.target.host, "utf8");
  if (host.length === 0 || host.length > 255) throw new WireError(`target host of ${host.length} bytes (1-255 allowed)`);
  const payload = Buffer.alloc(18 + host.length);
  Buffer.from(uuidParse(req.session)).copy(payload, 0);
  payload.writeUInt16BE(req.target.port, 16);
  host.copy(payload, 18);
  return encodeMessage(MessageType.Open, payload);
}

export function openOf(msg: WireMessage): OpenRequest {
  if (msg.type !== MessageType.Open || msg.payload.length < 19 || msg.payload.length > 18 + 255) throw new WireError("not an open message");
  const session = uuidStringify(msg.payload.subarray(0, 16));
  const port = msg.payload.readUInt16BE(16);
  const host = msg.payload.subarray(18).toString("utf8");
  return { session, target: { host, port } };
}

/** "OK" with the address the coordinator reached, or an error code and its message. */
export interface OpenResult {
  code: string;
  message?: string;
  target_address?: string;
}

export function encodeResult(result: OpenResult): Buffer {
  let payload = Buffer.from(JSON.stringify(result), "utf8");
  // A long error message is cut rather than failing the answer itself.
  if (payload.length > MAX_PAYLOAD) payload = Buffer.from(JSON.stringify({ ...result, message: result.message?.slice(0, 600) }), "utf8");
  return encodeMessage(MessageType.Result, payload);
}

export function resultOf(msg: WireMessage): OpenResult {
  if (msg.type !== MessageType.Result) throw new WireError("not a result message");
  let parsed: unknown;
  try {
    parsed = JSON.parse(msg.payload.toString("utf8"));
  } catch {
    throw new WireError("result message is not JSON");
  }
  const r = parsed as Partial<OpenResult> | null;
  if (!r || typeof r.code !== "string") throw new WireError("result message has no code");
  return { code: r.code, message: typeof r.message === "string" ? r.message : undefined, target_address: typeof r.target_address === "string" ? r.target_address : undefined };
}

export function isSessionId(text: unknown): text is string {
  return typeof text === "string" && uuidValidate(text) && uuidVersion(text) === 4;
}

export function sessionIdOf(msg: WireMessage): string {
  if (msg.type !== MessageType.Session || msg.payload.length !== 16) throw new WireError("not a session message");
  return uuidStringify(msg.payload);
}

/**
 * Decodes one message from the front of `buf`. Returns undefined while more
 * bytes are needed, and the unread rest once it has one.
 */
export function decodeMessage(buf: Buffer): { message: WireMessage; rest: Buffer } | undefined {
  const check = Math.min(buf.length, MAGIC.length);
  if (!buf.subarray(0, check).equals(MAGIC.subarray(0, check))) throw new WireError("the peer does not speak natproxy (bad magic)");
  if (buf.length < HEADER_SIZE) return undefined;
  if (buf[4] !== WIRE_VERSION) throw new WireError(`unsupported wire version ${buf[4]} (this build speaks ${WIRE_VERSION})`);
  const type = buf[5];
  if (!Object.values(MessageType).includes(type as MessageType)) throw new WireError(`unknown message type ${type}`);
  const length = buf.readUInt16BE(6);
  if (length > MAX_PAYLOAD) throw new WireError(`payload length ${length} exceeds ${MAX_PAYLOAD}`);
  if (buf.length < HEADER_SIZE + length) return undefined;
  return {
    message: { type: type as MessageType, payload: Buffer.from(buf.subarray(HEADER_SIZE, HEADER_SIZE + length)) },
    rest: buf.subarray(HEADER_SIZE + length),
  };
}

/**
 * Reads the front of a stream until `parse` finds a whole unit in what has
 * arrived, and puts back whatever followed it, so the caller can pipe the
 * stream from the next byte on. `parse` returns undefined while it needs more
 * and throws to refuse. It reads in paused mode ('readable' + read()): once
 * its listener is gone the stream is neither flowing nor explicitly paused,
 * so the next consumer's pipe() or 'data' listener starts it and no byte is
 * emitted to nobody. The caller owns timeouts and destroys the stream on
 * rejection.
 */
export function readFramed<T>(stream: Duplex, parse: (buf: Buffer) => { value: T; rest: Buffer } | undefined, closedEarly: () => Error): Promise<T> {
  return new Promise((resolve, reject) => {
    let buf: Buffer = Buffer.alloc(0);
    const cleanup = () => {
      stream.off("readable", onReadable);
      stream.off("end", onEnd);
      stream.off("error", onError);
      stream.off("close", onEnd);
    };
    const onReadable = () => {
      let chunk: Buffer | null;
      while ((chunk = stream.read() as Buffer | null) !== null) {
        buf = buf.length ? Buffer.concat([buf, chunk]) : chunk;
        let result;
        try {
          result = parse(buf);
        } catch (err) {
          cleanup();
          reject(err);
          return;
        }
        if (!result) continue;
        cleanup();
        if (result.rest.length) stream.unshift(result.rest);
        resolve(result.value);
        return;
      }
    };
    const onEnd = () => {
      cleanup();
      reject(closedEarly());
    };
    const onError = (err: Error) => {
      cleanup();
      reject(err);
    };
    stream.on("readable", onReadable);
    stream.on("end", onEnd);
    stream.on("close", onEnd);
    stream.on("error", onError);
  });
}

/** Reads the first natproxy message off a stream (see readFramed). */
export function readMessage(stream: Duplex): Promise<WireMessage> {
  return readFramed(
    stream,
    (buf) => {
      const r = decodeMessage(buf);
      return r && { value: r.message, rest: r.rest };
    },
    () => new WireError("the connection closed before its first message"),
  );
}

/**
 * Reads the coordinator's Result message (after an Open, or after the session
 * id on a connect-back); anything but OK becomes the error it names.
 */
export async function readResult(stream: Duplex): Promise<{ msg: WireMessage; result: OpenResult }> {
  const msg = await readMessage(stream);
  const result = resultOf(msg);
  if (result.code !== "OK") {
    const e = new NatproxyError(isErrorCode(result.code) ? result.code : "COORDINATOR_REFUSED");
    if (result.message) e.message = result.message;
    throw e;
  }
  return { msg, result };
}
