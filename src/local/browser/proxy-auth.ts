import { createHash, timingSafeEqual } from "node:crypto";
import type { IncomingMessage } from "node:http";

/**
 * Proxy-Authorization: Basic against `[local] users` ("name:password").
 * With no users configured every client is let in; config validation makes
 * sure that only happens on a loopback listener.
 */
export function makeProxyAuth(users: readonly string[]): (req: IncomingMessage) => boolean {
  if (users.length === 0) return () => true;
  const digests = users.map((u) => createHash("sha256").update(u).digest());
  return (req) => {
    const m = /^Basic +([A-Za-z0-9+/=]+)\s*$/i.exec(req.headers["proxy-authorization"] ?? "");
    const offered = createHash("sha256").update(m ? Buffer.from(m[1], "base64").toString("utf8") : "").digest();
    let ok = false;
    for (const d of digests) ok = timingSafeEqual(d, offered) || ok;
    return ok && m !== null;
  };
}

export const PROXY_AUTH_CHALLENGE = 'Basic realm="natproxy"';
