// NAT lab: seven Linux network namespaces and an nftables router that
// emulates the RFC 4787 NAT types, so natproxy can be tested behind a NAT
// on one machine. What it emulates, and what was measured on this kind of
// machine: docs/NAT.md, "NAT behaviours and how the lab builds them".
//
//  lan  192.168.77.2 fd00:77::2 ─┐ bridge rbr              bridge wbr ┌─ rep   203.0.113.10 (+.11)  2001:db8:113::10 (+::11)
//                                ├─ rtr 192.168.77.1 | 198.51.100.2 ── wan ┼─ coord 203.0.113.20       2001:db8:113::20
//  lan2 192.168.77.3 fd00:77::3 ─┘     fd00:77::1 | 2001:db8:51::2         └─ web   203.0.113.30       2001:db8:113::30
//
// scripts/natlab.ts is its command line:
//   npx node scripts/natlab.ts up --nat port-restricted [--delay 20] [--prefix nlab1-] [--seconds N]
//   npx node scripts/natlab.ts down --prefix nlab1-

import {
  execFile,
  execFileSync,
  spawn as spawnChild,
  type ChildProcess,
  type StdioOptions,
} from "node:child_process";
import { randomBytes } from "node:crypto";
import { accessSync, constants as fsConstants, existsSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

export type NatType = "open" | "full-cone" | "addr-restricted" | "port-restricted" | "symmetric";
export const NAT_TYPES: readonly NatType[] = [
  "open",
  "full-cone",
  "addr-restricted",
  "port-restricted",
  "symmetric",
];

export type HostName = "lan" | "lan2" | "rtr" | "wan" | "rep" | "coord" | "web";
export const HOST_NAMES: readonly HostName[] = ["lan", "lan2", "rtr", "wan", "rep", "coord", "web"];

export interface LabHost {
  readonly name: HostName;
  readonly ns: string;
  /** The address this host uses as its source towards the internet side. */
  ip4: string;
  /** As ip4; for lan/lan2 it is the ULA behind NAT66 and the routed GUA with `open`. */
  ip6: string;
  /** Second address of the reporter (RFC 5780 "other address"). */
  readonly ip4Alt?: string;
  readonly ip6Alt?: string;
  /** The router's (and the wan core's) address on its inner side. */
  readonly innerIp4?: string;
  readonly innerIp6?: string;
}

export interface LabOptions {
  nat: NatType;
  /** One-way delay added on the rtr<->wan link, in ms (userspace delay line). */
  delayMs?: number;
  /** Name prefix of namespaces and interfaces; at most 10 characters. */
  prefix?: string;
}

export interface ExecOptions {
  timeoutMs?: number;
  input?: string;
  env?: NodeJS.ProcessEnv;
}

export interface ExecResult {
  code: number;
  stdout: string;
  stderr: string;
  timedOut: boolean;
}

export interface SpawnOptions {
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  stdio?: StdioOptions;
}

const LAN4 = "192.168.77.0/24";
const ULA6 = "fd00:77::/64";
const ROUTED6 = "2001:db8:77::/64";
// How long a full-cone / address-restricted mapping outlives its last
// outbound packet; long enough that tests never race it.
const MAPPING_TIMEOUT_S = 600;
const TABLE = "natlab";

const here = path.dirname(fileURLToPath(import.meta.url));
const DELAY_SCRIPT = path.join(here, "natlab-delay.py");

// Root's PATH usually has the sbin directories, a CI shell's may not; every
// command here (and inside `ip netns exec`) is looked up with this PATH.
const TOOL_PATH = [...(process.env.PATH ?? "").split(":"), "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
  .filter((d, k, all) => d && all.indexOf(d) === k)
  .join(":");
const toolEnv = (env: NodeJS.ProcessEnv = process.env): NodeJS.ProcessEnv => ({ ...env, PATH: TOOL_PATH });

export function findTool(name: string): string | undefined {
  for (const dir of TOOL_PATH.split(":")) {
    const candidate = path.join(dir, name);
    try {
      accessSync(candidate, fsConstants.X_OK);
      return candidate;
    } catch {
      // not here
    }
  }
  return undefined;
}

function run(cmd: string, args: string[], opts: ExecOptions = {}): Promise<ExecResult> {
  return new Promise((resolve) => {
    const child = execFile(
      cmd,
      args,
      {
        timeout: opts.timeoutMs ?? 10_000,
        killSignal: "SIGKILL",
        maxBuffer: 32 * 1024 * 1024,
        encoding: "utf8",
        env: toolEnv(opts.env),
      },
      (err, stdout, stderr) => {
        let code = 0;
        let timedOut = false;
        if (err) {
          const e = err as NodeJS.ErrnoException & { killed?: boolean; code?: number | string };
          timedOut = Boolean(e.killed);
          code = typeof e.code === "number" ? e.code : -1;
          if (typeof e.code === "string") stderr = `${stderr}${e.message}\n`;
        }
        resolve({ code, stdout, stderr, timedOut });
      },
    );
    // A command that exits without reading its stdin must not crash us.
    child.stdin?.on("error", () => {});
    child.stdin?.end(opts.input ?? "");
  });
}

async function mustRun(cmd: string, args: string[], opts: ExecOptions = {}): Promise<string> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) {
    throw new Error(
      `${cmd} ${args.join(" ")} failed (${r.timedOut ? "timeout" : `exit ${r.code}`}): ${r.stderr.trim()}` +
        (opts.input ? `\ninput:\n${opts.input}` : ""),
    );
  }
  return r.stdout;
}

