/**
 * The coordinator's allow_targets / deny_targets entries, parsed once, by the
 * config validation (src/coordinator/target-policy.ts decides with the
 * result), and normalizeHost, which reads target hosts for rules and policy alike.
 *
 * Entries, each optionally followed by a port part ":443", ":8000-8100" or ":*":
 *   - "*"                       any host, any address ("*:25" names a port only)
 *   - "10.0.0.0/8", "2001:db8::/32"   a CIDR, matched against every resolved address
 *   - "192.0.2.7", "2001:db8::1"      a single address, likewise
 *   - "example.com"             that name exactly (case-insensitive, trailing dot ignored)
 *   - "*.example.com"           subdomains of example.com only, not example.com itself
 * An IPv6 entry with a port is bracketed: "[2001:db8::/32]:443". Addresses in
 * rules are written in their normal form (dotted-quad IPv4); targets may use
 * any spelling the resolver accepts.
 */
import net from "node:net";
import ipaddr from "ipaddr.js";
import { parseIP, type IPAddress } from "./address.ts";

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
  | { kind: "net"; family: "ipv4" | "ipv6"; cidr: string; network: IPAddress; prefixLength: number };

export interface TargetRule {
  /** The entry as written in the configuration. */
  entry: string;
  target: RuleTarget;
  /** undefined: every port. */
  ports: PortRange | undefined;
}

/** Both lists, parsed: what createTargetPolicy decides with. */
export interface TargetRules {
  allow: readonly TargetRule[];
  deny: readonly TargetRule[];
  /** What was wrong with either list; a policy refuses to start from rules with problems. */
  problems: readonly string[];
}

const MAX_RULES = 4096;
const MAX_HOST_LENGTH = 253;
const MAX_INPUT_LENGTH = 300;

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
    // inet_aton(3): one to four parts, each decimal, octal (leading 0) or hex
    // (0x); the last part fills the remaining bytes. ipaddr.js reads them all.
    if (!ipaddr.IPv4.isValid(lower)) return { kind: "invalid", reason: `"${host}" looks like an IPv4 address but is not a valid one in any spelling` };
    return { kind: "ipv4", address: ipaddr.IPv4.parse(lower).toString() };
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
  const ip = parseIP(bare);
  if (!(ip instanceof ipaddr.IPv6)) return { kind: "invalid", reason: `"${original}" is not an IPv6 address` };
  if (ip.isIPv4MappedAddress()) return { kind: "ipv4", address: ip.toIPv4Address().toString() };
  // Node's spelling, not ipaddr.js's: it is how dns.lookup and sockets report
  // addresses, so reasons and connect targets read the same as logs.
  const address = new net.SocketAddress({ address: bare, family: "ipv6" }).address;
  return zone === undefined ? { kind: "ipv6", address } : { kind: "ipv6", address, zone };
}

function looksNumeric(label: string): boolean {
  return /^(0x[0-9a-f]*|[0-9]+)$/i.test(label);
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

// ---------------------------------------------------------------------------
// Rules

/** Parses [coordinator] allow_targets and deny_targets. */
export function parseTargetLists(allow: unknown, deny: unknown): TargetRules {
  const a = parseTargetRules(allow, "coordinator.allow_targets");
  const d = parseTargetRules(deny, "coordinator.deny_targets");
  return { allow: a.rules, deny: d.rules, problems: [...a.problems, ...d.problems] };
}

/**
 * Parses one list of entries. Every problem is reported, each naming
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
  if (net.isIPv4(hostText) && !bracketed) return addressRule(hostText, 32);
  if (hostText.includes(":")) {
    if (hostText.includes("%")) return `"${entry}": zone ids ("%eth0") are not allowed in rules`;
    if (!net.isIPv6(hostText)) return `"${entry}" is not an IPv6 address (an entry with a port is written [2001:db8::1]:443)`;
    const n = normalizeIPv6(hostText, hostText);
    return n.kind === "ipv4" ? addressRule(n.address, 32) : addressRule(hostText, 128);
  }
  if (bracketed) return `"${entry}": brackets are for IPv6 addresses only`;
  return parseHostPattern(hostText, entry);
}

function parseCidr(address: string, lenText: string, entry: string, bracketed: boolean): RuleTarget | string {
  if (!/^\d{1,3}$/.test(lenText)) return `"${entry}": "${lenText}" is not a prefix length`;
  const len = Number(lenText);
  const ip = address.includes("%") || (bracketed && net.isIPv4(address)) ? undefined : parseIP(address);
  if (ip === undefined) return `"${entry}" is not a CIDR (a.b.c.d/len or IPv6/len; an IPv6 CIDR with a port is written [2001:db8::/32]:443)`;
  const v4 = ip.kind() === "ipv4";
  if (len > (v4 ? 32 : 128)) return `"${entry}": an IPv${v4 ? 4 : 6} prefix length is 0 to ${v4 ? 32 : 128}`;
  const mask = (v4 ? ipaddr.IPv4 : ipaddr.IPv6).subnetMaskFromPrefixLength(len).toByteArray();
  const bytes = ip.toByteArray();
  if (bytes.some((b, i) => (b & ~mask[i]) !== 0)) {
    if (!v4) return `"${entry}" has bits set after the prefix /${len}`;
    return `"${entry}" has bits set after the prefix; did you mean ${bytes.map((b, i) => b & mask[i]).join(".")}/${len}?`;
  }
  return addressRule(address, len);
}

function addressRule(address: string, prefixLength: number): RuleTarget | string {
  const network = parseIP(address);
  if (network === undefined) return `"${address}" is not an IP address`;
  return { kind: "net", family: network.kind(), cidr: `${address}/${prefixLength}`, network, prefixLength };
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
