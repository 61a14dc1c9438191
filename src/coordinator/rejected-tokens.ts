import type { ConsolaInstance } from "consola";

/**
 * Says that a caller's token was refused, at most once per caller address per
 * window: a misconfigured local proxy retries constantly, and a scanner
 * should not be able to fill the log. The token itself is never logged.
 */
export function rejectedTokenLog(log: ConsolaInstance, windowMs = 60_000, maxTracked = 4096): (host: string, what: string) => void {
  const last = new Map<string, number>();
  return (host, what) => {
    const now = Date.now();
    const seen = last.get(host);
    if (seen !== undefined && now - seen < windowMs) return;
    // Bounded: forget the oldest callers first (Map keeps insertion order).
    last.delete(host);
    if (last.size >= maxTracked) last.delete(last.keys().next().value as string);
    last.set(host, now);
    log.warn(`${what} from ${host} refused: missing or invalid token (401); logged once a minute per address`);
  };
}