/**
 * Resolves with the first line of `child`'s stdout that satisfies `match`
 * (and returns what `match` returned); rejects on timeout or child exit.
 */
export function waitForLine<T>(
  child: ChildProcess,
  match: (line: string) => T | undefined | false | null,
  timeoutMs: number,
  what = "line",
): Promise<T> {
  const stdout = child.stdout;
  if (!stdout) return Promise.reject(new Error("child has no stdout pipe"));
  return new Promise<T>((resolve, reject) => {
    let buf = "";
    let seen = "";
    const cleanup = (): void => {
      clearTimeout(timer);
      stdout.off("data", onData);
      child.off("exit", onExit);
    };
    const onData = (chunk: Buffer | string): void => {
      buf += chunk.toString();
      let nl: number;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).replace(/\r$/, "");
        buf = buf.slice(nl + 1);
        seen = (seen + line + "\n").slice(-2000);
        const r = match(line);
        if (r !== undefined && r !== false && r !== null) {
          cleanup();
          resolve(r);
          return;
        }
      }
    };
    const onExit = (code: number | null, sig: string | null): void => {
      cleanup();
      reject(new Error(`process exited (${code ?? sig}) before ${what}; output:\n${seen}`));
    };
    const timer = setTimeout(() => {
      cleanup();
      reject(new Error(`timeout after ${timeoutMs} ms waiting for ${what}; output:\n${seen}`));
    }, timeoutMs);
    stdout.on("data", onData);
    child.on("exit", onExit);
  });
}

/** One line of a lab helper's JSON-lines output, or undefined for anything else. */
export function jsonLine(line: string): Record<string, unknown> | undefined {
  try {
    return JSON.parse(line) as Record<string, unknown>;
  } catch {
    return undefined;
  }
}

/** A LineReader matcher for the helper output line `{"event": name, ...}`. */
export function jsonEvent<T = Record<string, unknown>>(name: string): (line: string) => T | undefined {
  return (line) => {
    const j = jsonLine(line);
    return j?.event === name ? (j as T) : undefined;
  };
}

/**
 * Collects a child's stdout lines from the moment it is attached, so a
 * caller can wait for a line that may already have arrived. Each matched
 * line is consumed and never returned twice.
 */
export class LineReader {
  readonly lines: string[] = [];
  private readonly used = new Set<number>();
  private buf = "";
  private exited: string | undefined;
  private readonly waiters = new Set<() => void>();

  constructor(child: ChildProcess) {
    child.stdout?.on("data", (chunk: Buffer | string) => {
      this.buf += chunk.toString();
      let nl: number;
      while ((nl = this.buf.indexOf("\n")) >= 0) {
        this.lines.push(this.buf.slice(0, nl).replace(/\r$/, ""));
        this.buf = this.buf.slice(nl + 1);
      }
      for (const w of this.waiters) w();
    });
    child.once("exit", (code, sig) => {
      this.exited = `process exited (${code ?? sig})`;
      for (const w of this.waiters) w();
    });
  }

  /** `consume: false` leaves the line for a later waitFor (a peek). */
  waitFor<T>(
    match: (line: string) => T | undefined | false | null,
    timeoutMs: number,
    what = "line",
    consume = true,
  ): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const check = (): boolean => {
        for (let k = 0; k < this.lines.length; k++) {
          if (this.used.has(k)) continue;
          const r = match(this.lines[k] as string);
          if (r !== undefined && r !== false && r !== null) {
            if (consume) this.used.add(k);
            done();
            resolve(r);
            return true;
          }
        }
        if (this.exited) {
          done();
          reject(new Error(`${this.exited} before ${what}; output:\n${this.lines.slice(-20).join("\n")}`));
          return true;
        }
        return false;
      };
      const done = (): void => {
        clearTimeout(timer);
        this.waiters.delete(onChange);
      };
      const onChange = (): void => {
        check();
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`timeout after ${timeoutMs} ms waiting for ${what}; output:\n${this.lines.slice(-20).join("\n")}`));
      }, timeoutMs);
      this.waiters.add(onChange);
      check();
    });
  }
}

