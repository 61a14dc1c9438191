import { randomBytes } from "node:crypto";
import { crc32 } from "node:zlib";
import { bytesToIp, ipToBytes } from "./address.ts";
import { NatproxyError } from "./errors.ts";

// STUN (RFC 8489) as the reporter link uses it: Binding over TCP (framed by
// stun-framer.ts). The decoder is strict because everything it reads comes
// from an untrusted peer; every refusal is a StunError whose detail names the
// offending field.

export const MAGIC_COOKIE = 0x2112a442;
export const HEADER_SIZE = 20;
/** Largest message the framer accepts by default: Binding needs about 100 bytes. */
export const MAX_MESSAGE_SIZE = 2048;
export const METHOD_BINDING = 0x001;

export const ATTR = {
  MAPPED_ADDRESS: 0x0001,
  USERNAME: 0x0006,
  MESSAGE_INTEGRITY: 0x0008,
  ERROR_CODE: 0x0009,
  UNKNOWN_ATTRIBUTES: 0x000a,
  XOR_MAPPED_ADDRESS: 0x0020,
  SOFTWARE: 0x8022,
  FINGERPRINT: 0x8028,
} as const;

const FINGERPRINT_XOR = 0x5354554e;
// RFC 8489 §14.3/§14.8/§14.14: at most 763 bytes for USERNAME (513),
// SOFTWARE and the ERROR-CODE reason phrase.
const MAX_TEXT_BYTES = 763;
const MAX_USERNAME_BYTES = 513;

export type StunClass = "request" | "indication" | "success" | "error";
const CLASS_BITS: Record<StunClass, number> = { request: 0, indication: 1, success: 2, error: 3 };
const CLASS_NAMES: StunClass[] = ["request", "indication", "success", "error"];

export interface StunAddress {
  family: "IPv4" | "IPv6";
  address: string;
  port: number;
}

export type StunAttribute =
  | { kind: "XOR-MAPPED-ADDRESS"; address: StunAddress }
  | { kind: "MAPPED-ADDRESS"; address: StunAddress }
  | { kind: "SOFTWARE"; value: string }
  | { kind: "USERNAME"; value: string }
  | { kind: "ERROR-CODE"; code: number; reason: string }
  | { kind: "UNKNOWN-ATTRIBUTES"; types: number[] }
  /** Only produced by the decoder. natproxy uses no STUN credentials: it neither checks nor sends one. */
  | { kind: "MESSAGE-INTEGRITY"; value: Buffer }
  /** Only produced by the decoder; encodeMessage computes it when `fingerprint` is set. */
  | { kind: "FINGERPRINT"; value: number }
  | { kind: "raw"; type: number; value: Buffer };

export type StunAttributeKind = StunAttribute["kind"];

export interface StunMessage {
  method: number;
  class: StunClass;
  /** 12 bytes. */
  transactionId: Buffer;
  attributes: StunAttribute[];
}

export interface DecodedStunMessage extends StunMessage {
  /** The bytes the message was decoded from. */
  raw: Buffer;
}

export interface EncodeOptions {
  /** Adds FINGERPRINT as the last attribute. */
  fingerprint?: boolean;
  /** Value of padding bytes; RFC 8489 says any, 0 is usual (RFC 5769's vectors use 0x20). */
  padding?: number;
}

export class StunError extends NatproxyError {
  /** What is wrong, without the generic prefix of the error code. */
  readonly detail: string;
  constructor(detail: string) {
    super("REPORTER_PROTOCOL", detail);
    this.name = "StunError";
    this.detail = detail;
  }
}

export function newTransactionId(): Buffer {
  return randomBytes(12);
}

export function messageType(method: number, cls: StunClass): number {
  if (!Number.isInteger(method) || method < 0 || method > 0xfff) throw new RangeError(`STUN method ${method} is not 12 bits`);
  const c = CLASS_BITS[cls];
  return ((method & 0xf80) << 2) | ((method & 0x070) << 1) | (method & 0x00f) | ((c & 2) << 7) | ((c & 1) << 4);
}

export function splitMessageType(type: number): { method: number; class: StunClass } {
  const method = ((type & 0x3e00) >> 2) | ((type & 0x00e0) >> 1) | (type & 0x000f);
  const c = ((type & 0x0100) >> 7) | ((type & 0x0010) >> 4);
  return { method, class: CLASS_NAMES[c] };
}

export function attributeName(type: number): string {
  for (const [name, code] of Object.entries(ATTR)) if (code === type) return name.replace(/_/g, "-");
  return `0x${type.toString(16).padStart(4, "0")}`;
}

