import assert from "node:assert/strict";
import dns from "node:dns";
import net from "node:net";
import { test } from "node:test";
import { DEFAULT_REFUSED_RANGES } from "../src/coordinator/address-ranges.ts";
import {
  createTargetPolicy,
  TargetForbiddenError,
  type LookupAll,
  type PolicyDecision,
  type TargetPolicy,
  type TargetPolicyOptions,
} from "../src/coordinator/target-policy.ts";
import { normalizeHost, parseTargetLists, parseTargetRules, type TargetRules } from "../src/target-rules.ts";

const PORT = 443;

function refused(d: PolicyDecision, pattern?: RegExp, label = ""): void {
  assert.equal(d.allowed, false, `${label} should be refused`);
  if (!d.allowed && pattern) assert.match(d.reason, pattern, label);
}

function allowed(d: PolicyDecision, label = ""): void {
  assert.deepEqual(d, { allowed: true }, `${label} should be allowed`);
}

/** A policy from rule lists as a configuration writes them (which must parse). */
function policyOf(opts: { allow: string[]; deny: string[] } & Omit<TargetPolicyOptions, keyof TargetRules>): TargetPolicy {
  const rules = parseTargetLists(opts.allow, opts.deny);
  assert.deepEqual(rules.problems, []);
  return createTargetPolicy({ ...opts, ...rules });
}

const defaultPolicy = policyOf({ allow: [], deny: [] });

// Public sample addresses must not be one of this machine's own addresses
// (a sandbox may well sit on a documentation range).
function notOwn(policy: TargetPolicy, candidates: string[]): string[] {
  const own = new Set(policy.ownAddresses);
  const out = candidates.filter((a) => !own.has(a));
  assert.ok(out.length > 0, `all of ${candidates.join(", ")} are own addresses`);
  return out;
}

test("normalizeHost: every IPv4 spelling inet_aton accepts becomes dotted-quad", () => {
  const loopback = ["2130706433", "0x7f000001", "0X7F000001", "0x7f.0.0.1", "0177.0.0.1", "0177.0.0.01", "127.1", "127.0.1", "0x7f.1", "017700000001", "127.0.0.1.", "0x7f.1."];
  for (const h of loopback) assert.deepEqual(normalizeHost(h), { kind: "ipv4", address: "127.0.0.1" }, h);
  assert.deepEqual(normalizeHost("4294967295"), { kind: "ipv4", address: "255.255.255.255" });
  assert.deepEqual(normalizeHost("0"), { kind: "ipv4", address: "0.0.0.0" });
  assert.deepEqual(normalizeHost("10.1"), { kind: "ipv4", address: "10.0.0.1" });
  assert.deepEqual(normalizeHost("169.254.43518"), { kind: "ipv4", address: "169.254.169.254" });
  assert.deepEqual(normalizeHost("0xa9.0xfe.0xa9.0xfe"), { kind: "ipv4", address: "169.254.169.254" });
  assert.deepEqual(normalizeHost("1.16777215"), { kind: "ipv4", address: "1.255.255.255" });
});

test("normalizeHost: IPv6 brackets, zones, mapped forms and names", () => {
  assert.deepEqual(normalizeHost("[::1]"), { kind: "ipv6", address: "::1" });
  assert.deepEqual(normalizeHost("0:0:0:0:0:0:0:1"), { kind: "ipv6", address: "::1" });
  assert.deepEqual(normalizeHost("fe80::1%eth0"), { kind: "ipv6", address: "fe80::1", zone: "eth0" });
  assert.deepEqual(normalizeHost("[FE80::1%eth0]"), { kind: "ipv6", address: "fe80::1", zone: "eth0" });
  assert.deepEqual(normalizeHost("2001:DB8::1"), { kind: "ipv6", address: "2001:db8::1" });
  for (const h of ["::ffff:127.0.0.1", "::ffff:7f00:1", "[::ffff:127.0.0.1]", "0:0:0:0:0:ffff:7f00:0001", "::FFFF:7F00:1"])
    assert.deepEqual(normalizeHost(h), { kind: "ipv4", address: "127.0.0.1" }, h);
  assert.deepEqual(normalizeHost("LocalHost."), { kind: "name", name: "localhost" });
  assert.deepEqual(normalizeHost("Www.Example.COM"), { kind: "name", name: "www.example.com" });
  assert.deepEqual(normalizeHost("0x7f.example.com"), { kind: "name", name: "0x7f.example.com" });
  assert.deepEqual(normalizeHost("_srv.example-1.com"), { kind: "name", name: "_srv.example-1.com" });
});

