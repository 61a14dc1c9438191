import { NatproxyError } from "../../errors.ts";
import type { HostPort } from "../../address.ts";

/**
 * The target of an absolute-form request ("GET http://host:port/path").
 * Origin-form ("GET /") means the browser is not using us as a proxy.
 */
export function targetOf(rawUrl: string | undefined): { target: HostPort; path: string; hostHeader: string } {
  const text = rawUrl ?? "";
  if (text.startsWith("/")) {
    throw new NatproxyError("BAD_REQUEST", "this is natproxy's HTTP proxy port: set it as your browser's proxy instead of opening it as a web site");
  }
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new NatproxyError("BAD_REQUEST", `not an absolute URL: "${text.slice(0, 200)}"`);
  }
  if (url.protocol !== "http:") {
    throw new NatproxyError("BAD_REQUEST", `only http:// URLs are forwarded in absolute form; https goes through CONNECT (got ${url.protocol})`);
  }
  if (url.username || url.password) throw new NatproxyError("BAD_REQUEST", "credentials in the URL are not forwarded");
  const host = url.hostname.startsWith("[") ? url.hostname.slice(1, -1) : url.hostname;
  const port = url.port === "" ? 80 : Number(url.port);
  return { target: { host, port }, path: `${url.pathname}${url.search}`, hostHeader: url.host };
}