/** Types 0x0000-0x7FFF must be understood by the receiver (RFC 8489 §14). */
export function isComprehensionRequired(type: number): boolean {
  return type < 0x8000;
}

export function getAttribute<K extends StunAttributeKind>(msg: StunMessage, kind: K): Extract<StunAttribute, { kind: K }> | undefined {
  return msg.attributes.find((a) => a.kind === kind) as Extract<StunAttribute, { kind: K }> | undefined;
}

/** XOR-MAPPED-ADDRESS, or MAPPED-ADDRESS from an RFC 3489 server. */
export function mappedAddressOf(msg: StunMessage): StunAddress | undefined {
  return getAttribute(msg, "XOR-MAPPED-ADDRESS")?.address ?? getAttribute(msg, "MAPPED-ADDRESS")?.address;
}

export function describeMessage(msg: StunMessage): string {
  const method = msg.method === METHOD_BINDING ? "Binding" : `method 0x${msg.method.toString(16)}`;
  return `${method} ${msg.class} ${msg.transactionId.toString("hex")}`;
}

// ---------------------------------------------------------------- encoding

export function encodeMessage(msg: StunMessage, opts: EncodeOptions = {}): Buffer {
  if (msg.transactionId.length !== 12) throw new RangeError(`transaction id must be 12 bytes, got ${msg.transactionId.length}`);
  const pad = opts.padding ?? 0;
  const parts: Buffer[] = [];
  for (const attr of msg.attributes) {
    if (attr.kind === "FINGERPRINT") throw new RangeError("FINGERPRINT is computed by encodeMessage; pass fingerprint: true instead");
    const [type, value] = encodeAttributeValue(attr, msg.transactionId);
    parts.push(tlv(type, value, pad));
  }
  let body = Buffer.concat(parts);
  const header = Buffer.alloc(HEADER_SIZE);
  header.writeUInt16BE(messageType(msg.method, msg.class), 0);
  header.writeUInt32BE(MAGIC_COOKIE, 4);
  msg.transactionId.copy(header, 8);

  if (opts.fingerprint) {
    header.writeUInt16BE(body.length + 8, 2);
    const crc = (crc32(body, crc32(header)) ^ FINGERPRINT_XOR) >>> 0;
    const value = Buffer.alloc(4);
    value.writeUInt32BE(crc, 0);
    body = Buffer.concat([body, tlv(ATTR.FINGERPRINT, value, pad)]);
  }
  header.writeUInt16BE(body.length, 2);
  if (body.length > 0xffff) throw new RangeError(`STUN message body of ${body.length} bytes does not fit the 16-bit length`);
  return Buffer.concat([header, body]);
}

function tlv(type: number, value: Buffer, pad: number): Buffer {
  const padded = (value.length + 3) & ~3;
  const out = Buffer.alloc(4 + padded, pad);
  out.writeUInt16BE(type, 0);
  out.writeUInt16BE(value.length, 2);
  value.copy(out, 4);
  return out;
}

function encodeAttributeValue(attr: StunAttribute, tid: Buffer): [number, Buffer] {
  switch (attr.kind) {
    case "XOR-MAPPED-ADDRESS":
      return [ATTR.XOR_MAPPED_ADDRESS, encodeAddress(attr.address, tid)];
    case "MAPPED-ADDRESS":
      return [ATTR.MAPPED_ADDRESS, encodeAddress(attr.address, undefined)];
    case "SOFTWARE":
      return [ATTR.SOFTWARE, textValue("SOFTWARE", attr.value, MAX_TEXT_BYTES)];
    case "USERNAME":
      return [ATTR.USERNAME, textValue("USERNAME", attr.value, MAX_USERNAME_BYTES)];
    case "ERROR-CODE": {
      if (!Number.isInteger(attr.code) || attr.code < 300 || attr.code > 699) throw new RangeError(`ERROR-CODE ${attr.code} is not 300-699`);
      const reason = textValue("ERROR-CODE reason", attr.reason, MAX_TEXT_BYTES);
      const v = Buffer.alloc(4 + reason.length);
      v[2] = Math.floor(attr.code / 100);
      v[3] = attr.code % 100;
      reason.copy(v, 4);
      return [ATTR.ERROR_CODE, v];
    }
    case "UNKNOWN-ATTRIBUTES": {
      const v = Buffer.alloc(attr.types.length * 2);
      attr.types.forEach((t, i) => v.writeUInt16BE(t, i * 2));
      return [ATTR.UNKNOWN_ATTRIBUTES, v];
    }
    case "raw":
      if (!Number.isInteger(attr.type) || attr.type < 0 || attr.type > 0xffff) throw new RangeError(`attribute type ${attr.type} is not 16 bits`);
      if (attr.value.length > 0xffff) throw new RangeError(`attribute 0x${attr.type.toString(16)} is too long`);
      return [attr.type, attr.value];
    default:
      throw new RangeError(`cannot encode ${attr.kind}`);
  }
}