// Where ipaddr.js, used as it comes, reads an address otherwise than the
// hand-written parser it replaced did (found by running both side by side):
// "::a.b.c.d" is IPv4-compatible (RFC 4291), not IPv4-mapped, whether a client
// writes it so or Node prints it so (Node spells ::ffff:7f00 "::255.255.127.0"),
// and a leading "::" may stand for a single zero group.
test("normalizeHost and rules: IPv4-compatible dotted forms and a one-group \"::\" read as before", () => {
  assert.deepEqual(normalizeHost("::127.0.0.1"), { kind: "ipv6", address: "::127.0.0.1" });
  assert.deepEqual(normalizeHost("::7f00:1"), { kind: "ipv6", address: "::127.0.0.1" });
  assert.deepEqual(normalizeHost("[::10.1.2.3]"), { kind: "ipv6", address: "::10.1.2.3" });
  assert.deepEqual(normalizeHost("::2:3:4:5:6:7:8"), { kind: "ipv6", address: "0:2:3:4:5:6:7:8" });
  assert.deepEqual(normalizeHost("::ffff:7f00"), { kind: "ipv6", address: "::255.255.127.0" });
  assert.deepEqual(defaultPolicy.checkName("::127.0.0.1", PORT), {
    allowed: false,
    reason: '::127.0.0.1 is an address that embeds IPv4 127.0.0.1 (IPv4-compatible, ::/96), which is a loopback address (127.0.0.0/8); add "::127.0.0.1" to [coordinator] allow_targets to permit it',
  });
  assert.deepEqual(defaultPolicy.checkName("::ffff:7f00", PORT), {
    allowed: false,
    reason: '::ffff:7f00 (::255.255.127.0) is an address that embeds IPv4 255.255.127.0 (IPv4-compatible, ::/96), which is a reserved address (240.0.0.0/4); add "::255.255.127.0" to [coordinator] allow_targets to permit it',
  });
  assert.deepEqual(defaultPolicy.checkAddress("rebind.example", "::ffff:7f00", 6, PORT), {
    allowed: false,
    reason: 'rebind.example resolved to ::255.255.127.0, which is an address that embeds IPv4 255.255.127.0 (IPv4-compatible, ::/96), which is a reserved address (240.0.0.0/4); add "::255.255.127.0" to [coordinator] allow_targets to permit it',
  });
  const c = defaultPolicy.connectOptions("::2:3:4:5:6:7:8", PORT);
  assert.ok(c.allowed && c.host === "0:2:3:4:5:6:7:8", JSON.stringify(c));

  const { rules, problems } = parseTargetRules(["::2:3:4:5:6:7:8", "::10.1.2.3", "::10.0.0.0/104", "::61d4:0:0:9:0:c:443"], "k");
  assert.deepEqual(problems, []);
  assert.deepEqual(rules.map((r) => (r.target.kind === "net" ? `${r.target.family} ${r.target.cidr}` : r.target.kind)), [
    "ipv6 ::2:3:4:5:6:7:8/128",
    "ipv6 ::10.1.2.3/128",
    "ipv6 ::10.0.0.0/104",
    "ipv6 ::61d4:0:0:9:0:c:443/128",
  ]);
  const policy = policyOf({ allow: ["::10.1.2.3", "::10.0.0.0/104"], deny: ["::2:3:4:5:6:7:8"] });
  allowed(policy.checkName("::a01:203", PORT), "the compatible address allow_targets names");
  allowed(policy.checkName("::10.9.9.9", PORT), "inside the compatible CIDR");
  refused(policy.checkName("10.1.2.3", PORT), /private address \(10\.0\.0\.0\/8\)/, "the IPv4 address itself is another address");
  refused(policy.checkName("::ffff:10.1.2.3", PORT), /private address/, "so is the mapped one");
  refused(policy.checkName("0:2:3:4:5:6:7:8", PORT), /deny_targets entry "::2:3:4:5:6:7:8"/);
});

test("normalizeHost: numeric-looking hosts that are no address are invalid, not names", () => {
  const bad = ["08.1", "0x7g.1", "1.2.3.4.5", "256.1", "1.16777216", "4294967296", "99999999999999999999999", "foo.1", "example.123", "0x", "1.2.3.0x", "1..1", "-1", "1.2.3.-4"];
  for (const h of bad) assert.equal(normalizeHost(h).kind, "invalid", h);
  for (const h of ["", ".", "a..b", "exa mple.com", "ex%ample.com", "exämple.com", "a".repeat(64) + ".com", "x.".repeat(130), "[127.0.0.1]", "[::1", "::1]", "1:2", "::1%", "fe80::1%eth 0", "[example.com]"])
    assert.equal(normalizeHost(h).kind, "invalid", JSON.stringify(h));
  refused(defaultPolicy.checkName("0x7g.1", 80), /^malformed target host: "0x7g\.1" looks like an IPv4 address/);
  refused(defaultPolicy.checkName("1.2.3.4.5", 80), /malformed/);
});

