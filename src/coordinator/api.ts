import type { IncomingMessage, ServerResponse } from "node:http";
import type { Socket } from "node:net";
import type { ConsolaInstance } from "consola";
import { formatHostPort, unmapIPv4, type HostPort } from "../address.ts";
import { NatproxyError, type ErrorCode } from "../errors.ts";
import type { CallerOf } from "./proxy-header.ts";
import type { TargetPolicy } from "./target-policy.ts";
import { API, MAX_BODY, parseWith, probeRequestSchema, readyRequestSchema, sessionRequestSchema, type ErrorAnswer, type HelloInfo, type ProbeAnswer, type ReadyAnswer, type SessionAnswer } from "../protocol/api.ts";
import { VERSION } from "../version.ts";
import { rejectedTokenLog } from "./rejected-tokens.ts";
import type { ProbeRequest, ReadyRequest, SessionRequest } from "./connect-back.ts";

export interface ApiContext {
  checkToken(authorization: string | undefined): number | undefined;
  connectBackPolicy: "same-ip" | "any";
  /** Where connect-backs may go: the target policy's default refusals, allow_connect_back for exceptions. */
  connectBackTargets: Pick<TargetPolicy, "checkName">;
  /** The caller's address: the TCP peer, or the one a PROXY header named. */
  callerOf: CallerOf;
  /** The connection carried a valid token: it no longer counts as unauthenticated. */
  authenticated(socket: Socket): void;
  openSession(req: SessionRequest): Promise<{ targetAddress: string }>;
  probe(req: ProbeRequest): Promise<{ ms: number }>;
  ready(req: ReadyRequest): Promise<{ ms: number }>;
  /** Counts each error answer, by code (the metrics). */
  refused?(code: ErrorCode): void;
  log: ConsolaInstance;
}

/** Routes the HTTPS API; each failure becomes a JSON error with a stable code. */
export function apiHandler(ctx: ApiContext) {
  const rejected = rejectedTokenLog(ctx.log);
  return (req: IncomingMessage, res: ServerResponse): void => {
    handle(ctx, req, res).catch((err: unknown) => {
      const e = err instanceof NatproxyError ? err : new NatproxyError("INTERNAL", (err as Error)?.message);
      if (e.code === "UNAUTHORIZED") rejected(ctx.callerOf(req.socket).host, `API request ${req.method} ${(req.url ?? "").split("?")[0].slice(0, 64)}`);
      if (e.code === "INTERNAL") ctx.log.error("API request failed:", err);
      ctx.refused?.(e.code);
      sendError(res, e);
    });
  };
}

async function handle(ctx: ApiContext, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const path = (req.url ?? "").split("?")[0];
  // Authentication comes before anything else is looked at, the path too: an
  // unauthenticated peer learns nothing but 401. The answer closes the
  // connection, so a peer without a token cannot keep one open by asking again.
  const token = ctx.checkToken(req.headers.authorization);
  if (token === undefined) {
    req.resume();
    res.setHeader("WWW-Authenticate", 'Bearer realm="natproxy"').setHeader("Connection", "close");
    throw new NatproxyError("UNAUTHORIZED");
  }
  ctx.authenticated(req.socket);
  const route = path === API.hello || path === API.sessions || path === API.probe || path === API.ready || path === API.tunnel ? path : undefined;
  if (!route) throw new NatproxyError("NOT_FOUND", `${req.method} ${path}`);
  if (route === API.hello) {
    if (req.method !== "GET") throw methodNotAllowed(res, "GET");
    req.resume();
    const client = ctx.callerOf(req.socket);
    sendJson(res, 200, { software: "natproxy", version: VERSION, client, connect_back: ctx.connectBackPolicy } satisfies HelloInfo);
    return;
  }
  if (route === API.tunnel) {
    req.resume();
    throw new NatproxyError("BAD_REQUEST", "the tunnel path takes an HTTP Upgrade to natproxy-tunnel/1");
  }
  if (req.method !== "POST") throw methodNotAllowed(res, "POST");
  const body = await readJson(req);
  if (route === API.probe || route === API.ready) {
    // The two connect-backs that carry only an id: the start-up probe, and
    // one opened ahead of need that then waits for an Open.
    const caller = ctx.callerOf(req.socket);
    const client = formatHostPort(caller.host, caller.port);
    if (route === API.probe) {
      const { probe, reply } = parseWith(probeRequestSchema, body, badRequest);
      checkConnectBack(ctx, unmapped(reply), caller.host);
      const { ms } = await ctx.probe({ token, probe, reply: unmapped(reply), client });
      sendJson(res, 200, { probe, outcome: "connected", ms } satisfies ProbeAnswer);
    } else {
      const { ready, reply } = parseWith(readyRequestSchema, body, badRequest);
      checkConnectBack(ctx, unmapped(reply), caller.host);
      const { ms } = await ctx.ready({ token, ready, reply: unmapped(reply), client });
      sendJson(res, 200, { ready, outcome: "connected", ms } satisfies ReadyAnswer);
    }
    return;
  }
  const sessionReq = validateSession(body, ctx.callerOf(req.socket));
  checkConnectBack(ctx, sessionReq.reply, sessionReq.client.host);
  const { targetAddress } = await ctx.openSession({
    token,
    session: sessionReq.session,
    target: sessionReq.target,
    reply: sessionReq.reply,
    client: formatHostPort(sessionReq.client.host, sessionReq.client.port),
  });
  sendJson(res, 200, { session: sessionReq.session, outcome: "bridged", target_address: targetAddress } satisfies SessionAnswer);
}

