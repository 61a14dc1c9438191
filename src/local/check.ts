import { formatHostPort } from "../address.ts";
import type { LocalConfig } from "../config.ts";
import { NatproxyError } from "../errors.ts";
import { roleLogger } from "../log.ts";
import { describeTrust } from "../tls/trust.ts";
import { describeReachability, probeConnectBack, resolveHost, type Reachability, type DataPath } from "./tunnel/path.ts";

import { localParts, mappingServiceFor } from "./parts.ts";

export interface CheckReport {
  /** A path that works was found (and is the one the configured mode would use). */
  ok: boolean;
  /** What a user reads, one finding per line. */
  lines: string[];
  path?: DataPath;
  reachability?: Reachability;
}

const fail = (err: unknown) => (err instanceof NatproxyError ? `${err.message} [${err.code}]` : String((err as Error)?.message ?? err));

/**
 * `natproxy local --check`: the start-up workflow once, every step reported,
 * nothing left running. It exercises the same code the proxy uses, so a
 * green check means the proxy will work from this network as configured.
 */
export async function runCheck(config: LocalConfig): Promise<CheckReport> {
  const lines: string[] = [];
  const log = roleLogger("local");
  const parts = localParts(config);
  const { hostname, trust, coordinator, dialer: outbound, sessions, sockets } = parts;
  const mappingService = mappingServiceFor({ ...config, reporter_retries: 0 }, parts, log);
  try {
    lines.push(`coordinator:   ${config.coordinatorUrl.origin} (trusting ${describeTrust(trust)})`);
    let apiOk = false;
    try {
      const hello = await coordinator.hello(config.hello_timeout);
      apiOk = true;
      lines.push(`  ok           natproxy ${hello.version}; certificate accepted; token accepted; it sees us as ${formatHostPort(hello.client.host, hello.client.port)}`);
    } catch (err) {
      lines.push(`  PROBLEM      ${fail(err)}`);
    }

    let outboundOk = false;
    if (apiOk) {
      try {
        await outbound.check();
        outboundOk = true;
        lines.push(`  ok           outbound path: the coordinator accepts tunnels on its HTTPS port`);
      } catch (err) {
        lines.push(`  PROBLEM      outbound path: ${fail(err)}`);
      }
    }

    const reporter = formatHostPort(config.reporterAddress.host, config.reporterAddress.port);
    lines.push(`reporter:      ${reporter} (STUN over TCP)`);
    const up = await mappingService.start();
    const state = mappingService.state;
    let reachability: Reachability | undefined;
    if (!up || !state) {
      lines.push(`  PROBLEM      ${fail(mappingService.lastError)}; connect-back cannot be used without a public address`);
    } else {
      lines.push(`  ok           public address ${formatHostPort(state.publicAddress.host, state.publicAddress.port)}, seen from local ${formatHostPort(state.localAddress, state.localPort)}`);
      if (apiOk) {
        const probe = await probeConnectBack(coordinator, sessions, state, config.probe_timeout);
        const coordinatorHost = await resolveHost(hostname);
        reachability = describeReachability(state, probe, coordinatorHost);
        lines.push(`connect-back:  ${probe.ok ? `ok, the coordinator connected back in ${probe.ms} ms` : `blocked: ${fail(probe.error)}`}`);
        lines.push(`NAT:           ${reachability.behaviour}`);
      }
    }

    const backOk = reachability?.probe.ok === true;
    let path: DataPath | undefined;
    let ok: boolean;
    if (config.tunnel === "connect-back") {
      path = "connect-back";
      ok = backOk;
      lines.push(`tunnel path:   connect-back ([local] tunnel = "connect-back")${backOk ? "" : ` — it does not work from here; set tunnel = "auto"`}`);
    } else if (config.tunnel === "outbound") {
      path = "outbound";
      ok = outboundOk;
      lines.push(`tunnel path:   outbound ([local] tunnel = "outbound")${outboundOk ? "" : " — it does not work from here"}`);
    } else {
      path = backOk ? "connect-back" : outboundOk ? "outbound" : undefined;
      ok = path !== undefined;
      lines.push(
        path === "connect-back"
          ? `tunnel path:   connect-back (auto: the probe got through)`
          : path === "outbound"
            ? `tunnel path:   outbound (auto: a connect-back cannot get in from here)`
            : `tunnel path:   NONE works: fix the problems above`,
      );
    }
    lines.push(ok ? "result:        OK" : "result:        FAILED");
    return { ok, lines, path, reachability };
  } finally {
    sessions.failAll(new NatproxyError("SHUTTING_DOWN"));
    await mappingService.close();
    coordinator.close();
    sockets.destroyAll();
  }
}
