import type { Duplex } from "node:stream";
import tls from "node:tls";
import type { HostPort } from "../../address.ts";
import { NatproxyError } from "../../errors.ts";
import { handshakeError, tlsClientOptions, verifyPeer, type Trust } from "../../tls/trust.ts";
import { API, TUNNEL_PROTOCOL } from "../../protocol/api.ts";
import { encodeOpen, readFramed, readResult } from "../../protocol/wire.ts";
import { responseError } from "../coordinator/client.ts";
import type { EarlyBytes } from "./early-bytes.ts";
import type { DialedConnection } from "./ready-pool.ts";

// A 101 head is tiny; an error answer is a short JSON document.
const MAX_HEAD = 8 * 1024;
const MAX_ERROR_BODY = 16 * 1024;

export interface OutboundOptions {
  url: URL;
  token: string;
  trust: Trust;
  /** TCP + TLS + the coordinator's answer (which includes dialling the target). */
  timeout: number;
}

/**
 * The outbound path: the local proxy dials the coordinator's HTTPS port,
 * upgrades to natproxy-tunnel/1 and names the target in the same flight, so a
 * tunnel costs TCP + TLS + one round trip, and works through any NAT that
 * lets the local proxy reach the coordinator at all. The TLS session is
 * resumed where the server allows it.
 */
export class OutboundDialer {
  readonly #opts: OutboundOptions;
  #tlsSession: Buffer | undefined;

  constructor(opts: OutboundOptions) {
    this.#opts = opts;
  }

  /** With `early`, the browser's first bytes follow the Open at once, before the Result (an optimistic CONNECT). */
  open(session: string, target: HostPort, signal?: AbortSignal, early?: EarlyBytes): Promise<DialedConnection> {
    return this.#dial({ session, target }, signal, early);
  }

  /** Upgrades a connection and closes it again: proves token, certificate and path without dialling a target. */
  async check(): Promise<void> {
    const t = await this.#dial(undefined);
    t.socket.destroy();
  }

  /** A connection upgraded and waiting for its Open (for the pool of ready connections). */
  upgrade(): Promise<DialedConnection> {
    return this.#dial(undefined);
  }

  #dial(open: { session: string; target: HostPort } | undefined, signal?: AbortSignal, early?: EarlyBytes): Promise<DialedConnection> {
    const { url, token, trust, timeout } = this.#opts;
    const port = Number(url.port || 443);
    return new Promise((resolve, reject) => {
      const offered = this.#tlsSession;
      // allowHalfOpen is honoured by tls.connect but missing from its types.
      const socket = tls.connect({ ...tlsClientOptions(trust), port, session: offered, allowHalfOpen: true } as tls.ConnectionOptions);
      socket.setNoDelay(true);
      let verified = false;
      // Only tickets from a connection whose certificate passed our checks are
      // kept: a resumed session carries no certificate to check again.
      socket.on("session", (ticket: Buffer) => {
        if (verified) this.#tlsSession = ticket;
      });
      let done = false;
      const timer = setTimeout(() => fail(new NatproxyError("COORDINATOR_UNREACHABLE", `outbound tunnel: no answer within ${timeout} ms`)), timeout);
      const onAbort = () => fail(signal?.reason instanceof NatproxyError ? signal.reason : new NatproxyError("CLIENT_GONE", "the browser went away"));
      signal?.addEventListener("abort", onAbort, { once: true });
      const finish = () => {
        done = true;
        clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
        socket.off("error", onError);
      };
      const fail = (err: Error) => {
        if (done) return;
        finish();
        early?.detach(socket);
        socket.destroy();
        reject(err);
      };
      const onError = (err: NodeJS.ErrnoException) => fail(handshakeError(err, "outbound tunnel"));
      socket.on("error", onError);
      socket.once("secureConnect", () => {
        const refused = offered && socket.isSessionReused() ? undefined : verifyPeer(socket, trust);
        if (refused) {
          this.#tlsSession = undefined;
          return fail(refused);
        }
        verified = true;
        // Request and Open in one write: the coordinator reads the Open from
        // the bytes after the head and starts dialling the target at once.
        const head =
          `GET ${API.tunnel} HTTP/1.1\r\nHost: ${url.host}\r\nAuthorization: Bearer ${token}\r\n` + `Connection: Upgrade\r\nUpgrade: ${TUNNEL_PROTOCOL}\r\nUser-Agent: natproxy\r\n\r\n`;
        const first = open ? Buffer.concat([Buffer.from(head, "latin1"), encodeOpen(open)]) : Buffer.from(head, "latin1");
        socket.write(first);
        if (open) early?.attach(socket);
        readHead(socket)
          .then(async ({ status, headers, size }) => {
            if (status !== 101) {
              const body = await readBody(socket, Math.min(Number(headers["content-length"] ?? MAX_ERROR_BODY), MAX_ERROR_BODY));
              let json: unknown;
              try {
                json = JSON.parse(body);
              } catch {
                json = undefined;
              }
              throw responseError(status, json);
            }
            if (!open) {
              finish();
              socket.on("error", () => {});
              resolve({ socket, overhead: size, sentOverhead: first.length });
              return;
            }
            const { msg, result } = await readResult(socket);
            if (done) return;
            finish();
            // Late errors belong to whoever pipes the socket next; until then
            // they must not crash the process.
            socket.on("error", () => {});
            resolve({ socket, overhead: size + 8 + msg.payload.length, sentOverhead: first.length, targetAddress: result.target_address });
          })
          .catch((err: Error) => fail(err instanceof NatproxyError ? err : new NatproxyError("COORDINATOR_REFUSED", `outbound tunnel: ${err.message}`)));
      });
    });
  }
}

interface ResponseHead {
  status: number;
  headers: Record<string, string>;
  size: number;
}

/** Reads an HTTP response head off a stream and puts back what followed it. */
function readHead(stream: Duplex): Promise<ResponseHead> {
  return readFramed(stream, parseHead, () => new Error("the coordinator closed the connection before answering"));
}

function parseHead(buf: Buffer): { value: ResponseHead; rest: Buffer } | undefined {
  const end = buf.indexOf("\r\n\r\n");
  if (end < 0) {
    if (buf.length > MAX_HEAD) throw new Error("the coordinator's answer head is too large");
    return undefined;
  }
  const lines = buf.subarray(0, end).toString("latin1").split("\r\n");
  const m = /^HTTP\/1\.[01] (\d{3})/.exec(lines[0] ?? "");
  if (!m) throw new Error("the coordinator did not answer with HTTP");
  const headers: Record<string, string> = {};
  for (const line of lines.slice(1)) {
    const colon = line.indexOf(":");
    if (colon > 0) headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
  }
  return { value: { status: Number(m[1]), headers, size: end + 4 }, rest: buf.subarray(end + 4) };
}

function readBody(stream: Duplex, limit: number): Promise<string> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const done = () => {
      stream.off("data", onData);
      resolve(Buffer.concat(chunks).toString("utf8"));
    };
    const onData = (c: Buffer) => {
      chunks.push(c);
      size += c.length;
      if (size >= limit) done();
    };
    stream.on("data", onData);
    stream.once("end", done);
    stream.once("close", done);
  });
}
