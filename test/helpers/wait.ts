/**
 * Waits for a condition that no event announces (counts reaching a baseline),
 * checking every 20 ms, bounded by `ms`; fails with `what` if it never holds.
 */
export async function waitUntil(cond: () => boolean, ms: number, what = "condition"): Promise<void> {
  const deadline = performance.now() + ms;
  while (!cond()) {
    if (performance.now() > deadline) throw new Error(`${what} did not hold within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Rejects, naming `what`, if `promise` has not settled within `ms`; its timer never outlives it. */
export function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}
