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
 * Entries (allow_targets / deny_targets), each optionally followed by a port
 * part ":443", ":8000-8100" or ":*":
 *   - "*"                       any host, any address ("*:25" names a port only)
 *   - "10.0.0.0/8", "2001:db8::/32"   a CIDR, matched against every resolved address
 *   - "192.0.2.7", "2001:db8::1"      a single address, likewise
 *   - "example.com"             that name exactly (case-insensitive, trailing dot ignored)
 *   - "*.example.com"           subdomains of example.com only, not example.com itself
 * An IPv6 entry with a port is bracketed: "[2001:db8::/32]:443".
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

export type PolicyDecision = { allowed: true } | { allowed: false; reason: string };

export type NormalizedHost =
  | { kind: "ipv4"; address: string }
  | { kind: "ipv6"; address: string; zone?: string }
  | { kind: "name"; name: string }
  | { kind: "invalid"; reason: string };

export interface PortRange {
  min: number;
  max: number;
}

export type RuleTarget =
  | { kind: "any" }
  | { kind: "host"; name: string; subdomains: boolean }
  | { kind: "net"; family: "ipv4" | "ipv6"; cidr: string; list: net.BlockList };

export interface TargetRule {
  /** The entry as written in the configuration. */
  entry: string;
  target: RuleTarget;
  /** undefined: every port. */
  ports: PortRange | undefined;
}

/** The subset of dns.lookup the policy uses; replaceable for tests. */
export type LookupAll = (
  hostname: string,
  options: dns.LookupAllOptions,
  callback: (err: NodeJS.ErrnoException | null, addresses: dns.LookupAddress[]) => void,
) => void;

