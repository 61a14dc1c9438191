// A configuration reload (SIGHUP, through src/cli.ts) on a running
// coordinator: tokens, limits, target rules and the timers of new sessions
// change in place; live tunnels keep the sockets, slots and timers they have.
import type https from "node:https";
import type { ConsolaInstance } from "consola";
import type { CoordinatorConfig } from "../config.ts";
import type { ApiContext } from "./api.ts";
import { makeTokenCheck } from "./auth.ts";
import type { SessionContext } from "./connect-back.ts";
import type { EngineContext } from "./open-engine.ts";
import { createTargetPolicy } from "./target-policy.ts";

/**
 * The accepted tokens, each under an id that survives reloads: the per-token
 * limits count by id, so a token kept across a reload keeps its live tunnels'
 * count, and one removed keeps its id (its live tunnels still release their
 * slots) but is refused from then on, on ready connections it opened before too.
 */
export class TokenTable {
  readonly #ids = new Map<string, number>();
  #live = new Set<number>();
  #idAt: number[] = [];
  #check: (authorization: string | undefined) => number | undefined;

  constructor(tokens: readonly string[]) {
    this.#check = makeTokenCheck([]);
    this.replace(tokens);
  }

  /** The id of the token an Authorization header carries, or undefined (constant time: makeTokenCheck). */
  check(authorization: string | undefined): number | undefined {
    const i = this.#check(authorization);
    return i === undefined ? undefined : this.#idAt[i];
  }

  isLive(id: number): boolean {
    return this.#live.has(id);
  }

  get size(): number {
    return this.#live.size;
  }

  replace(tokens: readonly string[]): { added: number; removed: number } {
    const idAt = tokens.map((t) => {
      let id = this.#ids.get(t);
      if (id === undefined) this.#ids.set(t, (id = this.#ids.size));
      return id;
    });
    const live = new Set(idAt);
    const added = [...live].filter((id) => !this.#live.has(id)).length;
    const removed = [...this.#live].filter((id) => !live.has(id)).length;
    this.#check = makeTokenCheck(tokens);
    this.#idAt = idAt;
    this.#live = live;
    return { added, removed };
  }
}

/** What a reload changes: the running coordinator's contexts, held by reference. */
export interface ReloadTarget {
  /** The configuration the coordinator started with: what the restart-only keys still are. */
  started: CoordinatorConfig;
  tokens: TokenTable;
  session: SessionContext;
  engine: EngineContext;
  api: ApiContext;
  server: https.Server;
  log: ConsolaInstance;
}

// Bound to sockets that are open for the process's life, or read once at start.
const RESTART_KEYS = ["listen", "cert", "key", "reporter", "proxy_protocol", "metrics_listen"] as const;

/**
 * Applies `next` (already validated by loadConfig) and returns the keys that
 * differ but take a restart to change. Whatever can fail runs before anything
 * is changed, so a reload that throws leaves the old configuration whole.
 */
export function reloadCoordinator(t: ReloadTarget, next: CoordinatorConfig): string[] {
  const policy = createTargetPolicy({ ...next.targetRules, ownAddresses: next.own_addresses });
  const connectBackTargets = createTargetPolicy({ ...next.connectBackRules, ownAddresses: next.own_addresses });

  const tokens = t.tokens.replace(next.tokens);
  t.session.limits.setLimits(next.max_sessions, next.max_sessions_per_token);
  t.engine.readyLimits.setLimits(next.max_sessions, next.max_sessions_per_token);
  Object.assign(t.session, {
    policy,
    connectTimeout: next.connect_timeout,
    handshakeTimeout: next.handshake_timeout,
    idleTimeout: next.session_idle_timeout,
    finTimeout: next.fin_timeout,
  } satisfies Partial<SessionContext>);
  Object.assign(t.engine, {
    policy,
    connectTimeout: next.connect_timeout,
    openTimeout: next.open_timeout,
    idleTimeout: next.session_idle_timeout,
    finTimeout: next.fin_timeout,
  } satisfies Partial<EngineContext>);
  t.api.connectBackPolicy = next.connect_back;
  t.api.connectBackTargets = connectBackTargets;
  // Node reads these per connection and request; how often it checks them
  // (connectionsCheckingInterval, at most 1 s) was fixed at start.
  t.server.requestTimeout = next.request_timeout;
  t.server.headersTimeout = Math.min(next.request_timeout, next.handshake_timeout);
  t.server.keepAliveTimeout = next.keep_alive_timeout;

  const restart: string[] = RESTART_KEYS.filter((k) => JSON.stringify(t.started[k]) !== JSON.stringify(next[k]));
  // Node's TLS server takes its handshake timeout once, at creation, and the
  // PROXY-header reader was armed with it at start too.
  if (next.handshake_timeout !== t.started.handshake_timeout) restart.push(`handshake_timeout (for TLS handshakes on the HTTPS port and the PROXY header; connect-backs and API request heads use ${next.handshake_timeout} ms now)`);
  t.log.info(
    `configuration reloaded: ${t.tokens.size} token(s) (${tokens.added} added, ${tokens.removed} removed), ` +
      `max_sessions ${next.max_sessions}, max_sessions_per_token ${next.max_sessions_per_token}, ` +
      `${next.allow_targets.length} allow_targets and ${next.deny_targets.length} deny_targets entries, ` +
      `${next.allow_connect_back.length} allow_connect_back entries; live tunnels keep their settings`,
  );
  return restart;
}
