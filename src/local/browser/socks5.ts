import type http from "node:http";
import { SocketAddress, type Socket } from "node:net";
import type { Duplex } from "node:stream";
import type { HostPort } from "../../address.ts";
import { NatproxyError, type ErrorCode } from "../../errors.ts";
import { readFramed } from "../../protocol/wire.ts";
import { formatSession } from "../../request-log.ts";
import { closeWith } from "../../sockets.ts";
import type { HandlerContext } from "./context.ts";
import { makeCredentialCheck } from "./proxy-auth.ts";
import { spliceOptimistic, spliceThroughTunnel, type SpliceAs } from "./splice.ts";

// SOCKS5 (RFC 1928) with username/password (RFC 1929), CONNECT only, on the
// HTTP proxy's own port. A small parser of our own: the npm SOCKS servers own
// the socket and the dial (we need only the three messages decoded, with our
// deadline and bounds), and the parser-only packages are unmaintained.

const VERSION = 5;
const AUTH_VERSION = 1;
const METHOD_NONE = 0x00;
const METHOD_USERPASS = 0x02;
const NO_ACCEPTABLE = 0xff;
const CMD_CONNECT = 1;

export const REPLY = {
  OK: 0x00,
  GENERAL_FAILURE: 0x01,
  NOT_ALLOWED: 0x02,
  NETWORK_UNREACHABLE: 0x03,
  HOST_UNREACHABLE: 0x04,
  REFUSED: 0x05,
  TTL_EXPIRED: 0x06,
  COMMAND_NOT_SUPPORTED: 0x07,
  ADDRESS_NOT_SUPPORTED: 0x08,
} as const;

class SocksError extends Error {
  readonly reply: number | undefined;
  constructor(message: string, reply?: number) {
    super(message);
    this.reply = reply;
  }
}

type Parsed<T> = { value: T; rest: Buffer } | undefined;

/** VER NMETHODS METHODS: at most 257 bytes. */
export function parseGreeting(buf: Buffer): Parsed<number[]> {
  if (buf.length < 2) return undefined;
  if (buf[0] !== VERSION) throw new SocksError(`not SOCKS5 (version ${buf[0]})`);
  const n = buf[1];
  if (n === 0) throw new SocksError("SOCKS5 greeting offers no methods");
  if (buf.length < 2 + n) return undefined;
  return { value: [...buf.subarray(2, 2 + n)], rest: buf.subarray(2 + n) };
}

/** RFC 1929: VER ULEN UNAME PLEN PASSWD, at most 513 bytes. */
export function parseUserPass(buf: Buffer): Parsed<{ user: string; password: string }> {
  if (buf.length < 2) return undefined;
  if (buf[0] !== AUTH_VERSION) throw new SocksError(`username/password sub-negotiation version ${buf[0]}`);
  const ulen = buf[1];
  if (buf.length < 2 + ulen + 1) return undefined;
  const plen = buf[2 + ulen];
  const end = 3 + ulen + plen;
  if (buf.length < end) return undefined;
  return { value: { user: buf.subarray(2, 2 + ulen).toString("utf8"), password: buf.subarray(3 + ulen, end).toString("utf8") }, rest: buf.subarray(end) };
}

export interface SocksRequest {
  command: number;
  target: HostPort;
}

/** VER CMD RSV ATYP DST.ADDR DST.PORT: at most 262 bytes. */
export function parseRequest(buf: Buffer): Parsed<SocksRequest> {
  if (buf.length < 5) return undefined;
  if (buf[0] !== VERSION) throw new SocksError(`SOCKS5 request with version ${buf[0]}`, REPLY.GENERAL_FAILURE);
  const command = buf[1];
  let host: string;
  let at = 4;
  switch (buf[3]) {
    case 1:
      if (buf.length < at + 4 + 2) return undefined;
      host = [...buf.subarray(at, at + 4)].join(".");
      at += 4;
      break;
    case 4: {
      if (buf.length < at + 16 + 2) return undefined;
      const groups = Array.from({ length: 8 }, (_, i) => buf.readUInt16BE(at + 2 * i).toString(16));
      host = new SocketAddress({ address: groups.join(":"), family: "ipv6" }).address;
      at += 16;
      break;
    }
    case 3: {
      const len = buf[4];
      if (buf.length < at + 1 + len + 2) return undefined;
      host = buf.subarray(at + 1, at + 1 + len).toString("latin1");
      at += 1 + len;
      // A name goes to the coordinator's resolver as it is (socks5h): only
      // the characters a host name may hold, so nothing odd reaches a log line.
      if (!/^[A-Za-z0-9._-]+$/.test(host)) throw new SocksError(`bad host name ${JSON.stringify(host)}`, REPLY.HOST_UNREACHABLE);
      break;
    }
    default:
      throw new SocksError(`address type ${buf[3]}`, REPLY.ADDRESS_NOT_SUPPORTED);
  }
  const port = buf.readUInt16BE(at);
  return { value: { command, target: { host, port } }, rest: buf.subarray(at + 2) };
}

/** What a natproxy failure is called in SOCKS. */
export function replyFor(code: ErrorCode): number {
  switch (code) {
    case "FORBIDDEN":
      return REPLY.NOT_ALLOWED;
    case "TARGET_REFUSED":
      return REPLY.REFUSED;
    case "TARGET_UNREACHABLE":
    case "DNS_FAILED":
      return REPLY.HOST_UNREACHABLE;
    case "TARGET_TIMEOUT":
    case "CONNECT_BACK_TIMEOUT":
      return REPLY.TTL_EXPIRED;
    default:
      return REPLY.GENERAL_FAILURE;
  }
}