interface IfNames {
  lan: string;
  lan2: string;
  rl1: string;
  rl2: string;
  rbr: string;
  rwan: string;
  wrtr: string;
  wbr: string;
  wrep: string;
  wcoord: string;
  wweb: string;
  rep: string;
  coord: string;
  web: string;
}

function ifNames(p: string): IfNames {
  return {
    lan: `${p}lan`,
    lan2: `${p}lan2`,
    rl1: `${p}rl1`,
    rl2: `${p}rl2`,
    rbr: `${p}rbr`,
    rwan: `${p}rwan`,
    wrtr: `${p}wrtr`,
    wbr: `${p}wbr`,
    wrep: `${p}wrep`,
    wcoord: `${p}wcrd`,
    wweb: `${p}wweb`,
    rep: `${p}rep`,
    coord: `${p}coord`,
    web: `${p}web`,
  };
}

/**
 * The router's whole ruleset for one NAT type: one `table inet` that is
 * replaced atomically (which also empties its dynamic maps).
 * `gen` is stamped into the conntrack mark of new forwarded connections;
 * packets of older generations are dropped, which is how flushNat() kills
 * existing mappings when the conntrack tool is missing.
 */
export function routerRuleset(nat: NatType, lanIf: string, wanIf: string, gen: number): string {
  const L = `"${lanIf}"`;
  const W = `"${wanIf}"`;
  const eim = nat === "full-cone" || nat === "addr-restricted";
  const adf = nat === "addr-restricted";
  const masq = nat === "symmetric" ? "masquerade fully-random" : "masquerade";
  const dyn = `flags dynamic,timeout; timeout ${MAPPING_TIMEOUT_S}s;`;
  const out: string[] = [];
  out.push(`table inet ${TABLE}`, `delete table inet ${TABLE}`, `table inet ${TABLE} {`);
  if (eim) {
    // public proto.port -> inner address.port, learned after masquerade.
    out.push(`  map eif4 { type inet_proto . inet_service : ipv4_addr . inet_service; ${dyn} }`);
    // nft 1.0.6 asserts (netlink_gen_expr dreg < reg_low) on an IPv6
    // "addr . port" map value, so IPv6 keeps address and port in two maps.
    out.push(`  map eif6a { type inet_proto . inet_service : ipv6_addr; ${dyn} }`);
    out.push(`  map eif6p { type inet_proto . inet_service : inet_service; ${dyn} }`);
  }
  if (adf) {
    out.push(`  set adf4 { type ipv4_addr . inet_proto . inet_service; ${dyn} }`);
    out.push(`  set adf6 { type ipv6_addr . inet_proto . inet_service; ${dyn} }`);
  }
  // Unsolicited SYNs to the router die silently (RFC 5382 REQ-4): a RST
  // would defeat TCP simultaneous open.
  out.push(
    `  chain input {`,
    `    type filter hook input priority filter; policy accept;`,
    `    iifname ${W} ct state established,related accept`,
    `    iifname ${W} meta l4proto { icmp, ipv6-icmp } accept`,
    `    iifname ${W} drop`,
    `  }`,
  );
  out.push(
    `  chain forward {`,
    `    type filter hook forward priority filter; policy drop;`,
    `    ct state new ct mark set ${gen}`,
    `    ct mark != ${gen} drop`,
    // With nf_conntrack_tcp_loose=0 the mid-stream packets of a forgotten
    // connection are invalid; dropping them is what a rebooted NAT does.
    `    ct state invalid drop`,
    `    ct state established,related accept`,
    `    iifname ${L} oifname ${W} accept`,
  );
  if (eim) out.push(`    iifname ${W} oifname ${L} ct status dnat accept`);
  out.push(`  }`);
  if (nat !== "open") {
    out.push(`  chain prerouting_nat {`, `    type nat hook prerouting priority dstnat; policy accept;`);
    if (eim) {
      const f4 = adf ? `ip saddr . meta l4proto . th dport @adf4 ` : "";
      const f6 = adf ? `ip6 saddr . meta l4proto . th dport @adf6 ` : "";
      out.push(
        `    iifname ${W} meta l4proto { tcp, udp } fib daddr type local ${f4}dnat ip to meta l4proto . th dport map @eif4`,
        `    iifname ${W} meta l4proto { tcp, udp } fib daddr type local ${f6}dnat ip6 to meta l4proto . th dport map @eif6a : meta l4proto . th dport map @eif6p`,
      );
    }
    out.push(`  }`);
    out.push(
      `  chain postrouting_nat {`,
      `    type nat hook postrouting priority srcnat; policy accept;`,
      `    oifname ${W} ip saddr ${LAN4} ${masq}`,
      `    oifname ${W} ip6 saddr ${ULA6} ${masq}`,
      `  }`,
    );
  }
  if (eim) {
    // Runs after masquerade, so th sport is already the public port.
    const sel = `oifname ${W} ct status snat meta l4proto { tcp, udp }`;
    out.push(
      `  chain learn {`,
      `    type filter hook postrouting priority srcnat + 10; policy accept;`,
      `    meta nfproto ipv4 ${sel} update @eif4 { meta l4proto . th sport : ct original ip saddr . ct original proto-src }`,
      `    meta nfproto ipv6 ${sel} update @eif6a { meta l4proto . th sport : ct original ip6 saddr }`,
      `    meta nfproto ipv6 ${sel} update @eif6p { meta l4proto . th sport : ct original proto-src }`,
    );
    if (adf) {
      out.push(
        `    meta nfproto ipv4 ${sel} update @adf4 { ip daddr . meta l4proto . th sport }`,
        `    meta nfproto ipv6 ${sel} update @adf6 { ip6 daddr . meta l4proto . th sport }`,
      );
    }
    out.push(`  }`);
  }
  out.push(`}`);
  return out.join("\n") + "\n";
}

