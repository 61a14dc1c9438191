// What the bench compares. Each contender starts its own processes and says
// how a client gets in (direct, HTTP proxy, SOCKS5).
//
// To add a contender, add one entry to CONTENDERS. A new natproxy tunnel path
// is one natproxyContender(name, { ...extra [local] keys }) line; if the build
// refuses a key ("unknown key"), that contender is skipped with a note.
//
// Where the processes run is a Placement: on loopback every site is
// 127.0.0.1 in this network namespace; in the --delay NAT lab the "near" site
// is the LAN host (browser, local proxy, ss-local), "far" is the coordinator
// host (coordinator, squid, ss-server) and the reporter has its own host.
import { spawnSync } from "node:child_process";
import { chmodSync, chownSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Via } from "./client.ts";
import { freePort } from "../lib/ports.ts";
import { startChild, stopChild, tcpProbe, waitForPort, withDescendants, type Child } from "./procs.ts";

export interface BenchEnv {
  /** Per-run temp dir, removed at exit. */
  tmp: string;
  root: string;
  natproxyBin: string;
  caFile: string;
  /** Key and certificate (localhost, 127.0.0.1, the lab's server addresses) in one PEM, signed by the CA. */
  combinedFile: string;
  /**
   * How a natproxy role is started; by default `natproxyBin <role> -c <file>`.
   * scripts/bench/profile.ts runs the sources under `node --cpu-prof` instead.
   */
  /** "sha256:…" of the coordinator's certificate: natproxy then trusts it by [local] fingerprint instead of [local] ca. */
  pin?: string;
  natproxyCommand?: (role: "reporter" | "coordinator" | "local", configFile: string) => { cmd: string; args: string[] };
}

export interface Site {
  /** The address processes here listen on and are reached at. */
  ip: string;
  spawn(name: string, cmd: string, args: string[]): Child;
  /** True once something accepts TCP on ip:port (seen from this site). */
  probe(ip: string, port: number): Promise<boolean>;
  port(): Promise<number>;
}

export interface Placement {
  name: string;
  /** The browser's side: local proxy, ss-local; the client runs here too. */
  near: Site;
  /** The far side: coordinator, squid, ss-server. */
  far: Site;
  reporter: Site;
  /** The address the far side sees the near side's connections come from. */
  nearSeenAs: string;
}

/** Everything on 127.0.0.1, in this process's network namespace. */
export function loopbackPlacement(): Placement {
  const site: Site = {
    ip: "127.0.0.1",
    spawn: (name, cmd, args) => startChild(name, cmd, args),
    probe: tcpProbe,
    port: () => freePort(),
  };
  return { name: "loopback", near: site, far: site, reporter: site, nearSeenAs: "127.0.0.1" };
}

export interface RunningContender {
  via: Via;
  /** The proxy's processes (with their descendants); empty for direct. */
  pids(): number[];
  /** The processes whose memory is reported (natproxy: local + coordinator, not the reporter). */
  memPids(): number[];
  children: Child[];
  notes: string[];
  stop(): Promise<void>;
}

export interface Contender {
  name: string;
  /** One line for the output: what runs. */
  describe: string;
  start(env: BenchEnv, where: Placement): Promise<RunningContender>;
}

/** Thrown by start() when the contender cannot run here; the bench goes on without it. */
export class SkipContender extends Error {}

const STARTUP_MS = 20_000;

function running(via: Via, children: Child[], notes: string[] = [], memChildren: Child[] = children): RunningContender {
  return {
    via,
    children,
    notes,
    pids: () => withDescendants(children.map((c) => c.pid)),
    memPids: () => withDescendants(memChildren.map((c) => c.pid)),
    stop: async () => {
      for (const c of [...children].reverse()) await stopChild(c);
    },
  };
}

/** Starts a process at `site` and waits until it listens on site.ip:port; stops it if it does not. */
async function startListening(site: Site, name: string, cmd: string, args: string[], port: number): Promise<Child> {
  const c = site.spawn(name, cmd, args);
  try {
    await waitForPort(port, c, STARTUP_MS, () => site.probe(site.ip, port));
  } catch (err) {
    await stopChild(c);
    throw err;
  }
  return c;
}

/** Starts the processes one after another; if one fails, the ones already up are stopped. */
async function startAll(steps: Array<() => Promise<Child>>): Promise<Child[]> {
  const up: Child[] = [];
  try {
    for (const s of steps) up.push(await s());
    return up;
  } catch (err) {
    for (const c of up.reverse()) await stopChild(c);
    throw err;
  }
}

