import { NatproxyError } from "./errors.ts";

// Two attempts at one connection, under the caller's AbortSignal, in the two
// shapes the roles need. hedge(): either attempt alone is enough, so the
// first success decides and a failure may not (the other attempt can still
// make it). both(): each attempt is half of the connection, so the first
// failure decides and a success does not. The rules for what decides are each
// other's mirror image, which is why they are two small functions rather than
// one with flags; what they share is written once, in Attempts: each attempt
// gets an abort of its own, tied to the caller's until the outcome is known,
// every attempt still running is cancelled the moment it is, and a value that
// arrives after that is handed back to be released, never dropped.

/** One attempt. It must settle soon after `signal` aborts, rejecting with an error that says why. */
export type Attempt<T> = (signal: AbortSignal) => Promise<T>;

/** The attempts of one race, and the caller's signal they answer to until it is decided. */
class Attempts {
  readonly #caller: AbortSignal | undefined;
  readonly #running = new Set<AbortController>();
  readonly #onCallerAbort: () => void;
  #decided = false;

  constructor(caller: AbortSignal | undefined, onCallerAbort: () => void) {
    this.#caller = caller;
    // A listener removed when the race is decided, not AbortSignal.any(): the
    // caller's signal may live as long as the process (the coordinator's
    // shutdown signal), and must not collect one dependant per session.
    this.#onCallerAbort = () => {
      for (const c of this.#running) c.abort(caller?.reason);
      onCallerAbort();
    };
    caller?.addEventListener("abort", this.#onCallerAbort, { once: true });
  }

  get callerGone(): boolean {
    return this.#caller?.aborted === true;
  }

  /** Starts an attempt; `ok` and `fail` hear its outcome while the race is open, `late` a value that came after. */
  start<T>(attempt: Attempt<T>, ok: (value: T) => void, fail: (err: unknown) => void, late: (value: T) => void): AbortController {
    const abort = new AbortController();
    if (this.#caller?.aborted) abort.abort(this.#caller.reason);
    this.#running.add(abort);
    let outcome: Promise<T>;
    try {
      outcome = attempt(abort.signal);
    } catch (err) {
      outcome = Promise.reject(err);
    }
    outcome.then(
      (value) => {
        this.#running.delete(abort);
        if (this.#decided) late(value);
        else ok(value);
      },
      (err: unknown) => {
        this.#running.delete(abort);
        if (!this.#decided) fail(err);
      },
    );
    return abort;
  }

  /** The outcome is known: what still runs is cancelled (an attempt that already succeeded is not touched). */
  decide(): void {
    if (this.#decided) return;
    this.#decided = true;
    this.#caller?.removeEventListener("abort", this.#onCallerAbort);
    if (!this.#running.size) return;
    const reason = new NatproxyError("CANCELLED", "the other attempt decided the outcome");
    for (const c of this.#running) c.abort(reason);
    this.#running.clear();
  }
}

export interface HedgeOptions<T> {
  /** Tried first. */
  primary: Attempt<T>;
  /** Started `delay` ms after the primary if nothing is decided by then, or at once when the primary fails in a way `fixable` accepts. */
  secondary: Attempt<T>;
  delay: number;
  /** A primary failure the secondary may still fix; any other primary failure is the answer. */
  fixable: (err: unknown) => boolean;
  /**
   * A secondary failure is the answer at once, even while the primary runs
   * (the secondary is the ground truth). Otherwise the primary is waited for,
   * and its failure is the answer only if `fixable` calls it final.
   */
  secondaryFinal?: boolean;
  /** How many attempts may be in flight at once: with 1, the secondary takes the primary's place at `delay` instead of running beside it. */
  attempts?: 1 | 2;
  /** Releases a value that arrived after the race was decided. */
  discard: (value: T) => void;
  /** The caller's: aborting it aborts both attempts, the secondary is not started any more, and the next failure is the answer. */
  signal?: AbortSignal;
}

/** The first of two attempts to succeed; the second is started after `delay`, or sooner if the first fails in a way it may fix. */
export function hedge<T>(o: HedgeOptions<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    let timer: NodeJS.Timeout | undefined;
    const attempts = new Attempts(o.signal, () => clearTimeout(timer));
    let primaryState: "running" | "failed" | "replaced" = "running";
    let secondaryState: "idle" | "running" | "failed" = "idle";
    let secondaryError: unknown;
    const win = (value: T) => {
      clearTimeout(timer);
      attempts.decide();
      resolve(value);
    };
    const lose = (err: unknown) => {
      clearTimeout(timer);
      attempts.decide();
      reject(err);
    };
    const startSecondary = () => {
      clearTimeout(timer);
      secondaryState = "running";
      attempts.start(
        o.secondary,
        win,
        (err) => {
          secondaryState = "failed";
          secondaryError = err;
          if (o.secondaryFinal || primaryState !== "running" || attempts.callerGone) lose(err);
        },
        o.discard,
      );
    };
    const primary = attempts.start(
      o.primary,
      // A primary that answers after all, even once replaced, is as good as any.
      win,
      (err) => {
        if (primaryState === "replaced") return;
        primaryState = "failed";
        if (attempts.callerGone || !o.fixable(err)) return lose(err);
        if (secondaryState === "failed") return lose(secondaryError);
        if (secondaryState === "idle") startSecondary();
      },
      o.discard,
    );
    timer = setTimeout(() => {
      if (attempts.callerGone || secondaryState !== "idle") return;
      if (o.attempts === 1) {
        primaryState = "replaced";
        primary.abort(new NatproxyError("CANCELLED", `no answer within ${o.delay} ms; another attempt takes its place`));
      }
      startSecondary();
    }, o.delay);
  });
}

/** One half of a connection for both(). */
export interface Leg<T> {
  attempt: Attempt<T>;
  /** Releases this leg's value when the other leg failed (before it came, or after): `err` is that failure. */
  release: (value: T, err: unknown) => void;
}

/** Two attempts started together, both needed: the first failure is the answer and cancels the other. */
export function both<A, B>(a: Leg<A>, b: Leg<B>, signal?: AbortSignal): Promise<[A, B]> {
  return new Promise((resolve, reject) => {
    const attempts = new Attempts(signal, () => {});
    let gotA: { value: A } | undefined;
    let gotB: { value: B } | undefined;
    let failure: unknown;
    const fail = (err: unknown) => {
      failure = err;
      attempts.decide();
      if (gotA) a.release(gotA.value, err);
      if (gotB) b.release(gotB.value, err);
      reject(err);
    };
    const check = () => {
      if (!gotA || !gotB) return;
      attempts.decide();
      resolve([gotA.value, gotB.value]);
    };
    attempts.start(a.attempt, (value) => ((gotA = { value }), check()), fail, (value) => a.release(value, failure));
    attempts.start(b.attempt, (value) => ((gotB = { value }), check()), fail, (value) => b.release(value, failure));
  });
}
