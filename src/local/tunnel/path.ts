import type { ConsolaInstance } from "consola";
import { v4 as uuidv4 } from "uuid";
import { lookup } from "node:dns/promises";
import { isIP } from "node:net";
import { formatHostPort, unmapIPv4 } from "../../address.ts";
import { NatproxyError } from "../../errors.ts";
import type { CoordinatorClient } from "../coordinator/client.ts";
import type { SessionTable } from "./connect-back.ts";
import type { NatMapping } from "../nat/mapping-service.ts";

export type DataPathMode = "auto" | "connect-back" | "outbound";
export type DataPath = "connect-back" | "outbound";

export interface ProbeResult {
  ok: boolean;
  ms: number;
  error?: NatproxyError;
}

/** What the start-up workflow learned, in a form --check prints and tests read. */
export interface Reachability {
  publicAddress: string;
  localAddress: string;
  /** No address translation between this machine and the reporter. */
  nat: boolean;
  portPreserved: boolean;
  probe: ProbeResult;
  /** The NAT behaviour these observations point to, in words. */
  behaviour: string;
}

/**
 * One connect-back, carrying a fresh id and nothing else: the only reliable
 * way to learn whether this NAT lets the coordinator in to P'.
 */
export async function probeConnectBack(coordinator: CoordinatorClient, sessions: SessionTable, state: NatMapping, timeout: number): Promise<ProbeResult> {
  const id = uuidv4();
  const started = performance.now();
  const arrival = sessions.expect(id, timeout);
  const abort = new AbortController();
  coordinator.probe({ probe: id, reply: state.publicAddress }, abort.signal).catch((err: Error) => sessions.fail(id, err));
  try {
    const socket = await arrival;
    socket.destroy();
    return { ok: true, ms: Math.round(performance.now() - started) };
  } catch (err) {
    const e = err instanceof NatproxyError ? err : new NatproxyError("INTERNAL", (err as Error).message);
    return { ok: false, ms: Math.round(performance.now() - started), error: e };
  } finally {
    abort.abort();
  }
}

/** Probe failures on the way to the coordinator (token, certificate, coordinator down), before any connect-back was tried. */
const NOT_ASKED: ReadonlySet<string> = new Set(["UNAUTHORIZED", "COORDINATOR_REFUSED", "COORDINATOR_UNREACHABLE", "CERT_UNTRUSTED", "CERT_PIN_MISMATCH"]);

export function describeReachability(state: NatMapping, probe: ProbeResult, coordinatorHost: string): Reachability {
  const pub = formatHostPort(state.publicAddress.host, state.publicAddress.port);
  const nat = state.publicAddress.host !== state.localAddress;
  const portPreserved = state.publicAddress.port === state.localPort;
  const sameIp = state.reporter.host === coordinatorHost;
  let behaviour: string;
  const mapping = portPreserved ? `port ${state.localPort} kept` : `port ${state.localPort} mapped to ${state.publicAddress.port}`;
  if (probe.error && NOT_ASKED.has(probe.error.code)) {
    // The coordinator never got the probe: the network is not to blame.
    behaviour = `not known: the coordinator could not be asked to connect back (${probe.error.code}: ${probe.error.message})`;
  } else if (probe.error?.code === "FORBIDDEN") {
    behaviour = `the coordinator refused to connect back (${probe.error.message})`;
  } else if (!nat) {
    behaviour = probe.ok
      ? `no NAT: this machine's own address ${state.localAddress} is public, and inbound connections reach port ${state.localPort}`
      : `no NAT, but a firewall drops inbound connections to port ${state.localPort} (a stateful firewall lets only connections this machine opened back in)`;
  } else if (probe.ok) {
    behaviour = sameIp
      ? `behind a NAT (${mapping}) that lets the coordinator in to ${pub}: full-cone, or address-restricted with the reporter on the coordinator's address`
      : `behind a full-cone NAT (${mapping}): it lets any outside host in to ${pub}`;
  } else {
    behaviour =
      `behind a NAT (${mapping}) that drops connections this machine did not open: ` +
      (sameIp ? "port-restricted or symmetric NAT, or a firewall" : "address- or port-restricted or symmetric NAT, or a firewall");
  }
  return { publicAddress: pub, localAddress: state.localAddress, nat, portPreserved, probe, behaviour };
}