export const direct: Contender = {
  name: "direct",
  describe: "no proxy: the client connects straight to the target",
  start: async () => running({ kind: "direct" }, []),
};

export const squid: Contender = {
  name: "squid",
  describe: "squid -N, one process, no cache, no logs",
  async start(env, where) {
    const dir = join(env.tmp, `squid-${where.name}`);
    mkdirSync(dir, { recursive: true });
    // Squid started as root drops to its effective user ("proxy" on Debian),
    // which must be able to write its pid file here.
    const uid = spawnSync("id", ["-u", "proxy"], { encoding: "utf8" });
    const gid = spawnSync("id", ["-g", "proxy"], { encoding: "utf8" });
    if (uid.status === 0 && gid.status === 0) chownSync(dir, Number(uid.stdout), Number(gid.stdout));
    else chmodSync(dir, 0o777);
    const port = await where.far.port();
    const conf = join(dir, "squid.conf");
    writeFileSync(
      conf,
      [
        `http_port ${where.far.ip}:${port}`,
        `acl bench_client src ${where.nearSeenAs}/32`,
        // Everything, CONNECT to any port included, from the bench's client only.
        "http_access allow bench_client",
        "http_access deny all",
        "cache deny all",
        "cache_mem 0 MB",
        "access_log none",
        "cache_store_log none",
        "cache_log /dev/null",
        "logfile_rotate 0",
        `pid_filename ${join(dir, "squid.pid")}`,
        `coredump_dir ${dir}`,
        "visible_hostname bench.invalid",
        // Targets are IP literals: no resolver is needed, and none elsewhere is asked.
        "dns_nameservers 127.0.0.1",
        "pinger_enable off",
        "via off",
        "forwarded_for delete",
        "shutdown_lifetime 0 seconds",
        "max_filedescriptors 8192",
        "",
      ].join("\n"),
    );
    const c = await startListening(where.far, "squid", "squid", ["-N", "-f", conf], port);
    return running({ kind: "http", host: where.far.ip, port }, [c]);
  },
};

export const shadowsocks: Contender = {
  name: "shadowsocks",
  describe: "ss-local (SOCKS5) + ss-server, chacha20-ietf-poly1305, --no-delay",
  async start(_env, where) {
    const serverPort = await where.far.port();
    const localPort = await where.near.port();
    const password = "bench-password-0123456789";
    const common = ["-k", password, "-m", "chacha20-ietf-poly1305", "--no-delay", "-n", "8192", "-t", "600"];
    const children = await startAll([
      () => startListening(where.far, "ss-server", "ss-server", ["-s", where.far.ip, "-p", String(serverPort), "-d", "127.0.0.1", ...common], serverPort),
      () => startListening(where.near, "ss-local", "ss-local", ["-s", where.far.ip, "-p", String(serverPort), "-b", where.near.ip, "-l", String(localPort), ...common], localPort),
    ]);
    return running({ kind: "socks5", host: where.near.ip, port: localPort }, children);
  },
};

const TOKEN = "bench-token-0123456789abcdef";
type TomlValue = string | number | boolean | string[];

function toml(sections: Record<string, Record<string, TomlValue>>, top: Record<string, TomlValue> = {}): string {
  const value = (v: TomlValue): string => (Array.isArray(v) ? `[${v.map((x) => JSON.stringify(x)).join(", ")}]` : typeof v === "string" ? JSON.stringify(v) : String(v));
  const lines = Object.entries(top).map(([k, v]) => `${k} = ${value(v)}`);
  for (const [name, kv] of Object.entries(sections)) {
    lines.push("", `[${name}]`, ...Object.entries(kv).map(([k, v]) => `${k} = ${value(v)}`));
  }
  return `${lines.join("\n")}\n`;
}

/**
 * natproxy as a user runs it: coordinator and local proxy (and, on the
 * connect-back path, the reporter), each a process of dist/natproxy with its
 * own config file. `path` is written as [local] tunnel; `extraLocal` is added
 * to [local]. log_level "warn": no line per session, as squid and ss run
 * without access logs. `extraCoordinator` is added to [coordinator] (e.g. the
 * session limits scripts/bench/scale.ts raises).
 */