function textValue(what: string, text: string, max: number): Buffer {
  const b = Buffer.from(text, "utf8");
  if (b.length > max) throw new RangeError(`${what} is ${b.length} bytes, at most ${max} allowed`);
  return b;
}

function encodeAddress(a: StunAddress, tid: Buffer | undefined): Buffer {
  if (!Number.isInteger(a.port) || a.port < 0 || a.port > 65535) throw new RangeError(`port ${a.port} is not 0-65535`);
  const ip = ipToBytes(a.address);
  if ((ip.length === 4) !== (a.family === "IPv4")) throw new RangeError(`${a.address} is not an ${a.family} address`);
  const v = Buffer.alloc(4 + ip.length);
  v[1] = ip.length === 4 ? 0x01 : 0x02;
  v.writeUInt16BE(tid ? a.port ^ (MAGIC_COOKIE >>> 16) : a.port, 2);
  ip.copy(v, 4);
  if (tid) xorAddressBytes(v.subarray(4), tid);
  return v;
}

function xorAddressBytes(ip: Buffer, tid: Buffer): void {
  const mask = Buffer.alloc(16);
  mask.writeUInt32BE(MAGIC_COOKIE, 0);
  tid.copy(mask, 4);
  for (let i = 0; i < ip.length; i++) ip[i] ^= mask[i];
}

// ---------------------------------------------------------------- decoding

export function decodeMessage(buf: Buffer): DecodedStunMessage {
  checkHeaderPrefix(buf);
  if (buf.length < HEADER_SIZE) throw new StunError(`message is ${buf.length} bytes, shorter than the 20-byte header`);
  const length = buf.readUInt16BE(2);
  if (buf.length !== HEADER_SIZE + length)
    throw new StunError(`length field says ${length} bytes of attributes but ${buf.length - HEADER_SIZE} follow the header`);
  const { method, class: cls } = splitMessageType(buf.readUInt16BE(0));
  const transactionId = Buffer.from(buf.subarray(8, 20));
  const attributes: StunAttribute[] = [];
  let sawIntegrity = false;
  let offset = HEADER_SIZE;
  while (offset < buf.length) {
    if (buf.length - offset < 4) throw new StunError(`truncated attribute header at byte ${offset}`);
    const type = buf.readUInt16BE(offset);
    const len = buf.readUInt16BE(offset + 2);
    const end = offset + 4 + len;
    const padded = offset + 4 + ((len + 3) & ~3);
    if (padded > buf.length)
      throw new StunError(`attribute ${attributeName(type)} at byte ${offset} claims ${len} bytes, only ${buf.length - offset - 4} remain`);
    const value = buf.subarray(offset + 4, end);

    if (type === ATTR.FINGERPRINT) {
      if (len !== 4) throw new StunError(`FINGERPRINT must be 4 bytes, got ${len}`);
      if (padded !== buf.length) throw new StunError(`FINGERPRINT at byte ${offset} is not the last attribute`);
      const expected = fingerprintOf(buf, offset);
      const got = value.readUInt32BE(0);
      if (got !== expected) throw new StunError(`FINGERPRINT mismatch: message says 0x${hex32(got)}, content gives 0x${hex32(expected)}`);
      attributes.push({ kind: "FINGERPRINT", value: got });
    } else if (sawIntegrity) {
      // RFC 8489 §14.5: everything after MESSAGE-INTEGRITY except FINGERPRINT is ignored.
    } else if (type === ATTR.MESSAGE_INTEGRITY) {
      if (len !== 20) throw new StunError(`MESSAGE-INTEGRITY must be 20 bytes, got ${len}`);
      sawIntegrity = true;
      attributes.push({ kind: "MESSAGE-INTEGRITY", value: Buffer.from(value) });
    } else {
      attributes.push(decodeAttribute(type, value, transactionId));
    }
    offset = padded;
  }
  return { method, class: cls, transactionId, attributes, raw: buf };
}

/** Checks whatever part of the 20-byte header `buf` holds; the framer calls it before the header is complete. */
export function checkHeaderPrefix(buf: Buffer): void {
  if (buf.length < 1) throw new StunError("empty message");
  if ((buf[0] & 0xc0) !== 0) throw new StunError(`first byte 0x${buf[0].toString(16).padStart(2, "0")} has its top two bits set: not STUN`);
  if (buf.length >= 4) {
    const length = buf.readUInt16BE(2);
    if (length % 4 !== 0) throw new StunError(`length field ${length} is not a multiple of 4`);
  }
  if (buf.length >= 8) {
    const cookie = buf.readUInt32BE(4);
    if (cookie !== MAGIC_COOKIE) throw new StunError(`magic cookie is 0x${hex32(cookie)}, expected 0x2112a442`);
  }
}