const liveLabs = new Set<Lab>();
let handlersInstalled = false;

function installProcessHandlers(): void {
  if (handlersInstalled) return;
  handlersInstalled = true;
  process.on("exit", () => {
    for (const lab of liveLabs) lab.destroySync();
  });
  for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
    const handler = (): void => {
      for (const lab of liveLabs) lab.destroySync();
      // Someone else handles it: leave the decision to exit to them.
      // Otherwise keep the default behaviour of dying by the signal.
      if (process.listenerCount(sig) === 1) {
        process.off(sig, handler);
        process.kill(process.pid, sig);
      }
    };
    process.on(sig, handler);
  }
}

function randomPrefix(): string {
  for (let i = 0; i < 20; i++) {
    const p = `nl${randomBytes(2).toString("hex")}-`;
    if (!existsSync(`/run/netns/${p}rtr`) && !existsSync(`/var/run/netns/${p}rtr`)) return p;
  }
  throw new Error("could not find a free lab prefix");
}

export class Lab {
  readonly prefix: string;
  readonly delayMs: number;
  readonly lan: LabHost;
  readonly lan2: LabHost;
  readonly rtr: LabHost;
  readonly wan: LabHost;
  readonly rep: LabHost;
  readonly coord: LabHost;
  readonly web: LabHost;
  readonly ifs: IfNames;
  /** Which way flushNat() works on this machine. */
  readonly flushMethod: "conntrack" | "ruleset-generation";
  private natType: NatType;
  private gen = 1;
  private readonly children = new Set<ChildProcess>();
  private readonly createdNs = new Set<string>();
  private destroying: Promise<void> | undefined;
  private destroyed = false;
  private readonly conntrackTool: string | undefined;

  constructor(prefix: string, nat: NatType, delayMs: number) {
    this.prefix = prefix;
    this.natType = nat;
    this.delayMs = delayMs;
    this.ifs = ifNames(prefix);
    this.conntrackTool = findTool("conntrack");
    this.flushMethod = this.conntrackTool ? "conntrack" : "ruleset-generation";
    const h = (name: HostName, ip4: string, ip6: string, extra: Partial<LabHost> = {}): LabHost => ({
      name,
      ns: `${prefix}${name}`,
      ip4,
      ip6,
      ...extra,
    });
    this.lan = h("lan", "192.168.77.2", "fd00:77::2");
    this.lan2 = h("lan2", "192.168.77.3", "fd00:77::3");
    this.rtr = h("rtr", "198.51.100.2", "2001:db8:51::2", { innerIp4: "192.168.77.1", innerIp6: "fd00:77::1" });
    this.wan = h("wan", "198.51.100.1", "2001:db8:51::1", { innerIp4: "203.0.113.1", innerIp6: "2001:db8:113::1" });
    this.rep = h("rep", "203.0.113.10", "2001:db8:113::10", { ip4Alt: "203.0.113.11", ip6Alt: "2001:db8:113::11" });
    this.coord = h("coord", "203.0.113.20", "2001:db8:113::20");
    this.web = h("web", "203.0.113.30", "2001:db8:113::30");
  }

