import { isIP, SocketAddress, type Socket } from "node:net";
import type { Duplex } from "node:stream";
import type tls from "node:tls";
import type { ConsolaInstance } from "consola";
import { AddressFamilyType, Command, TransportProtocol, V1ProxyProtocol, V2ProxyProtocol, type IPv4ProxyAddress, type IPv6ProxyAddress } from "proxy-protocol-js";
import { formatHostPort, unmapIPv4, type HostPort } from "../address.ts";
import type { ErrorCode } from "../errors.ts";
import { readFramed } from "../protocol/wire.ts";

// PROXY protocol (v1 text, v2 binary), as a TCP load balancer such as HAProxy
// sends it in front of the connection it forwards (`send-proxy-v2`), so that
// a server behind it learns who the real caller is. The library decodes the
// headers; this module frames them off the stream (which the library does
// not do: it needs the whole header, and v2's length field covers TLVs it
// would otherwise hand back as data) and checks what they claim.

export class ProxyHeaderError extends Error {
  readonly code: ErrorCode = "PROXY_HEADER";
}

export interface ProxyHeader {
  version: 1 | 2;
  /**
   * The caller the balancer forwards for; undefined when the balancer speaks
   * for itself (v2 LOCAL, as in its health checks, or v1 UNKNOWN): the
   * connection's own endpoints then apply, as the specification says.
   */
  caller: HostPort | undefined;
}

const V1_PREFIX = Buffer.from("PROXY ", "latin1");
// The specification's longest v1 line, "PROXY TCP6 <39> <39> 65535 65535\r\n".
const V1_MAX = 107;
const V2_SIGNATURE = Buffer.from("0d0a0d0a000d0a515549540a", "hex");
const V2_FIXED = 16;
// Addresses take at most 216 bytes (AF_UNIX); the rest are TLVs, which a
// balancer adds only when told to. Bounded so a peer cannot make us buffer 64 KiB.
const V2_MAX = 4096;
const TLS_HANDSHAKE = 0x16;

/**
 * Takes one PROXY header off the front of `buf`: undefined while more bytes
 * are needed, the header and the bytes after it once it is whole. Throws as
 * soon as the bytes cannot be a header, so a connection that starts with
 * anything else (a TLS ClientHello above all) is refused on its first packet.
 */
export function parseProxyHeader(buf: Buffer): { value: ProxyHeader; rest: Buffer } | undefined {
  if (buf.length === 0) return undefined;
  if (buf[0] === V2_SIGNATURE[0]) return parseV2(buf);
  const n = Math.min(buf.length, V1_PREFIX.length);
  if (!buf.subarray(0, n).equals(V1_PREFIX.subarray(0, n))) throw notAHeader(buf);
  const end = buf.indexOf("\r\n", 0, "latin1");
  if (end < 0 || end + 2 > V1_MAX) {
    if (end >= 0 || buf.length >= V1_MAX) throw new ProxyHeaderError(`PROXY v1 line longer than ${V1_MAX} bytes`);
    return undefined;
  }
  const line = buf.subarray(0, end + 2).toString("latin1");
  return { value: { version: 1, caller: v1Caller(line) }, rest: buf.subarray(end + 2) };
}

function notAHeader(buf: Buffer): ProxyHeaderError {
  if (buf[0] === TLS_HANDSHAKE) return new ProxyHeaderError("a TLS handshake without a PROXY protocol header");
  return new ProxyHeaderError(`not a PROXY protocol header (starts ${buf.subarray(0, 8).toString("hex")})`);
}

function v1Caller(line: string): HostPort | undefined {
  // The library's pattern wants addresses after UNKNOWN, which the
  // specification makes optional (and tells receivers to ignore).
  if (/^PROXY UNKNOWN[ \r]/.test(line)) return undefined;
  let parsed: V1ProxyProtocol;
  try {
    parsed = V1ProxyProtocol.parse(line);
  } catch {
    throw new ProxyHeaderError(`malformed PROXY v1 line ${JSON.stringify(line.trimEnd())}`);
  }
  const family = parsed.inetProtocol === "TCP4" ? 4 : 6;
  const { ipAddress, port } = parsed.source;
  if (isIP(ipAddress) !== family || !Number.isInteger(port) || port > 65535)
    throw new ProxyHeaderError(`PROXY v1 line with a bad ${parsed.inetProtocol} source ${JSON.stringify(`${ipAddress} ${port}`)}`);
  return { host: canonical(ipAddress, family), port };
}

function parseV2(buf: Buffer): { value: ProxyHeader; rest: Buffer } | undefined {
  const n = Math.min(buf.length, V2_SIGNATURE.length);
  if (!buf.subarray(0, n).equals(V2_SIGNATURE.subarray(0, n))) throw notAHeader(buf);
  if (buf.length < V2_FIXED) return undefined;
  const total = V2_FIXED + buf.readUInt16BE(14);
  if (total > V2_MAX) throw new ProxyHeaderError(`PROXY v2 header of ${total} bytes (at most ${V2_MAX} accepted)`);
  if (buf.length < total) return undefined;
  let parsed: V2ProxyProtocol;
  try {
    parsed = V2ProxyProtocol.parse(buf.subarray(0, total));
  } catch (err) {
    throw new ProxyHeaderError(`malformed PROXY v2 header: ${(err as { message?: string }).message ?? err}`);
  }
  return { value: { version: 2, caller: v2Caller(parsed) }, rest: buf.subarray(total) };
}