// BND.ADDR/BND.PORT name the proxy's socket towards the target, which is at
// the coordinator; no client of CONNECT uses them, so they stay zero.
function reply(code: number): Buffer {
  return Buffer.from([VERSION, code, 0, 1, 0, 0, 0, 0, 0, 0]);
}

const read = <T>(s: Duplex, parse: (b: Buffer) => Parsed<T>) => readFramed(s, parse, () => new SocksError("the client closed mid-negotiation"));

/** Handles one connection whose first byte was 0x05; the socket is paused with that byte unread. */
export function makeSocksHandler(ctx: HandlerContext, opts: { users: readonly string[]; timeout: number }) {
  const check = makeCredentialCheck(opts.users);
  const fail: SpliceAs["fail"] = (socket, e) => closeWith(socket, reply(replyFor(e.code)));
  return (socket: Socket): void => {
    const a = socket.remoteAddress ?? "?";
    const client = a.includes(":") ? `[${a}]:${socket.remotePort}` : `${a}:${socket.remotePort}`;
    // One absolute deadline for the whole negotiation, however slowly it trickles in.
    const deadline = setTimeout(() => socket.destroy(), opts.timeout);
    socket.once("close", () => clearTimeout(deadline));
    const refuse = (target: string, code: string, answer: Buffer | undefined, detail?: string) => {
      clearTimeout(deadline);
      ctx.log.info(formatSession({ session: "-", client, target, kind: "socks5", outcome: code, up: 0, down: 0, ms: 0, detail }));
      if (answer) closeWith(socket, answer);
      else socket.destroy();
    };
    void (async () => {
      const methods = await read(socket, parseGreeting);
      const method = opts.users.length ? METHOD_USERPASS : METHOD_NONE;
      if (!methods.includes(method)) return refuse("?", "PROXY_AUTH_REQUIRED", Buffer.from([VERSION, NO_ACCEPTABLE]), `offered methods ${methods.join(",")}`);
      socket.write(Buffer.from([VERSION, method]));
      if (method === METHOD_USERPASS) {
        const { user, password } = await read(socket, parseUserPass);
        if (!check(`${user}:${password}`)) return refuse("?", "PROXY_AUTH_REQUIRED", Buffer.from([AUTH_VERSION, 1]));
        socket.write(Buffer.from([AUTH_VERSION, 0]));
      }
      let req: SocksRequest;
      try {
        req = await read(socket, parseRequest);
      } catch (err) {
        const e = err as SocksError;
        return refuse("?", "BAD_REQUEST", e.reply === undefined ? undefined : reply(e.reply), e.message);
      }
      const { command, target } = req;
      const name = target.host.includes(":") ? `[${target.host}]:${target.port}` : `${target.host}:${target.port}`;
      if (command !== CMD_CONNECT) return refuse(name, "METHOD_NOT_ALLOWED", reply(REPLY.COMMAND_NOT_SUPPORTED), `SOCKS command ${command} (only CONNECT)`);
      if (target.port === 0) return refuse(name, "BAD_REQUEST", reply(REPLY.GENERAL_FAILURE), "port 0");
      clearTimeout(deadline);
      // Whatever the client sent after its request goes first, as after CONNECT.
      const head = (socket.read() as Buffer | null) ?? Buffer.alloc(0);
      const as: SpliceAs = { kind: "socks5", fail };
      const t = ctx.tunnels;
      if (ctx.optimisticConnect() && t.opening.count < t.maxPending) {
        socket.write(reply(REPLY.OK));
        spliceOptimistic(ctx, socket, target, client, head, as);
        return;
      }
      spliceThroughTunnel(ctx, socket, target, client, (tunnel) => {
        socket.write(reply(REPLY.OK));
        if (head.length) tunnel.socket.write(head);
        return head.length;
      }, as);
    })().catch((err: Error) => {
      ctx.log.debug(`SOCKS5 negotiation from ${client} failed: ${err.message}`);
      clearTimeout(deadline);
      socket.destroy();
    });
  };
}

/**
 * Puts a first-byte dispatch in front of the HTTP server: 0x05 is SOCKS5,
 * anything else goes to HTTP. Like requireProxyHeader, it takes over the
 * server's own 'connection' listener instead of putting a net.Server in
 * front, so the HTTP server still listens itself and keeps its header and
 * keep-alive deadlines. Call it right after creating the server.
 */
export function dispatchSocks(server: http.Server, timeout: number, socks: (socket: Socket) => void): void {
  const own = server.listeners("connection");
  if (own.length !== 1) throw new Error(`dispatchSocks: expected the HTTP server's own 'connection' listener alone, found ${own.length}`);
  const toHttp = own[0] as (socket: Socket) => void;
  server.removeListener("connection", toHttp);
  server.on("connection", (socket: Socket) => {
    socket.on("error", () => {});
    // No byte has come yet, so the idle timeout is the absolute deadline here.
    socket.setTimeout(timeout, () => socket.destroy());
    readFramed(socket, (b) => (b.length ? { value: b[0], rest: b } : undefined), () => new Error("closed before its first byte")).then(
      (first) => {
        socket.setTimeout(0);
        if (socket.destroyed) return;
        if (first === VERSION) socks(socket);
        else toHttp.call(server, socket);
      },
      () => socket.destroy(),
    );
  });
}