  get nat(): NatType {
    return this.natType;
  }

  /** The address the internet sees for `lan`: the router's, or lan's own with `open`. */
  get publicIp4(): string {
    return this.natType === "open" ? this.lan.ip4 : this.rtr.ip4;
  }

  get publicIp6(): string {
    return this.natType === "open" ? this.lan.ip6 : this.rtr.ip6;
  }

  host(name: HostName): LabHost {
    return this[name];
  }

  hosts(): LabHost[] {
    return HOST_NAMES.map((n) => this[n]);
  }

  netns(host: HostName): string {
    return this[host].ns;
  }

  /**
   * Runs argv inside host's namespace. A failing command or a timeout
   * (timedOut, after SIGKILL) resolves; only a destroyed lab rejects.
   */
  exec(host: HostName, argv: string[], opts: ExecOptions = {}): Promise<ExecResult> {
    if (this.destroyed) return Promise.reject(new Error("lab destroyed"));
    return run("ip", ["netns", "exec", this.netns(host), ...argv], opts);
  }

  /** Starts argv inside host's namespace; the process is killed by destroy(). */
  spawn(host: HostName, argv: string[], opts: SpawnOptions = {}): ChildProcess {
    if (this.destroyed) throw new Error("lab destroyed");
    // `ip netns exec` execs the command in place, so the PID is the command's.
    const child = spawnChild("ip", ["netns", "exec", this.netns(host), ...argv], {
      env: toolEnv(opts.env),
      cwd: opts.cwd,
      stdio: opts.stdio ?? "pipe",
    });
    this.children.add(child);
    child.once("exit", () => this.children.delete(child));
    child.once("error", () => this.children.delete(child));
    return child;
  }

  private async ipBatch(ns: string | null, lines: string[]): Promise<void> {
    const args = ns ? ["-n", ns, "-b", "-"] : ["-b", "-"];
    await mustRun("ip", args, { input: lines.join("\n") + "\n" });
  }

  private async sysctl(host: HostName, settings: string[]): Promise<void> {
    await mustRun("ip", ["netns", "exec", this.netns(host), "sysctl", "-q", "-w", ...settings]);
  }

  /** Builds the namespaces; called by createLab(). */
  async setup(): Promise<void> {
    const i = this.ifs;
    for (const host of HOST_NAMES) {
      // Recorded first, so a crash mid-call still cleans it up.
      this.createdNs.add(this.netns(host));
      await mustRun("ip", ["netns", "add", this.netns(host)]);
    }
    // Interfaces copy the "default" devconf when created, so DAD must be off
    // before the veths appear; tentative addresses would break the first
    // seconds of IPv6.
    await Promise.all(
      HOST_NAMES.map((host) =>
        this.sysctl(host, ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]),
      ),
    );
    const n = (h: HostName): string => this.netns(h);
    const veths = [
      `link add ${i.lan} netns ${n("lan")} type veth peer name ${i.rl1} netns ${n("rtr")}`,
      `link add ${i.lan2} netns ${n("lan2")} type veth peer name ${i.rl2} netns ${n("rtr")}`,
      `link add ${i.rep} netns ${n("rep")} type veth peer name ${i.wrep} netns ${n("wan")}`,
      `link add ${i.coord} netns ${n("coord")} type veth peer name ${i.wcoord} netns ${n("wan")}`,
      `link add ${i.web} netns ${n("web")} type veth peer name ${i.wweb} netns ${n("wan")}`,
    ];
    if (this.delayMs <= 0) {
      veths.push(`link add ${i.rwan} netns ${n("rtr")} type veth peer name ${i.wrtr} netns ${n("wan")}`);
    }
    await this.ipBatch(null, veths);
    if (this.delayMs > 0) await this.startDelayLine();