// For each range: its first and last address and one inside.
const V4_SAMPLES: [string, string[]][] = [
  ["127.0.0.0/8", ["127.0.0.0", "127.0.0.1", "127.255.255.255", "127.1.2.3"]],
  ["10.0.0.0/8", ["10.0.0.0", "10.255.255.255", "10.1.2.3"]],
  ["172.16.0.0/12", ["172.16.0.0", "172.31.255.255", "172.20.1.1"]],
  ["192.168.0.0/16", ["192.168.0.0", "192.168.255.255", "192.168.1.1"]],
  ["100.64.0.0/10", ["100.64.0.0", "100.127.255.255", "100.100.100.200"]],
  ["169.254.0.0/16", ["169.254.0.0", "169.254.255.255", "169.254.1.1"]],
  ["169.254.169.254/32", ["169.254.169.254"]],
  ["224.0.0.0/4", ["224.0.0.0", "239.255.255.255", "224.0.0.251"]],
  ["0.0.0.0/8", ["0.0.0.0", "0.255.255.255", "0.1.2.3"]],
  ["255.255.255.255/32", ["255.255.255.255"]],
  ["240.0.0.0/4", ["240.0.0.0", "255.255.255.254", "250.1.2.3"]],
  ["198.18.0.0/15", ["198.18.0.0", "198.19.255.255", "198.18.5.5"]],
];

