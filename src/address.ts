import { isIP } from "node:net";

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

// A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d; everything we
// report or compare uses the plain IPv4 form.
export function unmapIPv4(address: string): string {
  const m = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  return m ? m[1] : address;
}