function decodeAttribute(type: number, value: Buffer, tid: Buffer): StunAttribute {
  switch (type) {
    case ATTR.XOR_MAPPED_ADDRESS:
      return { kind: "XOR-MAPPED-ADDRESS", address: decodeAddress("XOR-MAPPED-ADDRESS", value, tid) };
    case ATTR.MAPPED_ADDRESS:
      return { kind: "MAPPED-ADDRESS", address: decodeAddress("MAPPED-ADDRESS", value, undefined) };
    case ATTR.SOFTWARE:
      return { kind: "SOFTWARE", value: decodeText("SOFTWARE", value, MAX_TEXT_BYTES) };
    case ATTR.USERNAME:
      return { kind: "USERNAME", value: decodeText("USERNAME", value, MAX_USERNAME_BYTES) };
    case ATTR.ERROR_CODE: {
      if (value.length < 4) throw new StunError(`ERROR-CODE must be at least 4 bytes, got ${value.length}`);
      const cls = value[2] & 0x07;
      const num = value[3];
      if (cls < 3 || cls > 6) throw new StunError(`ERROR-CODE class ${cls} is not 3-6`);
      if (num > 99) throw new StunError(`ERROR-CODE number ${num} is not 0-99`);
      return { kind: "ERROR-CODE", code: cls * 100 + num, reason: decodeText("ERROR-CODE reason", value.subarray(4), MAX_TEXT_BYTES) };
    }
    case ATTR.UNKNOWN_ATTRIBUTES: {
      if (value.length % 2 !== 0) throw new StunError(`UNKNOWN-ATTRIBUTES length ${value.length} is odd`);
      const types: number[] = [];
      for (let i = 0; i < value.length; i += 2) types.push(value.readUInt16BE(i));
      return { kind: "UNKNOWN-ATTRIBUTES", types };
    }
    default:
      return { kind: "raw", type, value: Buffer.from(value) };
  }
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

function decodeText(what: string, value: Buffer, max: number): string {
  if (value.length > max) throw new StunError(`${what} is ${value.length} bytes, at most ${max} allowed`);
  try {
    return utf8.decode(value);
  } catch {
    throw new StunError(`${what} is not valid UTF-8`);
  }
}

function decodeAddress(what: string, value: Buffer, tid: Buffer | undefined): StunAddress {
  if (value.length < 4) throw new StunError(`${what} is ${value.length} bytes, too short for family and port`);
  const family = value[1];
  const size = family === 0x01 ? 4 : family === 0x02 ? 16 : 0;
  if (size === 0) throw new StunError(`${what} has address family 0x${family.toString(16).padStart(2, "0")}, expected 0x01 or 0x02`);
  if (value.length !== 4 + size) throw new StunError(`${what} for ${size === 4 ? "IPv4" : "IPv6"} must be ${4 + size} bytes, got ${value.length}`);
  let port = value.readUInt16BE(2);
  const ip = Buffer.from(value.subarray(4));
  if (tid) {
    port ^= MAGIC_COOKIE >>> 16;
    xorAddressBytes(ip, tid);
  }
  return { family: size === 4 ? "IPv4" : "IPv6", address: bytesToIp(ip), port };
}

function fingerprintOf(buf: Buffer, fingerprintOffset: number): number {
  // The CRC covers the message up to FINGERPRINT, with the length field already
  // counting FINGERPRINT, whatever the buffer's length field says.
  const header = Buffer.from(buf.subarray(0, HEADER_SIZE));
  header.writeUInt16BE(fingerprintOffset + 8 - HEADER_SIZE, 2);
  return (crc32(buf.subarray(HEADER_SIZE, fingerprintOffset), crc32(header)) ^ FINGERPRINT_XOR) >>> 0;
}

/** True when the message carries a FINGERPRINT and it matches (decodeMessage already refuses a wrong one). */
export function verifyFingerprint(buf: Buffer): boolean {
  if (buf.length < HEADER_SIZE + 8) return false;
  const offset = buf.length - 8;
  if (buf.readUInt16BE(offset) !== ATTR.FINGERPRINT || buf.readUInt16BE(offset + 2) !== 4) return false;
  return buf.readUInt32BE(offset + 4) === fingerprintOf(buf, offset);
}

function hex32(n: number): string {
  return n.toString(16).padStart(8, "0");
}