export function natproxyContender(
  name: string,
  path: "connect-back" | "outbound",
  extraLocal: Record<string, TomlValue> = {},
  describe?: string,
  extraCoordinator: Record<string, TomlValue> = {},
): Contender {
  const local: Record<string, TomlValue> = { tunnel: path, ...extraLocal };
  const kv = (o: Record<string, TomlValue>): string => Object.entries(o).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(" ");
  const extras = kv(local);
  const coordinatorExtras = kv(extraCoordinator);
  // The outbound path never asks the reporter (the local proxy dials the
  // coordinator's HTTPS port itself), so no reporter runs for it.
  const withReporter = path !== "outbound";
  return {
    name,
    describe: describe ?? `dist/natproxy ${withReporter ? "reporter + " : ""}coordinator + local, [local] ${extras}${coordinatorExtras ? `, [coordinator] ${coordinatorExtras}` : ""}`,
    async start(env, where) {
      const dir = join(env.tmp, `${name}-${where.name}`);
      mkdirSync(dir, { recursive: true });
      const reporterPort = await where.reporter.port();
      const coordinatorPort = await where.far.port();
      const localPort = await where.near.port();
      const top = { log_level: "warn" };
      const files = {
        reporter: join(dir, "reporter.toml"),
        coordinator: join(dir, "coordinator.toml"),
        local: join(dir, "local.toml"),
      };
      writeFileSync(files.reporter, toml({ reporter: { listen: `${where.reporter.ip}:${reporterPort}` } }, top));
      // The coordinator refuses loopback targets and connect-backs to loopback
      // by default (SSRF guard); the bench's target and local proxy are on
      // 127.0.0.1 (in the NAT lab on documentation addresses, which are
      // allowed anyway).
      writeFileSync(
        files.coordinator,
        toml({ coordinator: { listen: `${where.far.ip}:${coordinatorPort}`, cert: env.combinedFile, tokens: [TOKEN], allow_targets: ["127.0.0.1"], allow_connect_back: ["127.0.0.1"], ...extraCoordinator } }, top),
      );
      writeFileSync(
        files.local,
        toml(
          {
            local: {
              listen: `${where.near.ip}:${localPort}`,
              coordinator: `https://${where.far.ip}:${coordinatorPort}`,
              token: TOKEN,
              reporter: `${where.reporter.ip}:${reporterPort}`,
              ...(env.pin ? { fingerprint: env.pin } : { ca: env.caFile }),
              reporter_retries: 0,
              ...local,
            },
          },
          top,
        ),
      );
      const role = (r: "reporter" | "coordinator" | "local", site: Site, port: number) => async () => {
        const how = env.natproxyCommand?.(r, files[r]) ?? { cmd: env.natproxyBin, args: [r, "-c", files[r]] };
        const c = site.spawn(`${name} ${r}`, how.cmd, how.args);
        try {
          await waitForPort(port, c, STARTUP_MS, () => site.probe(site.ip, port));
        } catch (err) {
          const text = c.log();
          await stopChild(c);
          // A config key this build does not know: a tunnel path not implemented yet.
          const refused = /unknown key/i.test(text) && [...Object.keys(local), ...Object.keys(extraCoordinator)].some((k) => text.includes(`"${k}"`));
          if (refused) throw new SkipContender(`this build refuses [local] ${extras}${coordinatorExtras ? ` or [coordinator] ${coordinatorExtras}` : ""}: ${text.trim().split("\n").slice(-2).join(" ").replace(/\s+/g, " ")}`);
          throw err;
        }
        return c;
      };
      const children = await startAll([
        ...(withReporter ? [role("reporter", where.reporter, reporterPort)] : []),
        role("coordinator", where.far, coordinatorPort),
        role("local", where.near, localPort),
      ]);
      // Memory is judged on local + coordinator (the reporter is a separate, idle service).
      const memChildren = children.filter((c) => !c.name.endsWith(" reporter"));
      return running({ kind: "http", host: where.near.ip, port: localPort }, children, [`natproxy log_level "warn"`, env.pin ? "trusts the coordinator by [local] fingerprint (--pin)" : "trusts the coordinator by [local] ca"], memChildren);
    },
  };
}

/** The contenders, in this order in the output. One entry per contender. */
export const CONTENDERS: Contender[] = [
  direct,
  squid,
  shadowsocks,
  natproxyContender("natproxy-connect-back", "connect-back"),
  natproxyContender("natproxy-outbound", "outbound"),
];
