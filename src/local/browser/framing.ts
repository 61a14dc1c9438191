import http, { type IncomingMessage } from "node:http";
import { NatproxyError } from "../../errors.ts";

/**
 * How a browser request's body leaves for the target: always with framing
 * of its own (RFC 9112 §6), never as bare bytes after the head, which the
 * target would read as the next request on a tunnel that the pool then hands
 * to another browser. Node's parser has already refused what is ambiguous
 * (Content-Length with Transfer-Encoding, two lengths, a coding after
 * chunked, obs-fold, bare LF) and decoded a chunked body. Node's client
 * chunks the body again when the Transfer-Encoding we send names chunked,
 * and sends a Content-Length body as it came. With neither there is no body.
 */
export interface Framing {
  /** ["Transfer-Encoding", codings], ["Content-Length", n], or nothing. */
  headers: string[];
  /** The chunk boundaries are ours, not the browser's. */
  rechunked: boolean;
}

export function requestFraming(req: IncomingMessage): Framing {
  const codings = req.headers["transfer-encoding"];
  if (codings !== undefined) {
    // Other codings before chunked ("gzip, chunked") travel on untouched:
    // the body bytes still carry them.
    if (!/(?:^|,)[ \t]*chunked[ \t]*$/i.test(codings)) throw new NatproxyError("BAD_REQUEST", `Transfer-Encoding must end with chunked, got "${codings.slice(0, 100)}"`);
    return { headers: ["Transfer-Encoding", codings], rechunked: true };
  }
  const length = req.headers["content-length"];
  if (length !== undefined) return { headers: ["Content-Length", length], rechunked: false };
  return { headers: [], rechunked: false };
}

// reason-phrase = *( HTAB / SP / VCHAR / obs-text ), RFC 9112 §4.
const REASON = /^[\t\x20-\x7e\x80-\xff]*$/;

/**
 * Why a target's response head cannot be passed on as it is, or undefined.
 * Node's client parser accepts some heads that its server side refuses to
 * write (a control character in the status text, say); those are the
 * target's fault, and the browser gets a 502 for them, not a hang.
 */
export function responseHeadProblem(up: IncomingMessage, headers: readonly string[]): string | undefined {
  const status = up.statusCode ?? 0;
  if (status < 100 || status > 999) return `status ${status}`;
  if (!REASON.test(up.statusMessage ?? "")) return `status text ${JSON.stringify(up.statusMessage)}`;
  for (let i = 0; i < headers.length; i += 2) {
    try {
      http.validateHeaderName(headers[i]);
      http.validateHeaderValue(headers[i], headers[i + 1]);
    } catch {
      return `header ${JSON.stringify(headers[i].slice(0, 100))}`;
    }
  }
  return undefined;
}
