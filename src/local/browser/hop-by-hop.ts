// Headers that describe one hop (browser <-> proxy, or proxy <-> server) and
// must not be forwarded (RFC 9110 §7.6.1), plus any header named in Connection.
const HOP_BY_HOP = new Set([
  "connection",
  "proxy-connection",
  "keep-alive",
  "proxy-authenticate",
  "proxy-authorization",
  "te",
  "trailer",
  "transfer-encoding",
  "upgrade",
]);

// Connection names hop-by-hop fields only: it never removes the length or
// the Host (RFC 9110 §7.6.1). A "Connection: content-length" that took the
// length away would leave the body to be read as the next request.
// (Transfer-Encoding is hop-by-hop itself; the request handler frames bodies.)
const NEVER_NAMED = new Set(["content-length", "host"]);

/**
 * Filters a raw header list (name, value, name, value, ...) keeping the
 * original names, order and duplicates.
 */
export function endToEndHeaders(raw: readonly string[], keep: readonly string[] = []): string[] {
  const named = new Set<string>();
  for (let i = 0; i < raw.length; i += 2) {
    if (raw[i].toLowerCase() === "connection" || raw[i].toLowerCase() === "proxy-connection") {
      for (const token of raw[i + 1].split(",")) {
        const t = token.trim().toLowerCase();
        if (!NEVER_NAMED.has(t)) named.add(t);
      }
    }
  }
  const keepSet = new Set(keep.map((k) => k.toLowerCase()));
  const out: string[] = [];
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i].toLowerCase();
    if ((HOP_BY_HOP.has(name) || named.has(name)) && !keepSet.has(name)) continue;
    out.push(raw[i], raw[i + 1]);
  }
  return out;
}