export interface TargetPolicyOptions {
  allow: readonly unknown[];
  deny: readonly unknown[];
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

const ALLOW_KEY = "coordinator.allow_targets";
const DENY_KEY = "coordinator.deny_targets";
const ALLOW_HINT = "[coordinator] allow_targets";
const DENY_HINT = "[coordinator] deny_targets";
const MAX_RULES = 4096;
const MAX_HOST_LENGTH = 253;
const MAX_INPUT_LENGTH = 300;

// ---------------------------------------------------------------------------
// Default-refused ranges

interface Range {
  cidr: string;
  what: string;
  list: net.BlockList;
}

function range(cidr: string, what: string): Range {
  const [address, len] = cidr.split("/");
  const family = address.includes(":") ? "ipv6" : "ipv4";
  const list = new net.BlockList();
  list.addSubnet(address, Number(len), family);
  return { cidr, what, list };
}

// Most specific first, so the reason names the narrowest range.
const V4_RANGES: readonly Range[] = [
  range("169.254.169.254/32", "the cloud metadata service address"),
  range("255.255.255.255/32", "the broadcast address"),
  range("0.0.0.0/8", "an unspecified (\"this network\") address"),
  range("10.0.0.0/8", "a private address"),
  range("100.64.0.0/10", "a shared (carrier-grade NAT) address"),
  range("127.0.0.0/8", "a loopback address"),
  range("169.254.0.0/16", "a link-local address"),
  range("172.16.0.0/12", "a private address"),
  range("192.168.0.0/16", "a private address"),
  range("198.18.0.0/15", "a benchmarking address"),
  range("224.0.0.0/4", "a multicast address"),
  range("240.0.0.0/4", "a reserved address"),
];

const V6_RANGES: readonly Range[] = [
  range("::/128", "the unspecified address"),
  range("::1/128", "a loopback address"),
  range("fe80::/10", "a link-local address"),
  range("fec0::/10", "a site-local address (deprecated, may still route internally)"),
  range("fc00::/7", "a unique-local address"),
  range("ff00::/8", "a multicast address"),
];

/** The ranges refused unless allow_targets names them (own addresses and embedded IPv4 come on top). */
export const DEFAULT_REFUSED_RANGES: readonly { cidr: string; what: string }[] = [...V4_RANGES, ...V6_RANGES].map(({ cidr, what }) => ({ cidr, what }));

/** IPv6 ranges judged by the IPv4 address they embed. */
export const EMBEDDING_RANGES: readonly { cidr: string; what: string }[] = [
  { cidr: "::ffff:0:0/96", what: "IPv4-mapped" },
  { cidr: "::/96", what: "IPv4-compatible" },
  { cidr: "::ffff:0:0:0/96", what: "IPv4-translated" },
  { cidr: "64:ff9b::/96", what: "NAT64" },
  { cidr: "64:ff9b:1::/48", what: "local-use NAT64" },
  { cidr: "2002::/16", what: "6to4" },
  { cidr: "2001::/32", what: "Teredo" },
];

// ---------------------------------------------------------------------------
// Normalisation

/**
 * Normalises a target host the way the resolver would read it: IPv4 in any
 * inet_aton spelling becomes dotted-quad, IPv6 loses brackets and zone (kept
 * apart) and IPv4-mapped IPv6 becomes IPv4. A host whose last label is
 * numeric must be an address, or it is invalid (never sent to DNS). Names are
 * lower-cased without the trailing dot.
 */
export function normalizeHost(host: string): NormalizedHost {
  if (typeof host !== "string") return { kind: "invalid", reason: "the host is not a string" };
  if (host.length === 0) return { kind: "invalid", reason: "the host is empty" };
  if (host.length > MAX_INPUT_LENGTH) return { kind: "invalid", reason: `the host is longer than ${MAX_INPUT_LENGTH} characters` };
  let text = host;
  if (text.startsWith("[")) {
    if (!text.endsWith("]")) return { kind: "invalid", reason: `"${host}" has an opening [ without a closing ]` };
    text = text.slice(1, -1);
    if (!text.includes(":")) return { kind: "invalid", reason: `"${host}": brackets are for IPv6 addresses only` };
  }
  if (text.includes(":")) return normalizeIPv6(text, host);

  if (text.endsWith(".")) text = text.slice(0, -1);
  if (text.length === 0 || text.length > MAX_HOST_LENGTH) return { kind: "invalid", reason: `"${host}" is not a host name (1 to ${MAX_HOST_LENGTH} characters)` };
  const lower = text.toLowerCase();
  const labels = lower.split(".");
  if (looksNumeric(labels[labels.length - 1])) {
    const value = parseInetAton(labels);
    if (value === undefined) return { kind: "invalid", reason: `"${host}" looks like an IPv4 address but is not a valid one in any spelling` };
    return { kind: "ipv4", address: formatIPv4(value) };
  }
  const bad = nameProblem(labels);
  if (bad) return { kind: "invalid", reason: `"${host}" is not a valid host name: ${bad}` };
  return { kind: "name", name: lower };
}

function normalizeIPv6(text: string, original: string): NormalizedHost {
  const percent = text.indexOf("%");
  const bare = percent >= 0 ? text.slice(0, percent) : text;
  const zone = percent >= 0 ? text.slice(percent + 1) : undefined;
  if (zone !== undefined && !/^[A-Za-z0-9_.\-]{1,64}$/.test(zone)) return { kind: "invalid", reason: `"${original}" has a malformed zone id` };
  if (!net.isIPv6(bare)) return { kind: "invalid", reason: `"${original}" contains ":" but is not an IPv6 address` };
  const groups = ipv6Groups(bare);
  if (groups === undefined) return { kind: "invalid", reason: `"${original}" is not an IPv6 address` };
  if (isMapped(groups)) return { kind: "ipv4", address: formatIPv4(groups[6] * 0x10000 + groups[7]) };
  const address = new net.SocketAddress({ address: bare, family: "ipv6" }).address;
  return zone === undefined ? { kind: "ipv6", address } : { kind: "ipv6", address, zone };
}

function looksNumeric(label: string): boolean {
  return /^(0x[0-9a-f]*|[0-9]+)$/i.test(label);
}

// inet_aton(3): one to four parts, each decimal, octal (leading 0) or hex
// (0x); the last part fills all remaining bytes.
function parseInetAton(labels: readonly string[]): number | undefined {
  if (labels.length < 1 || labels.length > 4) return undefined;
  const parts: bigint[] = [];
  for (const label of labels) {
    let value: bigint;
    if (/^0x[0-9a-f]+$/i.test(label)) value = BigInt(label);
    else if (/^0[0-7]*$/.test(label)) value = label.length === 1 ? 0n : BigInt(`0o${label.slice(1)}`);
    else if (/^[1-9][0-9]*$/.test(label)) value = BigInt(label);
    else return undefined;
    parts.push(value);
  }
  let result = 0n;
  const last = parts.length - 1;
  for (let i = 0; i < last; i++) {
    if (parts[i] > 255n) return undefined;
    result |= parts[i] << BigInt(8 * (3 - i));
  }
  const lastBits = BigInt(8 * (4 - last));
  if (parts[last] >= 1n << lastBits) return undefined;
  return Number(result | parts[last]);
}

function nameProblem(labels: readonly string[]): string | undefined {
  for (const label of labels) {
    if (label.length === 0) return "empty label";
    if (label.length > 63) return "a label is longer than 63 characters";
    if (!/^[a-z0-9_-]+$/.test(label)) return `"${label}" has characters other than letters, digits, "-" and "_" (write international names in their xn-- form)`;
    if (label.startsWith("-") || label.endsWith("-")) return `"${label}" starts or ends with "-"`;
  }
  return undefined;
}

function formatIPv4(value: number): string {
  return `${(value >>> 24) & 255}.${(value >>> 16) & 255}.${(value >>> 8) & 255}.${value & 255}`;
}

// Eight 16-bit groups of an address net.isIPv6 already accepted (no zone).
function ipv6Groups(text: string): number[] | undefined {
  let s = text;
  const tail: number[] = [];
  const lastColon = s.lastIndexOf(":");
  if (s.indexOf(".", lastColon) >= 0) {
    const v4 = s.slice(lastColon + 1);
    if (!net.isIPv4(v4)) return undefined;
    const value = parseInetAton(v4.split("."));
    if (value === undefined) return undefined;
    tail.push(value >>> 16, value & 0xffff);
    s = s.slice(0, lastColon + 1);
    if (!s.endsWith("::")) s = s.slice(0, -1);
  }
  const gap = s.indexOf("::");
  const split = (part: string) => (part === "" ? [] : part.split(":"));
  const head = split(gap >= 0 ? s.slice(0, gap) : s);
  const rest = gap >= 0 ? split(s.slice(gap + 2)) : [];
  const fill = 8 - head.length - rest.length - tail.length;
  if (fill < 0 || (gap < 0 && fill !== 0)) return undefined;
  const groups = [...head.map((g) => parseInt(g, 16)), ...new Array<number>(fill).fill(0), ...rest.map((g) => parseInt(g, 16)), ...tail];
  return groups.length === 8 && groups.every((g) => Number.isInteger(g) && g >= 0 && g <= 0xffff) ? groups : undefined;
}

function isMapped(g: readonly number[]): boolean {
  return g[0] === 0 && g[1] === 0 && g[2] === 0 && g[3] === 0 && g[4] === 0 && g[5] === 0xffff;
}

interface Embedded {
  v4: string;
  via: string;
}

function v4Of(bytes: readonly number[]): string {
  return bytes.join(".");
}

// Every IPv4 address an IPv6 address may carry traffic to (RFC 4291, 2765,
// 6052, 8215, 3056, 4380). Judged conservatively: if any candidate would be
// refused, the IPv6 address is.
function embeddedIPv4(g: readonly number[]): Embedded[] {
  const b: number[] = [];
  for (const group of g) b.push(group >>> 8, group & 255);
  const zero = (from: number, to: number) => b.slice(from, to).every((x) => x === 0);
  const out: Embedded[] = [];
  if (isMapped(g)) out.push({ v4: v4Of(b.slice(12)), via: "IPv4-mapped, ::ffff:0:0/96" });
  else if (zero(0, 12) && !(zero(12, 15) && b[15] <= 1)) out.push({ v4: v4Of(b.slice(12)), via: "IPv4-compatible, ::/96" });
  if (zero(0, 8) && g[4] === 0xffff && g[5] === 0) out.push({ v4: v4Of(b.slice(12)), via: "IPv4-translated, ::ffff:0:0:0/96" });
  if (g[0] === 0x64 && g[1] === 0xff9b && zero(4, 12)) out.push({ v4: v4Of(b.slice(12)), via: "NAT64, 64:ff9b::/96" });
  if (g[0] === 0x64 && g[1] === 0xff9b && g[2] === 1) {
    // RFC 6052 layouts for prefixes inside 64:ff9b:1::/48; bits 64-71 are zero.
    const via = "local-use NAT64, 64:ff9b:1::/48";
    if (b[8] === 0 && zero(11, 16)) out.push({ v4: v4Of([b[6], b[7], b[9], b[10]]), via: `${via} as a /48` });
    if (b[8] === 0 && zero(12, 16)) out.push({ v4: v4Of([b[7], b[9], b[10], b[11]]), via: `${via} as a /56` });
    if (b[8] === 0 && zero(13, 16)) out.push({ v4: v4Of([b[9], b[10], b[11], b[12]]), via: `${via} as a /64` });
    out.push({ v4: v4Of(b.slice(12)), via: `${via} as a /96` });
  }
  if (g[0] === 0x2002) out.push({ v4: v4Of(b.slice(2, 6)), via: "6to4, 2002::/16" });
  if (g[0] === 0x2001 && g[1] === 0) {
    out.push({ v4: v4Of(b.slice(4, 8)), via: "Teredo server, 2001::/32" });
    out.push({ v4: v4Of(b.slice(12).map((x) => x ^ 255)), via: "Teredo client, 2001::/32" });
  }
  return out;
}

// ---------------------------------------------------------------------------
// Rules

/**
 * Parses allow_targets / deny_targets. Every problem is reported, each naming
 * the entry and what is wrong; rules holds the entries that parsed.
 */
export function parseTargetRules(list: readonly unknown[] | unknown, key: string): { rules: TargetRule[]; problems: string[] } {
  const rules: TargetRule[] = [];
  const problems: string[] = [];
  if (!Array.isArray(list)) return { rules, problems: [`${key}: expected a list of strings`] };
  if (list.length > MAX_RULES) return { rules, problems: [`${key}: at most ${MAX_RULES} entries, got ${list.length}`] };
  for (let i = 0; i < list.length; i++) {
    const parsed = parseRule(list[i]);
    if (typeof parsed === "string") problems.push(`${key}[${i}]: ${parsed}`);
    else rules.push(parsed);
  }
  return { rules, problems };
}

function parseRule(entry: unknown): TargetRule | string {
  if (typeof entry !== "string") return `expected a string, got ${entry === null ? "null" : typeof entry}`;
  const text = entry.trim();
  if (text === "") return "empty entry";
  if (text.length > MAX_INPUT_LENGTH) return `"${text.slice(0, 40)}…" is longer than ${MAX_INPUT_LENGTH} characters`;
  let hostText: string;
  let portText: string | undefined;
  let bracketed = false;
  if (text.startsWith("[")) {
    const end = text.indexOf("]");
    if (end < 0) return `"${text}" has an opening [ without a closing ]`;
    hostText = text.slice(1, end);
    const after = text.slice(end + 1);
    if (after !== "") {
      if (!after.startsWith(":")) return `"${text}": expected ":port" after "]"`;
      portText = after.slice(1);
    }
    bracketed = true;
  } else {
    const colons = text.split(":").length - 1;
    if (colons === 1) {
      const colon = text.indexOf(":");
      hostText = text.slice(0, colon);
      portText = text.slice(colon + 1);
    } else {
      hostText = text;
    }
  }
  let ports: PortRange | undefined;
  if (portText !== undefined) {
    const p = parsePorts(portText);
    if (typeof p === "string") return `"${text}": ${p}`;
    ports = p;
  }
  const target = parseRuleTarget(hostText, text, bracketed);
  if (typeof target === "string") return target;
  return { entry: text, target, ports };
}

function parsePorts(text: string): PortRange | undefined | string {
  if (text === "*") return undefined;
  const m = /^(\d{1,5})(?:-(\d{1,5}))?$/.exec(text);
  if (!m) return `"${text}" is not a port, a port range "low-high" or "*"`;
  const min = Number(m[1]);
  const max = m[2] === undefined ? min : Number(m[2]);
  if (min > 65535 || max > 65535) return `port ${Math.max(min, max)} is above 65535`;
  if (min > max) return `port range ${text} is empty (low above high)`;
  return { min, max };
}

function parseRuleTarget(hostText: string, entry: string, bracketed: boolean): RuleTarget | string {
  if (hostText === "*") return bracketed ? `"${entry}": brackets are for IPv6 addresses only` : { kind: "any" };
  const slash = hostText.indexOf("/");
  if (slash >= 0) return parseCidr(hostText.slice(0, slash), hostText.slice(slash + 1), entry, bracketed);
  if (net.isIPv4(hostText) && !bracketed) return addressRule("ipv4", hostText, 32);
  if (hostText.includes(":")) {
    if (hostText.includes("%")) return `"${entry}": zone ids ("%eth0") are not allowed in rules`;
    if (!net.isIPv6(hostText)) return `"${entry}" is not an IPv6 address (an entry with a port is written [2001:db8::1]:443)`;
    const n = normalizeIPv6(hostText, hostText);
    if (n.kind === "ipv4") return addressRule("ipv4", n.address, 32);
    return addressRule("ipv6", hostText, 128);
  }
  if (bracketed) return `"${entry}": brackets are for IPv6 addresses only`;
  return parseHostPattern(hostText, entry);
}

function parseCidr(address: string, lenText: string, entry: string, bracketed: boolean): RuleTarget | string {
  if (!/^\d{1,3}$/.test(lenText)) return `"${entry}": "${lenText}" is not a prefix length`;
  const len = Number(lenText);
  if (net.isIPv4(address) && !bracketed) {
    if (len > 32) return `"${entry}": an IPv4 prefix length is 0 to 32`;
    const value = parseInetAton(address.split("."));
    if (value === undefined) return `"${entry}" is not a CIDR`;
    const hostBits = len === 32 ? 0 : len === 0 ? 0xffffffff : 0xffffffff >>> len;
    if (((value & hostBits) >>> 0) !== 0) return `"${entry}" has bits set after the prefix; did you mean ${formatIPv4((value & ~hostBits) >>> 0)}/${len}?`;
    return addressRule("ipv4", address, len);
  }
  if (address.includes(":") && !address.includes("%") && net.isIPv6(address)) {
    if (len > 128) return `"${entry}": an IPv6 prefix length is 0 to 128`;
    const groups = ipv6Groups(address);
    if (groups === undefined) return `"${entry}" is not a CIDR`;
    for (let bit = len; bit < 128; bit++) {
      if ((groups[bit >>> 4] >>> (15 - (bit & 15))) & 1) return `"${entry}" has bits set after the prefix /${len}`;
    }
    return addressRule("ipv6", address, len);
  }
  return `"${entry}" is not a CIDR (a.b.c.d/len or IPv6/len; an IPv6 CIDR with a port is written [2001:db8::/32]:443)`;
}

function addressRule(family: "ipv4" | "ipv6", address: string, len: number): RuleTarget {
  const list = new net.BlockList();
  list.addSubnet(address, len, family);
  return { kind: "net", family, cidr: `${address}/${len}`, list };
}

function parseHostPattern(text: string, entry: string): RuleTarget | string {
  let name = text.toLowerCase();
  if (name.endsWith(".")) name = name.slice(0, -1);
  let subdomains = false;
  if (name.startsWith("*.")) {
    subdomains = true;
    name = name.slice(2);
  }
  if (name.includes("*")) return `"${entry}": a wildcard is only allowed as the whole first label, as in *.example.com`;
  if (name.length === 0 || name.length > MAX_HOST_LENGTH) return `"${entry}" is not a host name`;
  const labels = name.split(".");
  if (looksNumeric(labels[labels.length - 1]))
    return `"${entry}" looks like an IPv4 address but is not one in dotted-quad form; write a.b.c.d or a.b.c.d/len`;
  const bad = nameProblem(labels);
  if (bad) return `"${entry}" is not a CIDR, an IP address or a host pattern: ${bad}`;
  return { kind: "host", name, subdomains };
}

// ---------------------------------------------------------------------------
// The policy

interface Address {
  family: "ipv4" | "ipv6";
  address: string;
  groups?: number[];
}

function toAddress(n: NormalizedHost): Address | undefined {
  if (n.kind === "ipv4") return { family: "ipv4", address: n.address };
  if (n.kind === "ipv6") return { family: "ipv6", address: n.address, groups: ipv6Groups(n.address) };
  return undefined;
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

function netMatches(rule: TargetRule, address: string, family: "ipv4" | "ipv6"): boolean {
  return rule.target.kind === "net" && rule.target.family === family && rule.target.list.check(address, family);
}

function interfaceAddresses(): string[] {
  const out: string[] = [];
  for (const entries of Object.values(os.networkInterfaces())) {
    for (const e of entries ?? []) out.push(e.address);
  }
  return out;
}

export function createTargetPolicy(opts: TargetPolicyOptions): TargetPolicy {
  const allow = parseTargetRules(opts.allow, ALLOW_KEY);
  const deny = parseTargetRules(opts.deny, DENY_KEY);
  const problems = [...deny.problems, ...allow.problems];
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
  const defaultV4 = (v4: string): string | undefined => {
    for (const r of V4_RANGES) if (r.list.check(v4, "ipv4")) return `${r.what} (${r.cidr})`;
    if (own.check(v4, "ipv4")) return "an address of the coordinator itself";
    return undefined;
  };

  const defaultRefusal = (a: Address): string | undefined => {
    if (a.family === "ipv4") return defaultV4(a.address);
    for (const r of V6_RANGES) if (r.list.check(a.address, "ipv6")) return `${r.what} (${r.cidr})`;
    if (own.check(a.address, "ipv6")) return "an address of the coordinator itself";
    for (const e of embeddedIPv4(a.groups ?? [])) {
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
    const embedded = address?.family === "ipv6" ? embeddedIPv4(address.groups ?? []) : [];
    for (const rule of deny.rules) {
      if (!portMatches(rule, port, true)) continue;
      let hit = rule.target.kind === "any" || nameMatches(rule, name);
      if (!hit && address) hit = netMatches(rule, address.address, address.family) || embedded.some((e) => netMatches(rule, e.v4, "ipv4"));
      if (hit) {
        const portNote = rule.ports === undefined ? "" : port === undefined ? " (it names ports and this lookup was not told the port)" : ` (port ${port})`;
        return { allowed: false, reason: `${subject} is refused by ${DENY_HINT} entry "${rule.entry}"${portNote}` };
      }
    }
    if (address === undefined) return { allowed: true };
    for (const rule of allow.rules) {
      if (!portMatches(rule, port, false)) continue;
      if (rule.target.kind === "any" || nameMatches(rule, name) || netMatches(rule, address.address, address.family)) return { allowed: true };
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
    return decide(undefined, toAddress(n), port, subjectFor(host, n.address));
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