    await this.ipBatch(n("rtr"), [
      `link set lo up`,
      `link add ${i.rbr} type bridge mcast_snooping 0`,
      `link set ${i.rl1} master ${i.rbr}`,
      `link set ${i.rl2} master ${i.rbr}`,
      `link set ${i.rl1} up`,
      `link set ${i.rl2} up`,
      `link set ${i.rbr} up`,
      `link set ${i.rwan} up`,
      `addr add 192.168.77.1/24 dev ${i.rbr}`,
      `addr add fd00:77::1/64 dev ${i.rbr} nodad`,
      `addr add 198.51.100.2/24 dev ${i.rwan}`,
      `addr add 2001:db8:51::2/64 dev ${i.rwan} nodad`,
      // A TUN device has no neighbour resolution, so route by device, which
      // also works on the veth.
      `route add default dev ${i.rwan} via 198.51.100.1`,
      `route add ::/0 dev ${i.rwan} via 2001:db8:51::1`,
    ]);
    await this.ipBatch(n("wan"), [
      `link set lo up`,
      `link add ${i.wbr} type bridge mcast_snooping 0`,
      `link set ${i.wrep} master ${i.wbr}`,
      `link set ${i.wcoord} master ${i.wbr}`,
      `link set ${i.wweb} master ${i.wbr}`,
      `link set ${i.wrep} up`,
      `link set ${i.wcoord} up`,
      `link set ${i.wweb} up`,
      `link set ${i.wbr} up`,
      `link set ${i.wrtr} up`,
      `addr add 198.51.100.1/24 dev ${i.wrtr}`,
      `addr add 2001:db8:51::1/64 dev ${i.wrtr} nodad`,
      `addr add 203.0.113.1/24 dev ${i.wbr}`,
      `addr add 2001:db8:113::1/64 dev ${i.wbr} nodad`,
    ]);
    const lanLike = (host: "lan" | "lan2", ifn: string, last: number): Promise<void> =>
      this.ipBatch(n(host), [
        `link set lo up`,
        `link set ${ifn} up`,
        `addr add 192.168.77.${last}/24 dev ${ifn}`,
        `addr add fd00:77::${last}/64 dev ${ifn} nodad`,
        `route add default via 192.168.77.1`,
        // The router's ULA is on-link for both the ULA and the routed GUA.
        `route add ::/0 via fd00:77::1`,
      ]);
    const outside = (host: "rep" | "coord" | "web", ifn: string, last: number, alt?: number): Promise<void> =>
      this.ipBatch(n(host), [
        `link set lo up`,
        `link set ${ifn} up`,
        `addr add 203.0.113.${last}/24 dev ${ifn}`,
        `addr add 2001:db8:113::${last}/64 dev ${ifn} nodad`,
        ...(alt !== undefined
          ? [
              `addr add 203.0.113.${alt}/24 dev ${ifn}`,
              // Deprecated, so the kernel never picks it as a source address
              // and skews the address-dependent filtering tests.
              `addr add 2001:db8:113::${alt}/64 dev ${ifn} nodad preferred_lft 0`,
            ]
          : []),
        `route add default via 203.0.113.1`,
        `route add ::/0 via 2001:db8:113::1`,
      ]);
    await Promise.all([
      lanLike("lan", i.lan, 2),
      lanLike("lan2", i.lan2, 3),
      outside("rep", i.rep, 10, 11),
      outside("coord", i.coord, 20),
      outside("web", i.web, 30),
    ]);
    await Promise.all([
      this.sysctl("rtr", [
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
        // Mid-stream packets of a flushed connection must not be picked up
        // again and re-NATed, or flushNat() would not break anything.
        "net.netfilter.nf_conntrack_tcp_loose=0",
      ]),
      this.sysctl("wan", ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]),
    ]);
    await this.setNat(this.natType);
  }

  private async startDelayLine(): Promise<void> {
    const i = this.ifs;
    const python = findTool("python3");
    if (!python) throw new Error("delayMs needs python3 for the userspace delay line (netem is missing)");
    const child = this.spawn("rtr", [
      python,
      DELAY_SCRIPT,
      i.rwan,
      i.wrtr,
      `/run/netns/${this.netns("wan")}`,
      String(this.delayMs),
    ]);
    let stderr = "";
    child.stderr?.on("data", (d: Buffer) => {
      stderr = (stderr + d.toString()).slice(-2000);
    });
    try {
      await waitForLine(child, (l) => l.trim() === "ready", 10_000, "delay line ready");
    } catch (e) {
      throw new Error(`${(e as Error).message}\nstderr: ${stderr}`);
    }
  }

  /** Switches the router to another NAT type in place; existing state is dropped. */
  async setNat(type: NatType): Promise<void> {
    if (!NAT_TYPES.includes(type)) throw new Error(`unknown NAT type ${type}`);
    const wasOpen = this.natType === "open";
    const toOpen = type === "open";
    this.natType = type;
    const n = (h: HostName): string => this.netns(h);
    // `open` routes 2001:db8:77::/64 (and the private IPv4 LAN) behind a
    // stateful firewall; the NAT types use only ULA inside.
    if (toOpen) {
      await Promise.all([
        this.ipBatch(n("rtr"), [`addr replace 2001:db8:77::1/64 dev ${this.ifs.rbr} nodad`]),
        this.ipBatch(n("lan"), [`addr replace 2001:db8:77::2/64 dev ${this.ifs.lan} nodad`]),
        this.ipBatch(n("lan2"), [`addr replace 2001:db8:77::3/64 dev ${this.ifs.lan2} nodad`]),
        this.ipBatch(n("wan"), [
          `route replace ${LAN4} via 198.51.100.2`,
          `route replace ${ROUTED6} via 2001:db8:51::2`,
        ]),
      ]);
      this.lan.ip6 = "2001:db8:77::2";
      this.lan2.ip6 = "2001:db8:77::3";
    } else if (wasOpen || this.lan.ip6 !== "fd00:77::2") {
      const quiet = async (ns: string, args: string[]): Promise<void> => {
        await run("ip", ["-n", ns, ...args]);
      };
      await Promise.all([
        quiet(n("rtr"), ["addr", "del", "2001:db8:77::1/64", "dev", this.ifs.rbr]),
        quiet(n("lan"), ["addr", "del", "2001:db8:77::2/64", "dev", this.ifs.lan]),
        quiet(n("lan2"), ["addr", "del", "2001:db8:77::3/64", "dev", this.ifs.lan2]),
        quiet(n("wan"), ["route", "del", LAN4]),
        quiet(n("wan"), ["-6", "route", "del", ROUTED6]),
      ]);
      this.lan.ip6 = "fd00:77::2";
      this.lan2.ip6 = "fd00:77::3";
    }
    await this.loadRuleset();
    await this.flushConntrack();
  }

  private async loadRuleset(): Promise<void> {
    this.gen++;
    const rules = routerRuleset(this.natType, this.ifs.rbr, this.ifs.rwan, this.gen);
    await mustRun("ip", ["netns", "exec", this.netns("rtr"), "nft", "-f", "-"], { input: rules });
  }

  private async flushConntrack(): Promise<void> {
    if (!this.conntrackTool) return;
    // conntrack -F only flushes one family (IPv4 by default).
    for (const fam of ["ipv4", "ipv6"]) {
      const r = await this.exec("rtr", [this.conntrackTool, "-F", "-f", fam]);
      if (r.code !== 0) throw new Error(`conntrack -F -f ${fam} failed: ${r.stderr.trim()}`);
    }
  }

  /**
   * "The NAT was rebooted": every mapping and connection the router knew is
   * forgotten, so packets of existing connections are dropped.
   * With the conntrack tool this is `conntrack -F` (IPv4 and IPv6); without
   * it the reloaded ruleset carries a new generation mark and drops every
   * connection stamped with an older one. The ruleset is reloaded in both
   * cases, which empties the full-cone / address-restricted maps.
   */
  async flushNat(): Promise<void> {
    await this.loadRuleset();
    await this.flushConntrack();
  }

  private killChildren(signal: NodeJS.Signals): void {
    for (const child of this.children) {
      if (child.pid !== undefined && child.exitCode === null && child.signalCode === null) {
        try {
          process.kill(child.pid, signal);
        } catch {
          // already gone
        }
      }
    }
  }

  private nsPidsSync(ns: string): number[] {
    try {
      return execFileSync("ip", ["netns", "pids", ns], {
        encoding: "utf8",
        stdio: ["ignore", "pipe", "ignore"],
        env: toolEnv(),
      })
        .split(/\s+/)
        .filter(Boolean)
        .map(Number)
        .filter((pid) => Number.isInteger(pid) && pid > 1 && pid !== process.pid);
    } catch {
      return [];
    }
  }

  /** Synchronous cleanup for process 'exit'; also the last step of destroy(). */
  destroySync(): void {
    this.destroyed = true;
    this.killChildren("SIGKILL");
    for (const ns of this.createdNs) {
      // Anything still inside our namespaces was started by this lab
      // (grandchildren of the tracked processes).
      for (const pid of this.nsPidsSync(ns)) {
        try {
          process.kill(pid, "SIGKILL");
        } catch {
          // gone
        }
      }
      try {
        execFileSync("ip", ["netns", "del", ns], { stdio: "ignore", env: toolEnv() });
      } catch {
        // already deleted
      }
    }
    this.createdNs.clear();
    liveLabs.delete(this);
  }

  /** Kills every process of the lab and deletes its namespaces; idempotent. */
  destroy(): Promise<void> {
    this.destroying ??= (async () => {
      this.destroyed = true;
      const pending = [...this.children].filter((c) => c.exitCode === null && c.signalCode === null);
      this.killChildren("SIGTERM");
      await Promise.race([
        Promise.all(pending.map((c) => new Promise((r) => c.once("exit", r)))),
        new Promise((r) => setTimeout(r, 1500).unref()),
      ]);
      this.destroySync();
    })();
    return this.destroying;
  }

  /** Human-readable summary of hosts and addresses. */
  describe(): string {
    const lines = [`NAT lab prefix=${this.prefix} nat=${this.natType} delay=${this.delayMs}ms`];
    for (const h of this.hosts()) {
      const extra = [
        h.ip4Alt ? `alt ${h.ip4Alt} ${h.ip6Alt}` : "",
        h.innerIp4 ? `inner ${h.innerIp4} ${h.innerIp6}` : "",
      ]
        .filter(Boolean)
        .join("  ");
      lines.push(`  ${h.name.padEnd(5)} ns=${h.ns.padEnd(14)} ${h.ip4.padEnd(15)} ${h.ip6.padEnd(18)} ${extra}`);
    }
    lines.push(`  lan is seen outside as ${this.publicIp4} / ${this.publicIp6}`);
    return lines.join("\n");
  }
}

