import type { IncomingMessage, ServerResponse } from "node:http";
import { isIP, type Socket } from "node:net";
import type { ConsolaInstance } from "consola";
import { formatHostPort, unmapIPv4, type HostPort } from "../address.ts";
import { NatproxyError } from "../errors.ts";
import type { CallerOf } from "./proxy-header.ts";
import { API } from "../protocol/api.ts";
import { VERSION } from "../version.ts";
import { isSessionId } from "../protocol/wire.ts";
import type { ProbeRequest, ReadyRequest, SessionRequest } from "./connect-back.ts";

const MAX_BODY = 16 * 1024;

export interface ApiContext {
  checkToken(authorization: string | undefined): number | undefined;
  connectBackPolicy: "same-ip" | "any";
  /** The caller's address: the TCP peer, or the one a PROXY header named. */
  callerOf: CallerOf;
  /** The connection carried a valid token: it no longer counts as unauthenticated. */
  authenticated(socket: Socket): void;
  openSession(req: SessionRequest): Promise<{ targetAddress: string }>;
  probe(req: ProbeRequest): Promise<{ ms: number }>;
  ready(req: ReadyRequest): Promise<{ ms: number }>;
  log: ConsolaInstance;
}

/** Routes the HTTPS API; each failure becomes a JSON error with a stable code. */
export function apiHandler(ctx: ApiContext) {
  return (req: IncomingMessage, res: ServerResponse): void => {
    handle(ctx, req, res).catch((err: unknown) => {
      const e = err instanceof NatproxyError ? err : new NatproxyError("INTERNAL", (err as Error)?.message);
      if (e.code === "INTERNAL") ctx.log.error("API request failed:", err);
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
    sendJson(res, 200, { software: "natproxy", version: VERSION, client, connect_back: ctx.connectBackPolicy });
    return;
  }
  if (route === API.tunnel) {
    req.resume();
    throw new NatproxyError("BAD_REQUEST", "the tunnel path takes an HTTP Upgrade to natproxy-tunnel/1");
  }
  if (req.method !== "POST") throw methodNotAllowed(res, "POST");
  const body = await readJson(req);
  if (route === API.probe) {
    const probe = validateProbe(body, ctx.callerOf(req.socket));
    checkConnectBack(ctx, probe.reply.host, probe.client.host);
    const { ms } = await ctx.probe({ token, probe: probe.probe, reply: probe.reply, client: formatHostPort(probe.client.host, probe.client.port) });
    sendJson(res, 200, { probe: probe.probe, outcome: "connected", ms });
    return;
  }
  if (route === API.ready) {
    const r = validateReady(body, ctx.callerOf(req.socket));
    checkConnectBack(ctx, r.reply.host, r.client.host);
    const { ms } = await ctx.ready({ token, ready: r.ready, reply: r.reply, client: formatHostPort(r.client.host, r.client.port) });
    sendJson(res, 200, { ready: r.ready, outcome: "connected", ms });
    return;
  }
  const sessionReq = validateSession(body, ctx.callerOf(req.socket));
  checkConnectBack(ctx, sessionReq.reply.host, sessionReq.client.host);
  const { targetAddress } = await ctx.openSession({
    token,
    session: sessionReq.session,
    target: sessionReq.target,
    reply: sessionReq.reply,
    client: formatHostPort(sessionReq.client.host, sessionReq.client.port),
  });
  sendJson(res, 200, { session: sessionReq.session, outcome: "bridged", target_address: targetAddress });
}

function checkConnectBack(ctx: ApiContext, reply: string, client: string): void {
  if (ctx.connectBackPolicy === "same-ip" && reply !== client) {
    throw new NatproxyError("FORBIDDEN", `connect-back to ${reply} refused: this request came from ${client}, and connect_back = "same-ip"`);
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

const HOSTNAME = /^(?=.{1,253}$)(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?)(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?)*\.?$/i;

function validateSession(body: unknown, client: HostPort): { session: string; target: HostPort; reply: HostPort; client: HostPort } {
  const problems: string[] = [];
  const b = (typeof body === "object" && body !== null ? body : {}) as Record<string, unknown>;
  if (!isSessionId(b.session)) problems.push("session: expected a UUID v4");
  const target = checkHostPort(b.target, "target", problems, false);
  const reply = checkHostPort(b.reply, "reply", problems, true);
  if (problems.length) throw new NatproxyError("BAD_REQUEST", problems.join("; "));
  return { session: b.session as string, target, reply: { host: unmapIPv4(reply.host), port: reply.port }, client };
}

function validateProbe(body: unknown, client: HostPort): { probe: string; reply: HostPort; client: HostPort } {
  const { id, reply } = validateConnectBack(body, "probe");
  return { probe: id, reply, client };
}

function validateReady(body: unknown, client: HostPort): { ready: string; reply: HostPort; client: HostPort } {
  const { id, reply } = validateConnectBack(body, "ready");
  return { ready: id, reply, client };
}

/** `{ <idKey>: uuid, reply: { host: ip, port } }`: a connect-back that carries only its id. */
function validateConnectBack(body: unknown, idKey: "probe" | "ready"): { id: string; reply: HostPort } {
  const problems: string[] = [];
  const b = (typeof body === "object" && body !== null ? body : {}) as Record<string, unknown>;
  if (!isSessionId(b[idKey])) problems.push(`${idKey}: expected a UUID v4`);
  const reply = checkHostPort(b.reply, "reply", problems, true);
  if (problems.length) throw new NatproxyError("BAD_REQUEST", problems.join("; "));
  return { id: b[idKey] as string, reply: { host: unmapIPv4(reply.host), port: reply.port } };
}

/** Checks `{ host, port }` from a request; every problem goes into `problems`, named `name.host` / `name.port`. */
export function checkHostPort(v: unknown, name: string, problems: string[], ipOnly: boolean): HostPort {
  const o = (typeof v === "object" && v !== null ? v : {}) as Record<string, unknown>;
  const host = typeof o.host === "string" ? o.host : "";
  const port = o.port;
  const hostOk = isIP(host) !== 0 || (!ipOnly && HOSTNAME.test(host));
  if (!hostOk) problems.push(`${name}.host: expected ${ipOnly ? "an IP address" : "a host name or IP address"}`);
  if (typeof port !== "number" || !Number.isInteger(port) || port < 1 || port > 65535) problems.push(`${name}.port: expected 1-65535`);
  return { host, port: port as number };
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
  sendJson(res, e.status, { error: { code: e.code, message: e.message } });
}