/**
 * Which path the next tunnel takes. With `auto`, connect-back is used while
 * the last probe got through and no connect-back has failed since; any doubt
 * means outbound, which works wherever the coordinator's HTTPS port does.
 */
export class PathChooser {
  readonly mode: DataPathMode;
  readonly #origin: string;
  readonly #log: ConsolaInstance;
  #connectBackWorks = false;
  #reachability: Reachability | undefined;

  /** `origin`: the coordinator's URL origin, which the outbound path dials. */
  constructor(mode: DataPathMode, origin: string, log: ConsolaInstance) {
    this.mode = mode;
    this.#origin = origin;
    this.#log = log;
  }

  current(): DataPath {
    if (this.mode !== "auto") return this.mode;
    return this.#connectBackWorks ? "connect-back" : "outbound";
  }

  get reachability(): Reachability | undefined {
    return this.#reachability;
  }

  /** The path in words, and why: the line the log and tests read. */
  describe(): string {
    return `tunnel path: ${this.current()}, ${this.#why()}`;
  }

  /** Records a probe and logs, in words, what it means and which path follows. */
  probed(r: Reachability): void {
    this.#reachability = r;
    this.#connectBackWorks = r.probe.ok;
    const probe = r.probe.ok ? `the coordinator connected back in ${r.probe.ms} ms` : `no connect-back got through (${r.probe.error?.message ?? "unknown"})`;
    this.#log.info(`reachability: public address ${r.publicAddress}; ${r.behaviour}; ${probe}`);
    this.#log.info(this.describe());
    if (this.mode === "connect-back" && !r.probe.ok) {
      this.#log.warn(`[local] tunnel = "connect-back", but the probe did not get through: sessions will fail with CONNECT_BACK_TIMEOUT. Set tunnel = "auto" to use the outbound path.`);
    }
  }

  /** The tunnel service is down (reporter gone, mapping changed): no connect-back until the next probe. */
  tunnelDown(why: string): void {
    if (this.mode === "auto" && this.#connectBackWorks) this.#log.info(`tunnel path: outbound until the tunnel service is back (${why})`);
    this.#connectBackWorks = false;
  }

  /** A session's connect-back failed: with `auto`, switch at once; the next probe may switch back. */
  connectBackFailed(err: NatproxyError): void {
    if (this.mode !== "auto" || !this.#connectBackWorks) return;
    this.#connectBackWorks = false;
    this.#log.warn(`connect-back failed (${err.message}); tunnel path: outbound until the next probe succeeds`);
  }

  #why(): string {
    const out = `each browser connection dials ${this.#origin} over TLS`;
    if (this.mode === "outbound") return `${out}, because [local] tunnel = "outbound"`;
    const r = this.#reachability;
    const back = `the coordinator connects back to ${r?.publicAddress ?? "?"} for each browser connection`;
    if (this.mode === "connect-back") return `${back}, because [local] tunnel = "connect-back"`;
    return this.#connectBackWorks ? `${back}, because the probe got through` : `${out}, because a connect-back cannot get in from here`;
  }
}

export function isConnectBackFailure(err: unknown): err is NatproxyError {
  return err instanceof NatproxyError && (err.code === "CONNECT_BACK_TIMEOUT" || err.code === "CONNECT_BACK_FAILED" || err.code === "TUNNEL_NOT_READY");
}

/**
 * The coordinator's address, for comparing with the reporter's (a combined
 * coordinator+reporter changes what a NAT lets in). A name that does not
 * resolve yet is kept as it is; the API call will say why.
 */
export async function resolveHost(host: string): Promise<string> {
  if (isIP(host)) return unmapIPv4(host);
  try {
    return (await lookup(host)).address;
  } catch {
    return host;
  }
}
