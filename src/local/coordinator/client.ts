import https from "node:https";
import type { Duplex } from "node:stream";
import tls from "node:tls";
import axios, { type AxiosInstance } from "axios";
import type { z } from "zod";
import { NatproxyError, isErrorCode } from "../../errors.ts";
import { destroyIdleSockets } from "../../sockets.ts";
import { API, errorBodySchema, helloResponseSchema, parseWith, probeResponseSchema, readyResponseSchema, sessionResponseSchema, type HelloInfo, type ProbeRequestBody, type ReadyRequestBody, type SessionRequestBody } from "../../protocol/api.ts";
import { handshakeError, tlsClientOptions, verifyPeer, type Trust } from "../../tls/trust.ts";

/**
 * Keep-alive HTTPS agent whose connections are handed to the HTTP client only
 * after the coordinator's certificate passed our checks, so a refused server
 * never sees the request (and the token in it).
 */
class VerifyingAgent extends https.Agent {
  readonly #trust: Trust;
  constructor(trust: Trust, idleTimeout: number) {
    super({ keepAlive: true, timeout: idleTimeout, scheduling: "lifo" });
    this.#trust = trust;
  }

  override createConnection(options: https.RequestOptions, callback?: (err: Error | null, stream: Duplex) => void): Duplex | undefined {
    const socket = tls.connect({ ...(options as tls.ConnectionOptions), ...tlsClientOptions(this.#trust) });
    socket.setNoDelay(true);
    let settled = false;
    const settle = (err: Error | null) => {
      if (settled) return;
      settled = true;
      socket.off("error", onError);
      if (err) {
        socket.destroy();
        callback?.(err, socket);
      } else callback?.(null, socket);
    };
    const onError = (err: NodeJS.ErrnoException) => settle(handshakeError(err, "HTTPS API"));
    socket.on("error", onError);
    socket.once("secureConnect", () => settle(verifyPeer(socket, this.#trust) ?? null));
    // Returning nothing tells the agent the socket comes through the callback.
    return undefined;
  }
}

export interface CoordinatorClient {
  hello(timeout: number): Promise<HelloInfo>;
  openSession(body: SessionRequestBody, signal: AbortSignal): Promise<void>;
  /** Asks for one connect-back carrying `probe` (the start-up reachability check). */
  probe(body: ProbeRequestBody, signal: AbortSignal): Promise<void>;
  /** Asks for one connect-back carrying `ready` that then waits for an Open (a ReadyPool's connection). */
  ready(body: ReadyRequestBody, signal: AbortSignal): Promise<void>;
  /** Destroys pooled idle connections (after a NAT lost its state, they are dead). */
  dropIdleConnections(): void;
  close(): void;
}

export function makeCoordinatorClient(opts: { url: URL; token: string; trust: Trust; idleTimeout: number }): CoordinatorClient {
  const agent = new VerifyingAgent(opts.trust, opts.idleTimeout);
  const http: AxiosInstance = axios.create({
    baseURL: opts.url.origin,
    httpsAgent: agent,
    // The coordinator is reached directly: an HTTPS_PROXY in the environment
    // must not reroute (and reveal the token to) anyone else.
    proxy: false,
    maxRedirects: 0,
    validateStatus: () => true,
    headers: { Authorization: `Bearer ${opts.token}`, "User-Agent": "natproxy" },
    responseType: "json",
  });

  // A 2xx answer that does not match the contract is the coordinator's fault,
  // named as such, field by field; nothing downstream sees an unchecked body.
  const call = async <S extends z.ZodType>(method: "get" | "post", path: string, data: unknown, answer: S, signal: AbortSignal): Promise<z.infer<S>> => {
    let res;
    try {
      res = await http.request({ method, url: path, data, signal });
    } catch (err) {
      throw transportError(err, signal);
    }
    if (res.status < 200 || res.status >= 300) throw responseError(res.status, res.data);
    return parseWith(answer, res.data, (problems) => new NatproxyError("COORDINATOR_REFUSED", `${method.toUpperCase()} ${path}: malformed answer (${problems})`));
  };

  return {
    hello: (timeout) => call("get", API.hello, undefined, helloResponseSchema, AbortSignal.timeout(timeout)),
    openSession: async (body, signal) => {
      await call("post", API.sessions, body, sessionResponseSchema, signal);
    },
    probe: async (body, signal) => {
      await call("post", API.probe, body, probeResponseSchema, signal);
    },
    ready: async (body, signal) => {
      await call("post", API.ready, body, readyResponseSchema, signal);
    },
    dropIdleConnections: () => {
      destroyIdleSockets(agent);
    },
    close: () => agent.destroy(),
  };
}

function transportError(err: unknown, signal: AbortSignal): NatproxyError {
  const e = err as { cause?: unknown; code?: string; message?: string };
  if (e.cause instanceof NatproxyError) return e.cause;
  if (err instanceof NatproxyError) return err;
  if (signal.aborted) {
    const reason = signal.reason as Error | undefined;
    if (reason instanceof NatproxyError) return reason;
    return new NatproxyError("COORDINATOR_UNREACHABLE", "no answer in time");
  }
  return new NatproxyError("COORDINATOR_UNREACHABLE", e.code ?? e.message ?? String(err), { cause: err });
}

export function responseError(status: number, data: unknown): NatproxyError {
  const parsed = errorBodySchema.safeParse(data);
  const code = parsed.data?.error.code;
  const message = parsed.data?.error.message ?? `HTTP ${status}`;
  if (status === 401) return new NatproxyError("COORDINATOR_REFUSED", `the coordinator rejected our token (401); check [local] token`);
  if (isErrorCode(code) && code !== "INTERNAL" && code !== "BAD_REQUEST" && code !== "UNAUTHORIZED") {
    // The coordinator's message already starts with the code's text.
    const e = new NatproxyError(code);
    e.message = message;
    return e;
  }
  return new NatproxyError("COORDINATOR_REFUSED", `${status}: ${message}`);
}
