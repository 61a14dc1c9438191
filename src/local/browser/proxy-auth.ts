import { createHash, timingSafeEqual } from "node:crypto";
import type { IncomingMessage } from "node:http";

/**
 * Proxy-Authorization: Basic against `[local] users` ("name:password").
 * With no users configured every client is let in; config validation makes
 * sure that only happens on a loopback listener.
 */
export function makeProxyAuth(users: readonly string[]): (req: IncomingMessage) => boolean {
  if (users.length === 0) return () => true;
  const check = makeCredentialCheck(users);
  return (req) => {
    const m = /^Basic +([A-Za-z0-9+/=]+)\s*$/i.exec(req.headers["proxy-authorization"] ?? "");
    return check(m ? Buffer.from(m[1], "base64").toString("utf8") : undefined);
  };
}

/** "name:password" against `[local] users`, in time that does not depend on which user (if any) matched. */
export function makeCredentialCheck(users: readonly string[]): (credential: string | undefined) => boolean {
  const digests = users.map((u) => createHash("sha256").update(u).digest());
  return (credential) => {
    const offered = createHash("sha256").update(credential ?? "").digest();
    let ok = false;
    for (const d of digests) ok = timingSafeEqual(d, offered) || ok;
    return ok && credential !== undefined;
  };
}

export const PROXY_AUTH_CHALLENGE = 'Basic realm="natproxy"';
