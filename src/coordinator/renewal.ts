import type { KeyPair } from "../tls/certs.ts";

// When the coordinator asks its ACME CA for a certificate: at start when it
// has no usable one, when a third of the lifetime is left (or renew_before),
// and after a failure with jittered exponential backoff. The old certificate
// is served until a new one is there; the schedule only decides the time.

/** setTimeout fires at once for delays above 2^31 - 1 ms (24.8 days); longer waits are chained. */
const MAX_TIMER = 2 ** 31 - 1;

export interface RenewalTime {
  /** Epoch milliseconds. */
  at: number;
  /** Why then, for the log. */
  rule: string;
}

/**
 * Renewal when `renewBefore` is left before expiry, or when a third of the
 * lifetime is left (renewBefore 0, or one not shorter than the lifetime: that
 * would renew at once after every issuance, a loop against the CA).
 */
export function renewalTime(kp: Pick<KeyPair, "validFrom" | "validTo">, renewBefore: number): RenewalTime {
  const from = kp.validFrom.getTime();
  const to = kp.validTo.getTime();
  const lifetime = Math.max(0, to - from);
  if (renewBefore > 0 && renewBefore < lifetime) return { at: to - renewBefore, rule: `renew_before (${renewBefore} ms) before expiry` };
  const third = `a third of its ${Math.round(lifetime / 1000)} s lifetime left`;
  return { at: to - Math.floor(lifetime / 3), rule: renewBefore > 0 ? `${third} (renew_before ${renewBefore} ms is not shorter than the lifetime)` : third };
}

/** After the n-th failure in a row (1, 2, ...): retryDelay doubling up to retryMaxDelay, then jittered down by up to half, so many coordinators do not retry in step. */
export function backoffDelay(failures: number, retryDelay: number, retryMaxDelay: number, random: () => number = Math.random): number {
  const base = Math.min(retryMaxDelay, retryDelay * 2 ** Math.max(0, failures - 1));
  return Math.round(base / 2 + (random() * base) / 2);
}

export interface RenewalOptions {
  renewBefore: number;
  retryDelay: number;
  retryMaxDelay: number;
  /** One issuance from the CA; rejects with an error that says what to fix. */
  issue: () => Promise<KeyPair>;
  onIssued: (kp: KeyPair, next: RenewalTime) => void;
  onFailed: (err: Error, failures: number, retryInMs: number) => void;
  random?: () => number;
}

export class RenewalSchedule {
  readonly #opts: RenewalOptions;
  #current: KeyPair | undefined;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #dueAt: number | undefined;
  #failures = 0;
  #closed = false;

  /** `current`: a cached CA-issued certificate, or undefined when there is none yet. */
  constructor(current: KeyPair | undefined, opts: RenewalOptions) {
    this.#current = current;
    this.#opts = opts;
  }

  /** Epoch milliseconds of the next issuance attempt, if one is scheduled. */
  get dueAt(): number | undefined {
    return this.#dueAt;
  }

  get failures(): number {
    return this.#failures;
  }

  /**
   * With no usable certificate: resolves after the first attempt (success or
   * not; failures are retried on the schedule). With one that is due, renews
   * in the background; otherwise only schedules.
   */
  async start(): Promise<void> {
    const current = this.#current;
    if (!current || current.validTo.getTime() <= Date.now()) return this.#run();
    const next = renewalTime(current, this.#opts.renewBefore);
    if (next.at <= Date.now()) void this.#run();
    else this.#schedule(next.at);
  }

  close(): void {
    this.#closed = true;
    clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#dueAt = undefined;
  }

  async #run(): Promise<void> {
    this.#dueAt = undefined;
    let kp: KeyPair;
    try {
      kp = await this.#opts.issue();
    } catch (err) {
      if (this.#closed) return;
      this.#failures += 1;
      const delay = backoffDelay(this.#failures, this.#opts.retryDelay, this.#opts.retryMaxDelay, this.#opts.random);
      this.#schedule(Date.now() + delay);
      this.#opts.onFailed(err instanceof Error ? err : new Error(String(err)), this.#failures, delay);
      return;
    }
    if (this.#closed) return;
    this.#failures = 0;
    this.#current = kp;
    const next = renewalTime(kp, this.#opts.renewBefore);
    this.#schedule(Math.max(next.at, Date.now()));
    this.#opts.onIssued(kp, next);
  }

  #schedule(at: number): void {
    if (this.#closed) return;
    clearTimeout(this.#timer);
    this.#dueAt = at;
    const wait = () => {
      const left = at - Date.now();
      if (left > 0) {
        this.#timer = setTimeout(wait, Math.min(left, MAX_TIMER));
        // The coordinator's server keeps the process alive; a renewal timer must not.
        this.#timer.unref?.();
        return;
      }
      this.#timer = undefined;
      void this.#run();
    };
    wait();
  }
}
