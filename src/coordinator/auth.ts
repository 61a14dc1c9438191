import { createHash, timingSafeEqual } from "node:crypto";

/**
 * Bearer-token check in constant time: every configured token is compared
 * (as SHA-256 digests, so lengths never leak) whether or not one matched.
 * Returns the index of the matching token, for per-token accounting and logs.
 */
export function makeTokenCheck(tokens: readonly string[]): (authorization: string | undefined) => number | undefined {
  const digests = tokens.map((t) => createHash("sha256").update(t).digest());
  return (authorization) => {
    const m = /^Bearer +(\S+)\s*$/i.exec(authorization ?? "");
    const offered = createHash("sha256").update(m ? m[1] : "").digest();
    let found: number | undefined;
    digests.forEach((d, i) => {
      if (timingSafeEqual(d, offered) && m) found ??= i;
    });
    return found;
  };
}
