import { isIP } from "node:net";
import ipaddr from "ipaddr.js";

export interface HostPort {
  host: string;
  port: number;
}

// Accepts "host:port", "[v6]:port" and "port"; a bare v6 literal without
// brackets is ambiguous and refused.
export function parseHostPort(text: string, defaultHost?: string): HostPort {
  const s = text.trim();
  let host: string;
  let portText: string;
  if (/^\d+$/.test(s) && defaultHost !== undefined) {
    host = defaultHost;
    portText = s;
  } else if (s.startsWith("[")) {
    const end = s.indexOf("]");
    if (end < 0 || s[end + 1] !== ":") throw new Error(`"${text}" is not [ipv6]:port`);
    host = s.slice(1, end);
    portText = s.slice(end + 2);
    if (isIP(host) !== 6) throw new Error(`"${host}" is not an IPv6 address`);
  } else {
    const colon = s.lastIndexOf(":");
    if (colon <= 0 || s.indexOf(":") !== colon) throw new Error(`"${text}" is not host:port (write IPv6 as [addr]:port)`);
    host = s.slice(0, colon);
    portText = s.slice(colon + 1);
  }
  const port = parsePort(portText);
  if (port === undefined) throw new Error(`"${portText}" in "${text}" is not a port (0-65535)`);
  return { host, port };
}

export function parsePort(text: string): number | undefined {
  if (!/^\d{1,5}$/.test(text)) return undefined;
  const n = Number(text);
  return n <= 65535 ? n : undefined;
}

export function formatHostPort(host: string, port: number): string {
  return isIP(host) === 6 ? `[${host}]:${port}` : `${host}:${port}`;
}

export type IPAddress = ipaddr.IPv4 | ipaddr.IPv6;

/**
 * An IP literal in the grammar net.isIP accepts (dotted-quad IPv4, IPv6
 * without a zone id), parsed; undefined for anything else, including the
 * other IPv4 spellings ipaddr.js would take.
 */
export function parseIP(text: string): IPAddress | undefined {
  const family = isIP(text);
  if (family === 0 || text.includes("%")) return undefined;
  try {
    if (family === 4) return ipaddr.IPv4.parse(text);
    // ipaddr.js reads exactly "::a.b.c.d" as IPv4-mapped (::ffff:a.b.c.d);
    // RFC 4291 makes it IPv4-compatible (::/96). Written "0::a.b.c.d" it is read so.
    return ipaddr.IPv6.parse(/^::[0-9.]+$/.test(text) ? `0${text}` : text);
  } catch {
    return undefined;
  }
}

// A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d; everything we
// report or compare uses the plain IPv4 form.
export function unmapIPv4(address: string): string {
  const ip = parseIP(address);
  return ip instanceof ipaddr.IPv6 && ip.isIPv4MappedAddress() ? ip.toIPv4Address().toString() : address;
}

/** 4 or 16 bytes for an IPv4 or IPv6 literal (no zone id). */
export function ipToBytes(text: string): Buffer {
  const ip = parseIP(text);
  if (ip === undefined) throw new RangeError(`"${text}" is not an IP address`);
  return Buffer.from(ip.toByteArray());
}

/** RFC 5952 text: lower case, longest zero run as "::", IPv4-mapped in dotted form (as Node prints it). */
export function bytesToIp(b: Buffer): string {
  if (b.length !== 4 && b.length !== 16) throw new RangeError(`an IP address is 4 or 16 bytes, got ${b.length}`);
  const ip = ipaddr.fromByteArray([...b]);
  return ip instanceof ipaddr.IPv6 && ip.isIPv4MappedAddress() ? `::ffff:${ip.toIPv4Address()}` : ip.toString();
}