const V6_SAMPLES: [string, string[]][] = [
  ["::1/128", ["::1"]],
  ["::/128", ["::"]],
  ["fe80::/10", ["fe80::", "fe80::1", "febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff"]],
  ["fc00::/7", ["fc00::", "fd00::1", "fd00:ec2::254", "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"]],
  ["ff00::/8", ["ff00::", "ff02::1", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"]],
  ["fec0::/10", ["fec0::1"]],
];

test("default: every refused IPv4 range, first, last and inside, with an actionable reason", () => {
  for (const [cidr, samples] of V4_SAMPLES) {
    assert.ok(DEFAULT_REFUSED_RANGES.some((r) => r.cidr === cidr), `${cidr} listed`);
    for (const a of samples) {
      const d = defaultPolicy.checkName(a, PORT);
      refused(d, new RegExp(`add "${a.replaceAll(".", "\\.")}" to \\[coordinator\\] allow_targets to permit it`), a);
      const own = defaultPolicy.ownAddresses.includes(a);
      if (!own && !d.allowed) assert.match(d.reason, /\(\d+\.\d+\.\d+\.\d+\/\d+\)/, a);
      refused(defaultPolicy.checkAddress("some.example", a, 4, PORT), /^some\.example resolved to/, a);
    }
  }
  const d = defaultPolicy.checkName("127.0.0.1", PORT);
  assert.deepEqual(d, { allowed: false, reason: '127.0.0.1 is a loopback address (127.0.0.0/8); add "127.0.0.1" to [coordinator] allow_targets to permit it' });
  refused(defaultPolicy.checkName("169.254.169.254", PORT), /cloud metadata/);
  refused(defaultPolicy.checkName("10.0.0.1", PORT), /private address \(10\.0\.0\.0\/8\)/);
});

test("default: every refused IPv6 range, first, last and inside", () => {
  for (const [cidr, samples] of V6_SAMPLES) {
    assert.ok(DEFAULT_REFUSED_RANGES.some((r) => r.cidr === cidr), `${cidr} listed`);
    for (const a of samples) {
      refused(defaultPolicy.checkName(a, PORT), /allow_targets/, a);
      refused(defaultPolicy.checkName(`[${a}]`, PORT), /allow_targets/, a);
      refused(defaultPolicy.checkAddress("some.example", a, 6, PORT), /^some\.example resolved to/, a);
    }
  }
  refused(defaultPolicy.checkName("::1", PORT), /loopback address \(::1\/128\)/);
});

// IPv6 addresses embedding 127.0.0.1, 10.1.2.3 and 169.254.169.254.
const EMBEDDED: [string, string, string][] = [
  ["IPv4-mapped", "::ffff:10.1.2.3", "10.1.2.3"],
  ["IPv4-compatible", "::127.0.0.1", "127.0.0.1"],
  ["IPv4-compatible", "::a9fe:a9fe", "169.254.169.254"],
  ["IPv4-translated", "::ffff:0:7f00:1", "127.0.0.1"],
  ["NAT64", "64:ff9b::7f00:1", "127.0.0.1"],
  ["NAT64", "64:ff9b::169.254.169.254", "169.254.169.254"],
  ["NAT64", "64:ff9b::a01:203", "10.1.2.3"],
  ["local-use NAT64 /96", "64:ff9b:1:abcd::7f00:1", "127.0.0.1"],
  ["local-use NAT64 /48", "64:ff9b:1:7f00:0:100::", "127.0.0.1"],
  ["local-use NAT64 /56", "64:ff9b:1:7f:0:1:0:0", "127.0.0.1"],
  ["local-use NAT64 /64", "64:ff9b:1:0:a:102:300::", "10.1.2.3"],
  ["6to4", "2002:7f00:1::", "127.0.0.1"],
  ["6to4", "2002:a9fe:a9fe::1", "169.254.169.254"],
  ["6to4", "2002:a01:203:1::5", "10.1.2.3"],
  ["Teredo client", "2001:0:cb00:7101::80ff:fffe", "127.0.0.1"],
  ["Teredo client", "2001:0:cb00:7101:0:0:5601:5601", "169.254.169.254"],
  ["Teredo server", "2001:0:a01:203::ffff:ffff", "10.1.2.3"],
];

test("default: IPv6 forms are judged by the IPv4 address they embed", () => {
  for (const [form, v6, v4] of EMBEDDED) {
    const d = defaultPolicy.checkName(v6, PORT);
    refused(d, new RegExp(v4.replaceAll(".", "\\.")), `${form} ${v6}`);
    refused(defaultPolicy.checkAddress("rebind.example", v6, 6, PORT), /allow_targets/, `${form} ${v6} after DNS`);
  }
  refused(defaultPolicy.checkName("2002:7f00:1::", PORT), /embeds IPv4 127\.0\.0\.1 \(6to4, 2002::\/16\), which is a loopback address/);
  refused(defaultPolicy.checkName("2001:0:cb00:7101::80ff:fffe", PORT), /Teredo client/);
  // The same forms around a public address are allowed.
  const publicForms = ["::ffff:203.0.113.9", "64:ff9b::cb00:7109", "64:ff9b::198.51.100.7", "64:ff9b:1:abcd::cb00:7109", "2002:cb00:7109::1", "2001:0:c633:6407::34ff:8ef6"];
  for (const a of publicForms) allowed(defaultPolicy.checkName(a, PORT), a);
});

test("every spelling that reaches loopback, private or metadata is refused before DNS", () => {
  const spellings = [
    "2130706433", "0x7f000001", "0x7f.0.0.1", "0177.0.0.1", "127.1", "127.0.1", "0x7f.1", "127.0.0.1.", "0x7f.1.",
    "167772161", "0xa000001", "012.0.0.1", "10.1", "0xc0a80001", "192.168.1", "2852039166", "0xa9fea9fe", "0251.0376.0251.0376", "169.254.43518",
    "::ffff:127.0.0.1", "::ffff:7f00:1", "[::ffff:127.0.0.1]", "::ffff:a9fe:a9fe", "::127.0.0.1", "::7f00:1",
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::", "2002:a9fe:a9fe::", "2001:0:cb00:7101::80ff:fffe",
    "[::1]", "0:0:0:0:0:0:0:1", "fe80::1%eth0", "[fe80::1%25eth0]", "[fe80::a9fe:a9fe%lo]", "0", "0.0.0.0", "0x0",
  ];
  for (const h of spellings) refused(defaultPolicy.checkName(h, 80), /allow_targets/, h);
});

test("documentation ranges are public for the default policy (the NAT lab's internet)", () => {
  const samples = notOwn(defaultPolicy, ["203.0.113.5", "203.0.113.254", "198.51.100.7", "198.51.100.1", "192.0.2.200", "2001:db8::5", "2001:db8:1::77"]);
  for (const a of samples) {
    allowed(defaultPolicy.checkName(a, 80), a);
    allowed(defaultPolicy.checkAddress("lab.example", a, net.isIP(a), 80), a);
  }
  for (const a of ["1.1.1.1", "8.8.8.8", "2606:4700:4700::1111", "172.32.0.1", "172.15.255.255", "100.128.0.1", "198.20.0.1"]) allowed(defaultPolicy.checkName(a, 80), a);
  // Special ranges to ipaddr.js ("reserved" like 240.0.0.0/4, IPv6 "benchmarking", "discard"); never refused by the policy.
  for (const a of ["192.0.0.8", "192.88.99.1", "2001:2::1", "100::1", "3fff::1"]) allowed(defaultPolicy.checkName(a, 80), a);
  allowed(defaultPolicy.checkName("example.com", 80));
});

test("the coordinator's own addresses are refused: interfaces and extra ones", () => {
  const policy = policyOf({ allow: [], deny: [], ownAddresses: ["203.0.113.77", "2001:db8::77", "::ffff:198.51.100.77"] });
  refused(policy.checkName("203.0.113.77", 443), /203\.0\.113\.77 is an address of the coordinator itself; add "203\.0\.113\.77" to \[coordinator\] allow_targets/);
  refused(policy.checkName("2001:db8::77", 443), /coordinator itself/);
  refused(policy.checkName("198.51.100.77", 443), /coordinator itself/);
  refused(policy.checkName("2002:cb00:714d::", 443), /embeds IPv4 203\.0\.113\.77.*coordinator itself/);
  allowed(policy.checkName("203.0.113.78", 443));
  for (const a of policy.ownAddresses) refused(policy.checkAddress("me.example", a, net.isIP(a), 443), /resolved to/, a);
  assert.ok(policy.ownAddresses.includes("127.0.0.1"), "interfaces are read at creation");
  allowed(policyOf({ allow: ["203.0.113.77"], deny: [], ownAddresses: ["203.0.113.77"] }).checkName("203.0.113.77", 443));
  assert.throws(() => policyOf({ allow: [], deny: [], ownAddresses: ["me.example"] }), /ownAddresses\[0\]: "me\.example" is not an IP address/);
});

test("precedence: deny beats allow, allow beats the default ranges", () => {
  const policy = policyOf({ allow: ["10.0.0.0/8", "127.0.0.1", "::1", "fd00::/8", "intranet.example"], deny: ["10.9.0.0/16", "203.0.113.0/24", "2001:db8:bad::/48"] });
  allowed(policy.checkName("10.1.2.3", 80));
  allowed(policy.checkName("0xa010203", 80), "hex spelling of an allowed address");
  allowed(policy.checkName("127.0.0.1", 80));
  allowed(policy.checkName("::ffff:127.0.0.1", 80), "mapped spelling of an allowed address");
  allowed(policy.checkName("[::1]", 80));
  allowed(policy.checkName("fd12::1", 80));
  refused(policy.checkName("127.0.0.2", 80), /loopback/);
  refused(policy.checkName("10.9.1.1", 80), /10\.9\.1\.1 is refused by \[coordinator\] deny_targets entry "10\.9\.0\.0\/16"/);
  refused(policy.checkName("203.0.113.5", 80), /deny_targets entry "203\.0\.113\.0\/24"/);
  refused(policy.checkName("2001:db8:bad::1", 80), /deny_targets/);
  allowed(policy.checkName("2001:db8:600d::1", 80));
  // A deny entry catches the IPv4 address embedded in IPv6; an allow entry does not extend to it.
  refused(policy.checkName("2002:cb00:7105::", 80), /deny_targets entry "203\.0\.113\.0\/24"/);
  refused(policy.checkName("64:ff9b::a01:203", 80), /embeds IPv4 10\.1\.2\.3/);
  // A host pattern in allow_targets permits whatever that name resolves to; deny addresses still win.
  allowed(policy.checkAddress("intranet.example", "192.168.1.10", 4, 80));
  refused(policy.checkAddress("intranet.example", "10.9.0.1", 4, 80), /intranet\.example resolved to 10\.9\.0\.1, which is refused by \[coordinator\] deny_targets entry/);
  refused(policy.checkAddress("other.example", "192.168.1.10", 4, 80), /other\.example resolved to 192\.168\.1\.10, which is a private address/);
  // Deny by name wins over allow by address.
  const byName = policyOf({ allow: ["127.0.0.1"], deny: ["localhost"] });
  refused(byName.checkName("LOCALHOST.", 80), /localhost is refused by \[coordinator\] deny_targets entry "localhost"/);
  refused(byName.checkAddress("localhost", "127.0.0.1", 4, 80), /deny_targets/);
  allowed(byName.checkName("127.0.0.1", 80));
});

test("host patterns: exact names, *. subdomains only, case and trailing dot ignored", () => {
  const policy = policyOf({ allow: [], deny: ["Example.COM.", "*.corp.example"] });
  refused(policy.checkName("example.com", 443), /deny_targets entry "Example\.COM\."/);
  refused(policy.checkName("EXAMPLE.com.", 443));
  allowed(policy.checkName("www.example.com", 443));
  allowed(policy.checkName("notexample.com", 443));
  refused(policy.checkName("a.corp.example", 443), /"\*\.corp\.example"/);
  refused(policy.checkName("A.B.Corp.Example.", 443));
  allowed(policy.checkName("corp.example", 443), "*. does not match the bare domain");
  allowed(policy.checkName("xcorp.example", 443));
  allowed(policy.checkName("corp.example.evil.test", 443));
  // Patterns never match IP literals.
  allowed(policyOf({ allow: [], deny: ["*.example"] }).checkName("203.0.113.5", 443));
  // An allowed pattern lets the name through to any address.
  const allow = policyOf({ allow: ["*.lab.example"], deny: [] });
  allowed(allow.checkAddress("db.lab.example", "10.0.0.5", 4, 5432));
  refused(allow.checkAddress("lab.example", "10.0.0.5", 4, 5432), /private/);
});

test("ports: every port by default; deny and allow entries can name ports and ranges", () => {
  allowed(defaultPolicy.checkName("203.0.113.5", 1));
  allowed(defaultPolicy.checkName("203.0.113.5", 65535));
  const policy = policyOf({
    allow: ["10.0.0.0/8:8000-8100", "127.0.0.1:*", "[fd00::/8]:443", "*.lab.example:22"],
    deny: ["*:25", "*.example.com:443", "[2001:db8::/32]:443", "203.0.113.9:1-1023"],
  });
  refused(policy.checkName("203.0.113.5", 25), /deny_targets entry "\*:25" \(port 25\)/);
  refused(policy.checkName("example.org", 25));
  allowed(policy.checkName("203.0.113.5", 26));
  refused(policy.checkName("www.example.com", 443), /"\*\.example\.com:443"/);
  allowed(policy.checkName("www.example.com", 80));
  refused(policy.checkName("2001:db8::1", 443), /"\[2001:db8::\/32\]:443"/);
  allowed(policy.checkName("2001:db8::1", 8443));
  refused(policy.checkName("203.0.113.9", 1023));
  allowed(policy.checkName("203.0.113.9", 1024));
  allowed(policy.checkName("10.1.2.3", 8000));
  allowed(policy.checkName("10.1.2.3", 8100));
  refused(policy.checkName("10.1.2.3", 8101), /private address/);
  refused(policy.checkName("10.1.2.3", 7999), /private address/);
  allowed(policy.checkName("127.0.0.1", 1));
  allowed(policy.checkName("127.0.0.1", 65535));
  allowed(policy.checkName("fd00::5", 443));
  refused(policy.checkName("fd00::5", 80), /unique-local/);
  allowed(policy.checkAddress("ssh.lab.example", "192.168.0.2", 4, 22));
  refused(policy.checkAddress("ssh.lab.example", "192.168.0.2", 4, 23), /private/);
});

test("rule parsing: accepted forms", () => {
  const { rules, problems } = parseTargetRules(
    ["10.0.0.0/8", "2001:db8::/32", "192.0.2.1", "2001:db8::1", "example.com", "*.Example.com.", "*.example.com:443", "10.0.0.0/8:8000-8100", "[2001:db8::/32]:443", "127.0.0.1:*", "[::1]:8080", "*", "*:25", "0.0.0.0/0", "::/0", "::ffff:10.0.0.1", " spaced.example "],
    "coordinator.allow_targets",
  );
  assert.deepEqual(problems, []);
  assert.equal(rules.length, 17);
  assert.deepEqual(rules[5].target, { kind: "host", name: "example.com", subdomains: true });
  assert.equal(rules[5].ports, undefined);
  assert.deepEqual(rules[6].ports, { min: 443, max: 443 });
  assert.deepEqual(rules[7].ports, { min: 8000, max: 8100 });
  assert.equal(rules[9].ports, undefined);
  assert.deepEqual(rules[12], { entry: "*:25", target: { kind: "any" }, ports: { min: 25, max: 25 } });
  const mapped = rules[15].target;
  assert.ok(mapped.kind === "net" && mapped.family === "ipv4", "a mapped entry is an IPv4 rule");
  assert.equal(rules[16].entry, "spaced.example");
});

test("rule parsing: every problem is reported at once, naming the entry and what is wrong", () => {
  const bad: unknown[] = [
    "10.0.0.1/8", // host bits
    "10.0.0.0/33",
    "2001:db8::/129",
    "example.com:70000",
    "example.com:100-10",
    "example.com:http",
    "ex*ample.com",
    "*.*.example.com",
    "0x7f.1", // not dotted-quad
    "127.1",
    "2001:db8::1:443:x",
    "[2001:db8::1]443",
    "[example.com]:443",
    "fe80::1%eth0",
    "",
    42,
    "exa mple.com",
    "[2001:db8::1",
    "2001:db8::/32:443",
    "10.0.0.0/abc",
  ];
  const { rules, problems } = parseTargetRules(["10.0.0.0/8", ...bad], "coordinator.deny_targets");
  assert.equal(rules.length, 1);
  assert.equal(problems.length, bad.length, problems.join("\n"));
  for (let i = 0; i < bad.length; i++) assert.ok(problems[i].startsWith(`coordinator.deny_targets[${i + 1}]: `), problems[i]);
  assert.match(problems[0], /"10\.0\.0\.1\/8" has bits set after the prefix; did you mean 10\.0\.0\.0\/8\?/);
  assert.match(problems[3], /port 70000 is above 65535/);
  assert.match(problems[4], /empty/);
  assert.match(problems[6], /wildcard is only allowed as the whole first label/);
  assert.match(problems[8], /not one in dotted-quad form/);
  assert.match(problems[13], /zone ids/);
  assert.match(problems[15], /expected a string, got number/);
  assert.deepEqual(parseTargetRules("10.0.0.0/8", "k").problems, ["k: expected a list of strings"]);
  // Both lists' problems are reported together, and a policy refuses to start from them.
  assert.throws(
    () => createTargetPolicy(parseTargetLists(["ok.example", "bad host"], ["10.0.0.1/8", "*.ok.example", ":"])),
    (err: Error) => {
      assert.match(err.message, /coordinator\.allow_targets\[1\]: "bad host"/);
      assert.match(err.message, /coordinator\.deny_targets\[0\]: "10\.0\.0\.1\/8"/);
      assert.match(err.message, /coordinator\.deny_targets\[2\]/);
      assert.doesNotMatch(err.message, /deny_targets\[1\]/);
      return true;
    },
  );
});

// --- lookup ---------------------------------------------------------------

function fakeDns(table: Record<string, dns.LookupAddress[]>): LookupAll {
  return (hostname, _options, callback) => {
    const found = table[hostname];
    process.nextTick(() => {
      if (found) callback(null, found);
      else callback(Object.assign(new Error(`getaddrinfo ENOTFOUND ${hostname}`), { code: "ENOTFOUND" }), []);
    });
  };
}

function callLookup(lookup: net.LookupFunction, host: string, options: dns.LookupOptions): Promise<{ err: NodeJS.ErrnoException | null; address: string | dns.LookupAddress[]; family?: number }> {
  return new Promise((resolve) => lookup(host, options, (err, address, family) => resolve({ err, address, family })));
}

test("lookup: refused addresses are dropped, all: true and single-address forms; none left is ETARGETFORBIDDEN", async () => {
  const policy = policyOf({
    allow: [],
    deny: ["203.0.113.66"],
    dnsLookup: fakeDns({
      "mixed.example": [
        { address: "127.0.0.1", family: 4 },
        { address: "10.0.0.1", family: 4 },
        { address: "203.0.113.9", family: 4 },
        { address: "::ffff:169.254.169.254", family: 6 },
        { address: "2001:db8::9", family: 6 },
      ],
      "internal.example": [
        { address: "192.168.1.1", family: 4 },
        { address: "fd00::1", family: 6 },
        { address: "203.0.113.66", family: 4 },
      ],
      "empty.example": [],
    }),
  });
  const all = await callLookup(policy.lookupFor(443), "mixed.example", { all: true });
  assert.equal(all.err, null);
  assert.deepEqual(all.address, [
    { address: "203.0.113.9", family: 4 },
    { address: "2001:db8::9", family: 6 },
  ]);
  const one = await callLookup(policy.lookup, "mixed.example", {});
  assert.equal(one.err, null);
  assert.equal(one.address, "203.0.113.9");
  assert.equal(one.family, 4);

  const none = await callLookup(policy.lookupFor(443), "internal.example", { all: true });
  assert.ok(none.err instanceof TargetForbiddenError);
  assert.equal(none.err.code, "ETARGETFORBIDDEN");
  assert.match(none.err.message, /^internal\.example: every address is refused: internal\.example resolved to 192\.168\.1\.1, which is a private address \(192\.168\.0\.0\/16\); add "192\.168\.1\.1" to \[coordinator\] allow_targets/);
  assert.match(none.err.message, /fd00::1, which is a unique-local address/);
  assert.match(none.err.message, /203\.0\.113\.66, which is refused by \[coordinator\] deny_targets entry "203\.0\.113\.66"/);
  assert.equal((none.err as TargetForbiddenError).reasons.length, 3);

  const missing = await callLookup(policy.lookupFor(443), "missing.example", { all: true });
  assert.equal(missing.err?.code, "ENOTFOUND");
  const empty = await callLookup(policy.lookupFor(443), "empty.example", {});
  assert.equal(empty.err?.code, "ENOTFOUND");
  // A malformed or name-denied host never reaches the resolver.
  const malformed = await callLookup(policy.lookupFor(443), "1.2.3.4.5", { all: true });
  assert.equal(malformed.err?.code, "ETARGETFORBIDDEN");
  assert.match(malformed.err?.message ?? "", /malformed target host/);
});

test("lookup: numeric spellings are answered in normal form, never handed to getaddrinfo", async () => {
  let asked = 0;
  const counting: LookupAll = (_h, _o, cb) => {
    asked++;
    cb(null, [{ address: "203.0.113.1", family: 4 }]);
  };
  const open = policyOf({ allow: ["127.0.0.1"], deny: [], dnsLookup: counting });
  const r = await callLookup(open.lookupFor(80), "0x7f.1", { all: true });
  assert.equal(r.err, null);
  assert.deepEqual(r.address, [{ address: "127.0.0.1", family: 4 }]);
  const strict = policyOf({ allow: [], deny: [], dnsLookup: counting });
  const s = await callLookup(strict.lookupFor(80), "0x7f.1", {});
  assert.equal(s.err?.code, "ETARGETFORBIDDEN");
  assert.match(s.err?.message ?? "", /0x7f\.1 \(127\.0\.0\.1\) is a loopback address/);
  assert.equal(asked, 0);
});

test("lookup without a port: deny entries naming ports fail safe, allow entries naming ports do not apply", async () => {
  const policy = policyOf({
    allow: ["127.0.0.1:8080"],
    deny: ["203.0.113.0/24:25"],
    dnsLookup: fakeDns({ "mail.example": [{ address: "203.0.113.25", family: 4 }], "loop.example": [{ address: "127.0.0.1", family: 4 }] }),
  });
  const mail = await callLookup(policy.lookup, "mail.example", { all: true });
  assert.equal(mail.err?.code, "ETARGETFORBIDDEN");
  assert.match(mail.err?.message ?? "", /it names ports and this lookup was not told the port/);
  assert.equal((await callLookup(policy.lookupFor(80), "mail.example", { all: true })).err, null);
  assert.equal((await callLookup(policy.lookupFor(25), "mail.example", { all: true })).err?.code, "ETARGETFORBIDDEN");
  assert.equal((await callLookup(policy.lookup, "loop.example", { all: true })).err?.code, "ETARGETFORBIDDEN");
  assert.equal((await callLookup(policy.lookupFor(8080), "loop.example", { all: true })).err, null);
});

test("connectOptions: literals are normalised (net.connect skips lookup for them) and checked", () => {
  const strict = policyOf({ allow: [], deny: [] });
  refused(strict.connectOptions("::ffff:127.0.0.1", 80), /loopback/);
  refused(strict.connectOptions("0x7f.1", 80), /loopback/);
  refused(strict.connectOptions("bad host", 80), /malformed/);
  const open = policyOf({ allow: ["127.0.0.1", "fe80::/10"], deny: [] });
  const c = open.connectOptions("0x7f.1", 80);
  assert.ok(c.allowed);
  assert.equal(c.host, "127.0.0.1");
  assert.equal(typeof c.lookup, "function");
  const z = open.connectOptions("[FE80::1%eth0]", 80);
  assert.ok(z.allowed && z.host === "fe80::1%eth0");
  const n = open.connectOptions("Example.COM", 80);
  assert.ok(n.allowed && n.host === "Example.COM");
});

// --- real sockets on loopback ---------------------------------------------

function listen(host: string): Promise<net.Server> {
  return new Promise((resolve, reject) => {
    const server = net.createServer((s) => {
      s.on("error", () => {});
      s.end();
    });
    server.once("error", reject);
    server.listen(0, host, () => resolve(server));
  });
}

function connect(options: net.NetConnectOpts): Promise<{ ok: true; remote: string } | { ok: false; err: NodeJS.ErrnoException }> {
  return new Promise((resolve) => {
    const socket = net.connect(options);
    const timer = setTimeout(() => {
      socket.destroy();
      resolve({ ok: false, err: Object.assign(new Error("test timeout"), { code: "TEST_TIMEOUT" }) });
    }, 5000);
    socket.once("error", (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      resolve({ ok: false, err });
    });
    socket.once("connect", () => {
      clearTimeout(timer);
      const remote = socket.remoteAddress ?? "";
      socket.destroy();
      resolve({ ok: true, remote });
    });
  });
}

async function localhostAddresses(): Promise<dns.LookupAddress[]> {
  return dns.promises.lookup("localhost", { all: true });
}

test("integration: net.connect to localhost is refused by default and allowed by allow_targets", async () => {
  const server = await listen("127.0.0.1");
  try {
    const port = (server.address() as net.AddressInfo).port;
    const strict = policyOf({ allow: [], deny: [] });
    // "localhost" is on no deny list and passes the name check: only the resolved address decides.
    allowed(strict.checkName("localhost", port));
    refused(strict.checkAddress("localhost", "127.0.0.1", 4, port), /localhost resolved to 127\.0\.0\.1, which is a loopback address/);
    for (const autoSelectFamily of [true, false]) {
      for (const lookup of [strict.lookup, strict.lookupFor(port)]) {
        const r = await connect({ host: "localhost", port, lookup, autoSelectFamily });
        assert.equal(r.ok, false, `autoSelectFamily ${autoSelectFamily}`);
        if (!r.ok) {
          assert.equal(r.err.code, "ETARGETFORBIDDEN");
          assert.match(r.err.message, /127\.0\.0\.1.*loopback address \(127\.0\.0\.0\/8\).*allow_targets/);
        }
      }
      const hex = await connect({ host: "0x7f.1", port, lookup: strict.lookupFor(port), autoSelectFamily });
      assert.equal(hex.ok ? "connected" : hex.err.code, "ETARGETFORBIDDEN", "0x7f.1 is caught even though getaddrinfo would accept it");
    }
    const open = policyOf({ allow: ["127.0.0.1"], deny: [] });
    for (const autoSelectFamily of [true, false]) {
      // Were localhost to resolve to ::1 as well, that address is refused and dropped here.
      const r = await connect({ host: "localhost", port, lookup: open.lookupFor(port), autoSelectFamily });
      assert.deepEqual(r, { ok: true, remote: "127.0.0.1" });
      const hex = await connect({ host: "0x7f.1", port, lookup: open.lookupFor(port), autoSelectFamily });
      assert.deepEqual(hex, { ok: true, remote: "127.0.0.1" });
    }
    const opts = open.connectOptions("127.1", port);
    assert.ok(opts.allowed);
    assert.deepEqual(await connect({ host: opts.host, port: opts.port, lookup: opts.lookup }), { ok: true, remote: "127.0.0.1" });
  } finally {
    server.close();
  }
});

test("integration: ::1, through localhost if it resolves to ::1 here, else through a stub resolver", async (t) => {
  let server: net.Server;
  try {
    server = await listen("::1");
  } catch {
    t.skip("cannot listen on ::1 here");
    return;
  }
  try {
    const port = (server.address() as net.AddressInfo).port;
    const viaLocalhost = (await localhostAddresses()).some((a) => a.address === "::1");
    const host = viaLocalhost ? "localhost" : "v6loop.test";
    const dnsLookup = viaLocalhost ? undefined : fakeDns({ "v6loop.test": [{ address: "::1", family: 6 }] });
    t.diagnostic(`resolving ${host}`);
    const strict = policyOf({ allow: [], deny: [], dnsLookup });
    for (const autoSelectFamily of [true, false]) {
      const r = await connect({ host, port, family: 6, lookup: strict.lookupFor(port), autoSelectFamily });
      assert.equal(r.ok ? "connected" : r.err.code, "ETARGETFORBIDDEN");
      if (!r.ok) assert.match(r.err.message, /::1, which is a loopback address \(::1\/128\)/);
    }
    const open = policyOf({ allow: ["::1"], deny: [], dnsLookup });
    for (const autoSelectFamily of [true, false])
      assert.deepEqual(await connect({ host, port, family: 6, lookup: open.lookupFor(port), autoSelectFamily }), { ok: true, remote: "::1" });
  } finally {
    server.close();
  }
});
