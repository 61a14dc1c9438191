/**
 * The address ranges the target policy (target-policy.ts, whose header says
 * why each is or is not refused) knows: those refused by default, and the
 * IPv6 ranges that carry an IPv4 address, which is judged in their stead.
 * ipaddr.js parses and classifies; the tables say what the policy makes of
 * each class.
 */
import ipaddr from "ipaddr.js";
import { parseIP, type IPAddress } from "../address.ts";

interface Range {
  cidr: string;
  what: string;
  network: IPAddress;
  prefixLength: number;
}

function range(cidr: string, what: string): Range {
  const [address, len] = cidr.split("/");
  return { cidr, what, network: parseIP(address) as IPAddress, prefixLength: Number(len) };
}

// By ipaddr.js range name; within a name, most specific first so the reason
// names the narrowest range. A name's addresses outside its listed ranges are
// not refused: ipaddr.js files the documentation ranges, 192.0.0.0/24 and
// 192.88.99.0/24 under "reserved" too.
const V4_RANGES: Partial<Record<ReturnType<ipaddr.IPv4["range"]>, readonly Range[]>> = {
  broadcast: [range("255.255.255.255/32", "the broadcast address")],
  unspecified: [range("0.0.0.0/8", "an unspecified (\"this network\") address")],
  private: [range("10.0.0.0/8", "a private address"), range("172.16.0.0/12", "a private address"), range("192.168.0.0/16", "a private address")],
  carrierGradeNat: [range("100.64.0.0/10", "a shared (carrier-grade NAT) address")],
  loopback: [range("127.0.0.0/8", "a loopback address")],
  linkLocal: [range("169.254.169.254/32", "the cloud metadata service address"), range("169.254.0.0/16", "a link-local address")],
  multicast: [range("224.0.0.0/4", "a multicast address")],
  reserved: [range("198.18.0.0/15", "a benchmarking address"), range("240.0.0.0/4", "a reserved address")],
};

// ipaddr.js returns "deprecatedSiteLocal" for fec0::/10; its type declarations omit the name.
const V6_RANGES: Partial<Record<ReturnType<ipaddr.IPv6["range"]> | "deprecatedSiteLocal", readonly Range[]>> = {
  unspecified: [range("::/128", "the unspecified address")],
  loopback: [range("::1/128", "a loopback address")],
  linkLocal: [range("fe80::/10", "a link-local address")],
  deprecatedSiteLocal: [range("fec0::/10", "a site-local address (deprecated, may still route internally)")],
  uniqueLocal: [range("fc00::/7", "a unique-local address")],
  multicast: [range("ff00::/8", "a multicast address")],
};

/** The ranges refused unless allow_targets names them (own addresses and embedded IPv4 come on top). */
export const DEFAULT_REFUSED_RANGES: readonly { cidr: string; what: string }[] = [...Object.values(V4_RANGES), ...Object.values(V6_RANGES)].flatMap((list) => (list ?? []).map(({ cidr, what }) => ({ cidr, what })));

/** The default-refused range `ip` is in, if any (the coordinator's own addresses are the policy's to add). */
export function refusedRange(ip: IPAddress): Range | undefined {
  const candidates = ip instanceof ipaddr.IPv6 ? V6_RANGES[ip.range()] : V4_RANGES[ip.range()];
  return candidates?.find((r) => ip.match(r.network, r.prefixLength));
}

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

export interface Embedded {
  v4: ipaddr.IPv4;
  via: string;
}

const v4Of = (bytes: number[]): ipaddr.IPv4 => new ipaddr.IPv4(bytes);

// Every IPv4 address an IPv6 address may carry traffic to (RFC 4291, 6145,
// 6052, 8215, 3056, 4380). Judged conservatively: if any candidate would be
// refused, the IPv6 address is. ipaddr.js classifies; where the IPv4 address
// sits is ours to read.
export function embeddedIPv4(ip: ipaddr.IPv6): Embedded[] {
  const b = ip.toByteArray();
  const zero = (from: number, to: number) => b.slice(from, to).every((x) => x === 0);
  switch (ip.range()) {
    case "ipv4Mapped":
      return [{ v4: ip.toIPv4Address(), via: "IPv4-mapped, ::ffff:0:0/96" }];
    case "rfc6145":
      return [{ v4: v4Of(b.slice(12)), via: "IPv4-translated, ::ffff:0:0:0/96" }];
    case "rfc6052": {
      if (ip.parts[2] !== 1) return [{ v4: v4Of(b.slice(12)), via: "NAT64, 64:ff9b::/96" }];
      // RFC 6052 §2.2 layouts for prefixes inside 64:ff9b:1::/48; bits 64-71 are zero.
      const via = "local-use NAT64, 64:ff9b:1::/48";
      const out: Embedded[] = [];
      if (b[8] === 0 && zero(11, 16)) out.push({ v4: v4Of([b[6], b[7], b[9], b[10]]), via: `${via} as a /48` });
      if (b[8] === 0 && zero(12, 16)) out.push({ v4: v4Of([b[7], b[9], b[10], b[11]]), via: `${via} as a /56` });
      if (b[8] === 0 && zero(13, 16)) out.push({ v4: v4Of([b[9], b[10], b[11], b[12]]), via: `${via} as a /64` });
      out.push({ v4: v4Of(b.slice(12)), via: `${via} as a /96` });
      return out;
    }
    case "6to4":
      return [{ v4: v4Of(b.slice(2, 6)), via: "6to4, 2002::/16" }];
    case "teredo":
      return [
        { v4: v4Of(b.slice(4, 8)), via: "Teredo server, 2001::/32" },
        { v4: v4Of(b.slice(12).map((x) => x ^ 255)), via: "Teredo client, 2001::/32" },
      ];
    default:
      // IPv4-compatible (deprecated, RFC 4291 §2.5.5.1) has no ipaddr.js name; :: and ::1 are not one.
      if (zero(0, 12) && !(zero(12, 15) && b[15] <= 1)) return [{ v4: v4Of(b.slice(12)), via: "IPv4-compatible, ::/96" }];
      return [];
  }
}
