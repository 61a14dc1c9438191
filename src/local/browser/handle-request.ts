import http, { type IncomingMessage, type ServerResponse } from "node:http";
import { formatHostPort } from "../../address.ts";
import { NatproxyError } from "../../errors.ts";
import { logSession } from "../../request-log.ts";
import { clientOf, type HandlerContext } from "./context.ts";
import { requestFraming, responseHeadProblem, type Framing } from "./framing.ts";
import { endToEndHeaders } from "./hop-by-hop.ts";
import { PROXY_AUTH_CHALLENGE } from "./proxy-auth.ts";
import { sendError, toProxyError } from "./respond.ts";
import { targetOf } from "./target-url.ts";

/**
 * Plain-HTTP requests in absolute form. Each request goes over a pooled tunnel
 * to its own target, so one browser connection can talk to many hosts with
 * keep-alive, and bodies (fixed-length or chunked) stream through, each with
 * framing of its own (framing.ts).
 */
export function makeRequestHandler(ctx: HandlerContext) {
  return (req: IncomingMessage, res: ServerResponse): void => {
    const client = clientOf(req);
    let answered = false;
    let parsed: ReturnType<typeof targetOf>;
    let framing: Framing;
    try {
      parsed = targetOf(req.url);
      framing = requestFraming(req);
    } catch (err) {
      fail(toProxyError(err));
      return;
    }
    if (!ctx.authorize(req)) {
      fail(new NatproxyError("PROXY_AUTH_REQUIRED"), { "Proxy-Authenticate": PROXY_AUTH_CHALLENGE });
      return;
    }
    const name = formatHostPort(parsed.target.host, parsed.target.port);
    // The Host is the URL's authority, whatever the browser's header said
    // (RFC 9112 §3.2.2); the length or the chunking is ours to send.
    const headers = ["Host", parsed.hostHeader];
    const rest = endToEndHeaders(req.rawHeaders);
    for (let i = 0; i < rest.length; i += 2) {
      const n = rest[i].toLowerCase();
      if (n !== "host" && n !== "content-length") headers.push(rest[i], rest[i + 1]);
    }
    headers.push(...framing.headers);
    let upstream: http.ClientRequest;
    try {
      upstream = http.request({
        host: parsed.target.host,
        port: parsed.target.port,
        method: req.method,
        path: parsed.path,
        headers,
        setHost: false,
        agent: ctx.agent,
        natproxyClient: client,
      } as http.RequestOptions);
    } catch (err) {
      fail(new NatproxyError("BAD_REQUEST", `cannot forward this request: ${(err as Error).message}`));
      return;
    }
    // Chunk boundaries that are ours are not what the browser sent: that
    // tunnel is not handed to anyone else afterwards.
    if (framing.rechunked) ctx.agent.retire(upstream);
    upstream.on("response", (up) => {
      const out = endToEndHeaders(up.rawHeaders);
      const problem = responseHeadProblem(up, out);
      if (problem) {
        fail(new NatproxyError("TARGET_BAD_RESPONSE", `${name}: ${problem}`));
        // Destroyed, not pooled: whatever follows this head is unknown.
        upstream.destroy();
        return;
      }
      res.writeHead(up.statusCode as number, up.statusMessage, out);
      up.pipe(res);
      up.on("error", () => res.destroy());
      // A target that answered before it had the whole body may still read
      // the rest of it as a request of its own.
      up.once("end", () => {
        if (!upstream.writableFinished) ctx.agent.retire(upstream);
      });
    });
    upstream.on("error", (err: NodeJS.ErrnoException) => {
      const e = upstreamError(err, name);
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

    // Only the first failure answers: a later one (the tunnel closing after
    // a refused head) must not cut the answer already on its way.
    function fail(e: NatproxyError, extra?: Record<string, string>, logged = false): void {
      if (answered) return;
      answered = true;
      if (!logged) {
        logSession(ctx.log, ctx.tunnels.metrics, { session: "-", client, target: req.url ?? "?", outcome: e.code, up: 0, down: 0, ms: 0, detail: e.message });
      }
      req.resume();
      sendError(res, e, extra);
    }
  };
}

/** The tunnel is open by now (opening errors are NatproxyErrors): what is left is the target's doing. */
function upstreamError(err: NodeJS.ErrnoException, target: string): NatproxyError {
  if (err instanceof NatproxyError) return err;
  const code = err.code ?? err.message;
  // Node's client parser refused the response (HPE_INVALID_CONSTANT, ...).
  if (code.startsWith("HPE_")) return new NatproxyError("TARGET_BAD_RESPONSE", `${target}: ${(err as { reason?: string }).reason ?? code} [${code}]`, { cause: err });
  return new NatproxyError("TARGET_RESET", `${target}: the connection closed before the answer was complete (${code})`, { cause: err });
}