function v2Caller(h: V2ProxyProtocol): HostPort | undefined {
  if (h.command === Command.LOCAL) return undefined;
  if (h.addressFamilyType === AddressFamilyType.UNSPEC) return undefined;
  if (h.transportProtocol !== TransportProtocol.STREAM) throw new ProxyHeaderError("PROXY v2 header for a datagram or unspecified transport, not TCP");
  if (h.addressFamilyType === AddressFamilyType.INET) {
    const a = h.proxyAddress as IPv4ProxyAddress;
    return { host: a.sourceAddress.address.join("."), port: a.sourcePort };
  }
  if (h.addressFamilyType === AddressFamilyType.INET6) {
    const a = h.proxyAddress as IPv6ProxyAddress;
    const bytes = a.sourceAddress.address;
    const groups = Array.from({ length: 8 }, (_, i) => ((bytes[2 * i] << 8) | bytes[2 * i + 1]).toString(16));
    return { host: canonical(groups.join(":"), 6), port: a.sourcePort };
  }
  throw new ProxyHeaderError("PROXY v2 header with a UNIX-socket source, not an IP address");
}

// Callers are compared as text (connect_back = "same-ip"), so every spelling
// of an address becomes the one Node itself reports.
function canonical(address: string, family: 4 | 6): string {
  return unmapIPv4(new SocketAddress({ address, family: family === 4 ? "ipv4" : "ipv6" }).address);
}

/**
 * Reads one PROXY header off a stream in paused mode and puts back whatever
 * followed it (see readFramed). The caller owns the timeout.
 */
export function readProxyHeader(stream: Duplex): Promise<ProxyHeader> {
  return readFramed(stream, parseProxyHeader, () => new ProxyHeaderError("the connection closed before its PROXY protocol header"));
}

/** Who a connection came from, as every log line and the same-ip rule see it. */
export type CallerOf = (socket: Socket) => HostPort;

export const directCaller: CallerOf = (socket) => ({ host: unmapIPv4(socket.remoteAddress ?? ""), port: socket.remotePort ?? 0 });

/** What a connection whose header cannot be found counts as: no address, so same-ip refuses it. */
const UNKNOWN_CALLER: HostPort = { host: "unknown", port: 0 };

/**
 * Makes a TLS (or HTTPS) server require a PROXY header on every connection it
 * accepts, read within `timeout`, before its TLS handshake; a connection
 * without a valid one is dropped and never reaches TLS. Returns how to find
 * the caller of a connection (its raw socket, or the TLS socket over it).
 *
 * Call it right after creating the server. tls.Server starts TLS from the one
 * 'connection' listener its constructor adds; that listener is taken over
 * here and called once the header is read. (A plain net.Server in front,
 * emitting 'connection' into a server that never listens, would lose the
 * HTTP server's header and request deadlines: Node starts checking them only
 * when the server itself listens.)
 */
export function requireProxyHeader(server: tls.Server, opts: { timeout: number; log: ConsolaInstance }): CallerOf {
  const listeners = server.listeners("connection");
  if (listeners.length !== 1) throw new Error(`requireProxyHeader: expected the TLS server's own 'connection' listener alone, found ${listeners.length}`);
  const startTls = listeners[0] as (socket: Socket) => void;
  server.removeListener("connection", startTls);
  // A TLS socket reports the same endpoints as the TCP socket under it, so
  // the connection's four-tuple finds the caller from either.
  const callers = new Map<string, HostPort>();
  let warnedTls = false;
  server.on("connection", (socket: Socket) => {
    // Errors reach the header read below, and after the hand-over the TLS socket.
    socket.on("error", () => {});
    const key = connectionKey(socket);
    const peer = formatHostPort(unmapIPv4(socket.remoteAddress ?? "?"), socket.remotePort ?? 0);
    // From the connection's start, not from its last byte: an idle timer
    // would let a peer that trickles its header a byte at a time renew it.
    const deadline = setTimeout(() => socket.destroy(new ProxyHeaderError(`no whole PROXY protocol header within ${opts.timeout} ms`)), opts.timeout);
    readProxyHeader(socket).then(
      (header) => {
        // From here the TLS handshake timeout and the HTTP deadlines apply.
        clearTimeout(deadline);
        if (socket.destroyed) return;
        const caller = header.caller ?? directCaller(socket);
        callers.set(key, caller);
        socket.once("close", () => callers.delete(key));
        opts.log.trace(`PROXY v${header.version} header from ${peer}: ${header.caller ? `caller ${formatHostPort(caller.host, caller.port)}` : "the balancer itself"}`);
        startTls.call(server, socket);
      },
      (err: Error) => {
        clearTimeout(deadline);
        socket.destroy();
        if (err instanceof ProxyHeaderError && err.message.startsWith("a TLS handshake") && !warnedTls) {
          warnedTls = true;
          opts.log.warn(
            `dropped a connection from ${peer}: ${err.message}. With [coordinator] proxy_protocol = true every connection must come through the load balancer, ` +
              "and the balancer must send the header (HAProxy: send-proxy-v2). Later drops are logged at debug level.",
          );
        } else opts.log.debug(`dropped a connection from ${peer}: ${err.message}`);
      },
    );
  });
  return (socket) => callers.get(connectionKey(socket)) ?? UNKNOWN_CALLER;
}

function connectionKey(socket: Socket): string {
  return `${socket.remoteAddress}|${socket.remotePort}|${socket.localAddress}|${socket.localPort}`;
}