/** Why the machine cannot run a lab, or undefined when it can. */
export async function labUnavailableReason(): Promise<string | undefined> {
  if (process.platform !== "linux") return "not Linux";
  if (typeof process.getuid === "function" && process.getuid() !== 0) return "not root";
  if (!findTool("ip")) return "the `ip` tool (iproute2) is missing";
  if (!findTool("nft")) return "the `nft` tool (nftables) is missing";
  const probe = `nlp${randomBytes(3).toString("hex")}`;
  const r = await run("ip", ["netns", "add", probe]);
  if (r.code !== 0) return `ip netns add fails: ${r.stderr.trim()}`;
  try {
    const t = await run("ip", ["netns", "exec", probe, "nft", "-f", "-"], {
      input: "table inet probe {\n chain c {\n type nat hook postrouting priority srcnat;\n masquerade\n }\n}\n",
    });
    if (t.code !== 0) return `nftables NAT does not work in a namespace: ${t.stderr.trim()}`;
  } finally {
    await run("ip", ["netns", "del", probe]);
  }
  return undefined;
}

export async function createLab(opts: LabOptions): Promise<Lab> {
  const prefix = opts.prefix ?? randomPrefix();
  // The longest interface name is prefix + "coord"; Linux allows 15 chars.
  if (!/^[a-z0-9][a-z0-9-]{0,9}$/.test(prefix)) {
    throw new Error(`lab prefix must be 1-10 chars of [a-z0-9-]: ${JSON.stringify(prefix)}`);
  }
  if (existsSync(`/run/netns/${prefix}rtr`)) throw new Error(`a lab with prefix ${prefix} already exists`);
  const lab = new Lab(prefix, opts.nat, Math.max(0, opts.delayMs ?? 0));
  installProcessHandlers();
  liveLabs.add(lab);
  try {
    await lab.setup();
  } catch (e) {
    await lab.destroy();
    throw e;
  }
  return lab;
}

/** Names of all network namespaces (`ip netns list`). */
export function listNamespaces(): string[] {
  return execFileSync("ip", ["netns", "list"], { encoding: "utf8", env: toolEnv() })
    .split("\n")
    .map((l) => l.trim().split(/\s+/)[0] ?? "")
    .filter(Boolean);
}

/** Removes the namespaces (and their processes) left behind by a lab. */
export function removeLeftovers(prefix: string): string[] {
  if (!/^[a-z0-9][a-z0-9-]{0,9}$/.test(prefix)) throw new Error(`bad prefix ${JSON.stringify(prefix)}`);
  const names = listNamespaces().filter((ns) => HOST_NAMES.some((h) => ns === `${prefix}${h}`));
  for (const ns of names) {
    const pids = execFileSync("ip", ["netns", "pids", ns], { encoding: "utf8", env: toolEnv() })
      .split(/\s+/)
      .filter(Boolean);
    for (const pid of pids.map(Number)) {
      if (pid > 1 && pid !== process.pid) {
        try {
          process.kill(pid, "SIGKILL");
        } catch {
          // gone
        }
      }
    }
    execFileSync("ip", ["netns", "del", ns], { env: toolEnv() });
  }
  return names;
}