function checkConnectBack(ctx: ApiContext, reply: HostPort, client: string): void {
  if (ctx.connectBackPolicy === "same-ip" && reply.host !== client) {
    throw new NatproxyError("FORBIDDEN", `connect-back to ${reply.host} refused: this request came from ${client}, and connect_back = "same-ip"`);
  }
  // A caller can appear as loopback or a private address (a TLS passthrough
  // on the same host, a Kubernetes Service without proxy_protocol); same-ip
  // alone would then let a token holder aim connect-backs at the
  // coordinator's own ports and its LAN.
  const d = ctx.connectBackTargets.checkName(reply.host, reply.port);
  if (!d.allowed) {
    const to = formatHostPort(reply.host, reply.port);
    // The policy's reason ends in advice about allow_targets, which does not govern connect-backs.
    const why = d.reason.replace(/; add .*$/, "");
    ctx.log.info(`connect-back to ${to} for ${client} refused: ${why}`);
    throw new NatproxyError("FORBIDDEN", `connect-back to ${to} refused: ${why}; only [coordinator] allow_connect_back can permit it`);
  }
}

function methodNotAllowed(res: ServerResponse, allow: string): NatproxyError {
  res.setHeader("Allow", allow);
  return new NatproxyError("METHOD_NOT_ALLOWED", `use ${allow}`);
}

function readJson(req: IncomingMessage): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const declared = Number(req.headers["content-length"] ?? 0);
    if (declared > MAX_BODY) {
      req.resume();
      reject(new NatproxyError("PAYLOAD_TOO_LARGE", `${declared} bytes; the limit is ${MAX_BODY}`));
      return;
    }
    const chunks: Buffer[] = [];
    let size = 0;
    req.on("data", (c: Buffer) => {
      size += c.length;
      if (size > MAX_BODY) {
        // Read no further; the answer says why and closes the connection.
        req.removeAllListeners("data");
        req.pause();
        reject(new NatproxyError("PAYLOAD_TOO_LARGE", `more than ${MAX_BODY} bytes`));
      } else chunks.push(c);
    });
    req.on("error", reject);
    req.on("end", () => {
      try {
        resolve(JSON.parse(Buffer.concat(chunks).toString("utf8")));
      } catch {
        reject(new NatproxyError("BAD_REQUEST", "the body is not JSON"));
      }
    });
  });
}

const badRequest = (problems: string) => new NatproxyError("BAD_REQUEST", problems);

/** The reply address normalised, so same-ip compares one spelling of an IPv4 caller. */
const unmapped = (reply: HostPort): HostPort => ({ host: unmapIPv4(reply.host), port: reply.port });

function validateSession(body: unknown, client: HostPort): { session: string; target: HostPort; reply: HostPort; client: HostPort } {
  const { session, target, reply } = parseWith(sessionRequestSchema, body, badRequest);
  return { session, target, reply: unmapped(reply), client };
}

export function sendJson(res: ServerResponse, status: number, body: unknown): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  const text = JSON.stringify(body);
  res.writeHead(status, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(text), "Cache-Control": "no-store" });
  res.end(text);
}

function sendError(res: ServerResponse, e: NatproxyError): void {
  // After a refused body the rest of it is still on the wire: no keep-alive.
  if (e.code === "PAYLOAD_TOO_LARGE" && !res.headersSent) res.setHeader("Connection", "close");
  sendJson(res, e.status, { error: { code: e.code, message: e.message } } satisfies ErrorAnswer);
}
