import http, { type IncomingMessage, type ServerResponse } from "node:http";
import { NatproxyError } from "../../errors.ts";
import { logSession } from "../../request-log.ts";
import { clientOf, type HandlerContext } from "./context.ts";
import { endToEndHeaders } from "./hop-by-hop.ts";
import { PROXY_AUTH_CHALLENGE } from "./proxy-auth.ts";
import { sendError, toProxyError } from "./respond.ts";
import { targetOf } from "./target-url.ts";

/**
 * Plain-HTTP requests in absolute form. Each request goes over a pooled tunnel
 * to its own target, so one browser connection can talk to many hosts with
 * keep-alive, and bodies (fixed-length or chunked) stream through untouched.
 */
export function makeRequestHandler(ctx: HandlerContext) {
  return (req: IncomingMessage, res: ServerResponse): void => {
    const client = clientOf(req);
    let parsed;
    try {
      parsed = targetOf(req.url);
    } catch (err) {
      fail(toProxyError(err));
      return;
    }
    if (!ctx.authorize(req)) {
      fail(new NatproxyError("PROXY_AUTH_REQUIRED"), { "Proxy-Authenticate": PROXY_AUTH_CHALLENGE });
      return;
    }
    const headers = endToEndHeaders(req.rawHeaders);
    if (!headers.some((h, i) => i % 2 === 0 && h.toLowerCase() === "host")) headers.push("Host", parsed.hostHeader);
    const upstream = http.request({
      host: parsed.target.host,
      port: parsed.target.port,
      method: req.method,
      path: parsed.path,
      headers,
      setHost: false,
      agent: ctx.agent,
      natproxyClient: client,
    } as http.RequestOptions);
    upstream.on("response", (up) => {
      const out = endToEndHeaders(up.rawHeaders);
      res.writeHead(up.statusCode ?? 502, up.statusMessage, out);
      up.pipe(res);
      up.on("error", () => res.destroy());
    });
    upstream.on("error", (err) => {
      const e = toProxyError(err);
      if (e.code === "INTERNAL") e.message = `the target closed the connection: ${(err as NodeJS.ErrnoException).code ?? err.message}`;
      if (!res.headersSent) ctx.log.debug(`${client} ${req.method} ${req.url}: ${e.message}`);
      // The agent has written this session's line (a tunnel that failed to
      // open), or the tunnel's own line follows when it closes.
      fail(e, undefined, true);
    });
    // A browser that goes away mid-request aborts the upstream request too,
    // which frees (destroys) its tunnel instead of returning it half-used.
    res.on("close", () => {
      if (!res.writableFinished) upstream.destroy();
    });
    req.on("error", () => upstream.destroy());
    req.pipe(upstream);

    function fail(e: ReturnType<typeof toProxyError>, extra?: Record<string, string>, logged = false): void {
      if (!logged) {
        logSession(ctx.log, ctx.tunnels.metrics, { session: "-", client, target: req.url ?? "?", outcome: e.code, up: 0, down: 0, ms: 0, detail: e.message });
      }
      req.resume();
      sendError(res, e, extra);
    }
  };
}
