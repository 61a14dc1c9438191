/**
 * Which targets the coordinator may connect to on behalf of a local proxy.
 *
 * The coordinator sits on a public address and dials whatever host:port an
 * authenticated local proxy names, so without a policy it is an SSRF tool
 * pointed at its own loopback, its LAN and the cloud metadata service. The
 * policy judges the address actually connected to (after DNS, through the
 * `lookup` handed to net.connect), so a name that resolves, or re-resolves,
 * to an internal address gains nothing.
 *
 * Decision order, for the requested name and for every resolved address:
 *   1. a deny_targets entry matches            -> refused
 *   2. an allow_targets entry matches          -> allowed
 *   3. the address is in a default-refused range
 *      or is one of the coordinator's own      -> refused
 *   4. otherwise                               -> allowed (every port)
 *
 * Entries (allow_targets / deny_targets) are CIDRs, addresses, host names
 * and patterns, each optionally with ports: see src/target-rules.ts, which
 * parses them once, when the configuration is validated.
 *
 * Host patterns match the name the client asked for, not the resolved
 * address: an allowed pattern permits whatever that name resolves to. Prefer
 * CIDR entries for internal targets; a wildcard pattern over names someone
 * else controls re-opens DNS rebinding for those names.
 *
 * Deny entries also match the IPv4 address embedded in an IPv6 target (6to4,
 * NAT64, Teredo, IPv4-compatible); allow entries match only the address as
 * connected to.
 *
 * Documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24,
 * 2001:db8::/32) are NOT refused by default: they never route on the real
 * internet, so refusing them protects nothing, while natproxy's NAT lab uses
 * 203.0.113.x and 198.51.100.x as its "internet".
 *
 * net.connect skips `lookup` for a host that is already an IP literal (by
 * experiment on Node 22), so a literal such as "::ffff:127.0.0.1" never reaches
 * the lookup: call checkName (or use connectOptions, which does both) for every
 * target before dialling.
 */
import dns from "node:dns";
import net from "node:net";
import os from "node:os";
import ipaddr from "ipaddr.js";
import { parseIP, type IPAddress } from "../address.ts";
import { embeddedIPv4, refusedRange } from "./address-ranges.ts";
import { normalizeHost, type NormalizedHost, type TargetRule, type TargetRules } from "../target-rules.ts";

export type PolicyDecision = { allowed: true } | { allowed: false; reason: string };

/** The subset of dns.lookup the policy uses; replaceable for tests. */
export type LookupAll = (
  hostname: string,
  options: dns.LookupAllOptions,
  callback: (err: NodeJS.ErrnoException | null, addresses: dns.LookupAddress[]) => void,
) => void;

export interface TargetPolicyOptions extends TargetRules {
  /** Addresses of this coordinator that no interface shows, e.g. a cloud NAT's public address. */
  ownAddresses?: readonly string[];
  /** Defaults to dns.lookup. */
  dnsLookup?: LookupAll;
}

export type ConnectTarget = { allowed: true; host: string; port: number; lookup: net.LookupFunction } | { allowed: false; reason: string };

export interface TargetPolicy {
  /** Before DNS: malformed hosts, IP literals in any spelling, host-pattern deny rules. */
  checkName(host: string, port: number): PolicyDecision;
  /** After DNS, for one resolved address of `host` (the name the client asked for). */
  checkAddress(host: string, address: string, family: number, port: number): PolicyDecision;
  /** A lookup for net.connect that knows the port, so port-specific rules apply. */
  lookupFor(port: number): net.LookupFunction;
  /**
   * A lookup for net.connect that does not know the port: deny entries naming
   * ports are applied as if they matched (fail safe), allow entries naming
   * ports do not match. Prefer lookupFor(port).
   */
  lookup: net.LookupFunction;
  /** checkName plus what to hand to net.connect: an IP literal in its normal spelling, and lookupFor(port). */
  connectOptions(host: string, port: number): ConnectTarget;
  /** The coordinator's own addresses as the policy sees them. */
  readonly ownAddresses: readonly string[];
}

export class TargetForbiddenError extends Error {
  readonly code = "ETARGETFORBIDDEN";
  readonly hostname: string;
  readonly reasons: readonly string[];
  constructor(hostname: string, reasons: readonly string[]) {
    super(reasons.length === 1 ? reasons[0] : `${hostname}: every address is refused: ${reasons.join("; ")}`);
    this.name = "TargetForbiddenError";
    this.hostname = hostname;
    this.reasons = reasons;
  }
}

const ALLOW_HINT = "[coordinator] allow_targets";
const DENY_HINT = "[coordinator] deny_targets";

// ---------------------------------------------------------------------------
// The policy

interface Address {
  /** As normalizeHost spells it. */
  address: string;
  ip: IPAddress;
}

function toAddress(n: NormalizedHost): Address | undefined {
  if (n.kind !== "ipv4" && n.kind !== "ipv6") return undefined;
  const ip = parseIP(n.address);
  return ip === undefined ? undefined : { address: n.address, ip };
}

function portMatches(rule: TargetRule, port: number | undefined, deny: boolean): boolean {
  if (rule.ports === undefined) return true;
  if (port === undefined) return deny;
  return port >= rule.ports.min && port <= rule.ports.max;
}

function nameMatches(rule: TargetRule, name: string | undefined): boolean {
  if (rule.target.kind !== "host" || name === undefined) return false;
  return rule.target.subdomains ? name.endsWith(`.${rule.target.name}`) : name === rule.target.name;
}

function netMatches(rule: TargetRule, ip: IPAddress): boolean {
  return rule.target.kind === "net" && rule.target.family === ip.kind() && ip.match(rule.target.network, rule.target.prefixLength);
}

function interfaceAddresses(): string[] {
  const out: string[] = [];
  for (const entries of Object.values(os.networkInterfaces())) {
    for (const e of entries ?? []) out.push(e.address);
  }
  return out;
}

export function createTargetPolicy(opts: TargetPolicyOptions): TargetPolicy {
  const { allow, deny } = opts;
  const problems = [...opts.problems];
  const own = new net.BlockList();
  const ownList: string[] = [];
  const extra = opts.ownAddresses ?? [];
  for (let i = 0; i < extra.length; i++) {
    const n = normalizeHost(extra[i]);
    if (n.kind !== "ipv4" && n.kind !== "ipv6") problems.push(`ownAddresses[${i}]: "${extra[i]}" is not an IP address`);
    else {
      own.addAddress(n.address, n.kind);
      ownList.push(n.address);
    }
  }
  if (problems.length > 0) throw new Error(`invalid target rules:\n${problems.map((p) => `  - ${p}`).join("\n")}`);
  for (const a of interfaceAddresses()) {
    const n = normalizeHost(a);
    if (n.kind === "ipv4" || n.kind === "ipv6") {
      own.addAddress(n.address, n.kind);
      ownList.push(n.address);
    }
  }
  const dnsLookup: LookupAll = opts.dnsLookup ?? ((hostname, options, callback) => dns.lookup(hostname, options, callback));

  // Why a bare IPv4 address is refused by default, or undefined.
  const defaultV4 = (v4: ipaddr.IPv4): string | undefined => {
    const r = refusedRange(v4);
    if (r) return `${r.what} (${r.cidr})`;
    if (own.check(v4.toString(), "ipv4")) return "an address of the coordinator itself";
    return undefined;
  };

  const defaultRefusal = (a: Address): string | undefined => {
    if (!(a.ip instanceof ipaddr.IPv6)) return defaultV4(a.ip);
    const r = refusedRange(a.ip);
    if (r) return `${r.what} (${r.cidr})`;
    if (own.check(a.address, "ipv6")) return "an address of the coordinator itself";
    for (const e of embeddedIPv4(a.ip)) {
      const why = defaultV4(e.v4);
      if (why) return `an address that embeds IPv4 ${e.v4} (${e.via}), which is ${why}`;
    }
    return undefined;
  };

  /**
   * The whole decision. `name` is the requested name (undefined for an IP
   * literal), `address` the address to connect to (undefined before DNS),
   * `subject` how the reason names the target.
   */
  const decide = (name: string | undefined, address: Address | undefined, port: number | undefined, subject: string): PolicyDecision => {
    const embedded = address?.ip instanceof ipaddr.IPv6 ? embeddedIPv4(address.ip) : [];
    for (const rule of deny) {
      if (!portMatches(rule, port, true)) continue;
      let hit = rule.target.kind === "any" || nameMatches(rule, name);
      if (!hit && address) hit = netMatches(rule, address.ip) || embedded.some((e) => netMatches(rule, e.v4));
      if (hit) {
        const portNote = rule.ports === undefined ? "" : port === undefined ? " (it names ports and this lookup was not told the port)" : ` (port ${port})`;
        return { allowed: false, reason: `${subject} is refused by ${DENY_HINT} entry "${rule.entry}"${portNote}` };
      }
    }
    if (address === undefined) return { allowed: true };
    for (const rule of allow) {
      if (!portMatches(rule, port, false)) continue;
      if (rule.target.kind === "any" || nameMatches(rule, name) || netMatches(rule, address.ip)) return { allowed: true };
    }
    const why = defaultRefusal(address);
    if (why) return { allowed: false, reason: `${subject} is ${why}; add "${address.address}" to ${ALLOW_HINT} to permit it` };
    return { allowed: true };
  };

  const subjectFor = (host: string, address: string): string => {
    const bare = host.startsWith("[") && host.endsWith("]") ? host.slice(1, -1) : host;
    return bare === address ? address : `${host} (${address})`;
  };

  const checkName = (host: string, port: number | undefined): PolicyDecision => {
    const n = normalizeHost(host);
    if (n.kind === "invalid") return { allowed: false, reason: `malformed target host: ${n.reason}` };
    if (n.kind === "name") return decide(n.name, undefined, port, n.name);
    // Unreachable while normalizeHost only returns addresses parseIP reads; refused, not waved through, if not.
    const a = toAddress(n);
    if (a === undefined) return { allowed: false, reason: `malformed target host: "${host}" is not an address this policy can judge` };
    return decide(undefined, a, port, subjectFor(host, n.address));
  };

  const checkAddress = (host: string, address: string, _family: number, port: number | undefined): PolicyDecision => {
    // The family argument is informational: the address text decides.
    const a = normalizeHost(address);
    const resolved = toAddress(a);
    if (resolved === undefined) return { allowed: false, reason: `${host} resolved to "${address}", which is not an IP address` };
    const n = normalizeHost(host);
    if (n.kind === "invalid") return { allowed: false, reason: `malformed target host: ${n.reason}` };
    const name = n.kind === "name" ? n.name : undefined;
    const subject = name === undefined ? subjectFor(host, resolved.address) : `${name} resolved to ${resolved.address}, which`;
    return decide(name, resolved, port, subject);
  };

  const makeLookup = (port: number | undefined): net.LookupFunction => (hostname, options, callback) => {
    const all = options.all === true;
    const reply = (addresses: dns.LookupAddress[]) => {
      if (all) callback(null, addresses);
      else callback(null, addresses[0].address, addresses[0].family);
    };
    const first = checkName(hostname, port);
    if (!first.allowed) {
      process.nextTick(() => callback(new TargetForbiddenError(hostname, [first.reason]), all ? [] : ""));
      return;
    }
    const n = normalizeHost(hostname);
    if (n.kind === "ipv4" || n.kind === "ipv6") {
      // A spelling net.isIP did not recognise (e.g. 0x7f.1): answer with the
      // normal form instead of letting getaddrinfo interpret it.
      const address = n.kind === "ipv6" && n.zone !== undefined ? `${n.address}%${n.zone}` : n.address;
      process.nextTick(() => reply([{ address, family: n.kind === "ipv4" ? 4 : 6 }]));
      return;
    }
    const dnsOptions: dns.LookupAllOptions = { all: true };
    if (options.family !== undefined) dnsOptions.family = options.family;
    if (options.hints !== undefined) dnsOptions.hints = options.hints;
    if (options.order !== undefined) dnsOptions.order = options.order;
    else if (options.verbatim !== undefined) dnsOptions.verbatim = options.verbatim;
    dnsLookup(hostname, dnsOptions, (err, addresses) => {
      if (err) return callback(err, all ? [] : "");
      const kept: dns.LookupAddress[] = [];
      const reasons: string[] = [];
      for (const a of addresses ?? []) {
        const d = checkAddress(hostname, a.address, a.family, port);
        if (d.allowed) kept.push(a);
        else reasons.push(d.reason);
      }
      if (kept.length > 0) return reply(kept);
      if (reasons.length === 0) {
        const e: NodeJS.ErrnoException = Object.assign(new Error(`getaddrinfo ENOTFOUND ${hostname}`), { code: "ENOTFOUND", hostname });
        return callback(e, all ? [] : "");
      }
      callback(new TargetForbiddenError(hostname, reasons), all ? [] : "");
    });
  };

  const lookup = makeLookup(undefined);

  return {
    checkName: (host, port) => checkName(host, port),
    checkAddress: (host, address, family, port) => checkAddress(host, address, family, port),
    lookupFor: (port) => makeLookup(port),
    lookup,
    connectOptions(host, port) {
      const d = checkName(host, port);
      if (!d.allowed) return d;
      const n = normalizeHost(host);
      const lookupForPort = makeLookup(port);
      if (n.kind === "ipv4") return { allowed: true, host: n.address, port, lookup: lookupForPort };
      if (n.kind === "ipv6") return { allowed: true, host: n.zone === undefined ? n.address : `${n.address}%${n.zone}`, port, lookup: lookupForPort };
      return { allowed: true, host, port, lookup: lookupForPort };
    },
    ownAddresses: ownList,
  };
}
